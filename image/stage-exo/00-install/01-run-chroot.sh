#!/bin/bash
# pi-gen runs this inside the image's root (on_chroot, script on stdin).
set -euo pipefail

# The wheelhouse (image/build.sh) holds exo and every dependency for this arch: no index needed.
python3 -m venv /opt/exo/venv
/opt/exo/venv/bin/pip install --quiet --no-index --find-links /opt/exo/dist exo-appliance

systemctl enable exo-firstboot.service exo-node.service
# A card runs a broker only when its exo.yaml asks for one.
systemctl disable mosquitto.service

# A flashed card must get its own id: no machine id, no node state baked in.
: > /etc/machine-id
rm -f /var/lib/dbus/machine-id
rm -rf /var/lib/exo /var/lib/private/exo
