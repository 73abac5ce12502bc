"""systemd/: the units' security ratings, and a real boot of the image's root with systemd-nspawn.

The booted root is a copy of the cached debootstrap root with the image stage installed (the same
install as test_deploy_image). systemd never boots on this machine's own root.
"""
from __future__ import annotations

import json
import re
import subprocess
import time
import uuid

import psutil
import pytest
import yaml

from appliance.broker import free_port, wait_for_port

from tests.system import needs

from .deploy_helpers import (REPO, STAGE, Watcher, fresh_root, install_stage, needs_root,  # noqa: F401
                             note_time, record_time, run)

UNITS = [REPO / "systemd" / "exo-node.service", REPO / "systemd" / "exo-panel.service",
         STAGE / "00-install" / "files" / "exo-firstboot.service"]


@needs("systemd-analyze")
@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_security_exposure_is_at_most_2_5(unit):
    out = run("systemd-analyze", "security", "--offline=true", "--no-pager", unit)
    assert out.stderr == "", out.stderr
    score = float(re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out.stdout).group(1))
    note_time(f"security score {unit.name} = {score}", 0)
    assert score <= 2.5, out.stdout


class Container:
    """A booted systemd-nspawn container; commands run in it through nsenter."""

    def __init__(self, root, log):
        # Shares this machine's network namespace: the node reaches the test broker on loopback.
        self.proc = subprocess.Popen(
            ["systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "--console=read-only",
             "-D", str(root), "--boot"], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        self.leader = self._find_leader()

    def _find_leader(self, timeout: float = 30) -> int:
        # No event tells us the container's PID 1 exists: poll for it briefly.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "systemd-nspawn exited"
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                if child.name() == "systemd":
                    return child.pid
            time.sleep(0.05)
        raise TimeoutError("the container's systemd did not start")

    def sh(self, command: str, check: bool = True) -> subprocess.CompletedProcess:
        return run("nsenter", "-t", self.leader, "-a", "sh", "-c", command, check=check)

    def unit(self, name: str, prop: str) -> str:
        return self.sh(f"systemctl show -P {prop} {name}").stdout.strip()

    def stop(self):
        self.proc.terminate()               # nspawn asks the container's systemd to halt
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def test_broker(tmp_path):
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port("127.0.0.1", port, timeout=10, process=proc)
    yield f"127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


def info(payload: bytes) -> dict:
    try:
        return json.loads(payload)
    except ValueError:
        return {}


@needs_root
@needs("systemd-nspawn", "debootstrap", "mosquitto", "nsenter", "unshare")
@pytest.mark.timeout(1200)  # a cold cache builds a debootstrap root / venv first
def test_nspawn_boot_runs_the_node_and_restarts_it_after_kill_9(tmp_path, test_broker):
    start = time.monotonic()
    root = fresh_root("amd64", tmp_path / "root")
    install_stage(root, "amd64", tmp_path)
    note_time("nspawn root: copy + stage install", time.monotonic() - start)

    # Configure the card the way a user does before flashing: exo.yaml on the boot partition.
    cluster = f"t{uuid.uuid4().hex[:8]}"
    (root / "boot/firmware").mkdir(parents=True, exist_ok=True)
    (root / "boot/firmware/exo.yaml").write_text(yaml.safe_dump(
        {"role": "node", "cluster": cluster, "broker": test_broker, "log_level": "DEBUG"}))

    prefix = f"exo/{cluster}/node"
    watcher = Watcher(test_broker, [f"{prefix}/+/info", f"{prefix}/+/status"])
    log = open(tmp_path / "console.log", "w")
    container = Container(root, log)
    try:
        booted = time.monotonic()
        topic, payload = watcher.wait_for(
            lambda t, p: t.endswith("/info") and info(p).get("online") is True, 120, "announcing the node")
        note_time("nspawn boot to node announced", time.monotonic() - booted)
        node = info(payload)
        watcher.wait_for(lambda t, p: t == f"{prefix}/{node['id']}/status", 30, "a heartbeat")

        # First boot named the card after its fresh machine id and applied exo.yaml.
        machine_id = container.sh("cat /etc/machine-id").stdout.strip()
        assert node["hostname"] == f"exo-{machine_id[:6]}"
        assert container.unit("exo-firstboot.service", "Result") == "success"
        assert (root / "boot/firmware/exo.yaml.applied").exists()
        assert not (root / "boot/firmware/exo.yaml").exists()

        # Hardened as written: an unprivileged dynamic user, logging to the journal.
        assert container.unit("exo-node.service", "ActiveState") == "active"
        pid = container.unit("exo-node.service", "MainPID")
        assert container.sh(f"stat -c %u /proc/{pid}").stdout.strip() != "0"
        assert container.sh("journalctl -q -u exo-node.service -o cat | head -n 3").stdout.strip()

        # kill -9: the node's Last Will says offline, then systemd restarts it and it announces again.
        seen = len(watcher.messages)
        container.sh(f"kill -9 {pid}")
        killed = time.monotonic()
        watcher.wait_for(lambda t, p: t == topic and info(p).get("online") is False, 30, "the Last Will")
        watcher.wait_for(lambda t, p: (t, p) in watcher.messages[seen:] and t == topic
                         and info(p).get("online") is True, 60, "the node announcing again")
        note_time("kill -9 to node announced again", time.monotonic() - killed)
        assert int(container.unit("exo-node.service", "NRestarts")) >= 1
        assert container.unit("exo-node.service", "MainPID") != pid

        # `systemd-analyze verify` on the installed units, in the system they run in: silent.
        units = "/etc/systemd/system/exo-node.service /etc/systemd/system/exo-panel.service " \
                "/etc/systemd/system/exo-firstboot.service"
        verify = container.sh(f"systemd-analyze verify {units}", check=False)
        assert (verify.returncode, verify.stdout, verify.stderr) == (0, "", "")
    finally:
        watcher.close()
        container.stop()
        log.close()
