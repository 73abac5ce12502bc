#!/usr/bin/env bash
# Installs what the deployment tests (tests/test_deploy_*.py) need, from nothing.
# Called by .ci/run before pytest; safe to run again.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
apt_packages=(
  systemd systemd-container   # systemd-analyze, systemd-nspawn
  debootstrap                 # the base root for the nspawn and chroot tests
  qemu-user-static binfmt-support  # arm64 chroot where binfmt_misc is available
  mosquitto mosquitto-clients # the broker the ansible test configures
  avahi-daemon                # the broker role advertises the broker with it
  shellcheck                  # image/ stage scripts
  python3-venv python3-apt    # the package role's venv; ansible's apt module
  openssh-client iproute2     # the end-to-end test: SSH into the cards, their network namespaces
)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# Debian's mosquitto postinst may start a broker on :1883; the tests run their own.
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  systemctl disable --now mosquitto || true
fi

python3 -m pip install -q -r "$(dirname "$0")/../ansible/requirements.txt"
# The tests' own clients (the core's [test] extra has them too).
python3 -m pip install -q "paho-mqtt>=2.0,<3" "pytest>=8" psutil PyYAML

# The roots the tests boot, built now so that nothing downloads while they run (kept in
# /var/cache/exo-test, EXO_TEST_CACHE): the debootstrap root with an SSH server, sudo and
# python3-apt in it, the wheels requirements.lock names, and the image root (the stage installed).
cd "$(dirname "$0")/.."
python3 -c "from tests.deploy_helpers import image_root; print(image_root('amd64'))"
