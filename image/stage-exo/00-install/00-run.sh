#!/bin/bash
# pi-gen runs this on the build host: copy what image/build.sh staged into the new root.
set -euo pipefail
files="$(dirname "$0")/files"
root="${ROOTFS_DIR:?}"

install -d "${root}/opt/exo/dist" "${root}/etc/exo" "${root}/etc/mosquitto/conf.d"
install -m 0644 "${files}"/staged/dist/*.whl "${files}"/staged/dist/requirements.lock "${root}/opt/exo/dist/"
install -m 0644 "${files}"/staged/systemd/exo-node.service "${files}"/staged/systemd/exo-panel.service \
	"${files}/exo-firstboot.service" "${root}/etc/systemd/system/"
install -m 0644 "${files}/staged/systemd/mosquitto-exo.conf" "${root}/etc/mosquitto/conf.d/exo-base.conf"
install -m 0755 "${files}/exo-firstboot" "${root}/usr/local/sbin/exo-firstboot"
install -D -m 0644 "${files}/80-exo.preset" "${root}/etc/systemd/system-preset/80-exo.preset"
install -D -m 0644 "${files}/60-exo.conf" "${root}/etc/sysctl.d/60-exo.conf"
install -m 0644 "${files}/exo.yaml.example" "${root}/etc/exo/exo.yaml.example"
