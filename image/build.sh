#!/usr/bin/env bash
# Usage: sudo image/build.sh PATH/TO/pi-gen
# Builds the exo appliance SD-card image with a pi-gen checkout you cloned yourself
# (git clone --branch arm64 <pi-gen>). Needs EXO_FIRST_USER_PASS (see image/config).
# The image lands in pi-gen's deploy/ folder.
set -euo pipefail
pigen="$(cd "${1:?usage: image/build.sh PATH/TO/pi-gen}" && pwd)"
here="$(cd "$(dirname "$0")" && pwd)"
staged="${here}/stage-exo/00-install/files/staged"

# Stage what the image installs: the package with its arm64 wheels, and our units.
rm -rf "${staged}"
mkdir -p "${staged}/systemd"
"${here}/wheelhouse.sh" arm64 "${staged}/dist"
cp "${here}"/../systemd/exo-node.service "${here}"/../systemd/exo-panel.service \
	"${here}"/../systemd/mosquitto-exo.conf "${staged}/systemd/"

# Lite only: stage2 makes the root, our stage exports the image.
touch "${pigen}/stage2/SKIP_IMAGES"
for stage in stage3 stage4 stage5; do
	if [ -d "${pigen}/${stage}" ]; then touch "${pigen}/${stage}/SKIP" "${pigen}/${stage}/SKIP_IMAGES"; fi
done

export EXO_STAGE_DIR="${here}/stage-exo"
cd "${pigen}"
./build.sh -c "${here}/config"
