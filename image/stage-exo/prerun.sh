#!/bin/bash -e
# pi-gen: start from stage2's root (Lite).
if [ ! -d "${ROOTFS_DIR}" ]; then
	copy_previous
fi
