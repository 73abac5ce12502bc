"""Memory-mapped safetensors: a node maps only the tensors of its own layers.

The safetensors format is an 8-byte little-endian header length, a JSON header (name -> dtype,
shape, byte offsets) and the raw tensor bytes. Mapping the file and viewing slices of it means a
node's resident memory grows only with the pages of the tensors it actually touches.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from appliance.models.gguf_model import GGUF, Blocks, is_gguf

DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I32": np.int32, "I64": np.int64}
INDEX = "model.safetensors.index.json"


def weight_map(model_dir: str | Path) -> dict[str, str]:
    """Tensor name -> safetensors file name, for one-file and sharded checkpoints alike."""
    model_dir = Path(model_dir)
    if (model_dir / INDEX).exists():
        return json.loads((model_dir / INDEX).read_text())["weight_map"]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} has no *.safetensors weights")
    return {name: f.name for f in files for name in _header(f)[0] if name != "__metadata__"}


def _header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length)), 8 + length


# A multimodal checkpoint's text tower (Gemma 3 4B and up) under the names a text model has.
PREFIXES = {"language_model.model.": "model.", "model.language_model.": "model.", "language_model.lm_head.": "lm_head."}


# Mixtral's expert names -> Qwen-MoE's, which the engines read: mlp.gate (the router), mlp.experts.E.*_proj.
MIXTRAL = {"block_sparse_moe.": "mlp.", ".w1.": ".gate_proj.", ".w3.": ".up_proj.", ".w2.": ".down_proj."}


def canonical_name(name: str) -> str:
    """The name a text-only checkpoint gives a tensor (a vision tower's tensors keep theirs: no stage
    wants them), and a Mixtral expert's the name a Qwen-MoE one has."""
    for prefix, text in PREFIXES.items():
        if name.startswith(prefix):
            name = text + name[len(prefix):]
            break
    if ".block_sparse_moe." in name:
        for old, new in MIXTRAL.items():
            name = name.replace(old, new)
    return name


def shard_tensor_names(names, start: int, end: int, first: bool, last: bool, tied: bool) -> list[str]:
    """The tensors (as stored) a stage holding layers [start, end) needs."""
    def wanted(name: str) -> bool:
        name = canonical_name(name)
        if name.startswith("model.layers."):
            return start <= int(name.split(".")[2]) < end
        if name == "model.embed_tokens.weight":
            return first or (last and tied)
        if name == "model.norm.weight":
            return last
        if name == "lm_head.weight":         # a tied checkpoint may store a copy: the embedding serves
            return last and not tied
        return False
    return [n for n in names if wanted(n)]


STACKED_EXPERTS = tuple(f"mlp.experts.{kind}_proj.weight" for kind in ("gate", "up", "down"))


def load_shard(model_dir: str | Path, config, start: int, end: int, copy_on_write: bool = False) -> dict[str, np.ndarray]:
    """The tensors of a stage holding layers [start, end), memory-mapped, under the names of a
    Llama checkpoint: a multimodal text tower's prefix dropped, Phi-3's fused `qkv_proj` and
    `gate_up_proj` split into row views (no copy), a GGUF file's stacked experts into one view
    each, and norm weights made what they multiply by (Gemma's `1 + w`, small float32 arrays). The engines all read the model through this."""
    first, last = start == 0, end == config.num_layers
    if is_gguf(model_dir):   # llama.cpp's file: its norms already hold 1 + w
        gguf = GGUF(model_dir)
        raw = gguf.load(shard_tensor_names(gguf.tensor_names(), start, end, first, last, config.tie_word_embeddings))
        offset = 0.0
    else:
        raw = load_tensors(model_dir, shard_tensor_names(weight_map(model_dir), start, end, first, last,
                                                         config.tie_word_embeddings), copy_on_write)
        offset = config.norm_offset
    out = {}
    for stored, t in raw.items():
        name = canonical_name(stored)
        if name.endswith("norm.weight") and offset:
            t = as_float32(t) + np.float32(offset)
        if name.endswith("self_attn.qkv_proj.weight"):
            q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
            base = name[:-len("qkv_proj.weight")]
            out.update({base + "q_proj.weight": t[:q], base + "k_proj.weight": t[q:q + kv],
                        base + "v_proj.weight": t[q + kv:]})
        elif name.endswith(STACKED_EXPERTS) and t.ndim == 3:   # a GGUF file's experts: a view of each
            base, kind = name.rsplit(".experts.", 1)
            out.update({f"{base}.experts.{e}.{kind}": t[e] for e in range(t.shape[0])})
        elif name.endswith("mlp.gate_up_proj.weight"):
            base, half = name[:-len("gate_up_proj.weight")], t.shape[0] // 2
            out.update({base + "gate_proj.weight": t[:half], base + "up_proj.weight": t[half:]})
        else:
            out[name] = t
    return out


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """The bfloat16 bits of float32 values, rounded to nearest even as torch does."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def load_tensors(model_dir: str | Path, names: list[str], copy_on_write: bool = False) -> dict[str, np.ndarray]:
    """Map the named tensors read-only. bfloat16 tensors come back as their raw uint16 bits;
    call `as_float32` to compute with them. `copy_on_write` maps the file privately instead: the
    arrays are writable, for libraries that insist on a writable buffer (tinygrad's copies to a
    device), yet the file is opened read-only and a page is copied only if written."""
    model_dir = Path(model_dir)
    files = weight_map(model_dir)
    by_file: dict[str, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    out = {}
    for file, file_names in by_file.items():
        header, data_start = _header(model_dir / file)
        mapped = np.memmap(model_dir / file, dtype=np.uint8, mode="c" if copy_on_write else "r")
        for name in file_names:
            info = header[name]
            lo, hi = info["data_offsets"]
            dtype = DTYPES[info["dtype"]]
            out[name] = mapped[data_start + lo:data_start + hi].view(dtype).reshape(info["shape"])
            out[name].flags.writeable = copy_on_write
            if info["dtype"] == "BF16":
                out[name] = _BF16(out[name])
    return out


class _BF16(np.ndarray):
    """A uint16 view that remembers it holds bfloat16 bits."""
    def __new__(cls, raw):
        return raw.view(cls)


def as_float32(t: np.ndarray) -> np.ndarray:
    if isinstance(t, Blocks):   # a GGUF file's quantized blocks
        return t.dequantize()
    if isinstance(t, _BF16):
        return bf16_to_f32(t.view(np.uint16))
    return np.asarray(t, dtype=np.float32)
