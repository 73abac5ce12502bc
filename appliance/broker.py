"""The broker: the one configured, or an embedded mosquitto for a laptop run.

Debian and Homebrew install mosquitto in an sbin folder that is often not on a user's PATH, so
those are searched too.
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

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
    """A mosquitto of our own, anonymous, in a throw-away folder, listening on `host:port`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 1883):
        self.host = host
        self.port = port if port and port_is_free(host, port) else free_port(host)
        self.process: subprocess.Popen | None = None
        self.folder = tempfile.TemporaryDirectory(prefix="exo-broker-")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> "EmbeddedBroker":
        binary = find_mosquitto()
        if binary is None:
            raise FileNotFoundError("mosquitto is not installed: `apt install mosquitto` or `brew install mosquitto`, "
                                    "or point --broker HOST:PORT at a running broker")
        conf = Path(self.folder.name) / "mosquitto.conf"
        conf.write_text(f"listener {self.port} {self.host}\nallow_anonymous true\npersistence false\n"
                        "log_dest stderr\nlog_type error\nlog_type warning\nset_tcp_nodelay true\n")
        conf.chmod(0o644)
        self.process = subprocess.Popen([binary, "-c", str(conf)])
        wait_for_port(self.host, self.port, 10, self.process)
        log.info("embedded mosquitto listening on %s", self.address)
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.folder.cleanup()
