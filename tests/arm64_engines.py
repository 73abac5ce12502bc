"""Run engine agreement tests on arm64: a Debian bookworm arm64 root under qemu-user (not part of
the suite; correctness, not speed).

    python3 -m tests.arm64_engines [--qemu QEMU] [--ggml-lib DIR] [--cpu CPU] [pytest arguments]

The root is the deployment tests' cached debootstrap root, with the aarch64 wheels of
requirements.lock (image/wheelhouse.sh), pytest, this tree and ../shared/models/stories260K.
ggml-python builds ggml on install, which under emulation would take hours: --ggml-lib names a
folder of libggml*.so cross-built for arm64 (docs/performance.md, "arm64", gives the cmake lines;
Raspberry Pi 5's Cortex-A76 is armv8.2-a with dotprod and fp16), and ggml-python's Python files
go beside them. Without it, the ggml tests skip there as they do on any machine without ggml.
--qemu names a static qemu-aarch64 to run them with instead of the system's: onnxruntime 1.32's
aarch64 wheel dies (SIGSEGV) while it loads under Debian bookworm's qemu-user 7.2, and runs under
bookworm-backports' 10.0 (CONTRIBUTING.md, "The engines on arm64", says how to get it without
installing it).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.deploy_helpers import BINFMT, REPO, arm64_emulation, fresh_root, in_chroot, run, wheelhouse

GGML_PYTHON = "ggml-python==0.0.45"   # pyproject's [ggml] pin: its Python files, not its build
TEST_WHEELS = ["pytest>=8", "pytest-timeout>=2.3", "httpx>=0.27"]   # what tests/conftest.py imports
SHARED = REPO.parent / "shared" / "models" / "stories260K"
VENV = "/opt/exo-test"
# The tests of both engines (some of onnxruntime's are named for what they check). unshare in a
# chroot cannot make the root's mounts private, which the read-only folder test needs.
DEFAULT_TESTS = ["tests/test_engines.py", "tests/test_gguf.py", "-k",
                 "(onnxruntime or onnx_kv or matmulnbits or qmoe or ggml) and not read_only_folder"]
SHOW_GGML_FEATURES = ("import ggml; print('ggml sees:', *(f'{name} {getattr(ggml, \"ggml_cpu_has_\" + name)()}' "
                      "for name in ('neon', 'dotprod', 'matmul_int8', 'sve')))")
# what binfmt_misc matches an aarch64 ELF executable by (as Debian's qemu-user-static registers it)
AARCH64_ELF = (b"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00",
               b"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff")


@contextlib.contextmanager
def emulated_by(qemu: Path):
    """arm64 executables run under `qemu` (a static qemu-aarch64) while the block runs. binfmt_misc
    tries the newest entry first, so this one goes ahead of the system's and is removed after.
    F: the kernel opens the emulator now, so it runs inside a chroot; P: argv[0] as given."""
    name = f"exo-qemu-aarch64-{os.getpid()}"
    escaped = ["".join(f"\\x{b:02x}" for b in pattern) for pattern in AARCH64_ELF]
    (BINFMT / "register").write_text(f":{name}:M::{escaped[0]}:{escaped[1]}:{qemu.resolve()}:PF")
    try:
        yield
    finally:
        (BINFMT / name).write_text("-1")


def download(dest: Path, *args: str) -> None:
    run(sys.executable, "-m", "pip", "download", "--quiet", "--dest", dest, "--only-binary=:all:",
        "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
        "--platform", "manylinux_2_17_aarch64", "--platform", "manylinux2014_aarch64", *args)


def ggml_python_files(dest: Path) -> Path:
    """ggml-python's package folder (its Python files only), from its source release."""
    run(sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
        "--dest", dest, GGML_PYTHON)
    sdist = next(dest.glob("ggml_python-*.tar.gz"))
    run("tar", "-xzf", sdist, "-C", dest)
    return next(dest.glob("ggml_python-*/ggml"))


def install_ggml(root: Path, ggml_lib: Path, scratch: Path) -> None:
    """ggml-python's files into the venv, the cross-built libraries in its lib/, and libgomp."""
    site = next((root / VENV.lstrip("/")).glob("lib/python3*/site-packages"))
    package = shutil.copytree(ggml_python_files(scratch), site / "ggml")
    shutil.copytree(ggml_lib, package / "lib", dirs_exist_ok=True)
    gomp = Path("/usr/aarch64-linux-gnu/lib/libgomp.so.1")   # Debian's libgomp1-arm64-cross
    shutil.copy(gomp, root / "usr/lib/aarch64-linux-gnu" / gomp.name)


def prepare_root(scratch: Path) -> Path:
    """A copy of the cached arm64 root with a venv of the lock's wheels and pytest, this tree and stories260K."""
    root = fresh_root("arm64", scratch / "root")
    download(scratch / "test-wheels", *TEST_WHEELS)
    shutil.copytree(wheelhouse("arm64"), root / "tmp/wheels")
    shutil.copytree(scratch / "test-wheels", root / "tmp/wheels", dirs_exist_ok=True)
    tree = root / "work/exo"
    tree.mkdir(parents=True)
    subprocess.run(f"git -C {REPO} ls-files -z --cached --others --exclude-standard | "
                   f"tar -C {REPO} --null -T - -cf - | tar -C {tree} -xf -", shell=True, check=True)
    if SHARED.exists():
        shutil.copytree(SHARED, root / "work/shared/models/stories260K")
    pip = f"{VENV}/bin/pip install --quiet --no-index --find-links /tmp/wheels"
    in_chroot(root, f"python3 -m venv {VENV}\n{pip} -r /tmp/wheels/requirements.lock\n"
                    f"{pip} {' '.join(map(shlex.quote, TEST_WHEELS))}\n")
    return root


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ggml-lib", type=Path, help="folder of libggml*.so built for arm64")
    parser.add_argument("--cpu", default="cortex-a76", help="the CPU qemu emulates (default: a Pi 5's core; "
                        "qemu's own, given by --cpu '', has features no Pi has, i8mm and SVE, which pick other "
                        "kernels)")
    parser.add_argument("--qemu", type=Path, help="a static qemu-aarch64 to run arm64 binaries with (default: the "
                        "system's, through binfmt_misc)")
    parser.add_argument("pytest_args", nargs=argparse.REMAINDER, help=f"default: {' '.join(DEFAULT_TESTS)}")
    args = parser.parse_args()
    system_emulation = arm64_emulation()   # mounts binfmt_misc where it is not
    if not (args.qemu or system_emulation):
        print("arm64 binaries do not run here: install qemu-user-static and binfmt-support", file=sys.stderr)
        return 2
    if args.qemu and not args.qemu.is_file():
        print(f"--qemu {args.qemu}: no such file", file=sys.stderr)
        return 2
    with emulated_by(args.qemu) if args.qemu else contextlib.nullcontext(), \
            tempfile.TemporaryDirectory(prefix="exo-arm64-") as tmp:
        root = prepare_root(Path(tmp))
        script = "cd /work/exo && uname -m\n"
        if args.ggml_lib:
            install_ggml(root, args.ggml_lib, Path(tmp))
            script += f"{VENV}/bin/python -c {shlex.quote(SHOW_GGML_FEATURES)}\n"
        script += f"{VENV}/bin/python -m pytest -q -p no:cacheprovider {' '.join(map(shlex.quote, args.pytest_args or DEFAULT_TESTS))}\n"
        env = {"QEMU_CPU": args.cpu} if args.cpu else None
        return in_chroot(root, script, env=env, capture_output=False, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
