"""image/: the pi-gen stage's scripts pass shellcheck, and its install runs in a debootstrap root.

The root is arm64 (run under qemu-user-static) where binfmt_misc allows it, else amd64;
EXO_TEST_STAGE_ARCH=amd64 or arm64 chooses. pi-gen itself is not run here (see docs/deploy.md).
"""
from __future__ import annotations

import configparser
import importlib.machinery
import importlib.util
import os
import re

import pytest
import yaml

from tests.system import needs

from .deploy_helpers import (REPO, STAGE, arm64_emulation, fresh_root, in_chroot, install_stage,  # noqa: F401
                             local_ports_taken, needs_root, record_time, run)

SCRIPTS = [STAGE / "prerun.sh", *sorted((STAGE / "00-install").glob("*.sh")),
           REPO / "image" / "build.sh", REPO / "image" / "wheelhouse.sh", REPO / "image" / "lock.sh",
           REPO / "image" / "config"]


@needs("shellcheck")
def test_stage_scripts_pass_shellcheck():
    run("shellcheck", "--external-sources", *SCRIPTS)


def test_stage_scripts_are_executable():
    for script in SCRIPTS[:-1]:
        assert os.access(script, os.X_OK), script


def stage_arch() -> str:
    wanted = os.environ.get("EXO_TEST_STAGE_ARCH", "auto")
    if wanted == "auto":
        return "arm64" if arm64_emulation() else "amd64"
    if wanted == "arm64" and not arm64_emulation():
        pytest.skip("arm64 asked for, but binfmt_misc has no qemu-aarch64 here")
    return wanted


@needs_root
@needs("debootstrap", "unshare", "chroot")
@pytest.mark.timeout(1200)  # a cold cache builds a debootstrap root / venv first
def test_stage_install_in_a_debootstrap_chroot(tmp_path):
    arch = stage_arch()
    root = fresh_root(arch, tmp_path / "root")
    install_stage(root, arch, tmp_path)

    machine = in_chroot(root, "uname -m").stdout.strip()
    assert machine == {"arm64": "aarch64", "amd64": "x86_64"}[arch]
    imported = in_chroot(root, "/opt/exo/venv/bin/python -c "
                               "'import appliance, appliance.node.agent, appliance.cli, paho.mqtt.client, numpy;"
                               " print(appliance.__file__)'")
    assert imported.stdout.startswith("/opt/exo/venv/lib/python3.11/site-packages/appliance/")
    in_chroot(root, "/opt/exo/venv/bin/exo --version")

    enabled = in_chroot(root, "for u in exo-firstboot exo-node exo-panel mosquitto; do "
                              "echo $u $(systemctl is-enabled $u.service || true); done").stdout
    assert enabled.split("\n")[:4] == ["exo-firstboot enabled", "exo-node enabled",
                                       "exo-panel disabled", "mosquitto disabled"], enabled
    # A flashed card gets its own machine id, hence its own node id, on first boot.
    assert (root / "etc/machine-id").read_text() == "uninitialized\n"
    assert not (root / "var/lib/exo").exists()
    assert (root / "etc/mosquitto/conf.d/exo-base.conf").is_file()
    assert (root / "etc/sysctl.d/60-exo.conf").read_text() == (STAGE / "00-install/files/60-exo.conf").read_text()
    assert os.access(root / "usr/local/sbin/exo-firstboot", os.X_OK)

    # First boot with a card configured before flashing: a broker and a node, on Wi-Fi.
    (root / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    (root / "boot/firmware").mkdir(parents=True, exist_ok=True)
    (root / "boot/firmware/exo.yaml").write_text(yaml.safe_dump({
        "role": ["node", "broker"], "cluster": "kitchen", "broker": "127.0.0.1:1883",
        "broker_username": "exo", "broker_password": "s3cret", "name": "pi-a",
        "wifi": {"ssid": 'Lab "5" = #1 \u00fc', "password": "wifi-s3cret", "country": "GB"}}, allow_unicode=True))
    in_chroot(root, "/usr/local/sbin/exo-firstboot\n")
    assert (root / "etc/hostname").read_text() == "exo-012345\n"
    config = yaml.safe_load((root / "etc/exo/config.yaml").read_text())
    assert config == {"cluster": "kitchen", "broker": "127.0.0.1:1883", "broker_username": "exo",
                      "broker_password": "s3cret", "name": "pi-a"}
    wifi = (root / "etc/NetworkManager/system-connections/exo-wifi.nmconnection")
    assert 'ssid=Lab "5" = #1 \u00fc\n' in wifi.read_text() and oct(wifi.stat().st_mode & 0o777) == "0o600"
    assert "listener 1883" in (root / "etc/mosquitto/conf.d/exo.conf").read_text()
    assert (root / "etc/mosquitto/exo.passwd").read_text().startswith("exo:$7$")
    from appliance.cluster_key import cluster_hash   # the broker card advertises itself: nodes need no address
    from appliance.config import Config
    advert = (root / "etc/avahi/services/exo-mqtt.service").read_text()
    assert "<type>_exo-mqtt._tcp</type>" in advert and "<port>1883</port>" in advert
    assert f"hash={cluster_hash(Config(cluster='kitchen'))}" in advert
    enabled = in_chroot(root, "systemctl is-enabled mosquitto.service exo-node.service exo-panel.service "
                              "|| true").stdout.split()
    assert enabled == ["enabled", "enabled", "disabled"]
    applied = (root / "boot/firmware/exo.yaml.applied").read_text()
    assert "s3cret" not in applied and not (root / "boot/firmware/exo.yaml").exists()


@needs_root
@needs("unshare", "sysctl", "ip")
def test_the_images_sysctl_file_keeps_the_panels_port_from_outgoing_connections():
    """The panel's default port lies in Linux's ephemeral range: any outgoing connection may take it
    as its local port, and a panel restarted then cannot bind it. With the image's file loaded, none
    takes it."""
    from appliance.config import Config
    port = Config().port
    unreserved = local_ports_taken(port)
    assert port in unreserved, unreserved
    reserved = local_ports_taken(port, STAGE / "00-install/files/60-exo.conf")
    assert port not in reserved and "EADDRNOTAVAIL" in reserved, reserved


FAKE_PI_GEN = """#!/bin/bash
# Stands in for pi-gen's build.sh: reads the config the way pi-gen does and records it.
set -e
[ "$1" = -c ]
source "$2"
printf '%s\\n' "$IMG_NAME" "$RELEASE" "$STAGE_LIST" "$FIRST_USER_NAME" "$ENABLE_SSH" > ran
ls "$EXO_STAGE_DIR/00-install/files/staged/dist" "$EXO_STAGE_DIR/00-install/files/staged/systemd" > staged
"""


def test_build_sh_stages_arm64_wheels_and_units_and_runs_pi_gen(tmp_path):
    """image/build.sh with a stand-in for the user's pi-gen clone (pi-gen itself cannot run here)."""
    pigen = tmp_path / "pi-gen"
    for stage in ("stage0", "stage1", "stage2", "stage3", "stage4", "stage5"):
        (pigen / stage).mkdir(parents=True)
    (pigen / "build.sh").write_text(FAKE_PI_GEN)
    (pigen / "build.sh").chmod(0o755)
    run(REPO / "image" / "build.sh", pigen, env={**os.environ, "EXO_FIRST_USER_PASS": "not-used"})

    name, release, stages, user, ssh = (pigen / "ran").read_text().splitlines()
    assert (name, release, user, ssh) == ("exo-appliance", "bookworm", "exo", "1")
    assert stages == f"stage0 stage1 stage2 {STAGE}"
    assert (pigen / "stage2" / "SKIP_IMAGES").exists() and (pigen / "stage3" / "SKIP").exists()
    staged = (pigen / "staged").read_text()
    assert "exo_appliance-" in staged and "exo-node.service" in staged
    assert any("numpy-" in line and "aarch64" in line for line in staged.splitlines())


def load_firstboot():
    loader = importlib.machinery.SourceFileLoader("exo_firstboot", str(STAGE / "00-install/files/exo-firstboot"))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module


def read_keyfile_value(text: str) -> str:
    """Undo GLib's key-file escapes, as NetworkManager reads a value."""
    return re.sub(r"\\(.)", lambda m: {"s": " ", "n": "\n", "t": "\t", "r": "\r"}.get(m.group(1), m.group(1)), text)


@pytest.mark.parametrize("ssid, password", [
    ('Caf\u00e9 "Lab" = #2', "p\"a=ss#w\u00f6rd;'x"),
    (" lead\\ing", "#starts with a hash"),
])
def test_wifi_keyfile_keeps_any_ssid_and_passphrase(ssid, password):
    """The NetworkManager keyfile exo-firstboot writes, read back as an ini file: the SSID and
    passphrase come back exactly, quotes, `=`, `#`, `;`, backslashes and non-ASCII included."""
    text = load_firstboot().wifi_keyfile({"ssid": ssid, "password": password, "country": "GB"})
    keyfile = configparser.RawConfigParser(interpolation=None, delimiters=("=",), comment_prefixes=("#",),
                                           inline_comment_prefixes=None, strict=True)
    keyfile.optionxform = str
    keyfile.read_string(text)
    assert read_keyfile_value(keyfile["wifi"]["ssid"]) == ssid
    assert read_keyfile_value(keyfile["wifi-security"]["psk"]) == password
    assert keyfile["wifi-security"]["key-mgmt"] == "wpa-psk"
    assert keyfile["connection"]["type"] == "wifi"


def test_the_lock_pins_every_dependency_within_its_range():
    """requirements.lock is made again (image/lock.sh) whenever pyproject.toml's dependencies change."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pinned = {canonicalize_name(name): version for name, version in
              re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (REPO / "requirements.lock").read_text(), re.M)}
    for line in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]:
        wanted = Requirement(line)
        name = canonicalize_name(wanted.name)
        assert name in pinned, f"{name} is not in requirements.lock: run image/lock.sh"
        assert wanted.specifier.contains(pinned[name]), f"requirements.lock pins {name} {pinned[name]}, not {wanted}"
