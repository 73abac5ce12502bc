"""The reference engine: a decoder-only transformer shard in plain numpy, float32.

Readable first: every other engine is checked against this one, and this one against Hugging Face
transformers. The layer is Llama's, with what `ModelConfig` turns on per family: q/k/v bias
(Qwen2), per-head q/k norms (Qwen3, Gemma 3), Gemma's four norms per layer, GeGLU, scaled
embeddings, query scale and logit soft-capping, per-layer sliding windows and rope bases (Gemma 3,
Mistral), layers without rope (SmolLM3), partial rotary and longrope (Phi-3.5, Phi-4-mini), and
mixture-of-experts MLPs (Qwen3-MoE, Qwen2-MoE's shared expert, Mixtral): see `route` and `_experts`.
"""
from __future__ import annotations

import math

import numpy as np

from appliance.engines.footprint import DEFAULT_QUANT
from appliance.engines.base import MAX_CONTEXT, Engine, Shard, Step, hidden_keys
from appliance.engines.rope import rope_tables
from appliance.models.config import ModelConfig
from appliance.models.weights import as_float32, load_shard


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


ACTIVATIONS = {"silu": silu, "gelu_tanh": gelu_tanh}


def rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Hugging Face rotary embedding on the first 2 * cos.shape[-1] dims of each head: the two
    halves of that part form the pairs; the dims past it pass unchanged (partial rotary)."""
    half = cos.shape[-1]
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)


def route(logits: np.ndarray, k: int, normalise: bool) -> tuple[np.ndarray, np.ndarray]:
    """Router logits [N, experts] -> each row's k chosen experts [N, k] and their weights [N, k]:
    a softmax over all experts, the k largest, renormalised to sum 1 where the model says so
    (Mixtral always, Qwen-MoE by `norm_topk_prob`). The onnxruntime engine's MoE op does the same."""
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    chosen = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    weights = np.take_along_axis(probs, chosen, axis=-1)
    return chosen, weights / weights.sum(axis=-1, keepdims=True) if normalise else weights


def softcap(x: np.ndarray, cap: float | None) -> np.ndarray:
    return x if not cap else np.tanh(x / cap) * cap


class KVCache:
    """Keys and values of one request for each local layer, grown in blocks."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, block: int = 256):
        self.length, self.block = 0, block
        self.k = np.zeros((layers, kv_heads, 0, head_dim), np.float32)
        self.v = np.zeros_like(self.k)

    def reserve(self, pos: int, new: int) -> None:
        self.length = pos  # a step at an earlier position (a retried chunk) overwrites what follows
        need = pos + new
        if need > self.k.shape[2]:
            grow = max(self.block, need - self.k.shape[2])
            pad = ((0, 0), (0, 0), (0, grow), (0, 0))
            self.k, self.v = np.pad(self.k, pad), np.pad(self.v, pad)


class NumpyEngine(Engine):
    name = "numpy"

    def __init__(self, shard: Shard, config: ModelConfig | None = None, quant: str = DEFAULT_QUANT["numpy"],
                 max_seq: int = MAX_CONTEXT):
        if quant != "f32":
            raise ValueError(f"the numpy engine computes in f32 only, not {quant!r}")
        super().__init__(shard, config, max_seq)
        c = self.config
        weights = load_shard(shard.model_dir, c, shard.start, shard.end)
        # The embedding stays mapped in its stored dtype: a lookup widens only the rows it reads.
        self.embed = weights.pop("model.embed_tokens.weight", None)
        # float32 checkpoints stay memory-mapped; fp16/bf16 ones are widened once here.
        self.w = {name: as_float32(t) for name, t in weights.items()}
        if shard.is_last:
            self.head = as_float32(self.embed) if c.tie_word_embeddings else self.w.pop("lm_head.weight")

    def forward(self, steps: list[Step]) -> list[np.ndarray]:
        return [self._forward_one(step) for step in steps]

    def _forward_one(self, step: Step) -> np.ndarray:
        c, shard = self.config, self.shard
        if shard.is_first:
            x = as_float32(self.embed[np.asarray(step.x, dtype=np.int64)]) * np.float32(c.embedding_scale)
        else:
            x = np.asarray(step.x, dtype=np.float32)
        cache = self.caches.get(step.request_id)
        if cache is None:
            cache = self.caches[step.request_id] = KVCache(shard.end - shard.start, c.num_kv_heads, c.head_dim)
        T = x.shape[0]
        cache.reserve(step.pos, T)
        positions = np.arange(step.pos, step.pos + T)
        for i, layer in enumerate(range(shard.start, shard.end)):
            rope = c.rope(layer)
            tables = rope_tables(rope, positions) if rope else None
            x = self._layer(x, layer, cache, i, step.pos, tables)
        cache.length = step.pos + T
        if not shard.is_last:
            return x
        return softcap(self.head @ rms_norm(x[-1], self.w["model.norm.weight"], c.rms_norm_eps),
                       c.final_logit_softcapping)

    def _linear(self, x, name):
        y = x @ self.w[name + ".weight"].T
        bias = self.w.get(name + ".bias")
        return y if bias is None else y + bias

    def _mask(self, pos, end, window):
        """True where query position (rows pos..end-1) may not see key position (columns 0..end-1)."""
        return hidden_keys(np.arange(pos, end)[:, None] - np.arange(end)[None, :], window)

    def _heads(self, h, p, kind, heads):
        """[T, hidden] -> [heads, T, head_dim] of q, k or v; q and k normed per head where the model does."""
        c = self.config
        x = self._linear(h, p + f"self_attn.{kind}_proj").reshape(h.shape[0], heads, c.head_dim)
        if c.qk_norm and kind != "v":
            x = rms_norm(x, self.w[p + f"self_attn.{kind}_norm.weight"], c.rms_norm_eps)
        return x.transpose(1, 0, 2)

    def _layer(self, x, layer, cache, i, pos, tables):
        c, p = self.config, f"model.layers.{layer}."
        T, end = x.shape[0], pos + x.shape[0]
        h = rms_norm(x, self.w[p + "input_layernorm.weight"], c.rms_norm_eps)
        q, k, v = (self._heads(h, p, kind, n) for kind, n in (("q", c.num_heads), ("k", c.num_kv_heads),
                                                              ("v", c.num_kv_heads)))
        if tables is not None:
            q, k = rotate(q, *tables), rotate(k, *tables)
        cache.k[i, :, pos:end], cache.v[i, :, pos:end] = k, v
        keys, values = cache.k[i, :, :end], cache.v[i, :, :end]
        group = c.num_heads // c.num_kv_heads
        keys, values = np.repeat(keys, group, axis=0), np.repeat(values, group, axis=0)
        scores = q @ keys.transpose(0, 2, 1) * np.float32(c.attention_scale)
        scores = np.where(self._mask(pos, end, c.window(layer)), -np.inf, scores)
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        attention = (scores / scores.sum(axis=-1, keepdims=True)) @ values
        out = self._linear(attention.transpose(1, 0, 2).reshape(T, -1), p + "self_attn.o_proj")
        if c.sandwich_norms:   # Gemma: the attention's output is normed, and the MLP's input by its own norm
            x = x + rms_norm(out, self.w[p + "post_attention_layernorm.weight"], c.rms_norm_eps)
            h = rms_norm(x, self.w[p + "pre_feedforward_layernorm.weight"], c.rms_norm_eps)
        else:
            x = x + out
            h = rms_norm(x, self.w[p + "post_attention_layernorm.weight"], c.rms_norm_eps)
        mlp = self._experts(h, p) if c.is_sparse(layer) else self._mlp(h, p + "mlp.")
        if c.sandwich_norms:
            mlp = rms_norm(mlp, self.w[p + "post_feedforward_layernorm.weight"], c.rms_norm_eps)
        return x + mlp

    def _mlp(self, h, p):
        gate = ACTIVATIONS[self.config.activation](self._linear(h, p + "gate_proj"))
        return self._linear(gate * self._linear(h, p + "up_proj"), p + "down_proj")

    def _experts(self, h, p):
        """A sparse layer's MLP: each expert runs once, on the rows that chose it, and only the
        chosen experts' weights are read."""
        c = self.config
        chosen, weights = route(self._linear(h, p + "mlp.gate"), c.experts_per_token, c.norm_topk_prob)
        out = np.zeros_like(h)
        for expert in np.unique(chosen):
            rows, slot = np.nonzero(chosen == expert)
            out[rows] += weights[rows, slot, None] * self._mlp(h[rows], p + f"mlp.experts.{expert}.")
        if c.shared_expert_size:   # Qwen2-MoE: every token's shared expert, gated by a sigmoid
            gate = 1 / (1 + np.exp(-self._linear(h, p + "mlp.shared_expert_gate")))
            out += gate * self._mlp(h, p + "mlp.shared_expert.")
        return out
