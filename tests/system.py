"""What the tests need from the machine, and the package (Debian's, or pip's) that provides each piece.

A test that needs one of these is marked `@needs("chromium")` (or `needs_opencl`, ...). Where the
piece is missing the test fails with a line naming the package to install, so a fresh machine that
lacks it shows up as red instead of as a quiet skip. It is skipped, with the same line, only where
the package cannot be installed at all: a machine without apt, or whose apt does not know it.
`.ci/run` installs every package named here.
"""
from __future__ import annotations

import ctypes.util
import functools
import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest

from appliance.broker import find_mosquitto

OPENCL_VENDORS = Path("/etc/OpenCL/vendors")


def _command(name: str):
    return lambda: shutil.which(name) is not None


def chromium() -> str | None:
    """Debian's chromium, or the name other distributions give it."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _opencl_loader() -> bool:
    return ctypes.util.find_library("OpenCL") is not None


def _opencl_driver() -> bool:
    return any(OPENCL_VENDORS.glob("*.icd"))


# what -> (is it here?, the Debian package that provides it, or "pip:" and the pip arguments)
PROVIDERS = {
    "mosquitto": (lambda: find_mosquitto() is not None, "mosquitto"),
    "mosquitto_passwd": (_command("mosquitto_passwd"), "mosquitto"),
    "clang": (_command("clang"), "clang"),                            # tinygrad's CPU backend
    "ggml": (lambda: importlib.util.find_spec("ggml") is not None, "pip:ggml-python==0.0.45"),   # the ggml engine
    "libOpenCL.so.1": (_opencl_loader, "ocl-icd-libopencl1"),          # the OpenCL ICD loader
    "an OpenCL driver": (_opencl_driver, "pocl-opencl-icd"),           # pocl: OpenCL on the CPU
    "chromium": (lambda: chromium() is not None, "chromium"),
    "tmux": (_command("tmux"), "tmux"),                               # a real terminal for `exo` and Ctrl-C
    "shellcheck": (_command("shellcheck"), "shellcheck"),
    "debootstrap": (_command("debootstrap"), "debootstrap"),
    "systemd-analyze": (_command("systemd-analyze"), "systemd"),
    "systemd-nspawn": (_command("systemd-nspawn"), "systemd-container"),
    "unshare": (_command("unshare"), "util-linux"),
    "nsenter": (_command("nsenter"), "util-linux"),
    "ssh": (_command("ssh"), "openssh-client"),
    "chroot": (_command("chroot"), "coreutils"),
    "ip": (_command("ip"), "iproute2"),
    "sysctl": (_command("sysctl"), "procps"),
    "ansible-playbook": (_command("ansible-playbook"), "pip:-r ansible/requirements.txt"),
    "ansible-lint": (_command("ansible-lint"), "pip:-r ansible/requirements.txt"),
}


@functools.cache
def installable(package: str) -> bool:
    """Whether this machine could install the package (pip always can; apt if it knows a candidate)."""
    if package.startswith("pip:"):
        return True
    if not shutil.which("apt-cache"):
        return False
    policy = subprocess.run(["apt-cache", "policy", package], capture_output=True, text=True).stdout
    return "Candidate:" in policy and "Candidate: (none)" not in policy


def missing(*things: str) -> list[str]:
    return [t for t in things if not PROVIDERS[t][0]()]


def check(*things: str) -> None:
    """Fail (or, where it cannot be installed, skip) naming the packages of what is missing."""
    absent = missing(*things)
    if not absent:
        return
    packages = sorted({PROVIDERS[t][1] for t in absent})
    commands = [f"pip install {p[4:]}" for p in packages if p.startswith("pip:")]
    debian = [p for p in packages if not p.startswith("pip:")]
    commands += [f"apt-get install {' '.join(debian)}"] if debian else []
    message = f"needs {', '.join(absent)}: {'; '.join(commands)} (.ci/run installs it)"
    if all(installable(p) for p in packages):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def needs(*things: str):
    """Mark a test (or, as `pytestmark`, a module) as needing these pieces of the system."""
    unknown = [t for t in things if t not in PROVIDERS]
    assert not unknown, f"tests/system.py does not know {unknown}: add it to PROVIDERS"
    return pytest.mark.system(*things)


needs_opencl = needs("libOpenCL.so.1", "an OpenCL driver")
