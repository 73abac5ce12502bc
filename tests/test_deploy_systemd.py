"""systemd/: the units' security ratings, and a real boot of the image's root with systemd-nspawn.

The booted root is an overlay over the cached image root: the debootstrap root with the image
stage installed (the same install as test_deploy_image). systemd never boots on this machine's
own root.
"""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import time
import uuid

import pytest
import yaml

from appliance.broker import free_port, wait_for_port

from tests.system import needs

from tests.faults import Lab

from .deploy_helpers import (REPO, STAGE, Container, Overlay, Watcher, image_root, needs_root,  # noqa: F401
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
    overlay = Overlay(image_root("amd64"), tmp_path / "card")
    root = overlay.path
    note_time("nspawn root: image root (cached) + overlay", time.monotonic() - start)

    # Configure the card the way a user does before flashing: exo.yaml on the boot partition.
    cluster = f"t{uuid.uuid4().hex[:8]}"
    (root / "boot/firmware").mkdir(parents=True, exist_ok=True)
    (root / "boot/firmware/exo.yaml").write_text(yaml.safe_dump(
        {"role": "node", "cluster": cluster, "broker": test_broker, "log_level": "DEBUG"}))

    prefix = f"exo/{cluster}/node"
    watcher = Watcher(test_broker, [f"{prefix}/+/info", f"{prefix}/+/status"])
    container = Container(root, tmp_path / "console.log")
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
        overlay.close()


# First boot, every role: a card booted from the image's root with an exo.yaml for the role, in
# a network namespace of its own. A node or panel card alone gets a broker the test runs in
# that namespace (the card reaches it on 127.0.0.1); a broker card serves its own.
ROLES = {"node": ["node"], "panel": ["panel"], "broker": ["broker"], "all": ["node", "panel", "broker"]}


def until(container: Container, command: str, timeout: int = 90) -> str:
    """Run command in the container until it succeeds (a service coming up); its output."""
    loop = shlex.quote(f"until {command}; do sleep 0.5; done")
    return container.sh(f"timeout {timeout} sh -c {loop}", timeout=timeout + 10).stdout


@needs_root
@needs("systemd-nspawn", "debootstrap", "mosquitto", "nsenter", "unshare")
@pytest.mark.timeout(900)
@pytest.mark.parametrize("role", ROLES)
def test_first_boot_serves_the_role_its_exo_yaml_names(role, tmp_path):
    roles = ROLES[role]
    network = Lab()                # a bridge in a namespace of its own, one host on it
    namespace = network.add_host("card").namespace
    overlay = Overlay(image_root("amd64"), tmp_path / "card")
    user, password = "exo", "p'w=#ü"
    settings = {"role": roles[0] if len(roles) == 1 else roles, "cluster": "fb", "broker": "127.0.0.1:1883",
                "broker_username": user, "broker_password": password, "log_level": "DEBUG"}
    (overlay.path / "boot/firmware").mkdir(parents=True, exist_ok=True)
    (overlay.path / "boot/firmware/exo.yaml").write_text(yaml.safe_dump(settings, allow_unicode=True))
    broker = None
    if "broker" not in roles:      # a broker elsewhere on the LAN: here, in the card's namespace
        (tmp_path / "broker.conf").write_text("listener 1883 127.0.0.1\nallow_anonymous true\nuser root\n")
        broker = subprocess.Popen(["ip", "netns", "exec", namespace, "mosquitto", "-c", str(tmp_path / "broker.conf")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    container = None
    try:
        container = Container(overlay.path, tmp_path / "console.log", namespace)
        container.wait_booted()
        assert container.unit("exo-firstboot.service", "ExecMainStatus") == "0"
        assert (overlay.path / "boot/firmware/exo.yaml.applied").exists()
        expected = {"exo-node.service": "node" in roles, "exo-panel.service": "panel" in roles,
                    "mosquitto.service": "broker" in roles}
        enabled = {unit: container.sh(f"systemctl is-enabled {unit}", check=False).stdout.strip() == "enabled"
                   for unit in expected}
        assert enabled == expected
        (overlay.path / "root/broker-password").write_text(password)
        login = f"-h 127.0.0.1 -u {user} -P \"$(cat /root/broker-password)\""
        if "broker" in roles:      # the broker takes exo.yaml's user and refuses anyone else
            until(container, f"mosquitto_pub {login} -t exo/fb/probe -m x")
            refused = container.sh("mosquitto_pub -h 127.0.0.1 -u exo -P wrong -t exo/fb/probe -m x", check=False)
            assert refused.returncode != 0
        if "node" in roles:        # the node announces itself on the broker
            info = until(container, f"mosquitto_sub {login} -t 'exo/fb/node/+/info' -C 1 -W 5 | grep '\"online\": *true'")
            assert '"hostname"' in info
        if "panel" in roles:       # the panel serves its API, with the node when the card has one
            state = until(container, "/opt/exo/venv/bin/python -c \"import urllib.request; "
                                     "print(urllib.request.urlopen('http://127.0.0.1:52415/api/state').read().decode())\"")
            assert json.loads(state)["cluster"] == "fb"
            if "node" in roles:
                until(container, "/opt/exo/venv/bin/python -c \"import json, urllib.request; "
                                 "s = json.load(urllib.request.urlopen('http://127.0.0.1:52415/api/state')); "
                                 "assert [n for n in s['nodes'] if n['online']]\"")
    finally:
        if container:
            container.stop()
        if broker:
            broker.terminate()
            broker.wait(10)
        overlay.close()
        network.close()
