"""The one interface every engine implements: run a shard (layers [start, end)) of a model.

A stage receives `Step`s: for the first stage `x` holds token ids, for the others the hidden
states the previous stage produced. An engine keeps one KV cache per request and runs a batch of
steps of different requests in one call. The last stage returns logits of the final position.
"""
from __future__ import annotations

import mmap
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from appliance.models.config import ModelConfig


@dataclass(frozen=True)
class Shard:
    model_dir: Path
    start: int
    end: int
    num_layers: int

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.end == self.num_layers


@dataclass
class Step:
    request_id: str
    pos: int            # position of x[0] in the request's sequence
    x: np.ndarray       # int32 [T] token ids (first stage) or float32 [T, hidden] activations


MAX_CONTEXT = 2048   # positions a request may hold, unless an engine is told otherwise
MAX_REQUESTS = 32    # requests a node holds at most when its memory decides (max_requests 0)
KV_SHARE = 0.25      # ... which is as many full KV caches as a quarter of the memory left after loading


class Engine:
    """Base class: subclasses implement `forward` and keep their KV caches keyed by request.
    `capacity` is how many positions one request may hold; the node refuses steps past it."""
    name = "base"

    def __init__(self, shard: Shard, config: ModelConfig | None = None, max_seq: int = MAX_CONTEXT):
        self.shard = shard
        self.config = config or ModelConfig.load(shard.model_dir)
        self.capacity = min(max_seq, self.config.max_position_embeddings)
        self.caches: dict[str, object] = {}     # request id -> that request's KV cache

    def forward(self, steps: list[Step]) -> list[np.ndarray]:
        """One output per step: float32 [T, hidden] activations, or on the last stage float32
        [vocab] logits of the step's final position."""
        raise NotImplementedError

    def free(self, request_id: str) -> None:
        """Forget a request's KV cache (finished, cancelled or failed)."""
        self.caches.pop(request_id, None)

    def requests(self) -> list[str]:
        return list(self.caches)

    kv_value_bytes = 4   # a key or value number: float32 (footprint.kv_value_bytes says which engine holds less)

    def kv_bytes(self) -> int:
        """What one request's KV cache takes at full capacity."""
        c = self.config
        return (self.shard.end - self.shard.start) * 2 * c.num_kv_heads * c.head_dim * self.capacity * self.kv_value_bytes

    def request_room(self, memory_available: int) -> int:
        """How many requests this engine can hold in `memory_available` bytes, 1 to MAX_REQUESTS."""
        return max(1, min(MAX_REQUESTS, int(memory_available * KV_SHARE) // max(self.kv_bytes(), 1)))


def hidden_keys(distance: np.ndarray, window: int | None) -> np.ndarray:
    """Where a query may not see a key, from query position - key position: a key in its future,
    or, with a sliding window, `window` or more positions back."""
    hidden = distance < 0
    if window:
        hidden |= distance >= window
    return hidden


def attention_mask(distance: np.ndarray, window: int | None, dtype=np.float32) -> np.ndarray:
    """hidden_keys as a mask added to the scores: -inf where hidden, 0 elsewhere."""
    return np.where(hidden_keys(distance, window), -np.inf, 0).astype(dtype)


def lazy_zeros(shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """Zeros whose memory becomes resident a small page at a time, as it is first written: for KV
    caches, sized for a whole context but filled a position at a time. np.zeros would do, but numpy
    asks for transparent huge pages on big arrays, and then writing one position of each layer and
    head makes every 2 MB around it resident: 92 MB for one request of TinyLlama on its first token."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    memory = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):   # Linux: small pages even where THP is 'always'
        memory.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(memory, dtype, count=int(np.prod(shape))).reshape(shape)


def map_root(a: np.ndarray) -> np.ndarray:
    """The array `a` is a view of, at the bottom: for a view of a np.memmap, the array np.memmap
    made (its first byte at the file's `offset`, its `_mmap` the map); for lazy_zeros, the array
    over its anonymous map."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def whole_pages(start: int, nbytes: int, page: int = mmap.PAGESIZE) -> tuple[int, int]:
    """The whole pages (of `page` bytes) inside bytes [start, start + nbytes) of a map, as [lo, hi):
    none where hi <= lo."""
    return -(-start // page) * page, (start + nbytes) // page * page


def zero_again(part: np.ndarray) -> None:
    """Make a contiguous part of a lazy_zeros array zeros again, on Linux its whole pages given back
    to the system (made afresh when next written): a freed request's rows of a shared KV cache.
    Elsewhere MADV_DONTNEED need not zero them, so they are written over."""
    if not sys.platform.startswith("linux"):
        part[...] = 0
        return
    root = map_root(part)
    start = part.ctypes.data - root.ctypes.data
    lo, hi = whole_pages(start, part.nbytes)
    flat = part.reshape(-1).view(np.uint8)
    if hi <= lo:
        flat[:] = 0
        return
    memory = root.base.obj if isinstance(root.base, memoryview) else root.base   # lazy_zeros' map
    memory.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
    flat[:lo - start] = 0   # the edges of pages shared with a neighbour
    flat[hi - start:] = 0
