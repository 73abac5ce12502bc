"""Build the ONNX graph of one shard with the `onnx` helper API, and quantize its weights.

The graph works on a batch of B rows of T tokens each, flattened to N = B*T rows for the linear
layers; attention is onnxruntime's GroupQueryAttention (com.microsoft), whose KV cache is a
fixed-capacity buffer that the kernel updates in place (see onnx_engine for how it is bound).

Inputs:  input_ids int64 [N] (first stage) or hidden float [N, H]; seqlens_k int32 [B] (each
         row's total length minus one); total_sequence_length int32 []; last_rows int64 [B]
         (last stage: which of the N rows to take logits of); past_key_<i>, past_value_<i> float
         [B, kv_heads, capacity, Dp].
Outputs: hidden_out [N, H] or logits [B, vocab]; present_key_<i>, present_value_<i>.

GroupQueryAttention also applies the rotary embedding (do_rotary), from cos/sin tables baked into
the graph and each row's position, which it derives from seqlens_k. It wants a head size that is
a multiple of 16: a smaller head [x1 | x2] (two halves of D/2) is zero-padded to
[x1 0 | x2 0] (two halves of Dp/2), so the rotation still pairs x1[i] with x2[i] and the zeros
change no dot product.
q8 multiplies int8 weights (one scale per output channel) by int8 activations (one scale per
row): onnxruntime's integer GEMM reads each weight once for all the rows of a batch, so 8 rows
cost 1.1x one row, where 8-bit MatMulNBits costs 1.9x (docs/performance.md).
Weights are not stored in the graph: every initializer is marked external and handed to the
session as an OrtValue over a memory map (`SessionOptions.add_external_initializers`).
"""
from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper

from appliance.engines.base import Shard
from appliance.engines.numpy_engine import rope_inv_freq
from appliance.models.config import ModelConfig
from appliance.models.weights import as_float32

QUANTS = ("q4", "q8", "f16", "f32")
BLOCK = 32  # MatMulNBits block size
ONNX_DTYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
               np.dtype(np.uint8): TensorProto.UINT8, np.dtype(np.int8): TensorProto.INT8}


def padded_head_dim(head_dim: int) -> int:
    return -(-head_dim // 16) * 16


# ---- weights: HF tensors -> what the graph's initializers hold, per quant --------------------

def quantize_4bit(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HF [out, in] float weight -> MatMulNBits (packed uint8 [out, in/32, 16], scales [out*in/32]),
    symmetric, block 32, with onnxruntime's own C++ quantizer."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    n, k = w.shape
    blocks = -(-k // BLOCK)
    w = np.pad(np.asarray(w, np.float32), ((0, 0), (0, blocks * BLOCK - k)))  # a last partial block
    packed = np.zeros((n, blocks, BLOCK // 2), np.uint8)
    scales = np.zeros((n, blocks), np.float32)
    zero_points = np.zeros((n, blocks), np.uint8)  # unused: symmetric
    quantize_matmul_4bits(packed, np.ascontiguousarray(w.T, dtype=np.float32), scales, zero_points, BLOCK, n, k, True)
    return packed, scales.reshape(-1)


def quantize_8bit(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HF [out, in] float weight -> int8 [in, out] (MatMulInteger's B) and one scale per output
    channel, symmetric."""
    w = np.asarray(w, np.float32)
    scales = np.abs(w).max(axis=1) / 127
    scales[scales == 0] = 1
    return np.round(w.T / scales).astype(np.int8), scales.astype(np.float32)


def convert_weights(tensors: dict[str, np.ndarray], quant: str, first: bool, last: bool):
    """Yield (graph initializer name, array) for every HF tensor of the shard, one at a time so a
    bfloat16 checkpoint is widened tensor by tensor."""
    for name, t in tensors.items():
        t = as_float32(t)
        is_matrix = t.ndim == 2 and name != "model.embed_tokens.weight"
        if name == "model.embed_tokens.weight":
            if first or quant in ("f32", "f16"):  # gathered by the first stage; a float tied head uses it too
                yield name, t if quant == "f32" else t.astype(np.float16)
            if last and quant in ("q4", "q8"):     # a tied head, quantized on its own
                yield from _quantized("lm_head.weight", t, quant)
        elif is_matrix and quant in ("q4", "q8"):
            yield from _quantized(name, t, quant)
        elif is_matrix and quant == "f16":
            yield name, t.astype(np.float16)
        else:
            yield name, t  # f32 matrices, norms and biases stay float32


def _quantized(name: str, t: np.ndarray, quant: str):
    packed, scales = quantize_4bit(t) if quant == "q4" else quantize_8bit(t)
    yield name + ".q", packed
    yield name + ".scales", scales


# ---- the graph ----------------------------------------------------------------------------

class GraphBuilder:
    """Collects nodes; each `op` call returns the name of its (first) output."""

    def __init__(self, shapes: dict[str, tuple[tuple[int, ...], np.dtype]], quant: str):
        self.nodes: list[onnx.NodeProto] = []
        self.shapes, self.quant, self.count = shapes, quant, 0
        self.constants: list[onnx.TensorProto] = []
        self.row_quantized: dict[str, tuple[str, str]] = {}

    def op(self, op_type: str, *inputs: str, outputs: list[str] | None = None, domain: str = "", **attrs) -> str:
        self.count += 1
        outputs = outputs or [f"{op_type}_{self.count}"]
        self.nodes.append(helper.make_node(op_type, list(inputs), outputs, domain=domain, **attrs))
        return outputs[0]

    def const(self, values, dtype=np.int64) -> str:
        name = f"const_{len(self.constants)}"
        self.constants.append(onnx.numpy_helper.from_array(np.asarray(values, dtype), name))
        return name

    def linear(self, x: str, name: str, in_features: int) -> str:
        """x [N, in] @ W.T (+ bias): MatMulNBits for q4, int8 MatMulInteger for q8, Gemm(transB) for
        float weights."""
        if name + ".weight.q" in self.shapes and self.quant == "q4":
            n = self.shapes[name + ".weight.q"][0][0]
            y = self.op("MatMulNBits", x, name + ".weight.q", name + ".weight.scales", domain="com.microsoft",
                        K=in_features, N=n, bits=4, block_size=BLOCK,
                        accuracy_level=4)  # int8 dot products: the fast path on ARM and x86
        elif name + ".weight.q" in self.shapes:
            q, scale, zero_point, row_max = self.quantize_rows(x)
            y = self.op("MatMulIntegerToFloat", q, name + ".weight.q", scale, name + ".weight.scales", zero_point,
                        domain="com.microsoft")
            y = self.op("Mul", y, row_max)
        else:
            w = name + ".weight"
            if self.shapes[w][1] == np.float16:
                w = self.op("Cast", w, to=TensorProto.FLOAT)
            y = self.op("Gemm", x, w, transB=1)
        if name + ".bias" in self.shapes:
            y = self.op("Add", y, name + ".bias")
        return y

    def quantize_rows(self, x: str) -> tuple[str, str, str, str]:
        """x [N, in] -> (uint8 rows, their scale and zero point, each row's largest |x|): every row is
        divided by its own largest |x| and then quantized alike. A row's scale depends on that row
        alone, so a request's result never depends on which other requests share its batch. Done
        once per input, however many matrices read it (q, k, v)."""
        if x not in self.row_quantized:
            row_max = self.op("Max", self.op("ReduceMax", self.op("Abs", x), self.const([1]), keepdims=1),
                              self.const(1e-30, np.float32))  # an all-zero row stays zero
            scale, zero_point = self.const(1 / 127, np.float32), self.const(128, np.uint8)
            q = self.op("QuantizeLinear", self.op("Div", x, row_max), scale, zero_point)
            self.row_quantized[x] = q, scale, zero_point, row_max
        return self.row_quantized[x]

    def rms_norm(self, x: str, weight: str, eps: float) -> str:
        return self.op("RMSNormalization", x, weight, epsilon=eps, axis=-1)

    def to_attention(self, x: str, heads: int, head_dim: int, padded: int, batch_shape: str) -> str:
        """[N, heads*D] -> [B, T, heads*Dp], each half of each head zero-padded to Dp/2."""
        if padded != head_dim:
            x = self.op("Reshape", x, self.const([0, heads, 2, head_dim // 2]))
            x = self.op("Pad", x, self.const([0, 0, 0, 0, 0, 0, 0, (padded - head_dim) // 2]))
        return self.op("Reshape", x, batch_shape)

    def from_attention(self, x: str, heads: int, head_dim: int, padded: int) -> str:
        """[B, T, heads*Dp] -> [N, heads*D], dropping the padding again."""
        if padded != head_dim:
            x = self.op("Reshape", x, self.const([-1, heads, 2, padded // 2]))
            x = self.op("Slice", x, self.const([0]), self.const([head_dim // 2]), self.const([3]))
        return self.op("Reshape", x, self.const([-1, heads * head_dim]))

    def rotary_tables(self, inv_freq: np.ndarray, capacity: int, padded: int) -> tuple[str, str]:
        """cos and sin [capacity, Dp/2] of every position; the padding's angles are 0."""
        angles = np.zeros((capacity, padded // 2))
        angles[:, :len(inv_freq)] = np.arange(capacity)[:, None] * inv_freq[None, :]
        return self.const(np.cos(angles), np.float32), self.const(np.sin(angles), np.float32)


def build_graph(config: ModelConfig, shard: Shard, shapes: dict, quant: str, capacity: int) -> onnx.ModelProto:
    c = config
    D, Dp = c.head_dim, padded_head_dim(c.head_dim)
    g = GraphBuilder(shapes, quant)
    f = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["B"]),
              helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [])]
    outputs = []
    if shard.is_first:
        inputs.append(helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N"]))
        x = g.op("Gather", "model.embed_tokens.weight", "input_ids")
        if shapes["model.embed_tokens.weight"][1] != np.float32:
            x = g.op("Cast", x, to=f)
    else:
        inputs.append(helper.make_tensor_value_info("hidden", f, ["N", c.hidden_size]))
        x = "hidden"
    # [B, -1, width] reshapes for attention, B taken from seqlens_k.
    batch = g.op("Shape", "seqlens_k")
    q_shape = g.op("Concat", batch, g.const([-1, c.num_heads * Dp]), axis=0)
    kv_shape = g.op("Concat", batch, g.const([-1, c.num_kv_heads * Dp]), axis=0)
    cos, sin = g.rotary_tables(rope_inv_freq(c), capacity, Dp)

    for i, layer in enumerate(range(shard.start, shard.end)):
        p = f"model.layers.{layer}."
        cache_shape = ["B", c.num_kv_heads, capacity, Dp]
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_{kind}_{i}", f, cache_shape))
            outputs.append(helper.make_tensor_value_info(f"present_{kind}_{i}", f, cache_shape))
        h = g.rms_norm(x, p + "input_layernorm.weight", c.rms_norm_eps)
        q = g.to_attention(g.linear(h, p + "self_attn.q_proj", c.hidden_size), c.num_heads, D, Dp, q_shape)
        k = g.to_attention(g.linear(h, p + "self_attn.k_proj", c.hidden_size), c.num_kv_heads, D, Dp, kv_shape)
        v = g.to_attention(g.linear(h, p + "self_attn.v_proj", c.hidden_size), c.num_kv_heads, D, Dp, kv_shape)
        attention = g.op("GroupQueryAttention", q, k, v, f"past_key_{i}", f"past_value_{i}",
                         "seqlens_k", "total_sequence_length", cos, sin,
                         outputs=[f"attention_{i}", f"present_key_{i}", f"present_value_{i}"], domain="com.microsoft",
                         num_heads=c.num_heads, kv_num_heads=c.num_kv_heads, scale=1 / math.sqrt(D), do_rotary=1)
        attention = g.from_attention(attention, c.num_heads, D, Dp)
        x = g.op("Add", x, g.linear(attention, p + "self_attn.o_proj", c.num_heads * D))
        h = g.rms_norm(x, p + "post_attention_layernorm.weight", c.rms_norm_eps)
        gate = g.linear(h, p + "mlp.gate_proj", c.hidden_size)
        mlp = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), g.linear(h, p + "mlp.up_proj", c.hidden_size))
        x = g.op("Add", x, g.linear(mlp, p + "mlp.down_proj", c.intermediate_size))

    if shard.is_last:
        inputs.append(helper.make_tensor_value_info("last_rows", TensorProto.INT64, ["B"]))
        last = g.rms_norm(g.op("Gather", x, "last_rows", axis=0), "model.norm.weight", c.rms_norm_eps)
        head = "lm_head" if "lm_head.weight" in shapes or "lm_head.weight.q" in shapes else "model.embed_tokens"
        g.op("Identity", g.linear(last, head, c.hidden_size), outputs=["logits"])
        outputs.insert(0, helper.make_tensor_value_info("logits", f, ["B", c.vocab_size]))
    else:
        g.op("Identity", x, outputs=["hidden_out"])
        outputs.insert(0, helper.make_tensor_value_info("hidden_out", f, ["N", c.hidden_size]))

    initializers = [_external(name, shape, dtype) for name, (shape, dtype) in shapes.items()]
    graph = helper.make_graph(g.nodes, f"shard_{shard.start}_{shard.end}", inputs, outputs,
                              initializer=initializers + g.constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model


def _external(name: str, shape, dtype) -> onnx.TensorProto:
    """An initializer whose data the session gets from us as an OrtValue, not from the graph."""
    t = onnx.TensorProto(name=name, data_type=ONNX_DTYPES[np.dtype(dtype)], dims=list(shape))
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value="provided-at-load")
    return t
