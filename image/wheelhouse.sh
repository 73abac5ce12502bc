#!/usr/bin/env bash
# Usage: image/wheelhouse.sh ARCH DEST
# Puts the exo wheel, and the wheels requirements.lock names (checked against its hashes) for
# Debian bookworm's Python 3.11 on ARCH (arm64 or amd64), into DEST: the image installs them
# offline, and two builds install the same files.
set -euo pipefail
arch="${1:?arch: arm64 or amd64}"
dest="${2:?destination folder}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
case "${arch}" in
	arm64) machine=aarch64 ;;
	amd64) machine=x86_64 ;;
	*) echo "unknown arch ${arch}" >&2; exit 2 ;;
esac

mkdir -p "${dest}"
rm -f "${dest}"/exo_appliance-*.whl
SOURCE_DATE_EPOCH=315532800 python3 -m pip wheel --quiet --no-deps --wheel-dir "${dest}" "${repo}"
cp "${repo}/requirements.lock" "${dest}/"
download() {
	python3 -m pip download --quiet --dest "${dest}" --only-binary=:all: --require-hashes --no-deps \
		--python-version 3.11 --implementation cp --abi cp311 \
		--platform "manylinux_2_36_${machine}" --platform "manylinux_2_28_${machine}" \
		--platform "manylinux_2_17_${machine}" --platform "manylinux2014_${machine}" \
		-r "${repo}/requirements.lock" "$@"
}
# A folder filled before needs no index; otherwise (or when the lock changed) ask PyPI.
download --no-index --find-links "${dest}" 2>/dev/null || download
