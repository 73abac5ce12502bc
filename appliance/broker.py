"""The broker: the one configured, or an embedded one for a laptop run.

The embedded broker is mosquitto when it is installed (Debian and Homebrew put it in an sbin
folder that is often not on a user's PATH, so those are searched too), else amqtt, a pure-Python
broker, on a thread of this process (open clusters only).

A keyed cluster's broker is closed: a password file and an ACL (`Members`) that start with two
logins, the joiner and the registrar (cluster_key.py). A member asks to join on `join/<role>/<user>`;
the registrar, a client of this process, adds the user with its derived password, writes both
files again and has mosquitto reload them (SIGHUP). The ACL lets a member write only as itself.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import pwd
import re
import signal
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

from appliance import cluster_key
from appliance.bus.client import Bus
from appliance.bus.protocol import Topics
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


def password_hash(password: str) -> str:
    """A password as mosquitto 2's password file holds it: PBKDF2-SHA512, 101 rounds ($7$)."""
    salt = os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101)
    return f"$7$101${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


USER_NAME = re.compile(r"^[0-9a-f]{8,64}$")   # a node id or a coordinator id: nothing an ACL reads as a pattern


class Members:
    """The logins a keyed broker knows, and its password file and ACL, written from them."""

    def __init__(self, config, folder: Path):
        self.config, self.folder, self.topics = config, folder, Topics(config.cluster)
        self.roles: dict[str, str] = {}     # user -> "node" | "coord"
        self.fixed = {user: cluster_key.password(config, user) for user in (cluster_key.JOINER, cluster_key.REGISTRAR)}
        self.passwords = folder / "exo.passwd"
        self.acl = folder / "exo.acl"

    def add(self, role: str, user: str) -> bool:
        """Let `user` in as a `role`; False when it is already in (or not a name we give out)."""
        if role not in ("node", "coord") or not USER_NAME.match(user) or self.roles.get(user) == role:
            return False
        self.roles[user] = role
        self.write()
        return True

    def write(self) -> None:
        users = {**self.fixed, **{u: cluster_key.password(self.config, u) for u in self.roles}}
        self.passwords.write_text("".join(f"{u}:{password_hash(p)}\n" for u, p in users.items()))
        self.acl.write_text(self.acl_text())
        for path in (self.passwords, self.acl):
            give_to_mosquitto(path, 0o600)

    def acl_text(self) -> str:
        t, root = self.topics, self.topics.root
        lines = ["# A member writes as itself only (%u is its login: a node id or a coordinator id).",
                 f"pattern write {t.node_info('%u')}", f"pattern write {t.node_status('%u')}",
                 f"pattern write {t.node_download('%u')}",
                 f"pattern write {t.node_inbox('+', '%u')}", f"pattern write {t.coord_out('+', '%u')}",
                 f"user {cluster_key.REGISTRAR}", f"topic read {t.join()}",
                 f"user {cluster_key.JOINER}", f"topic write {t.join()}"]
        for user, role in sorted(self.roles.items()):
            lines += [f"user {user}", f"topic read {root}/#"]
            if role == "coord":   # only coordinators plan, claim and command
                lines += [f"topic write {t.plan}", f"topic write {t.coord_info(user)}", f"topic write {t.ctl()}"]
        return "\n".join(lines) + "\n"


def give_to_mosquitto(path: Path, mode: int) -> None:
    """mosquitto started as root reads its files after dropping to the mosquitto user."""
    path.chmod(mode)
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("mosquitto")
        except KeyError:
            return
        os.chown(path, user.pw_uid, user.pw_gid)


class EmbeddedBroker:
    """A broker of our own listening on `host:port` (a free port if that is taken): anonymous, or,
    given a keyed `config`, closed to all but the cluster's members. `kind` is "auto" (mosquitto if
    installed, else amqtt), "mosquitto" or "python"."""

    def __init__(self, host: str = "127.0.0.1", port: int = 1883, kind: str = "auto", config=None):
        self.host = host
        self.port = port if port and port_is_free(host, port) else free_port(host)
        self.kind = kind
        self.process: subprocess.Popen | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.folder = tempfile.TemporaryDirectory(prefix="exo-broker-")
        self.members = Members(config, Path(self.folder.name)) if config and config.cluster_key else None
        self.registrar = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> "EmbeddedBroker":
        binary = find_mosquitto() if self.kind != "python" else None
        if binary:
            self._start_mosquitto(binary)
        elif self.kind == "mosquitto" or self.members:
            raise FileNotFoundError("mosquitto is not installed (a closed cluster's broker is mosquitto): "
                                    "`apt install mosquitto` or `brew install mosquitto`, or run an open cluster "
                                    "on a trusted LAN with --open")
        else:
            self._start_amqtt()
        if self.members:
            self._start_registrar()
        return self

    def _start_registrar(self) -> None:
        """Our own client: reads `join/<role>/<user>` and lets that member in."""
        config = replace(self.members.config, broker=self.local_address, broker_username=cluster_key.REGISTRAR,
                         broker_password=self.members.fixed[cluster_key.REGISTRAR])
        self.registrar = Bus(config, client_id=f"exo-registrar-{os.getpid()}")
        self.registrar.on(self.members.topics.join(), self.on_join, qos=1)
        self.registrar.start()

    def on_join(self, topic: str, payload: bytes) -> None:
        role, user = topic.split("/")[-2:]
        if self.members.add(role, user):
            log.info("broker: %s %s joins", role, user)
            self.process.send_signal(signal.SIGHUP)   # mosquitto reads its password file and ACL again

    @property
    def local_address(self) -> str:
        """Where a client of this machine reaches the broker (a LAN broker listens on every address)."""
        return f"{'127.0.0.1' if self.host in ('0.0.0.0', '') else self.host}:{self.port}"

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
        folder = Path(self.folder.name)
        conf = folder / "mosquitto.conf"
        access = "allow_anonymous true\n"
        if self.members:
            self.members.write()
            give_to_mosquitto(folder, 0o700)
            access = (f"allow_anonymous false\npassword_file {self.members.passwords}\n"
                      f"acl_file {self.members.acl}\n")
        conf.write_text(f"listener {self.port} {self.host}\n{access}persistence false\n"
                        "log_dest stderr\nlog_type error\nlog_type warning\nset_tcp_nodelay true\n")
        conf.chmod(0o644)
        self.process = subprocess.Popen([binary, "-c", str(conf)], **child_process())
        wait_for_port(self.host, self.port, 10, self.process)
        log.info("embedded mosquitto listening on %s", self.address)

    def stop(self) -> None:
        if self.registrar:
            self.registrar.stop()
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()   # reaped, not left a zombie of this process
        if self.loop:
            asyncio.run_coroutine_threadsafe(self.amqtt.shutdown(), self.loop).result(10)
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.folder.cleanup()
