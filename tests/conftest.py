"""Shared fixtures: a real mosquitto broker, and clusters of real `exo node` / `exo panel` processes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import httpx

from appliance.broker import EmbeddedBroker, free_port, wait_for_port
from tests import system
from appliance.bus.protocol import Topics

REPO = Path(__file__).resolve().parents[1]
STORIES = REPO.parent / "shared" / "models" / "stories260K" / "hf"
STORY = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
         "One day, she saw a big, red ball.")


# Tests never read the machine's /etc/exo/config.yaml (the Ansible test writes one for real).
_EMPTY_CONFIG = Path(tempfile.mkdtemp(prefix="exo-test-config-")) / "config.yaml"
_EMPTY_CONFIG.write_text("{}\n")
os.environ["EXO_CONFIG"] = str(_EMPTY_CONFIG)
# Nor do they look for brokers on the machine's network: a plain `exo` with its API on loopback runs
# a private broker (the discovery tests set their own host, inside network namespaces).
os.environ["EXO_HOST"] = "127.0.0.1"


def wait_for(predicate, timeout: float, what: str):
    """Poll a condition that has no event to wait on (an HTTP server coming up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def pytest_runtest_setup(item):
    for mark in item.iter_markers("system"):
        system.check(*mark.args)


@pytest.fixture(scope="session")
def broker():
    system.check("mosquitto")   # the tests talk to a real mosquitto, not the amqtt fallback
    b = EmbeddedBroker(port=free_port()).start()
    yield b.address
    b.stop()


class Watcher:
    """Listens to a cluster's retained info and plan topics; tests wait on its condition."""

    def __init__(self, address: str, cluster: str):
        self.cluster, self.nodes, self.plans = cluster, {}, []
        self.cond = threading.Condition()
        unix = address.startswith("/")   # a lab broker's socket file: the test watches from outside the lab
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, transport="unix" if unix else "tcp")
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe(f"{Topics(cluster).root}/#", 1)
        self.client.reconnect_delay_set(1, 1)
        if unix:
            self.client.connect(address)
        else:
            host, port = address.rsplit(":", 1)
            self.client.connect(host, int(port))
        self.client.loop_start()

    def _on_message(self, client, userdata, msg):
        parts = msg.topic.split("/")
        try:
            data = json.loads(msg.payload)
        except ValueError:
            return  # tests send garbage on purpose
        with self.cond:
            if parts[2:3] == ["plan"] and isinstance(data, dict) and "shards" in data:
                self.plans.append(data)
            elif parts[2:3] == ["node"] and parts[4] == "info" and isinstance(data, dict):
                self.nodes[parts[3]] = data
            self.cond.notify_all()

    def wait(self, predicate, timeout: float, what: str):
        with self.cond:
            if not self.cond.wait_for(lambda: predicate(self), timeout):
                raise TimeoutError(f"timed out after {timeout} s waiting for {what}")

    def ready(self, n_nodes: int) -> bool:
        """The newest plan spans n nodes and each of them has loaded it."""
        if not self.plans:
            return False
        plan = self.plans[-1]
        return len(plan["shards"]) == n_nodes and all(
            (self.nodes.get(s["node"], {}).get("shard") or {}).get("plan_id") == plan["plan_id"] for s in plan["shards"])

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


class LocalCluster:
    """`exo node` processes and one `exo panel` process on a cluster name of their own."""

    def __init__(self, broker: str, tmp: Path, model: Path = STORIES, engines: tuple[str, ...] = ("numpy",),
                 quant: str | None = None, watch: str | None = None):
        """Node i runs engines[i % len(engines)]. `watch`: where the test's watcher reaches the
        broker, when not at `broker`."""
        self.broker, self.tmp, self.model, self.engines, self.quant = broker, tmp, model, engines, quant
        self.cluster = "t" + uuid.uuid4().hex[:10]
        self.port = free_port()
        self.nodes: dict[str, subprocess.Popen] = {}
        self.panel: subprocess.Popen | None = None
        self.watcher = Watcher(watch or broker, self.cluster)
        self.env = {**os.environ, "EXO_STATE_DIR": str(tmp / "state"), "EXO_CONFIG": str(tmp / "none.yaml")}
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "none.yaml").write_text("{}\n")

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "wb")
        return subprocess.Popen([sys.executable, "-m", "appliance", *args, "--broker", self.broker,
                                 "--cluster", self.cluster], stdout=log, stderr=subprocess.STDOUT, env=self.env)

    def add_node(self, name: str) -> subprocess.Popen:
        engine = self.engines[len(self.nodes) % len(self.engines)]
        quant = ["--quant", self.quant] if self.quant else []
        self.nodes[name] = self._spawn(name, ["node", "--name", name, "--engine", engine, *quant])
        return self.nodes[name]

    def start_panel(self, model: Path | None = None) -> None:
        self.panel = self._spawn("panel", ["panel", "--model", str(model or self.model), "--host", "127.0.0.1",
                                           "--port", str(self.port)])
        wait_for_port("127.0.0.1", self.port, 30, self.panel)

    def start(self, n_nodes: int) -> "LocalCluster":
        for i in range(n_nodes):
            self.add_node(f"n{i}")
        self.start_panel()
        self.watcher.wait(lambda w: w.ready(n_nodes), 60, f"a plan over {n_nodes} loaded nodes")
        return self

    def node_id(self, name: str) -> str:
        pid = self.nodes[name].pid
        for node_id, info in self.watcher.nodes.items():
            if info.get("name") == name and info.get("online"):
                return node_id
        raise KeyError(f"node {name} (pid {pid}) has not announced itself")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def health(self) -> dict:
        return httpx.get(self.url + "/healthz", timeout=5).json()

    def openai(self, **kwargs):
        import openai
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, **kwargs)

    def publish(self, topic: str, payloads: list[bytes], retain: bool = False) -> None:
        """Publish on this cluster's broker as an outside client would, waiting for each to be sent."""
        host, port = self.broker.rsplit(":", 1)
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        client.connect(host, int(port))
        client.loop_start()
        try:
            for payload in payloads:
                client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)
        finally:
            client.loop_stop()
            client.disconnect()

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def stop(self):
        for p in [*self.nodes.values(), self.panel]:
            if p and p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in [*self.nodes.values(), self.panel]:
            if p:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        self.watcher.close()


@pytest.fixture
def local_cluster(broker, tmp_path):
    clusters = []

    def make(n_nodes: int, **kwargs) -> LocalCluster:
        c = LocalCluster(broker, tmp_path / f"c{len(clusters)}", **kwargs)
        clusters.append(c)
        return c.start(n_nodes)

    yield make
    for c in clusters:
        c.stop()
