"""Shared parts of the deployment tests: a cached debootstrap root, the image stage's install, MQTT.

The base root (Debian bookworm, minbase plus systemd and Python) is built once per arch with
debootstrap and kept under EXO_TEST_CACHE (default /var/cache/exo-test); each test copies it.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("EXO_TEST_CACHE", "/var/cache/exo-test"))
MIRROR = "http://deb.debian.org/debian"
# What a Raspberry Pi OS Lite root has that matters to us; mosquitto too, so that the stage's
# 00-packages-nr installs from the root's own package lists, without the network.
BASE_PACKAGES = ["systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "ca-certificates",
                 "libmosquitto1", "mosquitto-clients", "mosquitto", "iproute2", "procps"]
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
    binfmt = Path("/proc/sys/fs/binfmt_misc")
    if not (binfmt / "status").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(binfmt)], capture_output=True)
    entry = binfmt / "qemu-aarch64"
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


def in_chroot(root: Path, script: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a bash script inside root as pi-gen's on_chroot does, with /proc, /sys and /dev mounted
    in a private mount namespace (they go away with it) and a private hostname."""
    mounts = (f"mount -t proc proc {root}/proc && mount -t sysfs sys {root}/sys && "
              f"mount --rbind /dev {root}/dev && exec chroot {root} /bin/bash -e")
    return run("unshare", "--mount", "--uts", "--propagation", "private", "sh", "-c", mounts,
               input=script, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8",
                                  "DEBIAN_FRONTEND": "noninteractive", **(env or {})})


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
