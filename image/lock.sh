#!/usr/bin/env bash
# Usage: image/lock.sh
# Writes requirements.lock: every dependency of exo (and pip) pinned, with the sha256 of each of
# its files on PyPI, resolved for the Python of Raspberry Pi OS bookworm (3.11) on arm64.
# image/wheelhouse.sh and the Ansible package role install exactly this. Run it (uv from PyPI)
# after changing the dependencies in pyproject.toml, and commit the result.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "${repo}"
echo pip | uv pip compile pyproject.toml - --generate-hashes --quiet \
	--python-version 3.11 --python-platform aarch64-manylinux_2_36 --only-binary :all: \
	--custom-compile-command image/lock.sh --output-file requirements.lock
