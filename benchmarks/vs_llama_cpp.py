"""exo against llama.cpp on this machine: same weights, same prompts, same client. Not a test.

    python3 benchmarks/vs_llama_cpp.py MODEL_DIR [--quants q4,q8] [--engines onnxruntime,ggml]
                                       [--llama-cpp DIR] [--gguf-q4 FILE] [--gguf-q8 FILE] [--rounds N]

MODEL_DIR is a Hugging Face folder (`exo models synth --shape tinyllama-1.1b --dtype float16
--out DIR` makes one). The script writes that model as Q4_0 and Q8_0 GGUF files with the `gguf`
package (tests/gguf_writer.py, the project's own writer; cached under --work), unless files are
given, so both programs read the same weights. It needs llama.cpp's `llama-bench` and
`llama-server` on PATH or in --llama-cpp DIR; docs/performance.md says how to build them from
the llama-cpp-python source package without a download at run time.

Rows, for each quant, one after the other on this machine:
- decode and prefill of one stream: `llama-bench -p 128 -n 64`, then `-p 0 -n 64 -d 128`,
  against `exo bench` (one node). exo bench decodes after its 128-token prompt, so llama.cpp's
  decode is its tg64 at depth 128 (the same positions, 128 to 191); its tg64 from an empty
  cache, which attends over fewer positions, is kept beside it in the JSON ("decode_empty");
- one request over HTTP, 128 tokens from a one-sentence prompt, end to end: `llama-server`
  against `exo`;
- 8 concurrent requests over HTTP, aggregate tokens per second (`llama-server -np 8`);
- peak RSS: llama-bench's process against exo bench's node, each holding the whole model.

With --rounds N the whole sequence of a quant runs N times, llama.cpp and exo taking turns, and
each figure is the median of its N: a shared VM's neighbours slow a minute here and there by a
fifth, which would otherwise fall on one side only. Below the table it then prints each engine's
ratio to llama.cpp round by round, and their median.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from appliance.bench import bench, peak_rss_mb  # noqa: E402

GGUF_TYPES = {"q4": "Q4_0", "q8": "Q8_0"}
PROMPT = "The old lighthouse keeper climbed the stairs every evening to light the lamp."   # ~16 tokens
HTTP_TOKENS = 128
PROMPT_TOKENS, GEN_TOKENS = 128, 64   # one stream, both sides
STREAMS = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_tool(name: str, directory: str | None) -> str:
    path = shutil.which(name, path=directory) if directory else shutil.which(name)
    if not path:
        sys.exit(f"{name} not found {'in ' + directory if directory else 'on PATH'}: see docs/performance.md")
    return path


def model_gguf(model_dir: Path, quant: str, work: Path) -> Path:
    """The model as a GGUF file of `quant`, written once and kept under `work`."""
    from tests.gguf_writer import write_gguf

    stamp = "".join(f"{p.name}{p.stat().st_size}{p.stat().st_mtime_ns}" for p in sorted(model_dir.iterdir()))
    key = hashlib.sha256(f"{model_dir.resolve()}{stamp}".encode()).hexdigest()[:16]
    path = work / f"{model_dir.name}-{key}-{GGUF_TYPES[quant]}.gguf"
    if not path.exists():
        print(f"writing {path} ...", flush=True)
        partial = path.with_suffix(".part")
        write_gguf(model_dir, partial, GGUF_TYPES[quant])
        partial.rename(path)
    return path


def run_measuring_peak(command: list[str]) -> tuple[str, float]:
    """Run a command to its end; its stdout and its peak RSS in MB: the high-water mark of its own
    memory (VmHWM, as exo bench reads its nodes'), read until it exits. Not the kernel's maxrss of
    a child, which starts from this process's own: a fork begins with the parent's pages, so after
    this process had loaded an engine, llama-bench's peak read 3,035 MB instead of 1,169."""
    with tempfile.TemporaryFile() as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.DEVNULL)
        peak = 0.0
        while process.poll() is None:   # the high-water mark only grows: the last reading is the peak
            peak = max(peak, peak_rss_mb(process.pid))
            time.sleep(0.05)
        out.seek(0)
        text = out.read().decode()
    if process.returncode == -signal.SIGILL:
        raise RuntimeError(f"{command[0]} died of an illegal instruction: on an Intel CPU with AMX, a build by "
                           "gcc 12 runs ggml's AMX kernels without their tile shapes; build llama.cpp with clang, "
                           "or without AMX (docs/performance.md, \"An Intel VM with AMX\")")
    if process.returncode:
        raise RuntimeError(f"{command[0]} failed ({process.returncode})")
    return text, peak


def llama_bench(tool: str, gguf: Path, threads: int) -> dict:
    """Prefill and decode from an empty cache (the peak RSS is this run's), then decode again
    after a prompt as long as exo bench's: a decode step attends over every position before it,
    so decoding from an empty cache is the easier task."""
    def run(*test: str) -> tuple[list[dict], float]:
        text, peak = run_measuring_peak([tool, "-m", str(gguf), *test, "-r", "3", "-t", str(threads), "-o", "json"])
        return json.loads(text), peak

    rows, peak = run("-p", str(PROMPT_TOKENS), "-n", str(GEN_TOKENS))
    [after_prompt], _ = run("-p", "0", "-n", str(GEN_TOKENS), "-d", str(PROMPT_TOKENS))
    return {"decode": after_prompt["avg_ts"],
            "decode_empty": next(r["avg_ts"] for r in rows if r["n_gen"] and not r["n_prompt"]),
            "prefill": next(r["avg_ts"] for r in rows if r["n_prompt"] and not r["n_gen"]), "peak_mb": peak}


def exo_bench(model_dir: Path, engine: str, quant: str, repeat: int) -> dict:
    [r] = bench(model_dir, [engine], [quant], [1], [1], PROMPT_TOKENS, GEN_TOKENS, repeat=repeat, report=lambda r: None)
    return {"decode": r.decode_tok_s_per_stream, "prefill": r.prefill_tok_s, "peak_mb": r.peak_rss_mb[0]}


class Server:
    """A server process answering the OpenAI completions API on 127.0.0.1:port."""

    def __init__(self, command: list[str], port: int, ready_path: str, env: dict | None = None):
        self.port, self.ready_path = port, ready_path
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{self.ready_path}", timeout=5) as r:
                    body = r.read()
                    if r.status == 200 and b'"ready": false' not in body and b'"ready":false' not in body:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError("server not ready")

    def stop(self) -> None:
        os.killpg(self.process.pid, 15)
        self.process.wait(30)


def http_rates(port: int) -> dict:
    """One request alone, then STREAMS at once; generated tokens per second of wall time."""
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
    model = client.models.list().data[0].id

    def one(i: int) -> int:
        stream = client.completions.create(model=model, prompt=f"{i}. {PROMPT}", max_tokens=HTTP_TOKENS,
                                           temperature=0, stream=True)
        return sum(1 for chunk in stream if chunk.choices and chunk.choices[0].text)

    one(0)   # warm-up
    start = time.perf_counter()
    single = one(1) / (time.perf_counter() - start)
    counts = [0] * STREAMS
    threads = [threading.Thread(target=lambda i=i: counts.__setitem__(i, one(100 + i))) for i in range(STREAMS)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"http_one": single, "http_many": sum(counts) / (time.perf_counter() - start)}


def llama_server_rates(tool: str, gguf: Path, threads: int) -> dict:
    port = free_port()
    server = Server([tool, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-np", str(STREAMS),
                     "-c", str(STREAMS * 1024), "-t", str(threads)], port, "/health")
    try:
        server.wait_ready()
        return http_rates(port)
    finally:
        server.stop()


def exo_server_rates(model_dir: Path, engine: str, quant: str) -> dict:
    port, state = free_port(), tempfile.mkdtemp(prefix="exo-vs-")
    env = dict(os.environ, EXO_HOST="127.0.0.1", EXO_STATE_DIR=state)
    server = Server([sys.executable, "-m", "appliance", "--open", "--host", "127.0.0.1", "--port", str(port),
                     "--model", str(model_dir), "--engine", engine, "--quant", quant,
                     "--max-requests", str(STREAMS), "--max-context", "1024", "--log-level", "WARNING"],
                    port, "/healthz", env)
    try:
        server.wait_ready()
        return http_rates(port)
    finally:
        server.stop()
        shutil.rmtree(state, ignore_errors=True)


ROWS = [(f"decode, one stream, after {PROMPT_TOKENS} tokens (tok/s)", "decode"),
        (f"prefill {PROMPT_TOKENS} tokens (tok/s)", "prefill"),
        (f"one request, {HTTP_TOKENS} tokens over HTTP (tok/s)", "http_one"),
        (f"{STREAMS} concurrent requests, aggregate (tok/s)", "http_many"), ("peak RSS, one node (MB)", "peak_mb")]


def table(results: dict) -> str:
    """results: quant -> (llama.cpp's figures, {exo engine: its figures})."""
    engines = list(next(iter(results.values()))[1])
    head = ["", "quant", "llama.cpp"] + [f"exo {e}" for e in engines] + [f"{e} / llama.cpp" for e in engines]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, key in ROWS:
        for quant, (theirs, ours) in results.items():
            if key not in theirs or not all(key in ours[e] for e in engines):
                continue
            cells = [label, quant, f"{theirs[key]:.1f}"] + [f"{ours[e][key]:.1f}" for e in engines]
            cells += [f"{ours[e][key] / theirs[key]:.2f}×" for e in engines]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired(all_rounds: dict) -> str:
    """Each engine's ratio to llama.cpp round by round, and their median: a round's two sides ran
    minutes apart, the table's medians up to a quarter of an hour, on a VM whose neighbours come and go."""
    lines = []
    for quant, rounds in all_rounds.items():
        for engine in rounds[0][1]:
            for label, key in ROWS:
                ratios = [ours[engine][key] / theirs[key] for theirs, ours in rounds
                          if key in theirs and key in ours[engine]]
                if ratios:
                    each = " ".join(f"{r:.2f}" for r in ratios)
                    median = statistics.median(ratios)
                    lines.append(f"{engine} / llama.cpp, {quant}, {label}: {each} (median {median:.2f}×)")
    return "\n".join(lines)


def measure_round(args, tools: dict, gguf: Path, quant: str, n: int) -> tuple[dict, dict]:
    """llama.cpp's figures, then each exo engine's, for one quant."""
    label = f"{quant}, round {n + 1} of {args.rounds}"
    print(f"{label}: llama-bench ...", flush=True)
    theirs = llama_bench(tools["llama-bench"], gguf, args.threads)
    if not args.no_http:
        print(f"{label}: llama-server ...", flush=True)
        theirs |= llama_server_rates(tools["llama-server"], gguf, args.threads)
    ours = {}
    for engine in [e for e in args.engines.split(",") if e]:
        print(f"{label}: exo bench, {engine} ...", flush=True)
        ours[engine] = exo_bench(args.model, engine, quant, repeat=3 if args.rounds == 1 else 1)
        if not args.no_http:
            print(f"{label}: exo, {engine} ...", flush=True)
            ours[engine] |= exo_server_rates(args.model, engine, quant)
    print(json.dumps({"round": n + 1, quant: {"llama.cpp": theirs, "exo": ours}}), flush=True)
    return theirs, ours


def medians(figures: list[dict]) -> dict:
    return {key: statistics.median(f[key] for f in figures) for key in figures[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path, help="a Hugging Face model folder")
    parser.add_argument("--quants", default="q4,q8")
    parser.add_argument("--engines", default="onnxruntime", help="exo's engines, comma-separated")
    parser.add_argument("--llama-cpp", help="folder holding llama-bench and llama-server (default: PATH)")
    parser.add_argument("--gguf-q4", type=Path, help="use this Q4_0 GGUF of the model instead of writing one")
    parser.add_argument("--gguf-q8", type=Path, help="use this Q8_0 GGUF of the model instead of writing one")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp's threads")
    parser.add_argument("--work", type=Path, default=Path("~/.cache/exo/vs-llama-cpp").expanduser())
    parser.add_argument("--no-http", action="store_true", help="only llama-bench against exo bench")
    parser.add_argument("--rounds", type=int, default=1, help="run everything N times in turn, report medians")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    tools = {name: find_tool(name, args.llama_cpp) for name in ("llama-bench", "llama-server")}
    results, all_rounds = {}, {}
    for quant in [q for q in args.quants.split(",") if q]:
        gguf = getattr(args, f"gguf_{quant}") or model_gguf(args.model, quant, args.work)
        rounds = [measure_round(args, tools, gguf, quant, n) for n in range(args.rounds)]
        all_rounds[quant] = rounds
        theirs = medians([t for t, _ in rounds])
        ours = {engine: medians([o[engine] for _, o in rounds]) for engine in rounds[0][1]}
        results[quant] = (theirs, ours)
        print(json.dumps({quant: {"llama.cpp": theirs, "exo": ours}}), flush=True)
    print(table(results))
    if args.rounds > 1:
        print(paired(all_rounds))


if __name__ == "__main__":
    main()
