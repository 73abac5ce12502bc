"""tinygrad engine: for Macs (METAL) and GPUs (CUDA, AMD); on CPU (clang) so CI can test it.

The device is tinygrad's default (env DEV=CPU|CUDA|METAL|AMD|CL) or the `device=` option. Weights
go from their memory-mapped safetensors file to the device, as float32 or float16
(`quant="f32"|"f16"`); the embedding stays a memory map on the host and only the looked-up rows
go to the device.

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
"""
from __future__ import annotations

import math

import numpy as np

from appliance.engines.footprint import DEFAULT_QUANT
from appliance.engines.base import MAX_CONTEXT, Engine, Shard, Step
from appliance.engines.numpy_engine import rope_inv_freq
from appliance.models.config import ModelConfig
from appliance.models.weights import as_float32, load_tensors, shard_tensor_names, weight_map


class TinygradEngine(Engine):
    name = "tinygrad"

    def __init__(self, shard: Shard, config: ModelConfig | None = None, quant: str = DEFAULT_QUANT["tinygrad"],
                 cache_dir=None, max_seq: int = MAX_CONTEXT, device: str | None = None, jit: bool = True):
        from tinygrad import Device, dtypes

        super().__init__(shard, config, max_seq)
        if quant not in ("f32", "f16"):
            raise ValueError(f"the tinygrad engine runs f32 or f16, not {quant!r}")
        c = self.config
        self.device = device or Device.DEFAULT
        self.dtype = dtypes.float32 if quant == "f32" else dtypes.float16
        self.use_jit = jit
        names = shard_tensor_names(weight_map(shard.model_dir), shard.start, shard.end,
                                   shard.is_first, shard.is_last, c.tie_word_embeddings)
        host = load_tensors(shard.model_dir, names, copy_on_write=True)
        embed = "model.embed_tokens.weight"
        self.embed = as_float32(host[embed]) if shard.is_first else None
        self.w = {name: to_device(t, self.device, self.dtype) for name, t in host.items()
                  if name != embed or (shard.is_last and c.tie_word_embeddings)}
        angles = np.arange(self.capacity)[:, None] * rope_inv_freq(c)[None, :]
        angles = np.concatenate([angles, angles], axis=-1)
        self.cos, self.sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
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
            x[b, :T] = self.embed[np.asarray(s.x, np.int64)] if self.shard.is_first else s.x
        pos = np.stack([np.arange(s.pos, s.pos + padded) for s in steps])
        last = np.zeros((len(steps), padded), np.float32)
        last[:, T - 1] = 1                        # the row whose logits the last shard returns
        mask = np.where(np.arange(self.capacity) > pos[0][:, None], -np.inf, 0).astype(np.float32)  # prefill only
        inputs = [Tensor(a, device=self.device) for a in (x, self.cos[pos][:, :, None], self.sin[pos][:, :, None],
                                                          mask, last)]
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

    # ---- the model: x [B, T, H], cos/sin [B, T, 1, D], mask [T, capacity], last [B, T],
    # ---- B*layers caches, B positions

    def _graph(self, x, cos, sin, mask, last, *rest):
        layers = self.shard.end - self.shard.start
        B = x.shape[0]
        caches, positions = rest[:B * layers], rest[B * layers:]
        for i, layer in enumerate(range(self.shard.start, self.shard.end)):
            x = self._layer(x, f"model.layers.{layer}.", cos, sin, mask,
                            [caches[b * layers + i] for b in range(B)], positions)
        if self.shard.is_last:
            c = self.config
            head = self.w["model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"]
            x = (x * last.unsqueeze(-1)).sum(1)  # each row's last real position (a prefill may be padded)
            x = self._norm(x, "model.norm.weight") @ head.cast(x.dtype).T
        return x.realize()

    def _linear(self, x, name):
        y = x @ self.w[name + ".weight"].cast(x.dtype).T
        bias = self.w.get(name + ".bias")
        return y if bias is None else y + bias

    def _norm(self, x, name):
        eps = self.config.rms_norm_eps
        return x * (x.square().mean(axis=-1, keepdim=True) + eps).rsqrt() * self.w[name]

    def _layer(self, x, p, cos, sin, mask, caches, positions):
        c = self.config
        B, T, _ = x.shape
        D, group = c.head_dim, c.num_heads // c.num_kv_heads
        h = self._norm(x, p + "input_layernorm.weight")
        q = rotate(self._linear(h, p + "self_attn.q_proj").reshape(B, T, c.num_heads, D), cos, sin)
        k = rotate(self._linear(h, p + "self_attn.k_proj").reshape(B, T, c.num_kv_heads, D), cos, sin)
        v = self._linear(h, p + "self_attn.v_proj").reshape(B, T, c.num_kv_heads, D)
        rows = []
        for b, (cache, pos) in enumerate(zip(caches, positions)):
            cache[:, :, pos:pos + T, :].assign(k[b].stack(v[b]).permute(0, 2, 1, 3))  # [2, kv, T, D]
            keys, values = cache[0, :, :pos + T, :], cache[1, :, :pos + T, :]          # [kv, L, D]
            qb = q[b].permute(1, 0, 2).reshape(c.num_kv_heads, group * T, D)
            scores = qb @ keys.transpose(1, 2) / math.sqrt(D)                         # [kv, group*T, L]
            if T > 1:  # prefill: row t may see positions up to pos + t (-inf beyond)
                L = keys.shape[1]
                scores = scores.reshape(c.num_kv_heads, group, T, L) + mask[:, :L]
                scores = scores.reshape(c.num_kv_heads, group * T, L)
            attention = scores.softmax(-1) @ values                                    # [kv, group*T, D]
            rows.append(attention.reshape(c.num_heads, T, D).permute(1, 0, 2).reshape(T, c.num_heads * D))
        attention = rows[0].unsqueeze(0) if B == 1 else rows[0].stack(*rows[1:])
        x = x + self._linear(attention, p + "self_attn.o_proj")
        h = self._norm(x, p + "post_attention_layernorm.weight")
        return x + self._linear(self._linear(h, p + "mlp.gate_proj").silu() * self._linear(h, p + "mlp.up_proj"),
                                p + "mlp.down_proj")


def to_device(t: np.ndarray, device: str, dtype):
    """A memory-mapped tensor copied onto the device, matrices as `dtype`, norms and biases as
    float32. bfloat16 (uint16 bits from `load_tensors`) is widened on the device from its bits,
    because not every backend's compiler has the type (clang on x86 does not)."""
    from tinygrad import Tensor, dtypes

    x = Tensor(np.asarray(t), device=device)
    if t.dtype == np.uint16:
        x = (x.cast(dtypes.uint32) << 16).bitcast(dtypes.float32)
    return x.cast(dtype if t.ndim == 2 else dtypes.float32).contiguous().realize()


def rotate(x, cos, sin):
    """HF rotary embedding on [B, T, heads, D]: the two halves of each head form the pairs."""
    half = x.shape[-1] // 2
    return x * cos + (-x[..., half:]).cat(x[..., :half], dim=-1) * sin
