"""Shared parts of the deployment tests: a cached debootstrap root, the image stage's install, MQTT.

The base root (Debian bookworm, minbase plus systemd and Python) is built once per arch with
debootstrap and kept under EXO_TEST_CACHE (default /var/cache/exo-test); each test copies it.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("EXO_TEST_CACHE", "/var/cache/exo-test"))
MIRROR = "http://deb.debian.org/debian"
BINFMT = Path("/proc/sys/fs/binfmt_misc")
# What a Raspberry Pi OS Lite root has that matters to us (an SSH server, sudo, python3-apt for
# Ansible's apt module, avahi-daemon for the broker role's DNS-SD advert); mosquitto too, so that
# the stage's 00-packages-nr installs from the root's own package lists, without the network.
BASE_PACKAGES = ["systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "python3-apt",
                 "ca-certificates", "libmosquitto1", "mosquitto-clients", "mosquitto", "iproute2",
                 "procps", "openssh-server", "sudo", "avahi-daemon"]
STAGE = REPO / "image" / "stage-exo"
TIMINGS = REPO / "test-artifacts" / "deploy-timings.txt"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="deployment tests run as root (CI does)")


def run(*cmd, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("check", True)
    kw.setdefault("text", True)
    kw.setdefault("capture_output", True)
    try:
        return subprocess.run([str(c) for c in cmd], **kw)
    except subprocess.CalledProcessError as e:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({e.returncode}):\n{e.stdout}\n{e.stderr}") from e


def note_time(label: str, seconds: float) -> None:
    TIMINGS.parent.mkdir(exist_ok=True)
    with TIMINGS.open("a") as f:
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {label} {seconds:.1f}s\n")


@pytest.fixture(autouse=True)
def record_time(request):
    """Append each deployment test's wall time to test-artifacts/deploy-timings.txt
    (module fixtures note their own: they are set up before this starts)."""
    start = time.monotonic()
    yield
    note_time(request.node.nodeid, time.monotonic() - start)


def arm64_emulation() -> bool:
    """Whether arm64 binaries run here (qemu-user-static through binfmt_misc); enable it if we can."""
    if not (BINFMT / "status").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], capture_output=True)
    entry = BINFMT / "qemu-aarch64"
    if not entry.exists() and shutil.which("update-binfmts"):
        subprocess.run(["update-binfmts", "--enable", "qemu-aarch64"], capture_output=True)
    return entry.exists() and entry.read_text().startswith("enabled")


def base_root(arch: str) -> Path:
    """The cached debootstrap root for arch, built on first use (about 1 min amd64, 4 min arm64)."""
    key = hashlib.sha256(" ".join(["bookworm", arch, *BASE_PACKAGES]).encode()).hexdigest()[:10]
    root = CACHE / f"base-bookworm-{arch}-{key}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".lock-{arch}", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / ".complete").exists():
            partial = root.with_name(root.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            run("debootstrap", f"--arch={arch}", "--variant=minbase",
                f"--include={','.join(BASE_PACKAGES)}", "bookworm", partial, MIRROR)
            # A container boots without the console wizard; the stage empties machine-id itself.
            (partial / "etc/systemd/system/systemd-firstboot.service").symlink_to("/dev/null")
            shutil.rmtree(root, ignore_errors=True)
            partial.rename(root)
            (root / ".complete").touch()
    return root


def fresh_root(arch: str, dest: Path) -> Path:
    run("cp", "-a", "--reflink=auto", base_root(arch), dest)
    return dest


def wheelhouse(arch: str) -> Path:
    """The wheels image/build.sh bakes in: exo from this tree, its dependencies for arch (cached)."""
    dest = CACHE / f"wheels-{arch}"
    run(REPO / "image" / "wheelhouse.sh", arch, dest)
    return dest


def in_chroot(root: Path, script: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """Run a bash script inside root as pi-gen's on_chroot does, with /proc, /sys and /dev mounted
    in a private mount namespace (they go away with it) and a private hostname. `kw` goes to `run`."""
    mounts = (f"mount -t proc proc {root}/proc && mount -t sysfs sys {root}/sys && "
              f"mount --rbind /dev {root}/dev && exec chroot {root} /bin/bash -e")
    return run("unshare", "--mount", "--uts", "--propagation", "private", "sh", "-c", mounts,
               input=script, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8",
                                  "DEBIAN_FRONTEND": "noninteractive", **(env or {})}, **kw)


def install_stage(root: Path, arch: str, workdir: Path) -> None:
    """Run the image stage against root the way pi-gen does: packages, 00-run.sh, 01-run-chroot.sh."""
    stage = workdir / "stage-exo"
    shutil.copytree(STAGE, stage)
    staged = stage / "00-install/files/staged"
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(wheelhouse(arch), staged / "dist")
    (staged / "systemd").mkdir()
    for name in ("exo-node.service", "exo-panel.service", "mosquitto-exo.conf"):
        shutil.copy(REPO / "systemd" / name, staged / "systemd" / name)
    sub = stage / "00-install"
    packages = " ".join((sub / "00-packages-nr").read_text().split())
    in_chroot(root, f"apt-get -o Debug::NoLocking=1 install -y --no-install-recommends {packages}\n")
    run(sub / "00-run.sh", env={**os.environ, "ROOTFS_DIR": str(root)})
    in_chroot(root, (sub / "01-run-chroot.sh").read_text())


class Watcher:
    """An MQTT client that records every message on its subscriptions; tests wait on events."""

    def __init__(self, address: str, topics: list[str], username: str | None = None,
                 password: str | None = None):
        host, port = address.rsplit(":", 1)
        self.messages: list[tuple[str, bytes]] = []
        self._cond = threading.Condition()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        if username:
            self.client.username_pw_set(username, password)
        subscribed = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe([(t, 1) for t in topics])
        self.client.on_subscribe = lambda c, u, mid, rcs, p: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(host, int(port))
        self.client.loop_start()
        assert subscribed.wait(10), "subscription was not acknowledged"

    def _on_message(self, client, userdata, msg):
        with self._cond:
            self.messages.append((msg.topic, msg.payload))
            self._cond.notify_all()

    def wait_for(self, predicate, timeout: float, what: str):
        """Block until some recorded message satisfies predicate(topic, payload); return it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for m in self.messages:
                    if predicate(*m):
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no message {what} within {timeout} s; saw {self.messages[-5:]}")
                self._cond.wait(left)

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


def connect(address: str, username: str | None = None, password: str | None = None,
            timeout: float = 10) -> tuple[mqtt.Client, mqtt.ReasonCode]:
    """Connect and wait for the broker's CONNACK; returns the client and the reason code."""
    host, port = address.rsplit(":", 1)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    if username:
        client.username_pw_set(username, password)
    done = threading.Event()
    result = {}

    def on_connect(c, userdata, flags, rc, props):
        result["rc"] = rc
        done.set()

    client.on_connect = on_connect
    client.connect(host, int(port))
    client.loop_start()
    assert done.wait(timeout), "no CONNACK from the broker"
    if result["rc"].is_failure:
        client.loop_stop()
    return client, result["rc"]


def publish(client: mqtt.Client, topic: str, payload: bytes | str, retain: bool = False) -> None:
    """Publish at QoS 1 and wait for the broker's PUBACK (which a denied publish also gets)."""
    client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)


def image_root(arch: str) -> Path:
    """A cached copy of the base root with the image stage installed: what a flashed card holds
    before its first boot. Rebuilt when the stage, the units, the lock or exo itself (its wheel is
    baked in) change."""
    parts = sorted(p for p in [*STAGE.rglob("*"), *(REPO / "systemd").iterdir(), REPO / "requirements.lock",
                               *(REPO / "appliance").rglob("*"), REPO / "pyproject.toml"]
                   if p.is_file() and "staged" not in p.parts and "__pycache__" not in p.parts)
    digest = hashlib.sha256(base_root(arch).name.encode())
    for part in parts:
        digest.update(part.read_bytes())
    root = CACHE / f"image-{arch}-{digest.hexdigest()[:10]}"
    with open(CACHE / f".lock-image-{arch}", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / ".complete").exists():
            partial = root.with_name(root.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            work = CACHE / f"stage-work-{arch}"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()
            fresh_root(arch, partial)
            install_stage(partial, arch, work)
            shutil.rmtree(work)
            partial.rename(root)
            (root / ".complete").touch()
    return root


class Overlay:
    """A writable overlay over a cached root: a card of its own, made in a moment, that keeps its
    changes across reboots (the upper folder) until the test ends."""

    def __init__(self, lower: Path, folder: Path):
        self.path = folder / "merged"
        for name in ("upper", "work", "merged"):
            (folder / name).mkdir(parents=True)
        run("mount", "-t", "overlay", "overlay", "-o",
            f"lowerdir={lower},upperdir={folder / 'upper'},workdir={folder / 'work'}", self.path)

    def close(self):
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


class Container:
    """A booted systemd-nspawn container (in a network namespace of ours, or sharing this
    machine's); commands run in it through nsenter."""

    def __init__(self, root: Path, log: Path, netns: str | None = None):
        self.root, self.log_path, self.netns = root, log, netns
        self.start()

    def start(self):
        network = [f"--network-namespace-path=/run/netns/{self.netns}"] if self.netns else []
        self.log = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            ["systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "--console=read-only",
             *network, "-D", str(self.root), "--boot"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        self.leader = self._find_leader()

    def _find_leader(self, timeout: float = 30) -> int:
        # No event tells us the container's PID 1 exists: poll for it briefly.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"systemd-nspawn exited; see {self.log_path}"
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                if child.name() == "systemd":
                    return child.pid
            time.sleep(0.05)
        raise TimeoutError("the container's systemd did not start")

    def sh(self, command: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        return run("nsenter", "-t", self.leader, "-a", "sh", "-c", command, check=check, timeout=timeout)

    def unit(self, name: str, prop: str) -> str:
        return self.sh(f"systemctl show -P {prop} {name}").stdout.strip()

    def wait_booted(self, timeout: float = 120) -> None:
        """Until the container's systemd has finished starting up (running or degraded)."""
        self.sh(f"timeout {timeout} sh -c 'until systemctl is-system-running --wait >/dev/null 2>&1"
                f" || [ \"$(systemctl is-system-running)\" = degraded ]; do sleep 0.5; done'",
                timeout=timeout + 10)

    def stop(self):
        self.proc.terminate()               # nspawn asks the container's systemd to halt
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


RESERVED_PORTS_PROBE = """
import errno, json, socket
listener = socket.create_server(("127.0.0.1", 1883))
taken = []
for _ in range(3):
    try:
        taken.append(socket.create_connection(("127.0.0.1", 1883)).getsockname()[1])
    except OSError as e:
        taken.append(errno.errorcode[e.errno])
print(json.dumps(taken))
"""


def local_ports_taken(port: int, sysctl_file: Path | None = None) -> list:
    """In a network namespace of its own, whose ephemeral range is only `port` and the one after
    (a wider range is searched from a random start, and may skip a port): the local ports of three
    outgoing connections, or why each failed, after loading `sysctl_file` if one is given."""
    load = f"sysctl -q -p {sysctl_file} && " if sysctl_file else ""
    out = run("unshare", "--net", "sh", "-c",
              f"ip link set lo up && sysctl -q -w net.ipv4.ip_local_port_range='{port} {port + 1}' && {load}"
              f"python3 -c '{RESERVED_PORTS_PROBE}'")
    return json.loads(out.stdout)
