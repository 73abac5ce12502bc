"""Retake the panel screenshots in this folder, from the repository root:

    python3 docs/images/screenshots.py

It starts a 3-node local cluster on the tiny test model (`exo --model … --local-nodes 3
--port 52500`) and shoots its Cluster and Model split pages with Debian's Chromium, driven by
Playwright (as tests/test_panel_browser.py does; no browser download).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
MODEL = REPO.parent / "shared" / "models" / "stories260K" / "hf"
PORT = 52500
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
SHOTS = [("/", "#nodes > *", "panel-cluster.png", 1100), ("/split", "#shares tbody tr", "panel-split.png", 420)]


def ready() -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/healthz", timeout=2) as r:
            return json.load(r)["ready"]
    except OSError:
        return False


def main() -> None:
    empty = HERE.parents[1] / "test-artifacts" / "empty-config.yaml"   # never this machine's /etc/exo/config.yaml
    empty.parent.mkdir(exist_ok=True)
    empty.write_text("{}\n")
    exo = subprocess.Popen([sys.executable, "-m", "appliance", "--model", str(MODEL), "--local-nodes", "3",
                            "--port", str(PORT)], cwd=REPO, env={**os.environ, "EXO_CONFIG": str(empty)})
    try:
        deadline = time.monotonic() + 60
        while not ready():
            if exo.poll() is not None or time.monotonic() > deadline:
                sys.exit("the cluster did not get ready")
            time.sleep(0.3)  # polling a server coming up: there is no event to wait on
        traffic()
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            for path, selector, name, height in SHOTS:
                page.set_viewport_size({"width": 1280, "height": height})
                page.goto(f"http://127.0.0.1:{PORT}{path}")
                page.wait_for_selector(selector, timeout=20_000)
                page.wait_for_timeout(2500)   # a heartbeat or two, so the live figures are in
                page.screenshot(path=str(HERE / name))
            browser.close()
    finally:
        exo.send_signal(signal.SIGINT)
        exo.wait(20)


def traffic() -> None:
    """A few answers first, so the throughput chart and the nodes' rates have something to show."""
    body = json.dumps({"model": str(MODEL), "prompt": "Once upon a time", "max_tokens": 400}).encode()
    for _ in range(6):
        request = urllib.request.Request(f"http://127.0.0.1:{PORT}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=60).read()


if __name__ == "__main__":
    main()
