"""Build the ONNX graph of one shard with the `onnx` helper API, and quantize its weights.

The graph works on a batch of B rows of T tokens each, flattened to N = B*T rows for the linear
layers; attention is onnxruntime's GroupQueryAttention (com.microsoft), whose KV cache is a
fixed-capacity buffer that the kernel updates in place (see onnx_engine for how it is bound).

Inputs:  hidden float [N, H] (a first stage's too: the engine looks up the embedding's rows);
         seqlens_k int32 [B] (each row's total length minus one); total_sequence_length int32 [];
         last_rows int64 [B] (last stage: which of the N rows go on past the last attention, to logits);
         past_key_<i>, past_value_<i> float [B, kv_heads, capacity, Dp].
Outputs: hidden_out [N, H] or logits [B, vocab]; present_key_<i>, present_value_<i>.

GroupQueryAttention also applies the rotary embedding (do_rotary), from cos/sin tables baked into
the graph (one pair per distinct rope of the model: Gemma 3's local and global bases) and each
row's position, which it derives from seqlens_k. It rotates the pairs (i, i + Dp/2) of a head
whose size Dp is a multiple of 16, so each head is laid out for it (`head_layout`): the rotated
part [x1 | x2] (two halves of rotary_dim/2) and the dims rope leaves alone (partial rotary: p1 p2)
go to [x1 p1 0 | x2 p2 0]; the table's angles are 0 for p and the zeros, so they pass unchanged,
and the same layout of q, k and v changes no dot product. Sliding-window layers use its
local_window_size, layers without rope do_rotary=0.
q8 multiplies int8 weights (one scale per output channel) by int8 activations (one scale per
row): onnxruntime's integer GEMM reads each weight once for all the rows of a batch, so 8 rows
cost 1.1x one row, where 8-bit MatMulNBits costs 1.9x (docs/performance.md).
A sparse layer's MLP (mixture of experts) is onnxruntime's MoE op (f32, f16) or QMoE (q4, q8: 4 or
8-bit blocks of 32, one scale each): it takes the router's logits and the experts stacked
([experts, 2 * inter, hidden], gate and up rows interleaved; [experts, hidden, inter]), does the
softmax and top-k itself and runs only the chosen experts, each on the rows that chose it.
Weights are not stored in the graph: every initializer is marked external and handed to the
session as an OrtValue over a memory map (`SessionOptions.add_external_initializers`).
"""
from __future__ import annotations

import math
import re

import numpy as np
import onnx
from onnx import TensorProto, helper

from appliance.engines.base import Shard
from appliance.engines.rope import rope_tables
from appliance.engines.weight_cache import release_array
from appliance.models.config import ModelConfig, Rope
from appliance.models.weights import as_float32

BLOCK = 32  # MatMulNBits block size
ONNX_DTYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
               np.dtype(np.uint8): TensorProto.UINT8, np.dtype(np.int8): TensorProto.INT8}


def head_layout(config: ModelConfig) -> np.ndarray:
    """For each of the Dp dims GroupQueryAttention sees, the head dim it holds (head_dim: a zero).
    [x1 p1 0 | x2 p2 0]: x1, x2 the halves of the rotated part, p1, p2 of the part rope leaves."""
    D = config.head_dim
    rot = int(D * config.partial_rotary_factor)
    rest = np.arange(rot, D)
    p1, p2 = rest[:(len(rest) + 1) // 2], rest[(len(rest) + 1) // 2:]
    half = -(-(rot // 2 + len(p1)) // 8) * 8   # Dp = 2 * half, a multiple of 16
    zeros = lambda part: [D] * (half - rot // 2 - len(part))  # noqa: E731
    return np.array([*range(rot // 2), *p1, *zeros(p1), *range(rot // 2, rot), *p2, *zeros(p2)], np.int64)


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


def quantize_8bit_blocks(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HF [out, in] float weight -> QMoE's 8-bit blocks of 32 (uint8 [out, in] around a zero point of
    128) and their scales [out, in/32], symmetric."""
    n, k = w.shape
    blocks = np.asarray(w, np.float32).reshape(n, k // BLOCK, BLOCK)
    scales = np.abs(blocks).max(axis=-1) / 127
    scales[scales == 0] = 1
    q = np.round(blocks / scales[..., None]).astype(np.int16) + 128
    return q.astype(np.uint8).reshape(n, k), scales.astype(np.float32)


EXPERT = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")
ROUTERS = ("mlp.gate.weight", "mlp.shared_expert_gate.weight")   # kept float32: they pick the experts


def convert_weights(tensors: dict[str, np.ndarray], quant: str, first: bool, last: bool):
    """Yield (graph initializer name, array) for every HF tensor of the shard, one at a time so a
    bfloat16 checkpoint is widened tensor by tensor; a sparse layer's experts come stacked, at the end.
    Each source tensor's mapped pages are let go once what it became was taken (written)."""
    experts: dict[str, dict] = {}
    for name, t in tensors.items():
        if match := EXPERT.match(name):
            experts.setdefault(match.group(1), {})[int(match.group(2)), match.group(3)] = t
            continue
        yield from _converted(name, t, tensors, quant, first, last)
        release_array(t)
    for prefix, parts in experts.items():
        yield from stacked_experts(prefix, parts, quant)
        for t in parts.values():
            release_array(t)


def _converted(name: str, t: np.ndarray, tensors: dict[str, np.ndarray], quant: str, first: bool, last: bool):
    """The initializers one tensor (not an expert's) becomes."""
    if name.endswith(ROUTERS):
        yield name, as_float32(t)
    elif name != "model.embed_tokens.weight" and gguf_blocks_fit(t, quant):
        yield from _from_gguf_blocks(name, t)
    elif name == "model.embed_tokens.weight":
        t = as_float32(t)
        if first or quant in ("f32", "f16"):  # the first stage's engine reads its rows; a float tied head uses it too
            yield name, t if quant == "f32" else t.astype(np.float16)
        if last and quant in ("q4", "q8") and "lm_head.weight" not in tensors:   # a tied head, quantized
            yield from _quantized("lm_head.weight", t, quant)
    elif np.ndim(t) == 2 and quant in ("q4", "q8"):
        yield from _quantized(name, as_float32(t), quant)
    elif np.ndim(t) == 2 and quant == "f16":
        yield name, as_float32(t).astype(np.float16)
    else:
        yield name, as_float32(t)  # f32 matrices, norms and biases stay float32


def stacked_experts(prefix: str, parts: dict, quant: str):
    """One layer's experts as (Q)MoE takes them: fc1 [experts, 2 * inter, hidden] with the gate and up
    rows interleaved, fc2 [experts, hidden, inter]; quantized expert by expert (a GGUF file's Q4_0 or
    Q8_0 blocks as they are). The inner size is padded to a multiple of 32 (QMoE's blocks) with zero
    rows and columns, which add nothing."""
    count = 1 + max(e for e, _ in parts)
    for fc, kinds in (("fc1", ("gate", "up")), ("fc2", ("down",))):
        arrays = [_expert_matrix([parts[e, kind] for kind in kinds], fc, quant) for e in range(count)]
        for j, suffix in enumerate(("", ) if quant in ("f32", "f16") else (".q", ".scales")):
            yield prefix + "." + fc + suffix, np.stack([a[j] for a in arrays])


def _interleave(rows: list[np.ndarray]) -> np.ndarray:
    """[gate, up] -> gate row 0, up row 0, gate row 1, ... (QMoE's fused SwiGLU layout)."""
    return np.stack(rows, axis=1).reshape(-1, *rows[0].shape[1:]) if len(rows) > 1 else rows[0]


def _expert_matrix(parts: list[np.ndarray], fc: str, quant: str) -> tuple[np.ndarray, ...]:
    inner = parts[0].shape[0] if fc == "fc1" else as_float32(parts[0][:1]).shape[1]
    if inner % BLOCK == 0 and all(gguf_blocks_fit(t, quant) for t in parts):
        blocks = [dict(_from_gguf_blocks("", t)) for t in parts]
        packed = _interleave([b[".q"] for b in blocks])
        scales = _interleave([b[".scales"].reshape(t.shape[0], -1) for b, t in zip(blocks, parts)])
        return packed.reshape(packed.shape[0], -1), scales
    w = _interleave([as_float32(t) for t in parts])
    pad = -w.shape[0 if fc == "fc1" else 1] % (2 * BLOCK if fc == "fc1" else BLOCK)
    w = np.pad(w, ((0, pad), (0, 0)) if fc == "fc1" else ((0, 0), (0, pad)))
    if quant == "q4":
        packed, scales = quantize_4bit(w)
        return packed.reshape(w.shape[0], -1), scales.reshape(w.shape[0], -1)
    if quant == "q8":
        return quantize_8bit_blocks(w)
    return (w.astype(np.float16 if quant == "f16" else np.float32),)


def gguf_blocks_fit(t: np.ndarray, quant: str) -> bool:
    """A GGUF tensor whose blocks MatMulNBits takes as they are: Q4_0 at q4, Q8_0 at q8 (block
    32, one scale each, symmetric: the same numbers, no second rounding)."""
    kind = getattr(getattr(t, "qtype", None), "name", None)
    return (kind, quant) in (("Q4_0", "q4"), ("Q8_0", "q8"))


def _from_gguf_blocks(name: str, t: np.ndarray):
    """Q4_0 / Q8_0 blocks [rows, blocks * bytes] -> MatMulNBits' packed [rows, blocks, 16 or 32] and
    float32 scales. Q4_0 holds element j in the low nibble of byte j and element j+16 in its high
    one, MatMulNBits elements 2b and 2b+1 in byte b; both subtract 8. Q8_0's int8 become uint8
    around MatMulNBits' 8-bit zero point of 128."""
    rows = t.shape[0]
    raw = np.asarray(t).view(np.uint8).reshape(rows, -1, 18 if t.qtype.name == "Q4_0" else 34)
    scales = raw[..., :2].copy().view(np.float16).astype(np.float32).reshape(-1)
    if t.qtype.name == "Q4_0":
        q = np.concatenate([raw[..., 2:] & 0x0F, raw[..., 2:] >> 4], axis=-1)     # elements 0..31 of each block
        packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    else:
        packed = (raw[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    yield name + ".q", packed
    yield name + ".scales", scales


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
        if name + ".weight.q" in self.shapes and len(self.shapes[name + ".weight.q"][0]) == 3:
            n, _, block_bytes = self.shapes[name + ".weight.q"][0]   # 16 bytes a block: 4 bits; 32: 8 (GGUF Q8_0)
            y = self.op("MatMulNBits", x, name + ".weight.q", name + ".weight.scales", domain="com.microsoft",
                        K=in_features, N=n, bits=4 if block_bytes == BLOCK // 2 else 8, block_size=BLOCK,
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

    def to_attention(self, x: str, heads: int, layout: np.ndarray, batch_shape: str) -> str:
        """[N, heads, D] -> [B, T, heads*Dp], each head laid out as `head_layout` says."""
        if not np.array_equal(layout, np.arange(len(layout))):
            x = self.op("Pad", x, self.const([0, 0, 0, 0, 0, 1]))   # the zero, at index D
            x = self.op("Gather", x, self.const(layout), axis=2)
        return self.op("Reshape", x, batch_shape)

    def from_attention(self, x: str, heads: int, layout: np.ndarray, head_dim: int) -> str:
        """[B, T, heads*Dp] -> [N, heads*D], each head's dims back in their places."""
        if not np.array_equal(layout, np.arange(len(layout))):
            x = self.op("Reshape", x, self.const([-1, heads, len(layout)]))
            x = self.op("Gather", x, self.const(np.argsort(layout)[:head_dim]), axis=2)
        return self.op("Reshape", x, self.const([-1, heads * head_dim]))

    def rotary_tables(self, rope: Rope, capacity: int, padded: int) -> tuple[str, str]:
        """cos and sin [capacity, Dp/2] of every position; angle 0 (cos 1, sin 0) past the rotated pairs."""
        cos, sin = np.ones((capacity, padded // 2), np.float32), np.zeros((capacity, padded // 2), np.float32)
        cos[:, :rope.rotary_dim // 2], sin[:, :rope.rotary_dim // 2] = rope_tables(rope, np.arange(capacity))
        return self.const(cos, np.float32), self.const(sin, np.float32)

    def heads(self, x: str, name: str, heads: int, c: ModelConfig, norm: str | None) -> str:
        """The projection `name` of x as [N, heads, D], normed per head where the model does (q, k)."""
        y = self.op("Reshape", self.linear(x, name, c.hidden_size), self.const([0, heads, c.head_dim]))
        return self.rms_norm(y, norm, c.rms_norm_eps) if norm else y

    def mlp(self, x: str, p: str, inner: int, c: ModelConfig) -> str:
        gate = self.activation(self.linear(x, p + "gate_proj", c.hidden_size), c.activation)
        return self.linear(self.op("Mul", gate, self.linear(x, p + "up_proj", c.hidden_size)), p + "down_proj", inner)

    def experts(self, x: str, p: str, c: ModelConfig) -> str:
        """A sparse layer's MLP: router logits, then (Q)MoE, which routes each row to its k experts."""
        router = self.linear(x, p + "gate", c.hidden_size)
        attrs = dict(k=c.experts_per_token, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0,
                     activation_beta=0.0, normalize_routing_weights=int(c.norm_topk_prob), domain="com.microsoft")
        fc1, fc2 = p + "experts.fc1", p + "experts.fc2"
        if fc1 + ".q" in self.shapes:
            bits = 4 if self.quant == "q4" else 8
            y = self.op("QMoE", x, router, fc1 + ".q", fc1 + ".scales", "", fc2 + ".q", fc2 + ".scales",
                        expert_weight_bits=bits, block_size=BLOCK, accuracy_level=4, weights_prepacked=0, **attrs)
        elif self.shapes[fc1][1] == np.float16:   # f16: the experts run in float16, as they are held
            half = [self.op("Cast", v, to=TensorProto.FLOAT16) for v in (x, router)]
            y = self.op("Cast", self.op("MoE", *half, fc1, "", fc2, **attrs), to=TensorProto.FLOAT)
        else:
            y = self.op("MoE", x, router, fc1, "", fc2, **attrs)
        if c.shared_expert_size:   # Qwen2-MoE: the shared expert, gated by a sigmoid
            gate = self.op("Sigmoid", self.linear(x, p + "shared_expert_gate", c.hidden_size))
            y = self.op("Add", y, self.op("Mul", gate, self.mlp(x, p + "shared_expert.", c.shared_expert_size, c)))
        return y

    def activation(self, x: str, kind: str) -> str:
        if kind == "gelu_tanh":
            return self.op("Gelu", x, approximate="tanh")
        return self.op("Mul", x, self.op("Sigmoid", x))


def build_graph(config: ModelConfig, shard: Shard, shapes: dict, quant: str, capacity: int) -> onnx.ModelProto:
    c = config
    D, layout = c.head_dim, head_layout(c)
    Dp = len(layout)
    g = GraphBuilder(shapes, quant)
    f = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["B"]),
              helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [])]
    outputs = []
    inputs.append(helper.make_tensor_value_info("hidden", f, ["N", c.hidden_size]))
    x = "hidden"
    # [B, -1, width] reshapes for attention, B taken from seqlens_k.
    batch = g.op("Shape", "seqlens_k")
    q_shape = g.op("Concat", batch, g.const([-1, c.num_heads * Dp]), axis=0)
    kv_shape = g.op("Concat", batch, g.const([-1, c.num_kv_heads * Dp]), axis=0)
    tables: dict[Rope, tuple[str, str]] = {}

    for i, layer in enumerate(range(shard.start, shard.end)):
        p = f"model.layers.{layer}."
        cache_shape = ["B", c.num_kv_heads, capacity, Dp]
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_{kind}_{i}", f, cache_shape))
            outputs.append(helper.make_tensor_value_info(f"present_{kind}_{i}", f, cache_shape))
        rope, window = c.rope(layer), c.window(layer)
        if rope is not None and rope not in tables:
            tables[rope] = g.rotary_tables(rope, capacity, Dp)
        cos, sin = tables.get(rope, ("", ""))
        h = g.rms_norm(x, p + "input_layernorm.weight", c.rms_norm_eps)
        norm = (lambda kind: p + f"self_attn.{kind}_norm.weight") if c.qk_norm else (lambda kind: None)
        q = g.to_attention(g.heads(h, p + "self_attn.q_proj", c.num_heads, c, norm("q")), c.num_heads, layout, q_shape)
        k = g.to_attention(g.heads(h, p + "self_attn.k_proj", c.num_kv_heads, c, norm("k")), c.num_kv_heads, layout,
                           kv_shape)
        v = g.to_attention(g.heads(h, p + "self_attn.v_proj", c.num_kv_heads, c, None), c.num_kv_heads, layout, kv_shape)
        attention = g.op("GroupQueryAttention", q, k, v, f"past_key_{i}", f"past_value_{i}",
                         "seqlens_k", "total_sequence_length", cos, sin,
                         outputs=[f"attention_{i}", f"present_key_{i}", f"present_value_{i}"], domain="com.microsoft",
                         num_heads=c.num_heads, kv_num_heads=c.num_kv_heads, scale=c.attention_scale,
                         do_rotary=int(rope is not None), local_window_size=window if window else -1)
        attention = g.from_attention(attention, c.num_heads, layout, D)
        if shard.is_last and layer == shard.end - 1:   # past the last attention only the rows that make a token
            attention, x = (g.op("Gather", t, "last_rows", axis=0) for t in (attention, x))
        attention = g.linear(attention, p + "self_attn.o_proj", c.num_heads * D)
        if c.sandwich_norms:   # Gemma: the attention's output is normed, and the MLP's input by its own norm
            x = g.op("Add", x, g.rms_norm(attention, p + "post_attention_layernorm.weight", c.rms_norm_eps))
            h = g.rms_norm(x, p + "pre_feedforward_layernorm.weight", c.rms_norm_eps)
        else:
            x = g.op("Add", x, attention)
            h = g.rms_norm(x, p + "post_attention_layernorm.weight", c.rms_norm_eps)
        mlp = g.experts(h, p + "mlp.", c) if c.is_sparse(layer) else g.mlp(h, p + "mlp.", c.intermediate_size, c)
        if c.sandwich_norms:
            mlp = g.rms_norm(mlp, p + "post_feedforward_layernorm.weight", c.rms_norm_eps)
        x = g.op("Add", x, mlp)

    if shard.is_last:
        inputs.append(helper.make_tensor_value_info("last_rows", TensorProto.INT64, ["B"]))
        last = g.rms_norm(x, "model.norm.weight", c.rms_norm_eps)
        head = "lm_head" if "lm_head.weight" in shapes or "lm_head.weight.q" in shapes else "model.embed_tokens"
        logits = g.linear(last, head, c.hidden_size)
        if c.final_logit_softcapping:
            cap = g.const(c.final_logit_softcapping, np.float32)
            logits = g.op("Mul", g.op("Tanh", g.op("Div", logits, cap)), cap)
        g.op("Identity", logits, outputs=["logits"])
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
