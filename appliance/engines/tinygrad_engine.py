"""tinygrad engine: for Macs (METAL) and GPUs (CUDA, AMD); on CPU (clang) so CI can test it.

The device is tinygrad's default (env DEV=CPU|CUDA|METAL|AMD|CL) or the `device=` option. Weights
go from their memory-mapped safetensors file to the device, as float32 or float16
(`quant="f32"|"f16"`); the embedding stays a memory map on the host in its stored dtype, and only
the looked-up rows are widened and go to the device.

KV cache: one realized device buffer per request and local layer, [2, kv_heads, capacity, D]; a
step writes its new positions with `assign` into a slice, so nothing is copied.

Batching: decode steps (one token) of B requests run as one TinyJit-compiled call. The linear
layers run on all B rows at once; attention runs per row against that row's own cache, whose
position is a bound symbolic Variable, so one compiled graph serves every position. The JIT swaps
in the requests' cache buffers, so one graph per batch size B serves any set of requests.
Prefill chunks (several tokens) run one request at a time, compiled too, because scheduling a
graph eagerly costs about 0.1 s of Python per layer whatever the device (stories260K, 5 layers:
0.54 s a chunk eagerly, 0.03 s compiled). A chunk is padded to a power of two, so a few graphs
serve every prompt length: the padded rows come after the real ones, so the causal mask hides
them, and the cache entries they write are overwritten before any later step reads them.

The model's description (`ModelConfig`) drives the layer as in the numpy reference: cos/sin tables
per distinct rope (Gemma 3's two bases; none on SmolLM3's no-rope layers), a mask per distinct
sliding window, per-head q/k norms, Gemma's extra norms and GeGLU, partial rotary, soft-capping.
"""
from __future__ import annotations

import math

import numpy as np

from appliance.engines.footprint import DEFAULT_QUANT
from appliance.engines.base import MAX_CONTEXT, Engine, Shard, Step, attention_mask
from appliance.engines.rope import rope_tables
from appliance.models.config import ModelConfig
from appliance.models.weights import as_float32, load_shard


class TinygradEngine(Engine):
    name = "tinygrad"

    def __init__(self, shard: Shard, config: ModelConfig | None = None, quant: str = DEFAULT_QUANT["tinygrad"],
                 cache_dir=None, max_seq: int = MAX_CONTEXT, device: str | None = None, jit: bool = True):
        from tinygrad import Device, dtypes

        super().__init__(shard, config, max_seq)
        if quant not in ("f32", "f16"):
            raise ValueError(f"the tinygrad engine runs f32 or f16, not {quant!r}")
        c = self.config
        if c.num_experts:
            raise ValueError(f"the tinygrad engine does not run mixtures of experts ({c.model_type}): "
                             "use the onnxruntime or numpy engine")
        self.device = device or Device.DEFAULT
        self.dtype = dtypes.float32 if quant == "f32" else dtypes.float16
        self.use_jit = jit
        host = load_shard(shard.model_dir, c, shard.start, shard.end, copy_on_write=True)
        embed = "model.embed_tokens.weight"
        self.embed = host[embed] if shard.is_first else None   # mapped as stored; a lookup widens its rows
        self.w = {name: to_device(t, self.device, self.dtype) for name, t in host.items()
                  if name != embed or (shard.is_last and c.tie_word_embeddings)}
        layers = range(shard.start, shard.end)
        # One cos/sin table per distinct rope and one mask per distinct window among this shard's layers.
        self.ropes = list(dict.fromkeys(c.rope(i) for i in layers if c.rope(i) is not None))
        self.windows = list(dict.fromkeys(c.window(i) for i in layers))
        self.tables = [rope_tables(rope, np.arange(self.capacity)) for rope in self.ropes]
        self.jits: dict[int, object] = {}

    def forward(self, steps: list[Step]) -> list[np.ndarray]:
        decode = [s for s in steps if len(s.x) == 1]
        if len(decode) > 1 and len({s.request_id for s in decode}) == len(decode):
            out = dict(zip(map(id, decode), self._run(decode)))
            return [out[id(s)] if id(s) in out else self._run([s])[0] for s in steps]
        return [self._run([s])[0] for s in steps]

    def _run(self, steps: list[Step]) -> list[np.ndarray]:
        """B decode steps, or one prefill chunk. Compiled (TinyJit) once per batch size and, for a
        prefill, per padded length: the chunk is padded to a power of two so a handful of graphs
        serve every prompt. Positions are bound Variables, so one graph serves every position."""
        from tinygrad import Tensor, TinyJit, UOp

        T = len(steps[0].x)
        for s in steps:
            if s.pos + T > self.capacity:
                raise ValueError(f"request {s.request_id}: position {s.pos + T} is past the KV capacity {self.capacity}")
        padded = 1 << (T - 1).bit_length()
        if len(steps) > 1 or steps[0].pos + padded > self.capacity:
            padded = T
        x = np.zeros((len(steps), padded, self.config.hidden_size), np.float32)
        for b, s in enumerate(steps):
            x[b, :T] = as_float32(self.embed[np.asarray(s.x, np.int64)]) * self.config.embedding_scale \
                if self.shard.is_first else s.x
        pos = np.stack([np.arange(s.pos, s.pos + padded) for s in steps])
        last = np.zeros((len(steps), padded), np.float32)
        last[:, T - 1] = 1                        # the row whose logits the last shard returns
        distance = pos[:, :, None] - np.arange(self.capacity)[None, None, :]     # [B, T, capacity]
        masks = [attention_mask(distance, window) for window in self.windows]
        tables = [t[pos][:, :, None] for pair in self.tables for t in pair]    # [B, T, 1, rotary_dim/2]
        inputs = [Tensor(a, device=self.device) for a in (x, last, *masks, *tables)]
        caches = [c for s in steps for c in self._cache(s.request_id)]
        if self.use_jit:
            top = self.capacity - padded
            positions = [UOp.variable(f"pos{b}", 0, top).bind(s.pos) for b, s in enumerate(steps)]
            if (len(steps), padded) not in self.jits:
                self.jits[len(steps), padded] = TinyJit(self._graph)
            out = self.jits[len(steps), padded](*inputs, *caches, *positions).numpy()
        else:
            out = self._graph(*inputs, *caches, *[s.pos for s in steps]).numpy()
        return list(out) if self.shard.is_last else [rows[:T] for rows in out]

    def _cache(self, request_id: str) -> list:
        from tinygrad import Tensor

        if request_id not in self.caches:
            c = self.config
            self.caches[request_id] = [
                Tensor.zeros(2, c.num_kv_heads, self.capacity, c.head_dim, device=self.device).contiguous().realize()
                for _ in range(self.shard.start, self.shard.end)]
        return self.caches[request_id]

    # ---- the model: x [B, T, H], last [B, T], a mask [B, T, capacity] per window, cos and sin
    # ---- [B, T, 1, rotary_dim/2] per rope, B*layers caches, B positions

    def _graph(self, x, last, *rest):
        layers = self.shard.end - self.shard.start
        B, c = x.shape[0], self.config
        masks, rest = dict(zip(self.windows, rest[:len(self.windows)])), rest[len(self.windows):]
        tables = {rope: rest[2 * i:2 * i + 2] for i, rope in enumerate(self.ropes)}
        caches, positions = rest[2 * len(self.ropes):][:B * layers], rest[2 * len(self.ropes) + B * layers:]
        for i, layer in enumerate(range(self.shard.start, self.shard.end)):
            x = self._layer(x, layer, tables.get(c.rope(layer)), masks[c.window(layer)],
                            [caches[b * layers + i] for b in range(B)], positions)
        if self.shard.is_last:
            head = self.w["model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"]
            x = (x * last.unsqueeze(-1)).sum(1)  # each row's last real position (a prefill may be padded)
            x = self._norm(x, "model.norm.weight") @ head.cast(x.dtype).T
            if c.final_logit_softcapping:
                x = (x / c.final_logit_softcapping).tanh() * c.final_logit_softcapping
        return x.realize()

    def _linear(self, x, name):
        y = x @ self.w[name + ".weight"].cast(x.dtype).T
        bias = self.w.get(name + ".bias")
        return y if bias is None else y + bias

    def _norm(self, x, name):
        eps = self.config.rms_norm_eps
        return x * (x.square().mean(axis=-1, keepdim=True) + eps).rsqrt() * self.w[name]

    def _heads(self, h, p, kind, heads):
        c = self.config
        B, T, _ = h.shape
        x = self._linear(h, p + f"self_attn.{kind}_proj").reshape(B, T, heads, c.head_dim)
        return self._norm(x, p + f"self_attn.{kind}_norm.weight") if c.qk_norm and kind != "v" else x

    def _layer(self, x, layer, table, mask, caches, positions):
        c, p = self.config, f"model.layers.{layer}."
        B, T, _ = x.shape
        D, group = c.head_dim, c.num_heads // c.num_kv_heads
        h = self._norm(x, p + "input_layernorm.weight")
        q, k = self._heads(h, p, "q", c.num_heads), self._heads(h, p, "k", c.num_kv_heads)
        v = self._heads(h, p, "v", c.num_kv_heads)
        if table is not None:
            q, k = rotate(q, *table), rotate(k, *table)
        rows = []
        for b, (cache, pos) in enumerate(zip(caches, positions)):
            cache[:, :, pos:pos + T, :].assign(k[b].stack(v[b]).permute(0, 2, 1, 3))  # [2, kv, T, D]
            keys, values = cache[0, :, :pos + T, :], cache[1, :, :pos + T, :]          # [kv, L, D]
            qb = q[b].permute(1, 0, 2).reshape(c.num_kv_heads, group * T, D)
            scores = qb @ keys.transpose(1, 2) * c.attention_scale                    # [kv, group*T, L]
            L = keys.shape[1]   # row t may see positions up to pos + t, and no further back than its window
            scores = scores.reshape(c.num_kv_heads, group, T, L) + mask[b, :, :L]
            attention = scores.reshape(c.num_kv_heads, group * T, L).softmax(-1) @ values   # [kv, group*T, D]
            rows.append(attention.reshape(c.num_heads, T, D).permute(1, 0, 2).reshape(T, c.num_heads * D))
        attention = rows[0].unsqueeze(0) if B == 1 else rows[0].stack(*rows[1:])
        out = self._linear(attention, p + "self_attn.o_proj")
        if c.sandwich_norms:   # Gemma: the attention's output is normed, and the MLP's input by its own norm
            x = x + self._norm(out, p + "post_attention_layernorm.weight")
            h = self._norm(x, p + "pre_feedforward_layernorm.weight")
        else:
            x = x + out
            h = self._norm(x, p + "post_attention_layernorm.weight")
        gate = self._linear(h, p + "mlp.gate_proj")
        gate = gate.gelu() if c.activation == "gelu_tanh" else gate.silu()
        mlp = self._linear(gate * self._linear(h, p + "mlp.up_proj"), p + "mlp.down_proj")
        if c.sandwich_norms:
            mlp = self._norm(mlp, p + "post_feedforward_layernorm.weight")
        return x + mlp


def to_device(t: np.ndarray, device: str, dtype):
    """A memory-mapped tensor copied onto the device, matrices as `dtype`, norms and biases as
    float32. bfloat16 (uint16 bits from `load_tensors`) is widened on the device from its bits,
    because not every backend's compiler has the type (clang on x86 does not)."""
    from tinygrad import Tensor, dtypes

    if t.dtype not in (np.float32, np.float16, np.uint16):   # a GGUF file's quantized blocks
        t = as_float32(t)
    x = Tensor(np.asarray(t), device=device)
    if t.dtype == np.uint16:
        x = (x.cast(dtypes.uint32) << 16).bitcast(dtypes.float32)
    return x.cast(dtype if t.ndim == 2 else dtypes.float32).contiguous().realize()


def rotate(x, cos, sin):
    """HF rotary embedding on [B, T, heads, D] over each head's first 2 * cos.shape[-1] dims (the
    two halves of that part form the pairs); the rest pass unchanged (partial rotary)."""
    half, D = cos.shape[-1], x.shape[-1]
    x1, x2 = x[..., :half], x[..., half:2 * half]
    parts = [x1 * cos - x2 * sin, x2 * cos + x1 * sin] + ([x[..., 2 * half:]] if 2 * half < D else [])
    return parts[0].cat(*parts[1:], dim=-1)
