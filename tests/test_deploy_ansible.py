"""ansible/: lint, syntax, and site.yml run for real against this machine (connection local).

It overwrites and then removes this machine's /etc/exo and exo mosquitto files: CI machines only.

After two runs (the second must change nothing) the test starts mosquitto with the generated
config and checks authentication and the ACL with real clients.
"""
from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import yaml

from appliance.broker import free_port, wait_for_port

from tests.system import needs

from .deploy_helpers import (REPO, Watcher, connect, local_ports_taken, needs_root, note_time, publish,  # noqa: F401
                             record_time, run)

ANSIBLE = REPO / "ansible"


@needs("ansible-lint")
def test_ansible_lint_production_profile():
    out = run("ansible-lint", "--profile", "production", cwd=ANSIBLE)
    assert "Passed" in out.stdout + out.stderr


@needs("ansible-playbook")
def test_site_syntax_check_with_the_example_inventory():
    run("ansible-playbook", "-i", "inventory.example.yml", "--syntax-check", "site.yml", cwd=ANSIBLE)


def recap_changed(output: str) -> int:
    match = re.search(r"^localhost\s+:.*\bchanged=(\d+)", output, re.M)
    assert match, output[-3000:]
    return int(match.group(1))


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """site.yml applied twice to this machine, with broker, panel and node all on localhost."""
    work = tmp_path_factory.mktemp("ansible")
    cluster = f"t{uuid.uuid4().hex[:8]}"
    port, tls_port, panel_port = free_port(), free_port(), free_port()
    # TLS on: nodes use the TLS listener, the plain one stays on loopback (as the role does).
    inventory = {"all": {
        "vars": {"ansible_connection": "local", "ansible_python_interpreter": "/usr/bin/python3",
                 "exo_cluster": cluster, "exo_broker_host": "127.0.0.1", "exo_broker_port": port,
                 "exo_broker_tls": True, "exo_broker_tls_port": tls_port,
                 # No panel serves here (no systemd): a free port, so no other panel answers.
                 "exo_panel_port": panel_port,
                 "exo_credentials_dir": str(work / "credentials")},
        "children": {"broker": {"hosts": {"localhost": {"broker_listen_address": "127.0.0.1"}}},
                     "panel": {"hosts": {"localhost": {}}},
                     "nodes": {"hosts": {"localhost": {}}}}}}
    (work / "inventory.yml").write_text(yaml.safe_dump(inventory))
    remove_deployment()
    runs = []
    try:
        for n in (1, 2):
            start = time.monotonic()
            runs.append(run("ansible-playbook", "-i", work / "inventory.yml", "site.yml", cwd=ANSIBLE))
            note_time(f"ansible-playbook site.yml run {n}", time.monotonic() - start)
        yield {"cluster": cluster, "address": f"127.0.0.1:{port}", "tls_address": f"127.0.0.1:{tls_port}",
               "panel_port": panel_port, "runs": runs, "work": work}
    finally:
        remove_deployment()


# What site.yml writes to this machine outside /opt/exo (a venv, kept to make the next run quick).
# Left behind, /etc/exo/config.yaml would become every later `exo` process's config.
DEPLOYED_FILES = [
    "/etc/exo/config.yaml", "/etc/exo/panel.yaml", "/etc/exo/broker-ca.crt",
    "/etc/mosquitto/conf.d/exo.conf", "/etc/mosquitto/conf.d/exo-base.conf",
    "/etc/mosquitto/exo.passwd", "/etc/mosquitto/exo.passwd.sha256", "/etc/mosquitto/exo.acl",
    "/etc/mosquitto/certs/exo-ca.crt", "/etc/mosquitto/certs/exo-server.crt",
    "/etc/mosquitto/certs/exo-server.key", "/etc/avahi/services/exo-mqtt.service",
    "/etc/systemd/system/exo-node.service", "/etc/systemd/system/exo-panel.service", "/etc/sysctl.d/60-exo.conf",
    "/etc/systemd/system/multi-user.target.wants/exo-node.service",
    "/etc/systemd/system/multi-user.target.wants/exo-panel.service",
]


def remove_deployment():
    for path in DEPLOYED_FILES:
        Path(path).unlink(missing_ok=True)



@needs_root
@needs("ansible-playbook", "mosquitto")
@pytest.mark.timeout(1200)  # a cold cache builds a debootstrap root / venv first
def test_site_is_idempotent(deployed):
    first, second = deployed["runs"]
    assert recap_changed(first.stdout) > 0
    assert recap_changed(second.stdout) == 0, second.stdout[-4000:]
    assert "[WARNING]" not in first.stderr + second.stderr


@needs_root
@needs("ansible-playbook", "mosquitto")
def test_the_broker_is_advertised_with_exos_own_advert_on_the_port_nodes_use(deployed):
    """The avahi service file is exo's (appliance.discovery.avahi_service), TLS's port with TLS on."""
    from appliance.config import Config
    from appliance.discovery import avahi_service

    tls_port = int(deployed["tls_address"].rsplit(":", 1)[1])
    written = Path("/etc/avahi/services/exo-mqtt.service").read_text()
    assert written == avahi_service(Config(cluster=deployed["cluster"]), tls_port)


class Mosquitto:
    """mosquitto as Debian starts it (root, dropping to the mosquitto user), with our config."""

    def __init__(self, *addresses: str):
        self.address = addresses[0]
        self.addresses = addresses
        self.start()

    def start(self):
        self.proc = subprocess.Popen(["mosquitto", "-c", "/etc/mosquitto/mosquitto.conf"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for address in self.addresses:
            host, port = address.split(":")
            wait_for_port(host, int(port), timeout=15, process=self.proc)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def broker_process(deployed):
    broker = Mosquitto(deployed["address"], deployed["tls_address"])
    yield broker
    broker.stop()


@pytest.fixture
def mosquitto(broker_process):
    return broker_process.address


@needs_root
@needs("ansible-playbook", "mosquitto")
def test_broker_refuses_anonymous_and_enforces_the_acl(deployed, mosquitto):
    node = yaml.safe_load(open("/etc/exo/config.yaml"))
    panel = yaml.safe_load(open("/etc/exo/panel.yaml"))
    assert node["cluster"] == deployed["cluster"] and node["broker"] == deployed["tls_address"]
    prefix = f"exo/{deployed['cluster']}"

    _, rc = connect(mosquitto)
    assert rc.is_failure, "an anonymous client was let in"
    _, rc = connect(mosquitto, node["broker_username"], "wrong password")
    assert rc.is_failure, "a wrong password was let in"

    watcher = Watcher(mosquitto, [f"{prefix}/#"], panel["broker_username"], panel["broker_password"])
    client, rc = connect(mosquitto, node["broker_username"], node["broker_password"])
    assert not rc.is_failure, f"the node's own credentials were refused: {rc}"
    try:
        me = node["broker_username"]
        publish(client, f"{prefix}/plan", '{"plan_id": 999}', retain=True)   # denied: panel only
        publish(client, f"{prefix}/ctl/load", "{}")                           # denied: panel only
        publish(client, f"{prefix}/node/someone-else/info", "{}")             # denied: not its own
        publish(client, f"{prefix}/node/someone-else/in/{me}", b"frame")      # allowed: an inbox, as itself
        publish(client, f"{prefix}/node/someone-else/in/another", b"frame")   # denied: as another node
        publish(client, f"{prefix}/coord/c0ffee/out/another", b"token")       # denied: tokens as another node
        publish(client, f"{prefix}/coord/c0ffee/info", '{"online": true}')    # denied: a leader's claim
        publish(client, f"{prefix}/node/{me}/status", "marker")               # allowed: its own
        watcher.wait_for(lambda t, p: t == f"{prefix}/node/{me}/status" and p == b"marker", 10,
                         "marker on the node's own status topic")
        topics = [t for t, _ in watcher.messages]
        assert f"{prefix}/node/someone-else/in/{me}" in topics
        assert f"{prefix}/node/someone-else/in/another" not in topics
        assert f"{prefix}/coord/c0ffee/out/another" not in topics
        assert f"{prefix}/coord/c0ffee/info" not in topics
        assert f"{prefix}/plan" not in topics
        assert f"{prefix}/ctl/load" not in topics
        assert f"{prefix}/node/someone-else/info" not in topics
    finally:
        client.loop_stop()
        client.disconnect()
        watcher.close()

    # The panel may write the plan (retained, as the coordinator does).
    panel_client, rc = connect(mosquitto, panel["broker_username"], panel["broker_password"])
    assert not rc.is_failure
    watcher = Watcher(mosquitto, [f"{prefix}/plan"], node["broker_username"], node["broker_password"])
    publish(panel_client, f"{prefix}/plan", '{"plan_id": 1}', retain=True)
    watcher.wait_for(lambda t, p: t == f"{prefix}/plan", 10, "the panel's plan")
    watcher.close()
    panel_client.loop_stop()
    panel_client.disconnect()


@needs_root
@needs("ansible-playbook", "mosquitto")
def test_the_installed_node_announces_itself_through_tls_and_the_acl(deployed, mosquitto, tmp_path):
    """The deployed agent with the deployed config, as exo-node.service runs it (minus the sandbox)."""
    node = yaml.safe_load(open("/etc/exo/config.yaml"))
    panel = yaml.safe_load(open("/etc/exo/panel.yaml"))
    info = f"exo/{deployed['cluster']}/node/{node['broker_username']}/info"
    watcher = Watcher(mosquitto, [info], panel["broker_username"], panel["broker_password"])
    agent = subprocess.Popen(["/opt/exo/venv/bin/exo", "node"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL,
                             env={"EXO_CONFIG": "/etc/exo/config.yaml", "EXO_STATE_DIR": str(tmp_path),
                                  "PATH": "/usr/bin:/bin"})
    try:
        # The id Ansible keyed the broker user and ACL by is the id the agent announces.
        _, payload = watcher.wait_for(lambda t, p: json.loads(p).get("online") is True, 60,
                                      f"the agent's info on {info}")
        assert json.loads(payload)["id"] == node["broker_username"]
    finally:
        agent.terminate()
        agent.wait(20)
        watcher.close()


@needs_root
@needs("ansible-playbook", "mosquitto")
def test_broker_drops_messages_over_the_size_limit(deployed, mosquitto):
    panel = yaml.safe_load(open("/etc/exo/panel.yaml"))
    topic = f"exo/{deployed['cluster']}/ctl/size-test"
    watcher = Watcher(mosquitto, [topic], panel["broker_username"], panel["broker_password"])
    big, rc = connect(mosquitto, panel["broker_username"], panel["broker_password"])
    dropped = threading.Event()
    big.on_disconnect = lambda *args: dropped.set()
    big.publish(topic, b"x" * (3 << 20), qos=0)              # over max_packet_size (2 MiB)
    assert dropped.wait(10), "mosquitto kept a client that sent a 3 MiB packet"
    big.loop_stop()
    small, _ = connect(mosquitto, panel["broker_username"], panel["broker_password"])
    publish(small, topic, b"x" * (1 << 20))                  # a 1 MiB prefill chunk is fine
    watcher.wait_for(lambda t, p: len(p) == 1 << 20, 10, "the 1 MiB message")
    assert all(len(p) <= 1 << 20 for _, p in watcher.messages)
    small.loop_stop()
    small.disconnect()
    watcher.close()


@needs_root
@needs("ansible-playbook", "mosquitto")
def test_generated_files_are_private(deployed):
    for path, mode in [("/etc/exo/config.yaml", 0o600), ("/etc/exo/panel.yaml", 0o600),
                       ("/etc/mosquitto/exo.passwd", 0o640), ("/etc/mosquitto/exo.acl", 0o640)]:
        assert stat.S_IMODE(os.stat(path).st_mode) == mode, path
    creds = deployed["work"] / "credentials"
    assert (creds / "mqtt" / "localhost").read_text().strip() == \
        yaml.safe_load(open("/etc/exo/config.yaml"))["broker_password"]
    # The panel's API key and admin token are the ones kept on the controller (the end-to-end
    # test uses them against a deployed panel).
    panel = yaml.safe_load(open("/etc/exo/panel.yaml"))
    assert panel["api_keys"][0] == (creds / "panel-api-key").read_text().strip()
    assert panel["admin_token"] == (creds / "panel-admin-token").read_text().strip()
    assert "exo/" not in open("/etc/mosquitto/exo.passwd").read()


@needs_root
@needs("ansible-playbook", "mosquitto", "unshare", "sysctl", "ip")
def test_the_panels_port_is_kept_from_outgoing_connections(deployed):
    """The panel's port may lie in Linux's ephemeral range: the role writes a sysctl file that keeps
    it from outgoing connections (systemd-sysctl applies it; here, a namespace of our own loads it)."""
    port = deployed["panel_port"]
    assert port in local_ports_taken(port)
    assert port not in local_ports_taken(port, Path("/etc/sysctl.d/60-exo.conf"))


@needs_root
@needs("ansible-playbook", "mosquitto")
@pytest.mark.timeout(1200)  # a cold cache builds a debootstrap root / venv first
def test_rotating_a_node_password(deployed, broker_process):
    """docs/deploy.md: delete the credential file, run site.yml again."""
    old = yaml.safe_load(open("/etc/exo/config.yaml"))
    (deployed["work"] / "credentials" / "mqtt" / "localhost").unlink()
    start = time.monotonic()
    result = run("ansible-playbook", "-i", deployed["work"] / "inventory.yml", "site.yml", cwd=ANSIBLE)
    note_time("ansible-playbook site.yml after rotating", time.monotonic() - start)
    assert recap_changed(result.stdout) > 0
    new = yaml.safe_load(open("/etc/exo/config.yaml"))
    assert new["broker_password"] != old["broker_password"]

    # On a systemd host the role restarts mosquitto; here the test does. The retained plan from
    # the ACL test survives it: persistence is on, and the mosquitto user can write its database.
    broker_process.stop()
    broker_process.start()
    panel = yaml.safe_load(open("/etc/exo/panel.yaml"))
    watcher = Watcher(broker_process.address, [f"exo/{deployed['cluster']}/plan"],
                      panel["broker_username"], panel["broker_password"])
    watcher.wait_for(lambda t, p: p == b'{"plan_id": 1}', 10, "the retained plan after a restart")
    watcher.close()
    _, rc = connect(broker_process.address, old["broker_username"], old["broker_password"])
    assert rc.is_failure, "the old password still works"
    client, rc = connect(broker_process.address, new["broker_username"], new["broker_password"])
    assert not rc.is_failure, f"the new password was refused: {rc}"
    client.loop_stop()
    client.disconnect()


@needs_root
@needs("ansible-playbook", "mosquitto")
def test_nodes_reach_the_broker_over_tls_with_the_generated_ca(deployed, broker_process):
    node = yaml.safe_load(open("/etc/exo/config.yaml"))
    assert node["broker_tls"] is True
    host, port = node["broker"].split(":")
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.tls_set(ca_certs=node["broker_ca_file"])          # verifies the name, 127.0.0.1 here
    client.username_pw_set(node["broker_username"], node["broker_password"])
    connected = threading.Event()
    client.on_connect = lambda c, u, f, rc, p: (not rc.is_failure) and connected.set()
    client.connect(host, int(port))
    client.loop_start()
    try:
        assert connected.wait(10), "no TLS connection with the node's credentials and the CA"
    finally:
        client.loop_stop()
        client.disconnect()
