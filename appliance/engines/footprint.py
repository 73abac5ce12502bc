"""What a shard costs in memory as each engine really holds it: the planner's side of the engines.

Weights are counted in the form the engine keeps after loading, not as stored: onnxruntime holds
q4 as 4-bit blocks of 32 with a float32 scale each, q8 as int8 with a float32 scale per output
channel; numpy widens every matrix to float32; tinygrad keeps f32 or f16 on its device. No engine
widens the embedding: numpy and tinygrad map it as stored, onnxruntime keeps it float16. The KV
room is one request's float32 keys and values over the full context. Light on purpose (no numpy, no engine imports): the coordinator plans with it.
"""
from __future__ import annotations

from dataclasses import dataclass

from appliance.models.config import DTYPE_BYTES, ModelConfig

DEFAULT_QUANT = {"numpy": "f32", "onnxruntime": "q8", "tinygrad": "f32"}
BLOCK = 32   # onnxruntime's MatMulNBits block (onnx_graph.BLOCK)
FLOAT_BYTES = {"f32": 4, "f16": 2}


@dataclass(frozen=True)
class Footprint:
    layer: int       # one decoder layer's weights
    embedding: int   # the first stage's token embedding
    head: int        # the last stage's final norm and output head
    kv_layer: int    # one request's KV cache for one layer, at full context

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
    return rows * cols * FLOAT_BYTES.get(quant, 4)


def footprint(config: ModelConfig, engine: str, quant: str = "", positions: int = 2048) -> Footprint:
    c, quant = config, quant or DEFAULT_QUANT.get(engine, "f32")
    h, q, kv = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    matrices = [(q, h), (kv, h), (kv, h), (h, q), (c.intermediate_size, h), (c.intermediate_size, h),
                (h, c.intermediate_size)]
    norms = (4 if c.sandwich_norms else 2) * h + (2 * c.head_dim if c.qk_norm else 0)
    small = (norms + ((q + 2 * kv) if c.attention_bias else 0)) * 4   # norms and biases: float32
    layer = sum(matrix_bytes(r, k, engine, quant) for r, k in matrices) + small
    return Footprint(layer, embedding_bytes(c, engine, quant), h * 4 + matrix_bytes(c.vocab_size, h, engine, quant),
                     2 * kv * min(positions, c.max_position_embeddings) * 4)


def embedding_bytes(c: ModelConfig, engine: str, quant: str) -> int:
    rows = c.vocab_size * c.hidden_size
    if engine == "onnxruntime":                 # float16 beside quantized weights
        return rows * (4 if quant == "f32" else 2)
    return rows * DTYPE_BYTES.get(c.torch_dtype, 4)   # numpy, tinygrad: memory-mapped in its stored dtype
