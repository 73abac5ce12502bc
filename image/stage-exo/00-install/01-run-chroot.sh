#!/bin/bash
# pi-gen runs this inside the image's root (on_chroot, script on stdin).
set -euo pipefail

# The wheelhouse (image/build.sh) holds exo, every dependency for this arch and pip itself: no
# index needed. pip runs straight from its wheel, which under qemu is much faster than ensurepip.
python3 -m venv --without-pip /opt/exo/venv
pip_wheels=(/opt/exo/dist/pip-*.whl)
/opt/exo/venv/bin/python "${pip_wheels[-1]}/pip" install --quiet --no-index --find-links /opt/exo/dist \
	pip exo-appliance

systemctl enable exo-firstboot.service exo-node.service
# A card runs a broker only when its exo.yaml asks for one.
systemctl disable mosquitto.service

# A flashed card must get its own id: no machine id, no node state baked in.
: > /etc/machine-id
rm -f /var/lib/dbus/machine-id
rm -rf /var/lib/exo /var/lib/private/exo
