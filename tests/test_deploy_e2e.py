"""The deployment end to end, as a Pi owner runs it: cards booted from the image, SSH, the real
`ansible-playbook site.yml` from a controller, then the panel answering.

Four machines, each a systemd-nspawn container booted from the image's root (the stage installed
in the cached debootstrap root, a writable overlay each) in a network namespace of its own on one
bridge: pi-01 runs the broker and the panel, pi-02 and pi-03 are nodes; the controller is a
fourth namespace on the bridge, where ansible-playbook and the test's client run. The inventory
gives a cluster key, and pi-03 no broker address: it finds the broker by the DNS-SD advert the
broker role makes with avahi. The image's
first user `exo` logs in with a key made by the test and may sudo, as on a flashed card.

Marked e2e (minutes): CI runs it; `-m "not e2e"` leaves it out locally. Each phase's time goes
to test-artifacts/deploy-timings.txt.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from appliance import cluster_key
from appliance.config import Config
from tests.system import needs

from tests.faults import Lab as Bridge

from .deploy_helpers import (REPO, Container, Overlay, image_root, needs_root, note_time,  # noqa: F401
                             record_time, run)

pytestmark = [pytest.mark.e2e, needs_root,
              needs("systemd-nspawn", "debootstrap", "ansible-playbook", "ssh", "nsenter", "unshare")]

ANSIBLE = REPO / "ansible"
MODEL_SOURCE = REPO.parent / "shared" / "models" / "stories260K" / "hf"
MODEL = "/opt/exo/models/stories260K"
MACHINES = {"pi-01": ["broker", "panel"], "pi-02": ["nodes"], "pi-03": ["nodes"]}
NODES = [name for name, groups in MACHINES.items() if "nodes" in groups]
FINDS_THE_BROKER = "pi-03"      # its config has no broker line: it browses DNS-SD for the advert
CLUSTER = Config(cluster="e2e", cluster_key=cluster_key.new_key())
PANEL_PORT = 52415


class Lab:
    """The machines, the controller's namespace, and the controller's view of them."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.network = Bridge()        # tests/faults.py: namespaces on a bridge, one address each
        self.controller = self.network.add_host("ctl").namespace
        self.key = tmp / "id_ed25519"
        run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", self.key)
        self.overlays: dict[str, Overlay] = {}
        self.machines: dict[str, Container] = {}
        self.addresses: dict[str, str] = {}
        lower = image_root("amd64")
        for name in MACHINES:
            host = self.network.add_host(name)
            namespace, self.addresses[name] = host.namespace, host.address
            overlay = self.overlays[name] = Overlay(lower, tmp / name)
            first_user(overlay.path, self.key.with_suffix(".pub").read_text())
            self.machines[name] = Container(overlay.path, tmp / f"{name}.console.log", namespace)

    def api_key(self) -> str:
        return (self.tmp / "credentials" / "panel-api-key").read_text().strip()

    @property
    def panel(self) -> str:
        return f"http://{self.addresses['pi-01']}:{PANEL_PORT}"

    def controller_run(self, *argv, **kw) -> subprocess.CompletedProcess:
        return run("ip", "netns", "exec", self.controller, *argv, **kw)

    def client(self, *args, timeout: float = 300) -> dict:
        out = self.controller_run("python3", REPO / "tests" / "deploy_client.py", *args, cwd=REPO, timeout=timeout)
        return json.loads(out.stdout.strip().splitlines()[-1])

    def playbook(self, *extra) -> subprocess.CompletedProcess:
        return self.controller_run("ansible-playbook", "-i", self.tmp / "inventory.yml", "site.yml", *extra,
                                   cwd=ANSIBLE, env=ANSIBLE_ENV, timeout=900)

    def journals(self) -> str:
        """The tail of each machine's exo and mosquitto journal: what a failed phase shows."""
        out = []
        for name, machine in self.machines.items():
            got = machine.sh("journalctl -q --no-pager -o short-monotonic -n 25 -u exo-node -u exo-panel "
                             "-u mosquitto -u exo-firstboot", check=False)
            out.append(f"--- {name}\n{got.stdout}{got.stderr}")
        return "\n".join(out)

    def close(self):
        for machine in self.machines.values():
            machine.stop()
        for overlay in self.overlays.values():
            overlay.close()
        self.network.close()


ANSIBLE_ENV = {"PATH": "/root/.pyenv/shims:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
               "HOME": "/root", "LC_ALL": "C.UTF-8", "ANSIBLE_HOST_KEY_CHECKING": "False",
               "ANSIBLE_SSH_ARGS": "-o ControlMaster=auto -o ControlPersist=300s -o UserKnownHostsFile=/dev/null"}


def first_user(root: Path, public_key: str) -> None:
    """What pi-gen makes of FIRST_USER_NAME and PUBKEY_SSH_FIRST_USER: user exo, sudo without a
    password, the key in authorized_keys."""
    run("chroot", root, "useradd", "--create-home", "--shell", "/bin/bash", "--groups", "sudo", "exo")
    ssh = root / "home/exo/.ssh"
    ssh.mkdir(mode=0o700)
    (ssh / "authorized_keys").write_text(public_key)
    run("chroot", root, "chown", "-R", "exo:exo", "/home/exo/.ssh")
    (root / "etc/sudoers.d/010_exo-nopasswd").write_text("exo ALL=(ALL) NOPASSWD: ALL\n")


def inventory(lab: Lab, credentials: Path) -> dict:
    groups: dict[str, dict] = {"broker": {"hosts": {}}, "panel": {"hosts": {}}, "nodes": {"hosts": {}}}
    for name, member_of in MACHINES.items():
        for group in member_of:
            groups[group]["hosts"][name] = {"ansible_host": lab.addresses[name]}
    groups["nodes"]["hosts"][FINDS_THE_BROKER]["node_broker"] = ""
    return {"all": {"vars": {
        "ansible_user": "exo", "ansible_ssh_private_key_file": str(lab.key),
        "exo_cluster": CLUSTER.cluster, "exo_cluster_key": CLUSTER.cluster_key,
        "exo_credentials_dir": str(credentials),
        "exo_model": MODEL, "exo_model_source": str(MODEL_SOURCE)},
        "children": groups}}


def recap(output: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP: host -> {ok, changed, unreachable, failed, ...}."""
    hosts = {}
    for host, counts in re.findall(r"^(\S+)\s+:\s+(ok=.*)$", output, re.M):
        hosts[host] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", counts)}
    assert hosts, output[-3000:]
    return hosts


def timed(label: str):
    class Timer:
        def __enter__(self):
            self.start = time.monotonic()
            return self

        def __exit__(self, *exc):
            self.seconds = time.monotonic() - self.start
            note_time(f"e2e: {label}", self.seconds)
    return Timer()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    with timed("image root (cached) and booting four machines"):
        lab = Lab(tmp)
        for machine in lab.machines.values():
            machine.wait_booted()
    (tmp / "inventory.yml").write_text(yaml.safe_dump(inventory(lab, tmp / "credentials")))
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture(scope="module")
def deployed(lab):
    with timed("playbook, first run"):
        first = lab.playbook()
    with timed("first run to a ready plan over both nodes"):
        try:
            state = lab.client("wait-plan", lab.panel, lab.api_key(), str(len(NODES)), "180")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{lab.journals()}") from None
    return {"first": first, "state": state, "credentials": lab.tmp / "credentials"}


@pytest.mark.timeout(1500)
def test_the_playbook_ends_in_a_cluster_serving_the_inventorys_model(lab, deployed):
    assert not any(counts["failed"] or counts["unreachable"] for counts in recap(deployed["first"].stdout).values())
    state = deployed["state"]
    assert state["model"]["id"] == MODEL
    hostnames = {lab.machines[name].sh("hostname").stdout.strip() for name in NODES}
    in_plan = {n["hostname"] for n in state["nodes"] if n["id"] in {s["node"] for s in state["plan"]["shards"]}}
    assert in_plan == hostnames, (in_plan, hostnames)
    # The product's defaults, not the reference engine.
    assert {n.get("engine") for n in state["nodes"]} == {"onnxruntime"}, state["nodes"]

    key = (deployed["credentials"] / "panel-api-key").read_text().strip()
    text = lab.client("complete", lab.panel, key, MODEL)["text"]
    assert text.strip(), "an empty completion"
    refused = lab.client("post", lab.panel, "/v1/completions", "not-the-key", json.dumps({"model": MODEL, "prompt": "x"}))
    assert refused["status"] == 401


def test_a_node_given_no_broker_finds_the_advertised_one_and_logins_derive_from_the_key(lab, deployed):
    """Issue 14: the broker role advertises its mosquitto (avahi, exo's own advert), a node with
    no broker line joins through it, and the MQTT logins are those exo derives from the key."""
    advert = lab.client("browse", CLUSTER.cluster, CLUSTER.cluster_key, "30")   # from the controller's namespace
    assert advert["address"] == f"{lab.addresses['pi-01']}:1883", advert
    assert advert["cluster"] == CLUSTER.cluster and advert["since"] == 0, advert

    configs = {name: yaml.safe_load(lab.machines[name].sh("cat /etc/exo/config.yaml").stdout) for name in NODES}
    configs["panel"] = yaml.safe_load(lab.machines["pi-01"].sh("cat /etc/exo/panel.yaml").stdout)
    assert "broker" not in configs[FINDS_THE_BROKER], configs[FINDS_THE_BROKER]
    for name, config in configs.items():
        assert config["cluster_key"] == CLUSTER.cluster_key, name
        assert config["broker_password"] == cluster_key.password(CLUSTER, config["broker_username"]), name
    # It is in the plan (the first test checks every node is), and it got there by the advert.
    in_plan = {s["node"] for s in deployed["state"]["plan"]["shards"]}
    assert configs[FINDS_THE_BROKER]["broker_username"] in in_plan
    log = lab.machines[FINDS_THE_BROKER].sh("journalctl -q --no-pager -u exo-node").stdout
    assert f"at {lab.addresses['pi-01']}:1883" in log, log[-3000:]


def test_the_admin_token_ansible_wrote_works_for_admin_actions(lab, deployed):
    """docs/deploy.md, step 5: load a model with the admin token."""
    token = (deployed["credentials"] / "panel-admin-token").read_text().strip()
    body = json.dumps({"model": MODEL})
    assert lab.client("post", lab.panel, "/api/models/load", "wrong", body)["status"] == 401
    loaded = lab.client("post", lab.panel, "/api/models/load", token, body)
    assert loaded["status"] == 202, loaded
    lab.client("wait-plan", lab.panel, lab.api_key(), str(len(NODES)), "120")


@pytest.mark.timeout(900)
def test_a_second_run_changes_nothing(lab, deployed):
    with timed("playbook, second run"):
        second = lab.playbook()
    counts = recap(second.stdout)
    assert {host: c["changed"] for host, c in counts.items()} == {host: 0 for host in counts}, second.stdout[-5000:]


@pytest.mark.timeout(600)
def test_a_rebooted_node_comes_back_into_the_plan(lab, deployed):
    node = lab.machines["pi-03"]
    machine_id = node.sh("cat /etc/machine-id").stdout.strip()
    with timed("reboot of a node to a ready plan over both nodes"):
        node.stop()
        lab.client("wait-plan", lab.panel, lab.api_key(), str(len(NODES) - 1), "120")    # planned without it
        node.start()
        lab.client("wait-plan", lab.panel, lab.api_key(), str(len(NODES)), "180")
    assert node.sh("cat /etc/machine-id").stdout.strip() == machine_id, "the node's machine id changed on reboot"


def newer_wheel(tmp: Path) -> tuple[Path, str]:
    """This tree's wheel under a later version: what a release would bring."""
    source = tmp / "newer-source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", "test-artifacts", "credentials", "dist",
                                                               "__pycache__", "*.egg-info", "build"))
    init = source / "appliance" / "__init__.py"
    version = re.search(r'(?m)^__version__ = "([^"]+)"', init.read_text()).group(1) + ".post1"
    init.write_text(re.sub(r'(?m)^__version__ = "[^"]+"', f'__version__ = "{version}"', init.read_text()))
    run("python3", "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", tmp / "newer", source)
    return next((tmp / "newer").glob("exo_appliance-*.whl")), version


@pytest.mark.timeout(1200)
def test_a_newer_wheel_rolls_over_the_nodes_one_at_a_time_while_the_cluster_answers(lab, deployed):
    wheel, version = newer_wheel(lab.tmp)
    key = (deployed["credentials"] / "panel-api-key").read_text().strip()
    stop = lab.tmp / "stop-hammer"
    hammer = subprocess.Popen(["ip", "netns", "exec", lab.controller, "python3", str(REPO / "tests/deploy_client.py"),
                               "hammer", lab.panel, key, MODEL, str(stop)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    output = []
    try:
        with timed("rolling upgrade of the nodes (playbook with a newer wheel, up to the panel's play)"):
            playbook = subprocess.Popen(["ip", "netns", "exec", lab.controller, "ansible-playbook", "-i",
                                         str(lab.tmp / "inventory.yml"), "site.yml", "-e", f"package_wheel_file={wheel}"],
                                        cwd=ANSIBLE, env=ANSIBLE_ENV, stdout=subprocess.PIPE, text=True)
            for line in playbook.stdout:
                output.append(line)
                if line.startswith("PLAY [Panel]"):
                    break               # the panel restarts on its upgrade: the nodes' part is over
        stop.touch()
        answered = json.loads(hammer.communicate(timeout=120)[0].strip().splitlines()[-1])
        output.extend(playbook.stdout)
        assert playbook.wait(600) == 0, "".join(output)[-5000:]
    finally:
        stop.touch()
        hammer.wait(120)
    lab.client("wait-plan", lab.panel, lab.api_key(), str(len(NODES)), "180")
    upgrade = "".join(output)
    for name in NODES:
        installed = lab.machines[name].sh("/opt/exo/venv/bin/exo --version").stdout
        assert version in installed, (name, installed)
    # One node at a time (serial), each back in the plan before the next restarts, and requests
    # answered all along.
    assert upgrade.count("PLAY [Nodes]") == len(NODES), upgrade[:3000]
    rejoined = re.findall(r"Wait until the panel's plan holds this node again\] \**\n(?:FAILED - RETRYING.*\n)*ok: \[(\S+)\]",
                          upgrade)
    assert rejoined == NODES, upgrade[-5000:]
    note_time(f"e2e: completions answered while the nodes were upgraded: {answered['done']}", 0)
    assert answered["failures"] == [] and answered["done"] > 0, answered
