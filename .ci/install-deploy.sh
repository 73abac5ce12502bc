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
  shellcheck                  # image/ stage scripts
  python3-venv python3-apt    # the package role's venv; ansible's apt module
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
