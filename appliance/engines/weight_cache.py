"""Shard weights on disk: a converted (quantized, narrowed) shard is written once into one raw
file plus an index, keyed by the model's revision, the layer range and the form, and memory-mapped
on every later load. The onnxruntime and ggml engines both keep their converted shards this way.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import mmap
import os
import shutil
import sys
import threading
from pathlib import Path

import numpy as np

from appliance.engines.base import Shard, map_root, whole_pages
from appliance.models.gguf_model import gguf_files

CACHE_VERSION = 2


def release_pages(arrays) -> None:
    """The session has prepacked the matrices into its own buffers: drop the pages of the memory
    maps it read them from, so they are not counted twice. They are file-backed and read-only: a
    tensor still used in place (a float tied head) just faults its pages back in."""
    maps = {}
    for a in arrays:
        while a is not None and not hasattr(a, "_mmap"):
            a = a.base
        if a is not None and a._mmap is not None:
            maps[id(a._mmap)] = a._mmap
    for m in maps.values():
        m.madvise(mmap.MADV_DONTNEED)


MADV_PAGEOUT = 21   # Linux 5.4+: reclaim these pages now (clean file pages are just dropped)


def page_out_file(path: Path) -> None:
    """Drop this process's resident pages of every mapping of `path` made by someone else (here:
    onnxruntime's map of a saved session's data file, whose loading also read the original
    weights it no longer needs). Pages still used fault back in from the page cache. Dirty
    private pages are never discarded by MADV_PAGEOUT; without /proc (not Linux) it does nothing."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return
    target = str(Path(path).resolve())
    for line in maps:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == target:
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            madvise(lo, hi - lo, MADV_PAGEOUT)   # an old kernel says EINVAL: nothing dropped


@contextlib.contextmanager
def paging_out(path: Path, every_s: float = 0.05):
    """page_out_file(path) every `every_s` while the block runs, and once after. onnxruntime reads
    a saved session's whole data file while it builds the session, the original matrices and
    their prepacked copies alike, and needs none of it resident afterwards: paging out as it reads
    keeps the load's peak (VmHWM) under what running the session needs (TinyLlama q8: 1,207 ->
    1,097 MB). onnxruntime lets go of the GIL while it builds, so this thread gets to run."""
    done = threading.Event()

    def pager():
        while not done.wait(every_s):
            page_out_file(path)
    thread = threading.Thread(target=pager, name="page-out", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        page_out_file(path)


MADV_HUGEPAGE = 14
HUGE_PAGE = 2 << 20


def advise_huge_pages(address: int, size: int) -> None:
    """Ask Linux to back this (not yet touched) anonymous memory with transparent huge pages,
    whose fewer TLB misses make a weight-streaming step faster: measured 10 % (q8) and 6 % (q4)
    on a ggml decode step. The kernel's default `madvise` mode grants them only where asked.
    Where the kernel has none, or it is not Linux, nothing happens."""
    start, end = whole_pages(address, size, HUGE_PAGE)
    if end > start and sys.platform.startswith("linux"):   # 14 is Linux's number for it alone
        madvise(start, end - start, MADV_HUGEPAGE)   # EINVAL without THP: the pages stay small


def madvise(address: int, size: int, advice: int) -> None:
    """libc's madvise on memory that Python's mmap objects do not own (a library's map or buffer);
    its failure is ignored, as every caller's advice is only a hint."""
    call = _libc_madvise()
    if call:
        call(address, size, advice)


@functools.cache
def _libc_madvise():
    """libc's madvise with its argument types, loaded once (page_out_file calls it per mapping), or None."""
    import ctypes

    try:
        call = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return call


def release_array(a: np.ndarray) -> None:
    """Drop the pages wholly inside one memory-mapped array, just copied elsewhere: so copying a
    shard tensor by tensor never holds it twice."""
    root = map_root(a)
    if getattr(root, "_mmap", None) is None or root.offset != 0:
        return
    lo, hi = whole_pages(a.ctypes.data - root.ctypes.data, a.nbytes)
    if hi > lo:
        root._mmap.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


class FileRows:
    """Rows of a 2-D array memory-mapped from a file, read with pread instead of through the map: a
    first stage reads a few embedding rows a token. A fault maps more than the row it touched: 16
    pages around it, or, where the page cache holds the file in large folios (ext4 on Linux 6.16
    and later), the whole folio. A TinyLlama q8 first stage's map grew by 54 MB in 64 decode
    tokens on Linux 6.18. Read with pread, the rows come through the page cache and are never
    mapped into the process."""

    def __init__(self, a: np.ndarray):
        root = map_root(a)
        if not isinstance(root, np.memmap) or a.ndim != 2 or not a.flags.c_contiguous:
            raise ValueError("FileRows reads the rows of a C-ordered 2-D array of a np.memmap")
        self.offset = root.offset + a.ctypes.data - root.ctypes.data
        self.rows, self.dtype, self.width = a.shape[0], a.dtype, a.shape[1]
        self.row_bytes = a.strides[0]
        self.fd = os.open(root.filename, os.O_RDONLY)

    def read(self, ids) -> np.ndarray:
        out = np.empty((len(ids), self.width), self.dtype)
        for row, i in zip(out, ids):
            if not 0 <= i < self.rows or os.preadv(self.fd, [row], self.offset + int(i) * self.row_bytes) != row.nbytes:
                raise ValueError(f"row {i} is not one of the {self.rows} rows")
        return out

    def __del__(self):
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)


def row_reader(a: np.ndarray):
    """rows -> those rows of the 2-D array `a`: read from its file (FileRows) where `a` lies in a
    np.memmap, else indexed."""
    try:
        return FileRows(a).read
    except ValueError:
        return lambda ids: a[np.asarray(ids)]


def cache_key(shard: Shard, quant: str) -> str:
    """Model revision stand-in: the config and every weight file's name, size and mtime."""
    model_dir = Path(shard.model_dir)
    if model_dir.suffix == ".gguf":   # a GGUF model: its files, whose header holds the config
        h, files = hashlib.sha256(b"gguf"), gguf_files(model_dir)
    else:
        h, files = hashlib.sha256((model_dir / "config.json").read_bytes()), sorted(model_dir.glob("*.safetensors"))
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(f"v{CACHE_VERSION}".encode())
    return f"{model_dir.name}-{h.hexdigest()[:16]}/layers-{shard.start}-{shard.end}-{quant}"


def save_arrays(path: Path, arrays) -> None:
    """Arrays into one raw file (64-byte aligned) plus index.json; written aside, then renamed."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    index, offset = {}, 0
    with open(tmp / "weights.bin", "wb") as f:
        for name, a in arrays:
            a = np.ascontiguousarray(a)
            f.write(b"\0" * (-offset % 64))
            offset += -offset % 64
            index[name] = {"dtype": a.dtype.str, "shape": list(a.shape), "offset": offset}
            f.write(a.data if a.ndim else a.tobytes())   # the buffer itself: no copy of a large matrix
            offset += a.nbytes
    (tmp / "index.json").write_text(json.dumps(index))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    index = json.loads((path / "index.json").read_text())
    raw = np.memmap(path / "weights.bin", dtype=np.uint8, mode="r")
    out = {}
    for name, meta in index.items():
        dtype = np.dtype(meta["dtype"])
        count = int(np.prod(meta["shape"]))
        out[name] = raw[meta["offset"]:meta["offset"] + count * dtype.itemsize].view(dtype).reshape(meta["shape"])
    return out
