"""`exo` as a person runs it: in a real terminal (tmux), started, asked, stopped with Ctrl-C."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import threading
import uuid

import httpx
import psutil
import pytest

from appliance.broker import EmbeddedBroker, free_port
from tests.conftest import REPO, STORIES, STORY, Watcher, wait_for
from tests.system import needs


class Terminal:
    """A tmux session of its own: keys go in, the screen comes out."""

    def __init__(self, tmp):
        self.name = "exo-test-" + uuid.uuid4().hex[:8]
        subprocess.run(["tmux", "new-session", "-d", "-s", self.name, "-x", "220", "-y", "60", "-c", str(REPO)],
                       check=True)

    def type(self, line: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, line, "Enter"], check=True)

    def keys(self, *keys: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, *keys], check=True)

    def screen(self) -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-J", "-S", "-200", "-t", self.name],
                              check=True, capture_output=True, text=True).stdout

    def shell_pid(self) -> int:
        return int(subprocess.run(["tmux", "display", "-p", "-t", self.name, "#{pane_pid}"], check=True,
                                  capture_output=True, text=True).stdout)

    def close(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)


class EventStream:
    """An /api/events stream read on a thread, until the server ends it."""

    def __init__(self, url: str):
        self.opened, self.ended = threading.Event(), threading.Event()
        threading.Thread(target=self.read, args=(url,), daemon=True).start()
        assert self.opened.wait(10)

    def read(self, url: str) -> None:
        try:
            with httpx.stream("GET", url, timeout=httpx.Timeout(5, read=60)) as r:
                for line in r.iter_lines():
                    if line.startswith("event: hello"):
                        self.opened.set()
        except httpx.HTTPError:
            pass
        self.ended.set()


@pytest.fixture
def terminal(tmp_path):
    t = Terminal(tmp_path)
    yield t
    t.close()


@needs("tmux", "mosquitto")
def test_exo_says_where_once_ready_and_ctrl_c_ends_it_cleanly(terminal, tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("{}\n")
    port = free_port()
    # the API and broker on loopback: no advert on the network, as every test (tmux does not pass on EXO_HOST)
    env = f"EXO_HOST=127.0.0.1 EXO_CONFIG={tmp_path}/config.yaml EXO_STATE_DIR={tmp_path}/state"
    terminal.type(f"{env} {shlex.quote(sys.executable)} -m appliance --model {shlex.quote(str(STORIES))} "
                  f"--local-nodes 2 --port {port}; echo EXIT=$?")
    ready = wait_for(lambda: re.search(r"exo: ready in ([\d.]+) s: API and panel on (\S+)", terminal.screen()), 60,
                     "exo to say it is ready")
    assert ready.group(2) == f"http://localhost:{port}"
    # It said ready: the first request is answered (no 503 while nodes load), and /healthz agrees.
    r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=30,
                   json={"model": str(STORIES), "prompt": "", "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200 and STORY.startswith(r.json()["choices"][0]["text"])
    assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
    started = terminal.screen()
    assert " WARNING " not in started and "Traceback" not in started, started

    panel_tab = EventStream(f"http://127.0.0.1:{port}/api/events")   # a panel left open, as people do
    exo = [p for p in psutil.Process(terminal.shell_pid()).children() if "appliance" in " ".join(p.cmdline())]
    assert len(exo) == 1
    family = [exo[0], *exo[0].children(recursive=True)]
    assert {"mosquitto"} <= {p.name() for p in family} and len(family) == 4   # exo, broker, 2 nodes
    terminal.keys("C-c")
    wait_for(lambda: re.search(r"^EXIT=\d+$", terminal.screen(), re.M), 30, "exo to exit after Ctrl-C")
    screen = terminal.screen()
    after = screen[screen.index("^C"):screen.index("\nEXIT=")].strip().splitlines()
    assert after[1:] == ["exo: stopped"], screen                      # one line,
    assert re.search(r"^EXIT=0$", screen, re.M), screen               # exit status 0
    assert "Traceback" not in screen
    gone, alive = psutil.wait_procs(family, timeout=5)
    assert alive == [], f"left running: {alive}"
    assert panel_tab.ended.wait(5)                                     # its stream was closed, not cut
    with capsys.disabled():
        print(f"\nexo: ready {ready.group(1)} s after it started (stories260K, 2 local nodes)")


def test_healthz_is_503_with_the_reason_until_the_cluster_can_answer(broker, tmp_path):
    from tests.conftest import LocalCluster

    c = LocalCluster(broker, tmp_path)
    try:
        c.start_panel()
        r = httpx.get(c.url + "/healthz", timeout=5)
        assert r.status_code == 503
        assert r.json()["ready"] is False and r.json()["reason"] == "no nodes are online"
        c.add_node("hz")
        c.watcher.wait(lambda w: w.ready(1), 60, "a plan over one loaded node")
        wait_for(lambda: httpx.get(c.url + "/healthz", timeout=5).status_code == 200, 10, "/healthz to say ready")
        assert c.health()["reason"] is None
    finally:
        c.stop()


@needs("mosquitto")
def test_a_node_started_before_its_broker_waits_for_it(tmp_path):
    port, cluster = free_port(), "t" + uuid.uuid4().hex[:10]
    log = tmp_path / "node.log"
    node = subprocess.Popen([sys.executable, "-m", "appliance", "node", "--broker", f"127.0.0.1:{port}",
                             "--cluster", cluster, "--name", "early"], cwd=REPO, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, env={**os.environ, "EXO_STATE_DIR": str(tmp_path / "state")})
    broker = watcher = None
    try:
        wait_for(lambda: log.read_text().count("waiting for the broker") >= 2, 20, "two tries, each logged")
        assert node.poll() is None
        broker = EmbeddedBroker(port=port).start()
        assert broker.port == port
        watcher = Watcher(broker.address, cluster)
        watcher.wait(lambda w: any(n.get("name") == "early" and n.get("online") for n in w.nodes.values()), 30,
                     "the node to join once the broker is there")
        lines = [line for line in log.read_text().splitlines() if "waiting for the broker" in line]
        assert "try 2 again in 1 s" in lines[0] and "try 3 again in 2 s" in lines[1], lines
    finally:
        node.terminate()
        node.wait(10)
        if watcher:
            watcher.close()
        if broker:
            broker.stop()
