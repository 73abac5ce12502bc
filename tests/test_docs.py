"""The docs are tested: their shell commands, Mermaid diagrams, relative links, error messages
and the Requests for Work list.

Shell commands are the lines of blocks fenced as ```sh in README.md and docs/*.md. An HTML
comment on the line before the fence says what the test does with the block:

    <!-- doc-test: run -->           run the block for real (bash -e, repo root, 60 s at most)
    <!-- doc-test: serve -->         start the one command, wait until /healthz is ready, stop it
    <!-- doc-test: help -->         run each command's leading words with --help
    <!-- doc-test: skip REASON -->   do not run it (a reason is required)
    (no comment)                     the command's program must be installed here, else skipped

Whatever the marker, every `exo ...` command's arguments are parsed by exo's own parser, so a
flag the code does not have fails the test.

Mermaid blocks get a structural check always, and a real parse with the Mermaid CLI (`mmdc`)
when it is installed: $EXO_MMDC, or /var/cache/exo-docs/node_modules/.bin/mmdc, or `mmdc` on
PATH, with Debian's chromium.
"""
from __future__ import annotations

import csv
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import system
from tests.system import needs

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").glob("*.md"))]
RFW = REPO / "docs" / "todo" / "exo-needs.csv"
RFW_COLUMNS = ["id", "title", "area", "size", "status", "issue", "owner", "pr"]
RFW_STATUS = {"open", "claimed", "done"}
TEST_COMMAND = "python3 -m pytest -q tests"
MARKER = re.compile(r"<!--\s*doc-test:\s*(run|serve|help|skip)\b\s*(.*?)\s*-->")
FENCE = re.compile(r"^(\s*)```+\s*([\w+-]*)")
DIAGRAM_TYPES = ("graph", "flowchart", "sequenceDiagram", "classDiagram", "stateDiagram", "stateDiagram-v2",
                 "erDiagram", "gantt", "pie", "journey", "gitGraph", "mindmap", "timeline", "block-beta")
MMDC_DEFAULT = Path("/var/cache/exo-docs/node_modules/.bin/mmdc")


@dataclass
class Block:
    doc: Path
    line: int           # 1-based line of the opening fence
    lang: str
    text: str
    marker: str         # run | serve | help | skip | "" (default)
    reason: str

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(REPO)}:{self.line}"


def blocks(doc: Path) -> list[Block]:
    found, lines, i = [], doc.read_text().splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang, body = i, m.group(2), []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith("```"):
            body.append(lines[i])
            i += 1
        prev = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        mark = MARKER.search(prev)
        found.append(Block(doc, start + 1, lang, "\n".join(body), mark.group(1) if mark else "",
                           mark.group(2) if mark else ""))
        i += 1
    return found


def commands(text: str) -> list[str]:
    """The command lines of a shell block: comments dropped, backslash continuations joined."""
    out, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        out.append(current + line)
        current = ""
    return out


def program_words(command: str) -> list[str]:
    """The command's program (after sudo and VAR=value) and the plain words that follow it,
    up to the first option, path or placeholder: `exo node --broker X` -> ['exo', 'node']."""
    words = shlex.split(command)
    while words and (words[0] == "sudo" or words[0].startswith("-") or re.match(r"^[A-Z_][A-Z0-9_]*=", words[0])):
        words = words[1:]
    lead = words[:1]
    if words[:1] in (["python3"], ["python"]) and words[1:2] == ["-m"]:
        lead, words = words[:3], words[2:]
    for w in words[1:]:
        if not re.fullmatch(r"[a-z][a-z0-9-]*", w):
            break
        lead.append(w)
    return lead


def sh_blocks() -> list[Block]:
    return [b for doc in DOCS for b in blocks(doc) if b.lang in ("sh", "bash", "shell")]


def env() -> dict:
    """Commands run against this checkout (not another one pip may have installed), with an
    empty config (never the machine's /etc/exo/config.yaml), a state dir of their own, and a
    free port on loopback (so `exo` runs a private broker and looks for no other on the network)."""
    folder = Path(tempfile.mkdtemp(prefix="exo-doc-test-"))
    (folder / "config.yaml").write_text("{}\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "EXO_CONFIG": str(folder / "config.yaml"), "EXO_STATE_DIR": str(folder / "state"),
            "EXO_HOST": "127.0.0.1", "EXO_PORT": str(free_port())}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exo_parser():
    sys.path.insert(0, str(REPO))
    from appliance.cli import parser
    return parser()


# -- shell commands
SH = sh_blocks()


def test_docs_have_shell_commands_and_the_readme_test_command():
    assert SH, "no ```sh blocks found"
    readme = [c for b in blocks(REPO / "README.md") if b.lang == "sh" for c in commands(b.text)]
    assert TEST_COMMAND in readme, f"README.md must give the test command `{TEST_COMMAND}` in a ```sh block"
    assert "pip install -e ." in readme and any(c.split()[0] == "exo" for c in readme)


@pytest.mark.parametrize("block", [b for b in SH if b.marker == "skip"], ids=lambda b: b.where)
def test_skipped_blocks_say_why(block):
    assert block.reason, f"{block.where}: `doc-test: skip` needs a reason"


@pytest.mark.parametrize("command", [(b, c) for b in SH for c in commands(b.text) if program_words(c)[:1] == ["exo"]],
                         ids=lambda bc: f"{bc[0].where} {bc[1]}")
def test_exo_commands_parse(command):
    block, line = command
    words = shlex.split(line)
    words = words[words.index("exo") + 1:]
    try:
        exo_parser().parse_args(words)
    except SystemExit as e:
        if e.code:
            pytest.fail(f"{block.where}: exo's parser rejects `{line}`")


@pytest.mark.parametrize("block", [b for b in SH if b.marker == "run"], ids=lambda b: b.where)
def test_run_blocks(block):
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", block.text], cwd=REPO, env=env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{block.where} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"


@pytest.mark.parametrize("block", [b for b in SH if b.marker == "serve"], ids=lambda b: b.where)
def test_serve_blocks(block):
    (line,) = commands(block.text)
    environment = env()
    port = environment["EXO_PORT"]
    process = subprocess.Popen(shlex.split(line), cwd=REPO, env=environment, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, health = time.monotonic() + 40, None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    health = json.load(r)
            except urllib.error.HTTPError as e:   # 503 until the cluster can answer, saying why
                health = json.load(e)
            except OSError:
                pass
            if health and (health.get("ready") or "--model" not in line):
                break
            time.sleep(0.2)  # polling a server coming up: there is no event to wait on
        assert health is not None, f"{block.where}: `{line}` never answered /healthz"
        if "--model" in line:
            assert health["ready"], f"{block.where}: `{line}` did not get ready: {health}"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@pytest.mark.parametrize("command", [(b, c) for b in SH if b.marker == "help" for c in commands(b.text)],
                         ids=lambda bc: f"{bc[0].where} {bc[1]}")
def test_help_blocks(command):
    block, line = command
    words = program_words(line)
    if words[0] in ("cd", ".", "source"):
        return
    if words[0] in ("pip", "pip3"):
        words = [sys.executable, "-m", "pip", *words[1:]]
    if words[0] in ("python3", "python"):
        words[0] = sys.executable
    if shutil.which(words[0]) is None:
        pytest.skip(f"{words[0]} is not installed here")
    result = subprocess.run([*words, "--help"], cwd=REPO, env=env(), capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"{block.where}: `{' '.join(words)} --help` failed:\n{result.stderr}"


@pytest.mark.parametrize("command", [(b, c) for b in SH if b.marker == "" for c in commands(b.text)],
                         ids=lambda bc: f"{bc[0].where} {bc[1]}")
def test_default_blocks_name_an_installed_program(command):
    block, line = command
    program = program_words(line)[0]
    if program in ("cd", "export", "source", "."):
        return
    if "/" in program:
        assert (REPO / program).exists() or Path(program).expanduser().exists(), f"{block.where}: no {program}"
    elif shutil.which(program) is None:
        pytest.skip(f"{block.where}: {program} is not installed here")


# -- Mermaid
MERMAID = [b for doc in DOCS for b in blocks(doc) if b.lang == "mermaid"]


def test_architecture_has_the_diagrams():
    names = [b.text for b in MERMAID if b.doc.name == "architecture.md"]
    assert len(names) >= 4, "docs/architecture.md needs at least four Mermaid diagrams"


SEQUENCE_LINE = re.compile(r"^(participant|actor)\s|^(loop|alt|else|opt|par|and|rect|critical|break|end)\b|"
                           r"^Note (left of|right of|over) |^(activate|deactivate|autonumber)\b|"
                           r"^[\w ]+?\s*(->>|-->>|->|-->|-x|--x|-\)|--\))\s*[+-]?[\w ]+?:")
BLOCK_OPEN = re.compile(r"^(loop|alt|opt|par|rect|critical|break|subgraph)\b")


@pytest.mark.parametrize("block", MERMAID, ids=lambda b: b.where)
def test_mermaid_structure(block):
    lines = [l.strip() for l in block.text.splitlines() if l.strip() and not l.strip().startswith("%%")]
    assert lines, f"{block.where}: empty diagram"
    assert "\t" not in block.text, f"{block.where}: tabs"
    kind, body = lines[0].split()[0], lines[1:]
    assert kind in DIAGRAM_TYPES, f"{block.where}: unknown diagram type {lines[0]!r}"
    opened = sum(1 for l in body if BLOCK_OPEN.match(l))
    assert opened == sum(1 for l in body if l == "end"), f"{block.where}: blocks and `end`s do not pair"
    if kind == "sequenceDiagram":
        odd = [l for l in body if not SEQUENCE_LINE.match(l)]
        assert not odd, f"{block.where}: not a sequence diagram line: {odd}"
        assert any("->" in l or "-x" in l for l in body), f"{block.where}: a sequence with no messages"
    elif kind in ("graph", "flowchart"):
        text = re.sub(r'"[^"\n]*"', '""', "\n".join(body))   # brackets inside quoted labels do not count
        for pair in ("()", "[]", "{}"):
            assert text.count(pair[0]) == text.count(pair[1]), f"{block.where}: unbalanced {pair}"


def mmdc() -> str | None:
    for candidate in (os.environ.get("EXO_MMDC"), str(MMDC_DEFAULT), shutil.which("mmdc")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


@needs("chromium")
@pytest.mark.parametrize("doc", sorted({b.doc for b in MERMAID}), ids=lambda d: str(d.relative_to(REPO)))
def test_mermaid_parses_with_the_mermaid_cli(doc, tmp_path):
    tool, chromium = mmdc(), system.chromium()
    if not tool:
        pytest.skip("the Mermaid CLI is not installed (see CONTRIBUTING.md, 'Testing the docs'); "
                    "the structural check still ran")
    config = tmp_path / "puppeteer.json"
    config.write_text(json.dumps({"executablePath": chromium, "args": [
        "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]}))
    # Given a Markdown file, mmdc renders each of its mermaid blocks: one browser for all of them.
    result = subprocess.run([tool, "-q", "-p", str(config), "-i", str(doc), "-o", str(tmp_path / doc.name)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{doc.relative_to(REPO)}: mmdc failed:\n{result.stderr[-3000:]}"
    svgs = list(tmp_path.glob("*.svg"))
    assert len(svgs) == len([b for b in MERMAID if b.doc == doc])


# -- links
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    inside, found = False, set()
    for line in doc.read_text().splitlines():
        if line.strip().startswith("```"):
            inside = not inside
        elif not inside and line.startswith("#"):
            found.add(slug(line.lstrip("#")))
    return found


def links() -> list[tuple[Path, str]]:
    out = []
    for doc in DOCS:
        text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)   # no links inside code
        out += [(doc, target) for target in LINK.findall(text)]
    return out


@pytest.mark.parametrize("link", [l for l in links() if not re.match(r"^[a-z]+:", l[1])],
                         ids=lambda l: f"{l[0].relative_to(REPO)} {l[1]}")
def test_relative_links_resolve(link):
    doc, target = link
    path, _, anchor = target.partition("#")
    file = (doc.parent / path).resolve() if path else doc
    assert file.exists(), f"{doc.relative_to(REPO)}: link {target} points at nothing"
    if anchor and file.suffix == ".md":
        assert anchor in anchors(file), f"{doc.relative_to(REPO)}: no heading #{anchor} in {path or doc.name}"


# -- what the docs quote from the code
QUOTED = re.compile(r"<!--\s*doc-test:\s*printed\s*-->\s*\n```text\n(.*?)```", re.S)


def test_quoted_error_messages_are_printed_by_the_code():
    """Blocks marked `<!-- doc-test: printed -->` quote what the code prints; `…` stands for the
    parts that vary. Each fixed part must be in appliance/'s source."""
    source = "\n".join(p.read_text() for p in (REPO / "appliance").rglob("*.py"))
    source = re.sub(r'"\s*\n\s*[rbf]*"', "", source)     # join implicitly concatenated literals
    quoted = [line for doc in DOCS for block in QUOTED.findall(doc.read_text()) for line in block.splitlines()
              if line.strip()]
    assert quoted, "docs/install.md's troubleshooting quotes no messages"
    def printed(part: str) -> bool:      # the CLI prints "exo: " before an error's message
        return part in source or (part.startswith("exo: ") and part[5:] in source)

    missing = [line for line in quoted
               if not all(printed(part.strip()) for part in line.split("…") if len(part.strip()) >= 6)]
    assert not missing, "quoted but not in the code:\n" + "\n".join(missing)


# -- Requests for Work
def test_rfw_list_parses_with_its_columns():
    with RFW.open(newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == RFW_COLUMNS
        rows = list(reader)
    assert len([r for r in rows if r["status"] == "open"]) >= 12
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "RFW ids must be unique"
    for r in rows:
        assert re.fullmatch(r"RFW-\d{3}", r["id"]), r["id"]
        assert r["title"] and r["area"] and r["size"] in ("S", "M", "L"), r
        assert r["status"] in RFW_STATUS, r
        assert not r["issue"] or re.fullmatch(r"\d+", r["issue"]), r
        assert not r["pr"] or re.fullmatch(r"\d+", r["pr"]), r
