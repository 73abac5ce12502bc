#!/bin/bash
# pi-gen runs this inside the image's root (on_chroot, script on stdin).
set -euo pipefail

# The wheelhouse (image/build.sh) holds exo and every wheel requirements.lock names for this
# arch, pip included: no index needed, and every hash checked. pip runs straight from its wheel,
# which under qemu is much faster than ensurepip.
python3 -m venv --without-pip /opt/exo/venv
pip_wheels=(/opt/exo/dist/pip-*.whl)
pip=("/opt/exo/venv/bin/python" "${pip_wheels[0]}/pip" install --quiet --no-index --find-links /opt/exo/dist)
"${pip[@]}" --require-hashes -r /opt/exo/dist/requirements.lock
"${pip[@]}" --no-deps /opt/exo/dist/exo_appliance-*.whl

systemctl enable exo-firstboot.service exo-node.service
# A card runs a broker only when its exo.yaml asks for one.
systemctl disable mosquitto.service

# A flashed card must get its own id: no machine id, no node state baked in. "uninitialized"
# (machine-id(5)) makes the first boot a first boot: systemd writes a fresh id and keeps it,
# and ConditionFirstBoot units (exo-firstboot) run. An empty file would do neither.
echo uninitialized > /etc/machine-id
rm -f /var/lib/dbus/machine-id
rm -rf /var/lib/exo /var/lib/private/exo
