"""A local stand-in for the Hugging Face Hub: serves model folders the way the hub's HTTP API does,
for huggingface_hub's `hf_hub_download` (and `snapshot_download`).

    HEAD/GET /{repo}/resolve/{revision}/{filename}     ETag, X-Repo-Commit, Content-Length, Range (a-, a-b)
    GET      /api/models/{repo}/revision/{revision}    {"id", "sha", "siblings"}
    GET      /api/models/{repo}/tree/{revision}        [{"type": "file", "path", "size", "oid"}]

It records every request, can demand a token, and can drop a file's connection half way once.
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"
RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<kind>revision|tree)/(?P<rev>[^/?]+)")


@dataclass
class Seen:
    method: str
    path: str
    range: str | None
    auth: str | None


@dataclass
class FakeHub:
    repos: dict[str, Path]                      # repo id -> model folder
    token: str | None = None                    # when set, requests must carry "Bearer <token>"
    drop_once: set[str] = field(default_factory=set)   # file names whose next GET breaks half way
    chunk_delay: float = 0.0                    # seconds between 64 KB chunks of a file: a slow line
    fail_status: int | None = None              # when set, every request gets this error status
    seen: list[Seen] = field(default_factory=list)

    def start(self) -> "FakeHub":
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub.handle(self, body=False)

            def do_GET(self):
                hub.handle(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def files_got(self, repo: str) -> set[str]:
        """Files whose bytes were asked for (GET), by name."""
        prefix = f"/{repo}/resolve/"
        return {s.path.split("/", 5)[-1] for s in self.seen if s.method == "GET" and s.path.startswith(prefix)}

    # -- serving
    def handle(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        self.seen.append(Seen(h.command, h.path, h.headers.get("Range"), h.headers.get("Authorization")))
        if self.fail_status:
            return self.error(h, self.fail_status, "ServerError", "the hub is broken")
        if self.token and h.headers.get("Authorization") != f"Bearer {self.token}":
            return self.error(h, 401, "RepoNotFound", "Invalid credentials")
        if m := RESOLVE.match(h.path):
            return self.resolve(h, m["repo"], m["file"], body)
        if m := API.match(h.path):
            return self.api(h, m["repo"], m["kind"])
        self.error(h, 404, "RepoNotFound", "not found")

    def error(self, h, status: int, code: str, message: str) -> None:
        data = json.dumps({"error": message}).encode()
        h.send_response(status)
        h.send_header("X-Error-Code", code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)

    def api(self, h, repo: str, kind: str) -> None:
        folder = self.repos.get(repo)
        if folder is None:
            return self.error(h, 404, "RepoNotFound", f"no repo {repo}")
        files = sorted(p for p in folder.iterdir() if p.is_file())
        if kind == "revision":
            data = {"id": repo, "modelId": repo, "sha": COMMIT, "private": False,
                    "siblings": [{"rfilename": p.name} for p in files]}
        else:
            data = [{"type": "file", "path": p.name, "size": p.stat().st_size, "oid": _etag(p)} for p in files]
        raw = json.dumps(data).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(raw)))
        h.end_headers()
        h.wfile.write(raw)

    def resolve(self, h, repo: str, name: str, body: bool) -> None:
        folder = self.repos.get(repo)
        if folder is None:
            return self.error(h, 404, "RepoNotFound", f"no repo {repo}")
        path = folder / name
        if not path.is_file():
            return self.error(h, 404, "EntryNotFound", f"{name} is not in {repo}")
        data = path.read_bytes()
        asked = re.match(r"bytes=(\d+)-(\d*)", h.headers.get("Range") or "bytes=0-")
        start, end = int(asked.group(1)), int(asked.group(2) or len(data) - 1) + 1   # end: exclusive
        h.send_response(206 if h.headers.get("Range") else 200)
        h.send_header("ETag", f'"{_etag(path)}"')
        h.send_header("X-Repo-Commit", COMMIT)
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("Content-Length", str(end - start))
        if h.headers.get("Range"):
            h.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        h.end_headers()
        if not body:
            return
        if name in self.drop_once:
            self.drop_once.discard(name)
            h.wfile.write(data[start:start + (end - start) // 2])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(2)       # the connection drops half way through what was asked
            return
        for i in range(start, end, 1 << 16):
            h.wfile.write(data[i:min(i + (1 << 16), end)])
            if self.chunk_delay:
                h.wfile.flush()
                time.sleep(self.chunk_delay)   # the line's speed, not a wait for an event


def _etag(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sharded_stories(src: Path, dst: Path) -> dict[str, list[str]]:
    """stories260K re-saved as a sharded checkpoint: the embedding, each layer and the final norm
    in a file of their own, with an index. Returns file name -> tensor names."""
    from safetensors.numpy import load_file, save_file
    import shutil

    dst.mkdir(parents=True, exist_ok=True)
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, dst / f)
    tensors = load_file(src / "model.safetensors")
    layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    groups = {"model.embed_tokens.": [], "model.norm.": []} | {f"model.layers.{i}.": [] for i in range(layers)}
    for name in tensors:
        prefix = next(p for p in groups if name.startswith(p))
        groups[prefix].append(name)
    order = ["model.embed_tokens."] + [f"model.layers.{i}." for i in range(layers)] + ["model.norm."]
    files, weight_map = {}, {}
    for i, prefix in enumerate(order):
        file = f"model-{i + 1:05d}-of-{len(order):05d}.safetensors"
        save_file({n: tensors[n] for n in groups[prefix]}, dst / file, metadata={"format": "pt"})
        files[file] = groups[prefix]
        weight_map.update({n: file for n in groups[prefix]})
    total = sum(t.nbytes for t in tensors.values())
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return files
