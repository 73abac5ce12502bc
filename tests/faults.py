"""Tools for real faults: hosts, a broker that can be killed and started again, and a streaming
client that records when each token arrived.

Hosts: each host a network namespace, joined by a veth pair to a bridge in a
"switch" namespace of its own. The bridge floods multicast (no snooping), so DNS-SD works between
hosts, and each host has a machine id of its own (`ip netns exec` mounts /etc/netns/<host>/ over /etc). Unplugging a host is `ip link set eth0 down` on its side: no FIN,
no RST, its TCP connections left half-open, as a pulled cable. Needs root (CI runs as root).

Addresses are only inside the namespaces made here (10.<a>.<b>.0/24, picked per lab).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from appliance.broker import find_mosquitto, free_port, wait_for_port

REPO = Path(__file__).resolve().parent.parent


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def can_make_namespaces() -> bool:
    name = "exo-probe-" + uuid.uuid4().hex[:6]
    try:
        ip("netns", "add", name)
    except (OSError, subprocess.CalledProcessError):
        return False
    ip("netns", "del", name)
    return True


@dataclass
class Host:
    namespace: str
    address: str
    port_on_switch: str

    def command(self, *argv: str) -> list[str]:
        """argv run inside this host (`ip netns exec` execs it: the pid is the command's own)."""
        return ["ip", "netns", "exec", self.namespace, *argv]

    def popen(self, argv: list[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.command(*argv), **kwargs)

    def kill(self) -> None:
        """The host is gone at once, as a power cut: its cable first (no FIN, no RST), then every process."""
        self.unplug()
        for pid in subprocess.run(["ip", "netns", "pids", self.namespace], capture_output=True, text=True).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass

    def unplug(self) -> None:
        ip("-n", self.namespace, "link", "set", "eth0", "down")

    def plug(self) -> None:
        ip("-n", self.namespace, "link", "set", "eth0", "up")

    def wait_for_port(self, port: int, timeout: float, process: subprocess.Popen | None = None) -> None:
        """Until something accepts connections on `port` of this host."""
        probe = f"import socket; socket.create_connection(('{self.address}', {port}), 0.5).close()"
        deadline = time.monotonic() + timeout
        while subprocess.run(self.command(sys.executable, "-c", probe), capture_output=True).returncode:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"{process.args} exited with {process.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {self.address}:{port} after {timeout:.0f} s")


class Lab:
    def __init__(self):
        self.tag = "exo" + uuid.uuid4().hex[:5]
        self.subnet = f"10.{random.randint(100, 250)}.{random.randint(0, 255)}"
        self.switch = f"{self.tag}-sw"
        self.hosts: dict[str, Host] = {}
        ip("netns", "add", self.switch)
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        ip("-n", self.switch, "link", "set", "br0", "up")

    def add_host(self, name: str) -> Host:
        index = len(self.hosts) + 1
        namespace, port = f"{self.tag}-{name}", f"p{index}"
        ip("netns", "add", namespace)
        ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", namespace)
        ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
        ip("-n", namespace, "addr", "add", f"{self.subnet}.{index}/24", "dev", "eth0")
        ip("-n", namespace, "link", "set", "eth0", "up")
        ip("-n", namespace, "link", "set", "lo", "up")
        etc = Path("/etc/netns") / namespace
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "machine-id").write_text(uuid.uuid4().hex + "\n")
        self.hosts[name] = Host(namespace, f"{self.subnet}.{index}", port)
        return self.hosts[name]

    def close(self) -> None:
        for host in self.hosts.values():
            for pid in subprocess.run(["ip", "netns", "pids", host.namespace], capture_output=True,
                                      text=True).stdout.split():
                try:
                    os.kill(int(pid), 9)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "del", host.namespace], capture_output=True)
            shutil.rmtree(Path("/etc/netns") / host.namespace, ignore_errors=True)
        subprocess.run(["ip", "netns", "del", self.switch], capture_output=True)


class Mosquitto:
    """A real mosquitto on a fixed port that a test can stop and start again, on loopback or on a
    lab host. `persistence` keeps retained messages (and the Wills it sent) across restarts."""

    def __init__(self, folder: Path, persistence: bool, host: Host | None = None):
        self.host = host
        self.bind = host.address if host else "127.0.0.1"
        self.port, self.folder = 1883 if host else free_port(), folder
        folder.mkdir(parents=True, exist_ok=True)
        self.conf = folder / "mosquitto.conf"
        self.conf.write_text(f"listener {self.port} {self.bind}\nallow_anonymous true\nuser root\n"
                             f"persistence {'true' if persistence else 'false'}\npersistence_location {folder}/\n"
                             "autosave_interval 1\nlog_dest stderr\nlog_type error\n"
                             + (f"listener 0 {self.socket}\n" if host else ""))
        self.process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"{self.bind}:{self.port}"

    @property
    def socket(self) -> Path:
        """On a lab host, a second listener on a socket file: how the test watches from outside."""
        return self.folder / "mqtt.sock"

    def start(self) -> "Mosquitto":
        argv = [find_mosquitto(), "-c", str(self.conf)]
        log = open(self.folder / "mosquitto.log", "ab")
        options = dict(stdout=log, stderr=subprocess.STDOUT)
        self.process = self.host.popen(argv, **options) if self.host else subprocess.Popen(argv, **options)
        if self.host:
            self.host.wait_for_port(self.port, 10, self.process)
        else:
            wait_for_port("127.0.0.1", self.port, 10, self.process)
        return self

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(10)


@dataclass
class Stream:
    """A streamed completion run by tests/stream_client.py (on a lab host, or here): its tokens as
    they arrive, with arrival times, and how it ended."""
    process: subprocess.Popen
    prompt: str = ""
    pieces: list[str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    end: dict = field(default_factory=dict)

    @classmethod
    def start(cls, url: str, model: str, prompt: str, max_tokens: int, host: Host | None = None) -> "Stream":
        argv = [sys.executable, "-m", "tests.stream_client", url, model, prompt, str(max_tokens)]
        options = dict(stdout=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        return cls(host.popen(argv, **options) if host else subprocess.Popen(argv, **options), prompt)

    def read(self, tokens: int | None = None) -> "Stream":
        """Read until `tokens` pieces have arrived (or the end)."""
        for line in self.process.stdout:
            event = json.loads(line)
            if "piece" in event:
                self.pieces.append(event["piece"])
                self.times.append(event["t"])
            else:
                self.end = event
                break
            if tokens is not None and len(self.pieces) >= tokens:
                return self
        self.process.wait(30)
        return self

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def longest_gap(self) -> float:
        return max((b - a for a, b in zip(self.times, self.times[1:])), default=0.0)


def lab_cluster(tmp: Path, nodes: int, persistence: bool = False):
    """A lab with a broker host, a panel host and `nodes` node hosts (n0, n1, ...), and an exo
    cluster on it; the test watches the broker through its socket file. Returns (lab, broker, cluster)."""
    from tests.conftest import LocalCluster

    class LabCluster(LocalCluster):
        def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
            log = open(self.tmp / f"{name}.log", "wb")
            argv = [sys.executable, "-m", "appliance", *args, "--broker", self.broker, "--cluster", self.cluster]
            return lab.hosts[name].popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env)

        def start_panel(self, model: Path | None = None) -> None:
            host = lab.hosts["panel"]
            self.panel = self._spawn("panel", ["panel", "--model", str(model or self.model), "--host", host.address,
                                               "--port", str(self.port)])
            host.wait_for_port(self.port, 30, self.panel)

        @property
        def url(self) -> str:
            return f"http://{lab.hosts['panel'].address}:{self.port}"

        def stream(self, max_tokens: int, prompt: str = "") -> Stream:
            return Stream.start(self.url, str(self.model), prompt, max_tokens, host=lab.hosts["panel"])

    lab = Lab()
    try:
        for name in ["broker", "panel", *[f"n{i}" for i in range(nodes)]]:
            lab.add_host(name)
        broker = Mosquitto(tmp / "broker", persistence, host=lab.hosts["broker"]).start()
        cluster = LabCluster(broker.address, tmp / "cluster", watch=str(broker.socket))
        cluster.port = 8000
        cluster.start(nodes)
    except BaseException:
        lab.close()
        raise
    return lab, broker, cluster
