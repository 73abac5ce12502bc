"""What a shard costs in memory as each engine really holds it: the planner's side of the engines.

Weights are counted in the form the engine keeps after loading, not as stored: onnxruntime holds
q4 as 4-bit blocks of 32 with a float32 scale each, q8 as int8 with a float32 scale per output
channel; ggml holds Q4_0 / Q8_0 blocks (32 weights and a float16 scale, float16 where a row is
no whole number of blocks); numpy widens every matrix to float32; tinygrad keeps f32 or f16 on
its device. No engine widens the embedding: onnxruntime and ggml read a first stage's rows of it
from their cache file (they hold none of it), numpy and tinygrad map it as stored. The KV room is
one request's keys and values over the full context, float32 (ggml: float16 on a CPU with float16
arithmetic, but at f32). A mixture of experts is held whole (every expert: the memory) but a
token reads only its router and k experts (`active_layer`: for speed estimates); onnxruntime holds
the experts in QMoE's blocks of 32 (q8 too: a scale a block). Light on purpose (no numpy, no
engine imports): the coordinator plans with it.
"""
from __future__ import annotations

import ctypes
import functools
import platform
from dataclasses import dataclass

from appliance.models.config import DTYPE_BYTES, ModelConfig

QUANTS = ("q4", "q8", "f16", "f32")   # what every engine but numpy can hold a matrix as
DEFAULT_QUANT = {"numpy": "f32", "onnxruntime": "q8", "tinygrad": "f32", "ggml": "q8"}
BLOCK = 32   # onnxruntime's MatMulNBits block (onnx_graph.BLOCK)
FLOAT_BYTES = {"f32": 4, "f16": 2}
GGML_BLOCK_BYTES = {"q4": 18, "q8": 34}   # Q4_0, Q8_0: a block of 32 weights with its float16 scale
AT_HWCAP, HWCAP_ASIMDHP = 16, 1 << 10    # getauxval's key, and arm64 Linux's bit for float16 SIMD


@dataclass(frozen=True)
class Footprint:
    layer: int       # one decoder layer's weights
    embedding: int   # the first stage's token embedding
    head: int        # the last stage's final norm and output head
    kv_layer: int    # one request's KV cache for one layer, at full context
    active_layer: int = 0   # what one token reads of a layer (a mixture: the router and k experts); 0: all of it

    def shard(self, layers: int, first: bool, last: bool, requests: int) -> int:
        """A shard of `layers` layers holding `requests` full KV caches."""
        return (layers * (self.layer + requests * self.kv_layer)
                + (self.embedding if first else 0) + (self.head if last else 0))


# Bytes a weight takes, as the engines hold a model's matrices in each quant (matrix_bytes, less
# the scales of q8's rows): what the panel shows a catalog model's size by, before its config is read.
WEIGHT_BYTES = {"q4": 0.5 + 4 / BLOCK, "q8": 1, "f16": 2, "f32": 4}


def matrix_bytes(rows: int, cols: int, engine: str, quant: str) -> int:
    """One [rows, cols] weight matrix (rows = outputs) as the engine holds it."""
    if engine == "onnxruntime" and quant == "q4":
        return rows * cols // 2 + rows * -(-cols // BLOCK) * 4
    if engine == "onnxruntime" and quant == "q8":
        return rows * cols + rows * 4
    if engine == "ggml" and quant in GGML_BLOCK_BYTES:
        return rows * cols * 2 if cols % BLOCK else rows * cols // BLOCK * GGML_BLOCK_BYTES[quant]
    return rows * cols * FLOAT_BYTES.get(quant, 4)


def expert_bytes(rows: int, cols: int, engine: str, quant: str) -> int:
    """One expert's [rows, cols] matrix: onnxruntime's QMoE holds q8 in blocks of 32 as well."""
    if engine == "onnxruntime" and quant == "q8":
        return rows * cols + rows * -(-cols // BLOCK) * 4
    return matrix_bytes(rows, cols, engine, quant)


def layer_bytes(c: ModelConfig, layer: int, engine: str, quant: str, active: bool = False) -> int:
    """One layer as the engine holds it (`active`: what one token reads of it)."""
    h, q, kv = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    matrices = [(q, h), (kv, h), (kv, h), (h, q)]
    norms = (4 if c.sandwich_norms else 2) * h + (2 * c.head_dim if c.qk_norm else 0)
    small = (norms + ((q + 2 * kv) if c.attention_bias else 0)) * 4   # norms and biases: float32
    if not c.is_sparse(layer):
        matrices += [(c.intermediate_size, h), (c.intermediate_size, h), (h, c.intermediate_size)]
        return sum(matrix_bytes(r, k, engine, quant) for r, k in matrices) + small
    inner, shared = c.moe_intermediate_size, c.shared_expert_size
    if shared:
        matrices += [(shared, h), (shared, h), (h, shared)]
        small += h * 4                                           # its sigmoid gate, float32
    small += c.num_experts * h * 4                               # the router, float32
    expert = 2 * expert_bytes(inner, h, engine, quant) + expert_bytes(h, inner, engine, quant)
    experts = c.experts_per_token if active else c.num_experts
    return sum(matrix_bytes(r, k, engine, quant) for r, k in matrices) + small + experts * expert


def footprint(config: ModelConfig, engine: str, quant: str = "", positions: int = 2048,
              float16_arithmetic: bool = False) -> Footprint:
    """A layer is counted as the model's largest (a mixture with dense layers: a sparse one);
    `float16_arithmetic`: the node's CPU's (see kv_value_bytes)."""
    c, quant = config, quant or DEFAULT_QUANT.get(engine, "f32")
    h, kv = c.hidden_size, c.num_kv_heads * c.head_dim
    kinds = {c.is_sparse(i): i for i in range(c.num_layers)}.values()
    layer = max(layer_bytes(c, i, engine, quant) for i in kinds)
    active = max(layer_bytes(c, i, engine, quant, active=True) for i in kinds)
    kv_room = 2 * kv * min(positions, c.max_position_embeddings) * kv_value_bytes(engine, quant, float16_arithmetic)
    return Footprint(layer, embedding_bytes(c, engine), h * 4 + matrix_bytes(c.vocab_size, h, engine, quant),
                     kv_room, active)


def kv_value_bytes(engine: str, quant: str, float16_arithmetic: bool) -> int:
    """One key or value number in a KV cache: ggml keeps them float16 beside quantized or float16
    weights (llama.cpp's default) where the CPU does float16 arithmetic. Elsewhere ggml's attention
    converts every float16 it reads and writes (a q4 decode step on x86 took 23 ms with float16 keys
    and values against 18 in float32, a step of 8 requests 87 against 51 ms), so there, and for every
    other engine and quant, they are float32."""
    return 2 if engine == "ggml" and quant != "f32" and float16_arithmetic else 4


@functools.cache
def cpu_has_float16_arithmetic() -> bool:
    """Whether this CPU adds and multiplies float16 vectors itself: ARMv8.2's half-precision SIMD
    (the Pi 5's Cortex-A76, Apple's M chips), not x86 nor the Pi 4's Cortex-A72. On Linux the
    kernel's hardware capabilities say (as ggml reads them), which an emulator sets for the CPU it
    emulates, where /proc/cpuinfo would be the host's."""
    machine = platform.machine()
    if platform.system() == "Darwin":
        return machine == "arm64"
    if machine != "aarch64":
        return False
    try:
        return bool(ctypes.CDLL(None).getauxval(AT_HWCAP) & HWCAP_ASIMDHP)
    except (OSError, AttributeError):
        return False


def embedding_bytes(c: ModelConfig, engine: str) -> int:
    """What a first stage holds of the embedding in memory. onnxruntime and ggml read their tokens'
    rows from the cache file (`weight_cache.FileRows`, pread), so none of it; numpy and tinygrad
    index its map, in its stored dtype. A tied head is counted as the head."""
    if engine in ("onnxruntime", "ggml"):
        return 0
    return c.vocab_size * c.hidden_size * DTYPE_BYTES.get(c.torch_dtype, 4)
