"""The binary activation frame: a fixed little-endian header, then the raw tensor bytes.

    magic "EXOF" | version u8 | dtype u8 | flags u8 | ndim u8
    request id 16 bytes | coordinator id 16 bytes
    plan_id u32 | step u32 | pos u32
    temperature f32 | top_p f32 | top_k i32 | seed i64 (-1: none)
    compute_us u32: the stages' compute time so far, so the coordinator can tell hops from work
    shape: ndim x u32
    tensor bytes (C order)

No pickle and no JSON for tensors: a decode step of a 2048-wide model is 8 KB of payload plus
a few dozen bytes of header, and a frame that does not parse raises FrameError.
"""
from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass, field

import numpy as np

MAGIC, VERSION = b"EXOF", 2
HEADER = struct.Struct("<4sBBBB16s16sIIIffiqI")
DTYPES = {0: np.dtype("<i4"), 1: np.dtype("<f4"), 2: np.dtype("<f2")}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}
MAX_NDIM = 4

SAMPLE = 1          # flag: the last stage samples a token from this step's final position


class FrameError(ValueError):
    pass


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0          # 0: no top-k cut
    seed: int | None = None


@dataclass(eq=False)   # frames are compared by identity; their tensors have no single truth value
class Frame:
    request_id: str         # 32 hex digits
    coordinator_id: str     # 32 hex digits: replies go to coord/<coordinator_id>/out
    plan_id: int
    step: int
    pos: int
    tensor: np.ndarray
    flags: int = 0
    sampling: Sampling = field(default_factory=Sampling)
    compute_us: int = 0


def new_id() -> str:
    return uuid.uuid4().hex


def encode(frame: Frame) -> bytes:
    tensor = np.ascontiguousarray(frame.tensor)
    code = DTYPE_CODES.get(tensor.dtype.newbyteorder("<"))
    if code is None or tensor.ndim > MAX_NDIM:
        raise FrameError(f"cannot send a {tensor.dtype} tensor of {tensor.ndim} dims")
    s = frame.sampling
    header = HEADER.pack(MAGIC, VERSION, code, frame.flags, tensor.ndim,
                         bytes.fromhex(frame.request_id), bytes.fromhex(frame.coordinator_id),
                         frame.plan_id, frame.step, frame.pos,
                         s.temperature, s.top_p, s.top_k, -1 if s.seed is None else s.seed,
                         min(frame.compute_us, 2**32 - 1))
    return b"".join([header, struct.pack(f"<{tensor.ndim}I", *tensor.shape), tensor.astype(DTYPES[code], copy=False).data])


def decode(payload: bytes) -> Frame:
    if len(payload) < HEADER.size:
        raise FrameError(f"frame of {len(payload)} bytes is shorter than the header")
    (magic, version, code, flags, ndim, request_id, coordinator_id,
     plan_id, step, pos, temperature, top_p, top_k, seed, compute_us) = HEADER.unpack_from(payload)
    if magic != MAGIC or version != VERSION:
        raise FrameError(f"not an activation frame (magic {magic!r}, version {version})")
    if code not in DTYPES or ndim > MAX_NDIM:
        raise FrameError(f"bad dtype code {code} or ndim {ndim}")
    shape_end = HEADER.size + 4 * ndim
    if len(payload) < shape_end:
        raise FrameError("frame ends inside its shape")
    shape = struct.unpack_from(f"<{ndim}I", payload, HEADER.size)
    dtype = DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(payload) - shape_end != expected:
        raise FrameError(f"payload is {len(payload) - shape_end} bytes, shape {shape} needs {expected}")
    tensor = np.frombuffer(payload, dtype=dtype, offset=shape_end).reshape(shape)
    return Frame(request_id.hex(), coordinator_id.hex(), plan_id, step, pos, tensor, flags,
                 Sampling(temperature, top_p, top_k, None if seed < 0 else seed), compute_us)
