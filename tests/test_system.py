"""tests/system.py: a missing piece of the machine fails the test and names its package."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests import system

REPO = Path(__file__).resolve().parents[1]


def test_every_package_the_tests_need_is_installed_by_ci():
    scripts = (REPO / ".ci" / "run").read_text() + (REPO / ".ci" / "install-deploy.sh").read_text()
    words = set(re.findall(r"[\w.+-]+", scripts))
    debian = {package for _, package in system.PROVIDERS.values() if not package.startswith("pip:")}
    essential = {"coreutils", "util-linux"}  # in every Debian root
    assert sorted(debian - essential - words) == []
    assert "ansible/requirements.txt" in scripts


def test_a_missing_piece_fails_naming_its_package(monkeypatch):
    monkeypatch.setitem(system.PROVIDERS, "libOpenCL.so.1", (lambda: False, "ocl-icd-libopencl1"))
    monkeypatch.setattr(system, "installable", lambda package: True)
    with pytest.raises(pytest.fail.Exception, match=r"needs libOpenCL.so.1: apt-get install ocl-icd-libopencl1"):
        system.check("libOpenCL.so.1")


def test_a_piece_that_cannot_be_installed_here_skips_with_the_same_line(monkeypatch):
    monkeypatch.setitem(system.PROVIDERS, "chromium", (lambda: False, "chromium"))
    monkeypatch.setattr(system, "installable", lambda package: False)
    with pytest.raises(pytest.skip.Exception, match=r"needs chromium: apt-get install chromium"):
        system.check("chromium")


def test_pip_tools_name_their_pip_command(monkeypatch):
    monkeypatch.setitem(system.PROVIDERS, "ansible-lint", (lambda: False, "pip:-r ansible/requirements.txt"))
    with pytest.raises(pytest.fail.Exception, match=r"pip install -r ansible/requirements.txt"):
        system.check("ansible-lint")


def test_a_present_piece_passes():
    system.check("chroot")
