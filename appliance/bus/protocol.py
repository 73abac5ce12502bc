"""The wire protocol, in one place: topic names, the activation frame, the JSON payloads (replies,
commands, Last Wills) and the timings every process agrees on. All topics live under `exo/<cluster>/`.

The activation frame is a fixed little-endian header, then the raw tensor bytes:

    magic "EXOF" | version u8 | dtype u8 | flags u8 | ndim u8
    request id 16 bytes | coordinator id 16 bytes
    plan_id u32 | step u32 | pos u32
    temperature f32 | top_p f32 | top_k i32 | seed i64 (-1: none)
    compute_us u32: the stages' compute time so far, so the coordinator can tell hops from work
    last_step u32: the last stage samples and sends itself the steps after this one, up to this
        step (0: none, the coordinator sends each step)
    shape: ndim x u32
    tensor bytes (C order)

No pickle and no JSON for tensors: a decode step of a 2048-wide model is 8 KB of payload plus
a few dozen bytes of header, and a frame that does not parse raises FrameError.
"""
from __future__ import annotations

import json
import math
import struct
import uuid
from dataclasses import dataclass, field

import numpy as np

HEARTBEAT_S = 2.0        # a node's status interval
MISSED_HEARTBEATS = 3    # a node silent this many intervals is planned out until it speaks again
TOP_LOGPROBS = 5         # the most likely tokens each reply carries, for the API's top_logprobs


# -- topics
@dataclass(frozen=True)
class Topics:
    cluster: str = "default"

    @property
    def root(self) -> str:
        return f"exo/{self.cluster}"

    def node_info(self, node_id: str = "+") -> str:      # retained, QoS 1, Last Will
        return f"{self.root}/node/{node_id}/info"

    def node_status(self, node_id: str = "+") -> str:    # heartbeat, QoS 0
        return f"{self.root}/node/{node_id}/status"

    def node_download(self, node_id: str = "+") -> str:  # retained, QoS 1: download progress
        return f"{self.root}/node/{node_id}/download"

    def node_inbox(self, node_id: str, sender: str = "+") -> str:   # binary activation frames, QoS 0
        return f"{self.root}/node/{node_id}/in/{sender}"

    @property
    def plan(self) -> str:                              # retained, QoS 1
        return f"{self.root}/plan"

    def coord_out(self, coord_id: str, sender: str = "+") -> str:   # tokens and errors back to a coordinator
        return f"{self.root}/coord/{coord_id}/out/{sender}"

    def coord_info(self, coord_id: str = "+") -> str:   # retained, QoS 1, Last Will: who may plan
        return f"{self.root}/coord/{coord_id}/info"

    def ctl(self, command: str = "#") -> str:           # QoS 1 commands: free, ...
        return f"{self.root}/ctl/{command}"

    def join(self, role: str = "+", user: str = "+") -> str:   # a member asks a keyed broker to let it in
        return f"{self.root}/join/{role}/{user}"

    def bench_hop(self, tag: str) -> str:               # `exo bench`'s echo of one hop
        return f"{self.root}/bench/hop/{tag}"

    def node_id_of(self, topic: str) -> str:
        """The <id> of a `.../node/<id>/...` topic."""
        return self._id_after(topic, "node")

    def coord_id_of(self, topic: str) -> str:
        """The <id> of a `.../coord/<id>/...` topic."""
        return self._id_after(topic, "coord")

    @staticmethod
    def sender_of(topic: str) -> str:
        """Who sent a message on `node/<to>/in/<from>` or `coord/<to>/out/<from>`: a keyed broker's
        ACL lets a login write only under its own name there."""
        return topic.rsplit("/", 1)[1]

    def _id_after(self, topic: str, kind: str) -> str:
        parts = topic[len(self.root) + 1:].split("/")
        return parts[parts.index(kind) + 1]


# -- JSON payloads
def node_will(node_id: str) -> bytes:
    """A node's Last Will on its info topic: the broker says for it that it is gone."""
    return json.dumps({"id": node_id, "online": False}).encode()


COORD_WILL = b""   # a coordinator's Last Will clears its retained claim


def free_command(request_id: str) -> dict:
    return {"request_id": request_id}


def token_reply(f: "Frame", token: int, continued: bool,
                logprob: float | None = None, top: list[tuple[int, float]] = ()) -> dict:
    """`continued`: the last stage has sent the next step itself (the frame's last_step allowed it).
    The log-probabilities go only where the frame asks for them (LOGPROBS)."""
    reply = {"request_id": f.request_id, "step": f.step, "token": token, "compute_s": f.compute_us / 1e6,
             "continued": continued}
    if logprob is not None:
        reply.update(logprob=logprob, top=[[i, round(lp, 6)] for i, lp in top])
    return reply


def error_reply(f: "Frame", message: str, retry: bool = False) -> dict:
    """`retry`: the request may succeed on another plan (this node no longer holds the one it was sent for)."""
    return {"request_id": f.request_id, "step": f.step, "error": message, "retry": retry}


@dataclass
class Reply:
    """A last stage's answer to one step: a token, or an error."""
    request_id: str
    step: int
    token: int | None = None
    logprob: float | None = None   # None: the frame did not ask for log-probabilities
    top: list[tuple[int, float]] = field(default_factory=list)
    compute_s: float = 0.0
    continued: bool = False   # the last stage sent the next step itself
    error: str | None = None
    retry: bool = False


def parse_reply(payload: bytes) -> Reply:
    """A reply from `coord/<id>/out`, or ValueError."""
    data = parse_json(payload)
    request_id, step = str(data["request_id"]), int(data["step"])
    if "error" in data:
        return Reply(request_id, step, error=str(data["error"]), retry=bool(data.get("retry")))
    logprob = data.get("logprob")
    return Reply(request_id, step, int(data["token"]), None if logprob is None else float(logprob),
                 [(int(i), float(lp)) for i, lp in data.get("top") or []], float(data.get("compute_s", 0.0)),
                 bool(data.get("continued")))


def parse_json(payload: bytes) -> dict:
    """Decode a JSON object payload, or raise ValueError."""
    data = json.loads(payload)
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    return data


# -- the activation frame
MAGIC, VERSION = b"EXOF", 4
HEADER = struct.Struct("<4sBBBB16s16sIIIffiqII")
DTYPES = {0: np.dtype("<i4"), 1: np.dtype("<f4"), 2: np.dtype("<f2")}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}
TOKEN_IDS = DTYPES[0]     # a first stage's input: token ids, shape (n,); others: activations (n, hidden)
WIRE_ACTIVATIONS = DTYPES[2]   # hidden states travel between stages as float16: half the bytes of float32
FLOAT16_MAX = 65504.0
MAX_PLAN_ID = 2**32 - 1

SAMPLE = 1          # flag: the last stage samples a token from this step's final position
LOGPROBS = 2        # flag: its reply carries the token's log-probability and the TOP_LOGPROBS best


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
    last_step: int = 0      # the last stage goes on by itself through this step (0: the coordinator drives)

    def next_step(self, token: int) -> "Frame":
        """The step after this one (a last stage's SAMPLE frame; LOGPROBS kept), fed `token`."""
        return Frame(self.request_id, self.coordinator_id, self.plan_id, self.step + 1, self.pos + len(self.tensor),
                     np.array([token], TOKEN_IDS), self.flags | SAMPLE, self.sampling, 0, self.last_step)


def new_id() -> str:
    return uuid.uuid4().hex


def wire_activations(hidden: np.ndarray) -> np.ndarray:
    """Hidden states as a stage sends them on: float16, clipped to its range so that a rare outlier
    arrives as its largest value rather than as inf. Engines take float16 or float32 alike."""
    return np.clip(hidden, -FLOAT16_MAX, FLOAT16_MAX).astype(WIRE_ACTIVATIONS)


def encode_frame(frame: Frame) -> bytes:
    tensor = np.ascontiguousarray(frame.tensor)
    code = DTYPE_CODES.get(tensor.dtype.newbyteorder("<"))
    if code is None or tensor.ndim != (1 if code == 0 else 2):
        raise FrameError(f"cannot send a {tensor.dtype} tensor of {tensor.ndim} dims")
    s = frame.sampling
    header = HEADER.pack(MAGIC, VERSION, code, frame.flags, tensor.ndim,
                         bytes.fromhex(frame.request_id), bytes.fromhex(frame.coordinator_id),
                         frame.plan_id, frame.step, frame.pos,
                         s.temperature, s.top_p, s.top_k, -1 if s.seed is None else s.seed,
                         min(frame.compute_us, 2**32 - 1), frame.last_step)
    return b"".join([header, struct.pack(f"<{tensor.ndim}I", *tensor.shape), tensor.astype(DTYPES[code], copy=False).data])


def decode_frame(payload: bytes) -> Frame:
    """A frame whose structure is sound: token ids are 1-d, activations 2-d, none empty, sampling
    numbers finite. Whether it fits this node's model is the node's to check."""
    if len(payload) < HEADER.size:
        raise FrameError(f"frame of {len(payload)} bytes is shorter than the header")
    (magic, version, code, flags, ndim, request_id, coordinator_id,
     plan_id, step, pos, temperature, top_p, top_k, seed, compute_us, last_step) = HEADER.unpack_from(payload)
    if magic != MAGIC or version != VERSION:
        raise FrameError(f"not an activation frame (magic {magic!r}, version {version})")
    if code not in DTYPES or ndim != (1 if code == 0 else 2):
        raise FrameError(f"bad dtype code {code} with ndim {ndim}")
    shape_end = HEADER.size + 4 * ndim
    if len(payload) < shape_end:
        raise FrameError("frame ends inside its shape")
    shape = struct.unpack_from(f"<{ndim}I", payload, HEADER.size)
    dtype = DTYPES[code]
    expected = math.prod(shape) * dtype.itemsize
    if len(payload) - shape_end != expected or expected == 0:
        raise FrameError(f"payload is {len(payload) - shape_end} bytes, shape {shape} needs {expected}")
    if not (math.isfinite(temperature) and math.isfinite(top_p)):
        raise FrameError(f"sampling parameters are not finite (temperature {temperature}, top_p {top_p})")
    tensor = np.frombuffer(payload, dtype=dtype, offset=shape_end).reshape(shape)
    return Frame(request_id.hex(), coordinator_id.hex(), plan_id, step, pos, tensor, flags,
                 Sampling(temperature, top_p, top_k, None if seed < 0 else seed), compute_us, last_step)
