"""The reference engine: a Llama-family transformer shard in plain numpy, float32.

Readable first: every other engine is checked against this one, and this one against Hugging Face
transformers. Covers Llama 2/3 (llama3 rope scaling), Mistral, Qwen2 (q/k/v bias), GQA, tied heads.
"""
from __future__ import annotations

import math

import numpy as np

from appliance.engines.footprint import DEFAULT_QUANT
from appliance.engines.base import MAX_CONTEXT, Engine, Shard, Step
from appliance.models.config import ModelConfig
from appliance.models.weights import as_float32, load_tensors, shard_tensor_names, weight_map


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
        return np.where(medium, smoothed, scaled)
    raise ValueError(f"rope_scaling type {kind!r} is not supported")


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Hugging Face rotary embedding: the two halves of each head form the pairs."""
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


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
        names = shard_tensor_names(weight_map(shard.model_dir), shard.start, shard.end,
                                   shard.is_first, shard.is_last, c.tie_word_embeddings)
        weights = load_tensors(shard.model_dir, names)
        # The embedding stays mapped in its stored dtype: a lookup widens only the rows it reads.
        self.embed = weights.pop("model.embed_tokens.weight", None)
        # float32 checkpoints stay memory-mapped; fp16/bf16 ones are widened once here.
        self.w = {name: as_float32(t) for name, t in weights.items()}
        if shard.is_last:
            self.head = as_float32(self.embed) if c.tie_word_embeddings else self.w.pop("lm_head.weight")
        self.inv_freq = rope_inv_freq(c)

    def forward(self, steps: list[Step]) -> list[np.ndarray]:
        return [self._forward_one(step) for step in steps]

    def _forward_one(self, step: Step) -> np.ndarray:
        c, shard = self.config, self.shard
        if shard.is_first:
            x = as_float32(self.embed[np.asarray(step.x, dtype=np.int64)])
        else:
            x = np.asarray(step.x, dtype=np.float32)
        cache = self.caches.get(step.request_id)
        if cache is None:
            cache = self.caches[step.request_id] = KVCache(shard.end - shard.start, c.num_kv_heads, c.head_dim)
        T = x.shape[0]
        cache.reserve(step.pos, T)
        angles = np.arange(step.pos, step.pos + T)[:, None] * self.inv_freq[None, :]
        angles = np.concatenate([angles, angles], axis=-1)
        cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
        for i, layer in enumerate(range(shard.start, shard.end)):
            x = self._layer(x, f"model.layers.{layer}.", cache, i, step.pos, cos, sin)
        cache.length = step.pos + T
        if not shard.is_last:
            return x
        return self.head @ rms_norm(x[-1], self.w["model.norm.weight"], c.rms_norm_eps)

    def _linear(self, x, name):
        y = x @ self.w[name + ".weight"].T
        bias = self.w.get(name + ".bias")
        return y if bias is None else y + bias

    def _mask(self, pos, end):
        """True where query position (rows pos..end-1) may not see key position (columns 0..end-1)."""
        distance = np.arange(pos, end)[:, None] - np.arange(end)[None, :]
        hidden = distance < 0
        if self.config.sliding_window:
            hidden |= distance >= self.config.sliding_window
        return hidden

    def _layer(self, x, p, cache, i, pos, cos, sin):
        c = self.config
        T, end = x.shape[0], pos + x.shape[0]
        h = rms_norm(x, self.w[p + "input_layernorm.weight"], c.rms_norm_eps)
        q = self._linear(h, p + "self_attn.q_proj").reshape(T, c.num_heads, c.head_dim).transpose(1, 0, 2)
        k = self._linear(h, p + "self_attn.k_proj").reshape(T, c.num_kv_heads, c.head_dim).transpose(1, 0, 2)
        v = self._linear(h, p + "self_attn.v_proj").reshape(T, c.num_kv_heads, c.head_dim).transpose(1, 0, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        cache.k[i, :, pos:end], cache.v[i, :, pos:end] = k, v
        keys, values = cache.k[i, :, :end], cache.v[i, :, :end]
        group = c.num_heads // c.num_kv_heads
        keys, values = np.repeat(keys, group, axis=0), np.repeat(values, group, axis=0)
        scores = q @ keys.transpose(0, 2, 1) / math.sqrt(c.head_dim)
        scores = np.where(self._mask(pos, end), -np.inf, scores)
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        attention = (scores / scores.sum(axis=-1, keepdims=True)) @ values
        x = x + self._linear(attention.transpose(1, 0, 2).reshape(T, -1), p + "self_attn.o_proj")
        h = rms_norm(x, self.w[p + "post_attention_layernorm.weight"], c.rms_norm_eps)
        mlp = silu(self._linear(h, p + "mlp.gate_proj")) * self._linear(h, p + "mlp.up_proj")
        return x + self._linear(mlp, p + "mlp.down_proj")
