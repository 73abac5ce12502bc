"""ggml engine: a shard run by ggml's CPU backend (the tensor library llama.cpp is built on), through
the `ggml-python` bindings, with ggml's own Q4_0 / Q8_0 block kernels.

Weights. Matrices are held as ggml blocks: Q4_0 (q4), Q8_0 (q8), F16 or F32; the embedding too
(looked up with get_rows, which widens only the rows it reads), and a tied head is the embedding's
own tensor. A first stage reads its tokens' rows of the embedding from the file (pread), not
through the map, where the embedding is not also its head. A GGUF file's Q4_0 / Q8_0 blocks are
used as they are. A matrix whose rows are not a whole number of 32-wide blocks stays F16. Norms
and biases are float32. The converted shard is written once to the on-disk cache (weight_cache.py,
default ~/.cache/exo/ggml) and memory-mapped: ggml's tensors point into the map, so only the pages
of this node's layers are ever read in.
q, k and v are stacked into one matrix, gate and up into another: one product each instead of
three and two (fewer graph nodes, each a barrier of ggml's threads). Q4_0 and Q8_0 matrices (but
the embedding) are copied into ggml's CPU_REPACK buffer, whose interleaved blocks feed llama.cpp's
fastest kernels (Q4_0 on x86 and ARM, Q8_0 on ARM; elsewhere the blocks are copied as they are);
each one's mapped pages are dropped once copied, so the shard is never held twice. That buffer
asks for transparent huge pages (fewer TLB misses: a decode step 10 % faster at q8, 6 % at q4).

A step. A call over several steps (requests distinct) builds one ggml graph for them all: the
linear layers run over every token row of every request at once, attention per request against its
own KV cache. Decode steps (one token each) reuse their requests' graph instead: built once per
SPAN positions of each, attending over the whole span with the positions not yet written masked,
then pointed at each next position while the same requests decode together (building one is about
2 ms of Python for 22 layers and one request, more than a tenth of a q4 TinyLlama step; 6 ms for
eight). A decode graph takes its requests in their caches' order, and attends once a layer for each
run of requests in neighbouring slots (below). ggml's allocator reuses one compute buffer for every
graph.
Rope is ggml's NEOX mode (pairs i and i + rotary/2 of each head, Hugging Face's layout); its
frequencies come from rope.py as per-pair factors.

KV cache. A row per position of each layer, kv_heads * D wide, as ggml's fused attention
(flash_attn_ext) reads them. Requests' caches sit side by side in banks of BANK, keys and values
[layers, BANK, capacity, kv_heads * D] each, a request holding a slot: the decode steps of requests
in neighbouring slots write their new rows with one set_rows each and attend in one flash_attn_ext
(a batch of queries, each over its own slot), instead of a copy, a copy and an attention each, and
a concatenation: 8 requests decode 3 % faster. float16 where the CPU does float16 arithmetic
(llama.cpp's default: half the memory, half the bytes attention reads), else float32, and at f32.
Pages are made as rows are written (lazy_zeros); a freed request's are given back (zero_again).
"""
from __future__ import annotations

import ctypes
import functools
import logging
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from appliance.engines.base import MAX_CONTEXT, Engine, Shard, Step, attention_mask, lazy_zeros, zero_again
from appliance.engines.footprint import DEFAULT_QUANT, QUANTS, cpu_has_float16_arithmetic, kv_value_bytes
from appliance.engines.rope import attention_factor, inv_freq
from appliance.engines.weight_cache import (advise_huge_pages, cache_key, load_arrays, release_array, release_pages,
                                            row_reader, save_arrays)
from appliance.models.config import ModelConfig, Rope
from appliance.models.weights import as_float32, load_shard

# ggml's threads meet at an OpenMP barrier after every operation. libgomp's waiters spin for about
# a millisecond before sleeping: on a shared host (local nodes, anything else running) a barrier
# then waits out a preempted thread, measured 2 tok/s instead of 14 on two busy cores. A short
# spin, then sleep (read once, when libgomp loads; OMP_WAIT_POLICY or GOMP_SPINCOUNT overrides).
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")

import ggml  # noqa: E402  (ggml-python: pip install 'exo-appliance[ggml]')

MATRIX_TYPES = {"q4": ggml.GGML_TYPE_Q4_0, "q8": ggml.GGML_TYPE_Q8_0, "f16": ggml.GGML_TYPE_F16,
                "f32": ggml.GGML_TYPE_F32}
GGUF_BLOCKS = {("Q4_0", "q4"), ("Q8_0", "q8")}   # a GGUF tensor's blocks taken as they are
BLOCK = 32
DEFAULT_CACHE_DIR = Path("~/.cache/exo/ggml")
FORMAT = 2   # of the cached shard (2: fused q/k/v and gate/up): a new format converts again
NUMPY_TYPES = {np.dtype(np.float32): ggml.GGML_TYPE_F32, np.dtype(np.float16): ggml.GGML_TYPE_F16}
F32 = ggml.GGML_TYPE_F32
EMBED = "model.embed_tokens.weight"
KV_TYPES = {2: np.dtype(np.float16), 4: np.dtype(np.float32)}   # a KV cache's numbers, by their bytes
SPAN = 256           # a decode graph attends over a whole span of this many positions
KEPT_DECODERS = 8    # decode graphs kept (a request's current span each), the least recently used dropped
BANK = 8             # requests' KV caches side by side in one array: a decode step attends over neighbours at once
FEW_ROWS = 6         # a batch this small takes a padded matrix's own rows (1-5 rows faster so, 8 rows slower)
log = logging.getLogger(__name__)


@ggml.ggml_log_callback
def _ggml_log(level: int, text: bytes, _user_data) -> None:
    """ggml's own messages (it reports every repacked tensor at INFO) into our log, at DEBUG below warnings."""
    log.log(logging.WARNING if level >= ggml.GGML_LOG_LEVEL_WARN else logging.DEBUG,
            "ggml: %s", text.decode(errors="replace").rstrip())


ggml.ggml_log_set(_ggml_log, None)


@dataclass(frozen=True, eq=False)   # hashed by identity: one per distinct rope
class LayerRope:
    """A layer's rotary embedding as ggml's rope takes it: rope.py's frequencies as per-pair divisors
    of theta^(-2i/d) (None where all 1), and longrope's long ones past `original` positions."""
    rope: Rope
    short: np.ndarray | None
    long: np.ndarray | None
    original: int | None

    @classmethod
    def of(cls, rope: Rope) -> "LayerRope":
        d = rope.rotary_dim
        plain = 1.0 / (rope.theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
        short = (plain / inv_freq(rope)).astype(np.float32)
        long = (plain / inv_freq(rope, long=True)).astype(np.float32)
        scaling = rope.scaling or {}
        original = scaling.get("original_max_position_embeddings") if scaling.get("rope_type") == "longrope" else None
        return cls(rope, None if np.all(short == 1) else short, None if np.all(long == 1) else long, original)


class GgmlEngine(Engine):
    name = "ggml"

    def __init__(self, shard: Shard, config: ModelConfig | None = None, quant: str = DEFAULT_QUANT["ggml"],
                 cache_dir: str | Path | None = None, max_seq: int = MAX_CONTEXT, threads: int = 0,
                 repack: bool = True):
        super().__init__(shard, config, max_seq)
        if quant not in QUANTS:
            raise ValueError(f"quant must be one of {QUANTS}, not {quant!r}")
        if self.config.num_experts:
            raise ValueError(f"the ggml engine does not run mixtures of experts ({self.config.model_type}): "
                             "use the onnxruntime or numpy engine")
        self.quant = quant
        self.kv_value_bytes = kv_value_bytes(self.name, quant, cpu_has_float16_arithmetic())
        self.arrays, self.cache_path = shard_arrays(shard, self.config, quant, cache_dir)
        self.types = {name: ggml_type(name, a, quant) for name, a in self.arrays.items()}
        self.backend = ggml.ggml_backend_cpu_init()
        ggml.ggml_backend_cpu_set_n_threads(self.backend, threads or len(os.sched_getaffinity(0)))
        # The embedding is read by get_rows, which needs the plain layout; a tied head shares it.
        repacked = [n for n, t in self.types.items() if t in (ggml.GGML_TYPE_Q4_0, ggml.GGML_TYPE_Q8_0)
                    and n != EMBED]
        buffer_type = weight_buffer_type(self.backend, [self.arrays[n] for n in repacked]) if repack else None
        padded = [n for n in repacked if n.startswith("model.layers.")] if is_amx(buffer_type) else []
        self.tensors = Tensors(self.arrays, self.types, repacked, buffer_type, padded)
        release_pages(self.arrays.values())
        self.allocator = ggml.ggml_gallocr_new(ggml.ggml_backend_get_default_buffer_type(self.backend))
        self.laid_out: Graph | None = None   # the graph whose tensors the allocator's buffer holds now
        c = self.config
        self.head = "lm_head.weight" if "lm_head.weight" in self.arrays else EMBED
        # A first stage reads its tokens' embedding rows from the file, unless the embedding is its
        # head too (which reads every row each step).
        self.embedding_rows = row_reader(self.arrays[EMBED]) \
            if shard.is_first and not (shard.is_last and self.head == EMBED) else None
        self.width = c.num_kv_heads * c.head_dim
        ropes: dict[Rope, LayerRope] = {}
        self.ropes = [None if (r := c.rope(layer)) is None else ropes.setdefault(r, LayerRope.of(r))
                      for layer in range(shard.start, shard.end)]
        self.windows = [c.window(layer) for layer in range(shard.start, shard.end)]
        self.long_ropes = [r for r in ropes.values() if r.original]   # their factors change along the way
        self.decoders: dict[tuple, Graph] = {}   # (requests, their spans, long factors in use) -> their decode graph
        self.banks: list[KVBank] = []

    def __del__(self):
        for g in getattr(self, "decoders", {}).values():
            g.free()
        if getattr(self, "allocator", None):
            ggml.ggml_gallocr_free(self.allocator)
            ggml.ggml_backend_free(self.backend)

    def forward(self, steps: list[Step]) -> list[np.ndarray]:
        for step in steps:
            if step.pos + len(step.x) > self.capacity:
                raise ValueError(f"request {step.request_id}: position {step.pos + len(step.x)} is past the KV "
                                 f"capacity {self.capacity} (max_seq)")
        distinct = len({s.request_id for s in steps}) == len(steps)
        if distinct and all(len(s.x) == 1 for s in steps):
            return self._decode(steps)
        if distinct:
            return self._run(steps)
        return [self._run([step])[0] for step in steps]   # two steps of one request: in order

    def free(self, request_id: str) -> None:
        cache = self.caches.get(request_id)
        super().free(request_id)
        self._drop_decoders(request_id)
        if cache is not None:
            cache.release()

    def _drop_decoders(self, request_id: str) -> None:
        for key in [k for k in self.decoders if request_id in k[0]]:
            self.decoders.pop(key).free()

    # ---- one graph over the steps of distinct requests ----

    def _run(self, steps: list[Step]) -> list[np.ndarray]:
        g = Graph(self, steps)
        try:
            out = g.compute()
        finally:
            g.free()
        if self.shard.is_last:
            return list(out)
        bounds = np.cumsum([0] + [len(s.x) for s in steps])
        return [out[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def _decode(self, steps: list[Step]) -> list[np.ndarray]:
        """The next token of each of some requests, one row each: their graph is built once per
        SPAN positions of each (attending over the whole span, the positions not yet written
        masked) and run again with new inputs while the same requests decode together, which
        saves rebuilding it in Python (about 2 ms a step for 22 layers and one request, 6 ms
        for eight)."""
        order = sorted(range(len(steps)), key=lambda i: self.cache(steps[i].request_id).place)
        steps = [steps[i] for i in order]   # in their caches' order: neighbours attend in one operation
        spans = tuple(min(self.capacity, (s.pos // SPAN + 1) * SPAN) for s in steps)
        key = (tuple(s.request_id for s in steps), spans,
               tuple(s.pos >= r.original for s in steps for r in self.long_ropes))
        g = self.decoders.pop(key, None)
        if g is None:
            for step in steps:   # their graphs of the span, or the batch, before
                self._drop_decoders(step.request_id)
            while len(self.decoders) >= KEPT_DECODERS:
                self.decoders.pop(next(iter(self.decoders))).free()
            g = Graph(self, steps, spans=spans)
        else:
            g.retarget(steps)
        self.decoders[key] = g   # last used last
        out = g.compute()
        results = [None] * len(steps)
        for row, i in enumerate(order):
            results[i] = out[row] if self.shard.is_last else out[row:row + 1]
        return results

    def lay_out(self, graph: "Graph") -> None:
        """Place the graph's tensors in the allocator's buffer. A graph larger than any before makes
        ggml free that buffer and allocate a bigger one, and the decode graphs kept from before
        would then point into freed memory (a later step of theirs corrupted the heap): they go,
        and are built again when next needed. On the CPU the buffer is one piece that only grows,
        so a new size is a new buffer. A new buffer, not yet touched, asks for transparent huge
        pages as the weights' does: a prefill's activations span megabytes (q4 prefill 2.5 %
        faster)."""
        size = ggml.ggml_gallocr_get_buffer_size(self.allocator, 0)
        if not ggml.ggml_gallocr_alloc_graph(self.allocator, graph.graph):
            raise MemoryError("ggml could not allocate the compute buffer")
        if ggml.ggml_gallocr_get_buffer_size(self.allocator, 0) != size:
            for key in [k for k, kept in self.decoders.items() if kept is not graph]:
                self.decoders.pop(key).free()
            buffer = graph.out.contents.buffer   # the output is one of the allocator's own tensors
            advise_huge_pages(ggml.ggml_backend_buffer_get_base(buffer), ggml.ggml_backend_buffer_get_size(buffer))
        self.laid_out = graph

    def cache(self, request_id: str) -> "KVCache":
        """The request's KV cache: the first free slot of a bank, a new bank where all are taken."""
        cache = self.caches.get(request_id)
        if cache is None:
            bank = next((b for b in self.banks if b.free), None)
            if bank is None:
                bank = KVBank(len(self.banks), self.shard.end - self.shard.start, self.width, self.capacity,
                              KV_TYPES[self.kv_value_bytes])
                self.banks.append(bank)
            slot = min(bank.free)
            bank.free.remove(slot)
            cache = self.caches[request_id] = KVCache(bank, slot)
        return cache


class KVBank:
    """The KV caches of BANK requests side by side, keys and values [layers, BANK, capacity, width]:
    a decode step's requests in neighbouring slots are one run of rows for ggml's attention, which
    attends over each request's own slot (one operation a layer for them all, not one each, and
    one write of their new keys and one of their values). Pages are made as rows are written."""

    def __init__(self, number: int, layers: int, width: int, capacity: int, dtype: np.dtype):
        self.number = number
        self.k = lazy_zeros((layers, BANK, capacity, width), dtype)
        self.v = lazy_zeros((layers, BANK, capacity, width), dtype)
        self.free = list(range(BANK))


class KVCache:
    """One request's keys and values for each local layer, a row per position: its slot of a bank."""

    def __init__(self, bank: KVBank, slot: int):
        self.bank, self.slot = bank, slot
        self.place = (bank.number, slot)
        self.k, self.v = bank.k[:, slot], bank.v[:, slot]
        self.written = 0   # positions [0, written) hold rows

    def release(self) -> None:
        """The rows written zeros again, their pages given back, and the slot free for another request."""
        for layer in (*self.k, *self.v):
            zero_again(layer[:self.written])
        self.bank.free.append(self.slot)


class Graph:
    """A ggml graph over some steps: a context for its tensors' descriptions (the data lives in the
    weight maps, the KV caches and the allocator's buffer), the inputs to write once it is
    allocated. With `spans` (decode steps, one row each), each step's attention covers that many
    positions, those not yet written masked, so `retarget` can point the graph at the requests'
    next positions."""

    def __init__(self, engine: GgmlEngine, steps: list[Step], spans: tuple[int, ...] | None = None):
        self.engine, self.config, self.steps, self.spans = engine, engine.config, steps, spans
        layers = engine.shard.end - engine.shard.start
        self.size = 64 + layers * (48 + 32 * len(steps))
        params = ggml.ggml_init_params(mem_size=self.size * ggml.ggml_tensor_overhead() +
                                       ggml.ggml_graph_overhead_custom(self.size, False), mem_buffer=None, no_alloc=True)
        self.ctx = ggml.ggml_init(params)
        self.graph = ggml.ggml_new_graph_custom(self.ctx, self.size, False)
        self.inputs: list[tuple[object, np.ndarray]] = []
        starts = np.cumsum([0] + [len(s.x) for s in steps])
        self.rows = [(int(a), len(s.x)) for a, s in zip(starts, steps)]   # (first row, rows) of each step
        self.positions = np.concatenate([np.arange(s.pos, s.pos + len(s.x), dtype=np.int32) for s in steps])
        self.pos = self.input(self.positions, ggml.GGML_TYPE_I32)
        self.masks: dict[tuple[int, int | None], object] = {}
        self.ramps: dict[tuple[int, int | None], np.ndarray] = {}   # a decode graph's one-row masks, by span and window
        self.runs: dict[LayerRope, list] = {}
        self.caches = [engine.cache(s.request_id) for s in steps]
        # a decode graph's runs of requests in neighbouring slots of a bank, as (first row, rows)
        self.neighbours = neighbour_runs(self.caches) if spans else []
        self.slot_rows: dict[int, object] = {}   # a run's input: its new keys' and values' rows of its bank
        self.run_masks: dict[tuple[int, int | None], object] = {}
        self.x = None
        self.out = self.build()
        ggml.ggml_set_output(self.out)
        ggml.ggml_build_forward_expand(self.graph, self.out)

    def free(self) -> None:
        if self.engine.laid_out is self:
            self.engine.laid_out = None
        ggml.ggml_free(self.ctx)

    def input(self, values: np.ndarray, kind: int, shape: tuple[int, ...] | None = None):
        """An input tensor of values; `shape` in ggml's order (fastest first), the values' own unless
        told (a quantized type's rows hold more elements than bytes). It is a view of a tensor of
        whole cache lines: ggml's allocator lays a graph's tensors end to end after its inputs, and
        one input of 4 bytes (a prompt's last row) left every product's output of a prefill
        starting mid-line, each 64-byte store of ggml's AMX kernels split in two (1.7× the time)."""
        values = np.ascontiguousarray(values)
        ne = (*(shape or values.shape[::-1]), 1, 1, 1)[:4]
        row = ggml.ggml_row_size(kind, ne[0])
        line = math.lcm(ggml.ggml_type_size(kind), 64)   # whole cache lines of whole blocks
        padded_bytes = -(-row * ne[1] * ne[2] * ne[3] // line) * line
        padded = ggml.ggml_new_tensor_1d(self.ctx, kind,
                                         padded_bytes // ggml.ggml_type_size(kind) * ggml.ggml_blck_size(kind))
        ggml.ggml_set_input(padded)
        t = ggml.ggml_view_4d(self.ctx, padded, *ne, row, row * ne[1], row * ne[1] * ne[2], 0)
        self.inputs.append((t, values))
        return t

    def set_input(self, t, values: np.ndarray) -> None:
        i = next(i for i, (known, _) in enumerate(self.inputs) if known is t)
        self.inputs[i] = (t, np.ascontiguousarray(values, self.inputs[i][1].dtype))

    def external(self, kind: int, shape: tuple[int, ...], data: int):
        """A tensor over memory we own (a KV cache), shape in ggml's order (fastest first)."""
        t = ggml.ggml_new_tensor(self.ctx, kind, len(shape), dims(shape))
        t.contents.data = data
        return t

    def build(self):
        """The shard's layers over the steps' rows: the output tensor."""
        c, shard, steps = self.config, self.engine.shard, self.steps
        if shard.is_first:
            x = self.embed(np.concatenate([np.asarray(s.x, np.int32) for s in steps]))
            if c.embedding_scale != 1.0:
                x = ggml.ggml_scale(self.ctx, x, c.embedding_scale)
        else:
            self.x = x = self.input(np.concatenate([np.asarray(s.x, np.float32) for s in steps]), F32)
        # the last stage makes a token of each step's last row only: after the model's last
        # attention (which reads every row's keys and values) the other rows are left behind
        self.token_rows = None
        if shard.is_last and len(self.positions) > len(steps):
            self.token_rows = self.input(np.cumsum([len(s.x) for s in steps]).astype(np.int32) - 1, ggml.GGML_TYPE_I32)
        for i, layer in enumerate(range(shard.start, shard.end)):
            x = self.layer(x, layer, i)
        if not shard.is_last:
            return x
        x = self.norm(x, "model.norm.weight")
        x = ggml.ggml_mul_mat(self.ctx, self.engine.tensors[self.engine.head], x)
        if c.final_logit_softcapping:
            cap = c.final_logit_softcapping
            x = ggml.ggml_scale(self.ctx, ggml.ggml_tanh(self.ctx, ggml.ggml_scale(self.ctx, x, 1 / cap)), cap)
        return x

    def embed(self, ids: np.ndarray):
        """The embedding's rows of these token ids, widened to float32. `self.x` is the input that
        `retarget` sets: the ids, or the rows themselves where the engine reads them from the file."""
        rows, embedding = self.engine.embedding_rows, self.engine.tensors[EMBED]
        if rows is None:
            self.x = self.input(ids, ggml.GGML_TYPE_I32)
            return ggml.ggml_get_rows(self.ctx, embedding, self.x)
        self.x = self.input(rows(ids), embedding.contents.type, (embedding.contents.ne[0], len(ids)))
        return ggml.ggml_get_rows(self.ctx, self.x, self.input(np.arange(len(ids), dtype=np.int32), ggml.GGML_TYPE_I32))

    def retarget(self, steps: list[Step]) -> None:
        """A decode graph, to one more step of each of its requests: the new rows, positions and
        masks, and the KV cache rows they write."""
        self.steps = steps
        self.positions = np.array([s.pos for s in steps], np.int32)
        x = np.concatenate([s.x for s in steps])
        rows = self.engine.embedding_rows
        self.set_input(self.x, x if rows is None else rows(x))
        self.set_input(self.pos, self.positions)
        for r, rows in self.slot_rows.items():
            self.set_input(rows, self.slot_row_values(r))
        for (r, window), mask in self.run_masks.items():
            self.set_input(mask, self.run_mask_values(r, window))

    def compute(self) -> np.ndarray:
        engine = self.engine
        if engine.laid_out is not self:   # a decode graph run again finds its tensors where they were
            engine.lay_out(self)
            ne = self.out.contents.ne
            buf = (ctypes.c_float * (ne[0] * ne[1])).from_address(self.out.contents.data)
            self.output = np.ctypeslib.as_array(buf).reshape(ne[1], ne[0])
        for t, values in self.inputs:
            ctypes.memmove(t.contents.data, values.ctypes.data, values.nbytes)
        for cache, step in zip(self.caches, self.steps):
            cache.written = max(cache.written, step.pos + len(step.x))
        status = ggml.ggml_backend_graph_compute(engine.backend, self.graph)
        if status != 0:
            raise RuntimeError(f"ggml graph compute failed with status {status}")
        return self.output.copy()

    # ---- the layer ----

    def norm(self, x, name: str):
        return ggml.ggml_mul(self.ctx, ggml.ggml_rms_norm(self.ctx, x, self.config.rms_norm_eps),
                             self.engine.tensors[name])

    def linear(self, x, name: str):
        """x times the matrix. Of a padded matrix (`Tensors`), a batch of a few rows takes a view of
        its own rows (the pad would only be read); a larger one the whole, and its product is
        viewed back to the matrix's own width, its rows keeping the padded stride."""
        ctx, tensors = self.ctx, self.engine.tensors
        w, rows = tensors[name + ".weight"], tensors.rows.get(name + ".weight")
        if rows and x.contents.ne[1] <= FEW_ROWS:
            w = ggml.ggml_view_2d(ctx, w, w.contents.ne[0], rows, w.contents.nb[1], 0)
        y = ggml.ggml_mul_mat(ctx, w, x)
        if rows and y.contents.ne[0] != rows:
            y = ggml.ggml_view_2d(ctx, y, rows, y.contents.ne[1], y.contents.nb[1], 0)
        bias = tensors.get(name + ".bias")
        return y if bias is None else ggml.ggml_add(ctx, y, bias)

    def qkv(self, h, p: str):
        """q, k and v of h as [D, heads, N] views of one product by the fused q/k/v matrix; q and k
        normed per head where the model does."""
        c, ctx = self.config, self.ctx
        qkv = self.linear(h, p + "self_attn.qkv_proj")
        row, D, N = qkv.contents.nb[1], c.head_dim, len(self.positions)
        q = ggml.ggml_view_3d(ctx, qkv, D, c.num_heads, N, D * 4, row, 0)
        k = ggml.ggml_view_3d(ctx, qkv, D, c.num_kv_heads, N, D * 4, row, c.num_heads * D * 4)
        v = ggml.ggml_view_3d(ctx, qkv, D, c.num_kv_heads, N, D * 4, row, (c.num_heads + c.num_kv_heads) * D * 4)
        if c.qk_norm:
            q, k = self.norm(q, p + "self_attn.q_norm.weight"), self.norm(k, p + "self_attn.k_norm.weight")
        return q, k, v

    def layer(self, x, layer: int, i: int):
        c, ctx, p = self.config, self.ctx, f"model.layers.{layer}."
        h = self.norm(x, p + "input_layernorm.weight")
        q, k, v = self.qkv(h, p)
        rope = self.engine.ropes[i]
        if rope is not None:
            q, k = self.rotate(q, rope), self.rotate(k, rope)
        window = self.engine.windows[i]
        if self.spans:
            outs = [self.attend_run(q, k, v, i, r, window) for r in range(len(self.neighbours))]
        else:
            outs = [self.attend(q, k, v, i, s, window) for s in range(len(self.steps))]
        attention = outs[0]
        for more in outs[1:]:
            attention = ggml.ggml_concat(ctx, attention, more, 1)
        if self.token_rows is not None and layer == self.engine.shard.end - 1:
            attention, x = (ggml.ggml_get_rows(ctx, t, self.token_rows) for t in (attention, x))
        attention = self.linear(attention, p + "self_attn.o_proj")
        if c.sandwich_norms:   # Gemma: the attention's output is normed, and the MLP's input by its own norm
            x = ggml.ggml_add(ctx, x, self.norm(attention, p + "post_attention_layernorm.weight"))
            h = self.norm(x, p + "pre_feedforward_layernorm.weight")
        else:
            x = ggml.ggml_add(ctx, x, attention)
            h = self.norm(x, p + "post_attention_layernorm.weight")
        mlp = self.linear(self.gated(self.linear(h, p + "mlp.gate_up_proj")), p + "mlp.down_proj")
        if c.sandwich_norms:
            mlp = self.norm(mlp, p + "post_feedforward_layernorm.weight")
        return ggml.ggml_add(ctx, x, mlp)

    def gated(self, gate_up):
        """activation(gate) * up, of the fused [gate | up] product."""
        ctx = self.ctx
        if self.config.activation == "silu":
            return ggml.ggml_swiglu(ctx, gate_up)
        # gelu_tanh from its formula: ggml's gelu reads a float16 table
        half, row, N = gate_up.contents.ne[0] // 2, gate_up.contents.nb[1], gate_up.contents.ne[1]
        x = ggml.ggml_cont(ctx, ggml.ggml_view_2d(ctx, gate_up, half, N, row, 0))
        up = ggml.ggml_view_2d(ctx, gate_up, half, N, row, half * 4)
        cube = ggml.ggml_mul(ctx, ggml.ggml_mul(ctx, x, x), x)
        inner = ggml.ggml_scale(ctx, ggml.ggml_add(ctx, x, ggml.ggml_scale(ctx, cube, 0.044715)), (2 / np.pi) ** 0.5)
        gate = ggml.ggml_mul(ctx, x, ggml.ggml_scale_bias(ctx, ggml.ggml_tanh(ctx, inner), 0.5, 0.5))
        return ggml.ggml_mul(ctx, gate, up)

    def rotate(self, x, rope: LayerRope):
        """ggml's NEOX rope over [D, heads, N]; longrope's rows past the original context take
        the long factors (rows are split into runs of one kind)."""
        out = None
        for a, b, factors in self.rope_runs(rope):
            part, pos = x, self.pos
            if (a, b) != (0, len(self.positions)):
                nb = x.contents.nb
                part = ggml.ggml_view_3d(self.ctx, x, x.contents.ne[0], x.contents.ne[1], b - a, nb[1], nb[2], a * nb[2])
                pos = ggml.ggml_view_1d(self.ctx, self.pos, b - a, a * 4)
            turned = ggml.ggml_rope_ext(self.ctx, part, pos, factors, rope.rope.rotary_dim, ggml.GGML_ROPE_TYPE_NEOX, 0,
                                        rope.rope.theta, 1.0, 0.0, attention_factor(rope.rope), 0.0, 0.0)
            out = turned if out is None else ggml.ggml_concat(self.ctx, out, turned, 2)
        return out

    def rope_runs(self, rope: LayerRope) -> list:
        """(first row, end row, factors tensor or None) of each run of rows with one set of factors."""
        if rope not in self.runs:
            is_long = self.positions >= rope.original if rope.original else np.zeros(len(self.positions), bool)
            cuts = [0, *(np.flatnonzero(np.diff(is_long.astype(np.int8))) + 1), len(self.positions)]
            runs = []
            for a, b in zip(cuts[:-1], cuts[1:]):
                factors = rope.long if is_long[a] else rope.short
                runs.append((int(a), int(b), None if factors is None else self.input(factors, F32)))
            self.runs[rope] = runs
        return self.runs[rope]

    def mask(self, s: int, window: int | None):
        """Step s's attention mask [L, T]: 0 where a query may see a key, -inf elsewhere. None where
        nothing is hidden (one new token, no window)."""
        key = (s, window)
        if key not in self.masks:
            step = self.steps[s]
            end = step.pos + len(step.x)
            values = attention_mask(np.arange(step.pos, end)[:, None] - np.arange(end)[None, :], window)
            self.masks[key] = self.input(values.astype(np.float16), ggml.GGML_TYPE_F16) if np.isinf(values).any() else None
        return self.masks[key]

    def row_mask(self, span: int, pos: int, window: int | None) -> np.ndarray:
        """One query's mask over a span at `pos`: a slice of a row made once per span and window,
        so a decode step costs no mask arithmetic. Key k is visible where 0 <= pos - k < window."""
        ramp = self.ramps.get((span, window))
        if ramp is None:   # the slice for pos starts at span - 1 - pos, where the distance is pos
            ramp = self.ramps[span, window] = attention_mask(span - 1 - np.arange(2 * span - 1), window, np.float16)
        start = span - 1 - pos
        return ramp[None, start:start + span]

    def attend(self, q, k, v, i: int, s: int, window: int | None):
        """Step s's rows: write its keys and values into its cache, attend over positions [0, end)
        with ggml's fused attention (one node instead of a dozen: scores, mask, softmax, sum)."""
        c, ctx = self.config, self.ctx
        first, T = self.rows[s]
        pos, cache, width, cap = self.steps[s].pos, self.caches[s], self.engine.width, self.engine.capacity
        size = cache.k.itemsize
        end, D, row = pos + T, c.head_dim, width * size
        seen = []
        for new, cache_rows in ((k, cache.k[i]), (v, cache.v[i])):
            whole = self.external(NUMPY_TYPES[cache_rows.dtype], (width, cap), cache_rows.ctypes.data)
            write = ggml.ggml_cpy(ctx, ggml.ggml_view_2d(ctx, new, width, T, new.contents.nb[2], first * new.contents.nb[2]),
                                  ggml.ggml_view_2d(ctx, whole, width, T, row, pos * row))
            ggml.ggml_build_forward_expand(self.graph, write)
            seen.append(ggml.ggml_view_3d(ctx, whole, D, end, c.num_kv_heads, row, D * size, 0))   # [D, L, kvh]
        queries = ggml.ggml_permute(ctx, ggml.ggml_view_3d(ctx, q, D, c.num_heads, T, q.contents.nb[1],
                                                           q.contents.nb[2], first * q.contents.nb[2]), 0, 2, 1, 3)
        out = ggml.ggml_flash_attn_ext(ctx, queries, *seen, self.mask(s, window), c.attention_scale, 0.0, 0.0)
        return ggml.ggml_reshape_2d(ctx, out, D * c.num_heads, T)                                 # out: [D, heads, T]

    # ---- a decode graph's attention: a run of requests in neighbouring slots at once ----

    def attend_run(self, q, k, v, i: int, r: int, window: int | None):
        """Run r's rows, one a request: their new keys, and their values, written into their bank in
        one operation each; one fused attention for them all, each request's query against its own
        slot over its span (a batch of rows a slot apart), the positions not yet written masked."""
        c, ctx, cap, width = self.config, self.ctx, self.engine.capacity, self.engine.width
        first, n = self.neighbours[r]
        cache = self.caches[first]
        size = cache.k.itemsize
        D, row = c.head_dim, width * size
        seen = []
        for new, bank in ((k, cache.bank.k[i]), (v, cache.bank.v[i])):                       # [BANK, capacity, width]
            whole = self.external(NUMPY_TYPES[bank.dtype], (width, BANK * cap), bank.ctypes.data)
            rows = ggml.ggml_view_2d(ctx, new, width, n, new.contents.nb[2], first * new.contents.nb[2])
            written = ggml.ggml_set_rows(ctx, whole, rows, self.slot_rows_input(r))
            seen.append(ggml.ggml_view_4d(ctx, written, D, self.run_span(r), c.num_kv_heads, n, row, D * size, cap * row,
                                          cache.slot * cap * row))                             # [D, L, kvh, n]
        nb = q.contents.nb
        queries = ggml.ggml_view_4d(ctx, q, D, 1, c.num_heads, n, nb[1], nb[1], nb[2], first * nb[2])   # [D, 1, heads, n]
        out = ggml.ggml_flash_attn_ext(ctx, queries, *seen, self.run_mask(r, window), c.attention_scale, 0.0, 0.0)
        return ggml.ggml_reshape_2d(ctx, out, D * c.num_heads, n)                             # out: [D, heads, 1, n]

    def run_span(self, r: int) -> int:
        first, n = self.neighbours[r]
        return max(self.spans[first:first + n])

    def slot_rows_input(self, r: int):
        if r not in self.slot_rows:
            self.slot_rows[r] = self.input(self.slot_row_values(r), ggml.GGML_TYPE_I64)
        return self.slot_rows[r]

    def slot_row_values(self, r: int) -> np.ndarray:
        """Where run r's new keys (and values) go: each request's row of its position in its slot."""
        first, n = self.neighbours[r]
        places = zip(self.caches[first:first + n], self.steps[first:first + n])
        return np.array([cache.slot * self.engine.capacity + step.pos for cache, step in places], np.int64)

    def run_mask(self, r: int, window: int | None):
        if (r, window) not in self.run_masks:
            self.run_masks[r, window] = self.input(self.run_mask_values(r, window), ggml.GGML_TYPE_F16)
        return self.run_masks[r, window]

    def run_mask_values(self, r: int, window: int | None) -> np.ndarray:
        """[n, 1, 1, span]: each request's one-row mask over the run's span."""
        first, n = self.neighbours[r]
        span = self.run_span(r)
        return np.stack([self.row_mask(span, step.pos, window) for step in self.steps[first:first + n]])[:, None]


def neighbour_runs(caches: list[KVCache]) -> list[tuple[int, int]]:
    """(first, count) of each run of caches in neighbouring slots of one bank, in the order given."""
    runs: list[tuple[int, int]] = []
    for i, cache in enumerate(caches):
        before = caches[i - 1] if i else None
        if before is not None and cache.bank is before.bank and cache.slot == before.slot + 1:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


class Tensors(dict):
    """ggml tensors over the shard's arrays (memory maps, or small float32 arrays): name -> tensor.
    The matrices in `repacked` are copied instead into a buffer of one of ggml's extra types
    (`weight_buffer_type`), which lays out their blocks for its faster matrix kernels, as llama.cpp
    does: CPU_REPACK interleaves the blocks of 8 rows (4 on ARM), AMX packs them into its tiles.
    One for which ggml has no such layout on this CPU is copied as it is.

    The matrices in `padded` whose rows are whole blocks of 32 get zero rows after their own
    (`padded_rows`; `rows` keeps their own count): ggml's AMX kernels write a product in blocks of
    32 rows by 32 columns, and where a product's rows lie a multiple of 2 KiB apart, a block's rows
    fall in a few of the L1 cache's sets and evict each other. TinyLlama's widths (2,048, 2,560,
    5,632 and 11,264 numbers) all do: a prompt of 128 rows took each product 1.5 to 2.2 times as
    long as with 32 rows more."""

    def __init__(self, arrays: dict[str, np.ndarray], types: dict[str, int], repacked=(), buffer_type=None,
                 padded=()):
        super().__init__()
        repacked = [n for n in repacked if buffer_type]
        self.rows = {n: len(arrays[n]) for n in padded
                     if n in repacked and len(arrays[n]) % 32 == 0 and padded_rows(len(arrays[n])) != len(arrays[n])}
        params = ggml.ggml_init_params(mem_size=(len(arrays) + len(self.rows) + 1) * ggml.ggml_tensor_overhead(),
                                       mem_buffer=None, no_alloc=True)
        self.ctx, self.repack_ctx, self.buffer = ggml.ggml_init(params), None, None
        self.arrays = arrays   # the tensors point into these: they live as long as this
        for name, a in arrays.items():
            if name not in repacked:
                self[name] = self._new(self.ctx, name, a, types[name])
                self[name].contents.data = a.ctypes.data
        if repacked:
            self.repack_ctx = ggml.ggml_init(params)
            for name in repacked:
                self[name] = self._new(self.repack_ctx, name, arrays[name], types[name],
                                       padded_rows(self.rows[name]) if name in self.rows else None)
            self.buffer = ggml.ggml_backend_alloc_ctx_tensors_from_buft(self.repack_ctx, buffer_type)
            advise_huge_pages(ggml.ggml_backend_buffer_get_base(self.buffer), ggml.ggml_backend_buffer_get_size(self.buffer))
            # Largest first: while one is copied both it and its mapped pages are resident, so the
            # peak is what is copied so far plus twice the one at hand, here the whole plus the smallest.
            for name in sorted(repacked, key=lambda n: -arrays[n].nbytes):
                a, t = arrays[name], self[name]
                if name in self.rows:
                    self._set_padded(t, a, buffer_type)
                else:
                    self._set(t, a)
                release_array(a)

    @staticmethod
    def _set(t, a: np.ndarray) -> None:
        if t.contents.extra:   # ggml has an interleaved layout for this one
            ggml.ggml_backend_tensor_set(t, a.ctypes.data, 0, a.nbytes)
        else:
            ctypes.memmove(t.contents.data, a.ctypes.data, a.nbytes)

    def _set_padded(self, t, a: np.ndarray, buffer_type) -> None:
        """A padded matrix's own rows, laid out as its buffer lays them, then zeros. Both layouts keep
        whole groups of rows (16 for AMX's tiles, 8 or 4 for CPU_REPACK's) one after another, so the
        own rows laid out alone are the first part of the padded matrix: no padded copy is made (one
        of 12 MiB stayed in the allocator's heap after it was freed)."""
        own = ggml.ggml_view_2d(self.repack_ctx, t, t.contents.ne[0], len(a), t.contents.nb[1], 0)
        own.contents.extra = t.contents.extra   # the interleaved layout's, where there is one
        self._set(own, a)
        row_bytes = ggml.ggml_backend_buft_get_alloc_size(buffer_type, t) // t.contents.ne[1]   # as laid out
        ctypes.memset(t.contents.data + len(a) * row_bytes, 0, (t.contents.ne[1] - len(a)) * row_bytes)

    @staticmethod
    def _new(ctx, name: str, a: np.ndarray, kind: int, rows: int | None = None):
        cols = a.shape[-1] if kind in (F32, ggml.GGML_TYPE_F16) else \
            a.shape[-1] // ggml.ggml_type_size(kind) * ggml.ggml_blck_size(kind)
        shape = (cols, *a.shape[:-1][::-1])
        if rows:
            shape = (cols, rows)
        return ggml.ggml_new_tensor(ctx, kind, len(shape), dims(shape))

    def __del__(self):
        if self.buffer:
            ggml.ggml_backend_buffer_free(self.buffer)
        for ctx in (self.ctx, self.repack_ctx):
            if ctx:
                ggml.ggml_free(ctx)


def padded_rows(rows: int) -> int:
    """The rows, rounded up to whole blocks of 32, and one block more where that makes an even
    number: a product's rows then lie an odd number of 128-byte steps apart, and the 32 rows of a
    block (128 bytes each) fill the L1 cache's 64 sets once."""
    blocks = -(-rows // 32)
    return 32 * (blocks + 1 - blocks % 2)


def is_amx(buffer_type) -> bool:
    return bool(buffer_type) and ggml.ggml_backend_buft_name(buffer_type) == b"AMX"


def weight_buffer_type(backend, matrices):
    """The buffer type for the quantized matrices, as llama.cpp picks it: the first of the CPU
    backend's extra buffer types that takes them all. ggml lists them best first: AMX (Intel's
    tile kernels, 4th-generation Xeon and later) where this build has it, then CPU_REPACK. AMX
    takes a matrix in whole tiles of 32 rows, and only where its kernels run (`amx_runs`).
    None where this build has neither, or there is nothing to place."""
    if not matrices:
        return None
    whole_tiles = all(a.shape[0] % 32 == 0 for a in matrices)
    for buffer_type in extra_buffer_types(backend):
        name = ggml.ggml_backend_buft_name(buffer_type)
        if name == b"CPU_REPACK" or (name == b"AMX" and whole_tiles and amx_runs()):
            return buffer_type
    return None


def extra_buffer_types(backend) -> list:
    """The CPU backend's extra buffer types, in ggml's order of preference."""
    device = ggml.ggml_backend_get_device(backend)
    address = ggml.ggml_backend_reg_get_proc_address(ggml.ggml_backend_dev_backend_reg(device),
                                                     b"ggml_backend_dev_get_extra_bufts")
    if not address:
        return []
    extra = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(address)(device)
    found = []
    while extra and extra[len(found)]:
        found.append(extra[len(found)])
    return found


@functools.cache
def amx_runs() -> bool:
    """Whether this ggml build's AMX kernels run on this machine, tried once in a child process:
    Debian 12's gcc (12.2) drops the stores that give `ldtilecfg` its tile shapes, so a build by
    it dies of an illegal instruction at its first tile load (clang builds them right)."""
    try:
        child = subprocess.run([sys.executable, "-c", f"from {__name__} import amx_product; amx_product()"],
                               capture_output=True, timeout=120)
        code = child.returncode
    except subprocess.TimeoutExpired:
        code = "timed out"
    if code:
        log.info("ggml's AMX kernels do not run here (exit %s): using CPU_REPACK", code)
    return code == 0


def amx_product() -> None:
    """A product of 2 rows with a Q8_0 matrix held in ggml's AMX buffer: its tile kernels."""
    backend = ggml.ggml_backend_cpu_init()
    [amx] = [b for b in extra_buffer_types(backend) if ggml.ggml_backend_buft_name(b) == b"AMX"]
    ggml.ggml_backend_free(backend)
    matrix_product(quantize(np.ones((32, 32), np.float32), ggml.GGML_TYPE_Q8_0), ggml.GGML_TYPE_Q8_0,
                   np.ones((2, 32), np.float32), amx)


def matrix_product(blocks: np.ndarray, kind: int, x: np.ndarray, buffer_type=None) -> np.ndarray:
    """x (float32 [n, cols]) times the transpose of a matrix of ggml blocks of `kind`, the matrix
    held in a buffer of `buffer_type` (as it is where None): float32 [n, matrix rows]."""
    backend = ggml.ggml_backend_cpu_init()
    weights = Tensors({"w": blocks}, {"w": kind}, ["w"], buffer_type)   # as it is where None
    out_bytes = len(x) * len(blocks) * 4
    ctx = ggml.ggml_init(ggml.ggml_init_params(mem_size=4 * ggml.ggml_tensor_overhead() + ggml.ggml_graph_overhead()
                                               + x.nbytes + out_bytes + 1024, mem_buffer=None, no_alloc=False))
    try:
        rows = ggml.ggml_new_tensor_2d(ctx, F32, x.shape[1], len(x))
        ctypes.memmove(ggml.ggml_get_data(rows), np.ascontiguousarray(x, np.float32).ctypes.data, x.nbytes)
        product = ggml.ggml_mul_mat(ctx, weights["w"], rows)
        graph = ggml.ggml_new_graph(ctx)
        ggml.ggml_build_forward_expand(graph, product)
        if ggml.ggml_backend_graph_compute(backend, graph) != ggml.GGML_STATUS_SUCCESS:
            raise RuntimeError("ggml could not compute a matrix product")
        out = (ctypes.c_float * (len(x) * len(blocks))).from_address(ggml.ggml_get_data(product))
        return np.ctypeslib.as_array(out).reshape(len(x), len(blocks)).copy()
    finally:
        ggml.ggml_free(ctx)
        ggml.ggml_backend_free(backend)


def dims(shape) -> ctypes.Array:
    """A shape in ggml's order (fastest dim first) as ggml's int64[4]."""
    return (ctypes.c_int64 * 4)(*shape, *[1] * (4 - len(shape)))


# ---- weights: HF tensors -> ggml blocks, through the on-disk cache ------------------------------

def ggml_type(name: str, a: np.ndarray, quant: str) -> int:
    """The ggml type of a held array: float arrays by dtype, uint8 rows as the quant's blocks."""
    if a.dtype == np.uint8:
        return MATRIX_TYPES[quant]
    return NUMPY_TYPES[np.dtype(a.dtype)]


def shard_arrays(shard: Shard, config: ModelConfig, quant: str, cache_dir) -> tuple[dict[str, np.ndarray], Path]:
    """The shard's arrays, memory-mapped from the cache (converted on the first load)."""
    path = Path(cache_dir or DEFAULT_CACHE_DIR).expanduser() / cache_key(shard, f"ggml{FORMAT}-{quant}")
    if not (path / "index.json").exists():
        save_arrays(path, convert_weights(load_shard(shard.model_dir, config, shard.start, shard.end), quant))
    return load_arrays(path), path / "weights.bin"


# fused matrix -> its parts, whose rows it stacks: one product instead of three (two)
FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}
PART_OF = {part: fused for fused, parts in FUSED.items() for part in parts}


def convert_weights(tensors: dict[str, np.ndarray], quant: str):
    """Yield (name, array), one layer's matrices at a time: q/k/v and gate/up fused (weights and
    biases), matrices (the embedding too) as the quant's blocks, raw uint8 [rows, bytes per row],
    or F16 where the rows are no whole number of blocks; norms and biases float32."""
    for name, t in tensors.items():
        prefix, _, leaf = name.rpartition(".")      # "model.layers.3.self_attn.q_proj", "weight"
        layer, part = _layer_part(prefix)
        fused = PART_OF.get(part)
        if fused is None:
            yield name, convert(t, quant)
            release_array(t)   # written: its source pages need not stay resident
        elif part == FUSED[fused][0]:   # the fused matrix, when its first part comes by
            parts = [tensors[f"{layer}{other}.{leaf}"] for other in FUSED[fused]]
            yield f"{layer}{fused}.{leaf}", np.concatenate([convert(p, quant) for p in parts])
            for p in parts:
                release_array(p)


def _layer_part(prefix: str) -> tuple[str, str]:
    """"model.layers.3.self_attn.q_proj" -> ("model.layers.3.", "self_attn.q_proj")."""
    parts = prefix.split(".")
    if len(parts) < 4 or parts[:2] != ["model", "layers"]:
        return "", prefix
    return ".".join(parts[:3]) + ".", ".".join(parts[3:])


def convert(t: np.ndarray, quant: str) -> np.ndarray:
    kind = getattr(getattr(t, "qtype", None), "name", None)
    if (kind, quant) in GGUF_BLOCKS:
        return np.asarray(t).view(np.uint8)
    if np.ndim(t) != 2 or quant == "f32":
        return as_float32(t)
    if quant == "f16" or t.shape[1] % BLOCK:
        return as_float32(t).astype(np.float16)
    return quantize(as_float32(t), MATRIX_TYPES[quant])


def quantize(w: np.ndarray, kind: int) -> np.ndarray:
    """A float32 [rows, cols] matrix -> ggml's blocks of `kind`, with ggml's own quantizer."""
    rows, cols = w.shape
    w = np.ascontiguousarray(w, np.float32)
    out = np.empty((rows, ggml.ggml_row_size(kind, cols)), np.uint8)
    ggml.ggml_quantize_chunk(kind, w.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), out.ctypes.data, 0, rows, cols,
                             None)
    return out
