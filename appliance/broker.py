"""The broker: the one configured, or an embedded one for a laptop run.

The embedded broker is mosquitto when it is installed (Debian and Homebrew put it in an sbin
folder that is often not on a user's PATH, so those are searched too), else amqtt, a pure-Python
broker, on a thread of this process.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from appliance.processes import child_process

log = logging.getLogger(__name__)

SEARCH_PATH = ["/usr/sbin", "/usr/local/sbin", "/opt/homebrew/sbin", "/usr/local/opt/mosquitto/sbin"]


def find_mosquitto() -> str | None:
    return shutil.which("mosquitto") or shutil.which("mosquitto", path=os.pathsep.join(SEARCH_PATH))


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process and process.poll() is not None:
            raise RuntimeError(f"the broker exited at start with code {process.returncode}")
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)  # polling a port: there is no event to wait on
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


class EmbeddedBroker:
    """A broker of our own, anonymous, listening on `host:port` (a free port if that is taken).
    `kind` is "auto" (mosquitto if installed, else amqtt), "mosquitto" or "python"."""

    def __init__(self, host: str = "127.0.0.1", port: int = 1883, kind: str = "auto"):
        self.host = host
        self.port = port if port and port_is_free(host, port) else free_port(host)
        self.kind = kind
        self.process: subprocess.Popen | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.folder = tempfile.TemporaryDirectory(prefix="exo-broker-")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> "EmbeddedBroker":
        binary = find_mosquitto() if self.kind != "python" else None
        if binary:
            self._start_mosquitto(binary)
        elif self.kind == "mosquitto":
            raise FileNotFoundError("mosquitto is not installed: `apt install mosquitto` or `brew install mosquitto`")
        else:
            self._start_amqtt()
        return self

    def wait(self) -> None:
        """Block until the broker ends."""
        if self.process:
            self.process.wait()
        else:
            threading.Event().wait()

    def _start_amqtt(self) -> None:
        from amqtt.broker import Broker

        config = {"listeners": {"default": {"type": "tcp", "bind": self.address}},
                  "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}}
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.amqtt = Broker(config, loop=self.loop)
            self.loop.run_until_complete(self.amqtt.start())
            started.set()
            self.loop.run_forever()
        threading.Thread(target=run, name="amqtt", daemon=True).start()
        if not started.wait(10):
            raise RuntimeError("the embedded amqtt broker did not start")
        log.info("embedded amqtt broker (mosquitto is not installed) listening on %s", self.address)

    def _start_mosquitto(self, binary: str) -> None:
        conf = Path(self.folder.name) / "mosquitto.conf"
        conf.write_text(f"listener {self.port} {self.host}\nallow_anonymous true\npersistence false\n"
                        "log_dest stderr\nlog_type error\nlog_type warning\nset_tcp_nodelay true\n")
        conf.chmod(0o644)
        self.process = subprocess.Popen([binary, "-c", str(conf)], **child_process())
        wait_for_port(self.host, self.port, 10, self.process)
        log.info("embedded mosquitto listening on %s", self.address)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
        if self.loop:
            asyncio.run_coroutine_threadsafe(self.amqtt.shutdown(), self.loop).result(10)
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.folder.cleanup()
