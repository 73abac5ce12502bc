"""onnxruntime engine: the default on CPUs. A shard becomes one ONNX graph (onnx_graph.py) with
weights quantized to 4 bits (MatMulNBits, block 32) or 8 bits (int8 per output channel, run by
MatMulInteger on activations quantized per row) or kept as float16/float32.

Weights. The graph holds no weight bytes. float32 shards hand the model's safetensors to the
session as OrtValues over a memory map. Quantized (q4, q8) and f16 shards are converted once and
cached under `cache_dir` (default ~/.cache/exo/onnx) in a directory keyed by a hash of the model's
config and weight files (name, size, mtime), the layer range and the quant. Beside the converted
weights the cache keeps the session onnxruntime optimized from them, with its prepacked weights
(the kernels' own layout) saved to a data file: a node maps that file, so its weights are
file-backed pages, not a heap copy made at every start. The first start converts in a child
process, so the node itself never holds the checkpoint, the converted and the packed weights at once.

KV cache. One float32 pool per shard: [layers, 2 (key, value), slots, kv_heads, capacity, Dp].
Each request owns a slot. A call runs a contiguous range of slots [lo, hi): for every layer the
pool's slice [lo:hi] is bound (IOBinding, by pointer) both as GroupQueryAttention's past_key and
as its present_key output. With past and present on the same buffer the kernel writes only the
new positions in place, so a step never copies a cache. Slots inside the range that are not in
this call ride along as dummy rows: they write a junk entry at their own next free position, which
their next real step overwrites. Its pages are made as they are written (lazy_zeros), so untouched
capacity costs no RAM.

Batching. Decode steps (one token) of different requests run as ONE session call over B rows;
each row has its own length (seqlens_k). Multi-token steps (prefill chunks) run one call each.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from appliance.engines.footprint import DEFAULT_QUANT, QUANTS
from appliance.engines.base import MAX_CONTEXT, Engine, Shard, Step, lazy_zeros
from appliance.engines.weight_cache import cache_key, load_arrays, paging_out, release_pages, row_reader, save_arrays
from appliance.models.config import ModelConfig
from appliance.models.weights import load_shard

DEFAULT_CACHE_DIR = Path("~/.cache/exo/onnx")
QUANTIZED_SHARDS = 0  # how many shards this process converted (tests check the cache is reused)


class OnnxEngine(Engine):
    name = "onnxruntime"

    def __init__(self, shard: Shard, config: ModelConfig | None = None, quant: str = DEFAULT_QUANT["onnxruntime"],
                 cache_dir: str | Path | None = None, max_seq: int = MAX_CONTEXT, slots: int = 8, threads: int = 0,
                 profile_prefix: str | None = None):
        import onnxruntime as ort

        super().__init__(shard, config, max_seq)
        if quant not in QUANTS:
            raise ValueError(f"quant must be one of {QUANTS}, not {quant!r}")
        c = self.config
        self.quant = quant
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        # Idle threads sleep instead of spinning: several stages may share one machine's cores
        # (local nodes), and spinning was slower even for a node alone (docs/performance.md).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if profile_prefix:   # onnxruntime's own per-operator trace (see engines/profile.py)
            options.enable_profiling, options.profile_file_prefix = True, profile_prefix
        checkpoint = float32_checkpoint(shard, c, quant)
        if checkpoint is not None:
            from appliance.engines.onnx_graph import build_graph, convert_weights   # onnx: only to build a graph
            self.weights = dict(convert_weights(checkpoint, quant, shard.is_first, shard.is_last))
            self.cache_path = None
            self.session = session_over(self.weights, build_graph(c, shard, shapes(self.weights), quant, self.capacity),
                                        options, quant)
            release_pages(self.weights.values())
        else:
            saved = saved_session(shard, quant, cache_dir, self.capacity)
            self.weights, self.cache_path = load_arrays(saved.parent), saved.parent / "weights.bin"
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL   # optimized when saved
            with paging_out(saved / "model.data"):
                self.session = ort.InferenceSession(str(saved / "model.onnx"), options, providers=["CPUExecutionProvider"])

        # A first stage looks up its tokens' embedding rows itself, from the file (FileRows): through
        # onnxruntime's map of it, each token made the pages around its row resident.
        self.embedding_rows = row_reader(self.weights["model.embed_tokens.weight"]) if shard.is_first else None
        self.layers = shard.end - shard.start
        self.head_dim = {i.name: i.shape for i in self.session.get_inputs()}["past_key_0"][-1]   # padded for GQA
        self.pool = self._new_pool(slots)
        self.slot: dict[str, int] = {}
        self.length: dict[str, int] = {}

    def requests(self) -> list[str]:
        return list(self.slot)

    def free(self, request_id: str) -> None:
        self.slot.pop(request_id, None)
        self.length.pop(request_id, None)

    def forward(self, steps: list[Step]) -> list[np.ndarray]:
        out: list[np.ndarray | None] = [None] * len(steps)
        decode = [i for i, s in enumerate(steps) if len(s.x) == 1]
        if len({steps[i].request_id for i in decode}) != len(decode):
            decode = []  # two steps of one request: run them in order, one by one
        for i, result in zip(decode, self._run([steps[i] for i in decode]) if decode else []):
            out[i] = result
        for i, step in enumerate(steps):
            if out[i] is None:
                out[i] = self._run([step])[0]
        return out

    # ---- one session call over a range of slots, every row with the same number of tokens ----

    def _run(self, steps: list[Step]) -> list[np.ndarray]:
        T = len(steps[0].x)
        for step in steps:
            if step.pos + T > self.capacity:
                raise ValueError(f"request {step.request_id}: position {step.pos + T} is past the KV capacity "
                                 f"{self.capacity} (max_seq)")
            self._assign_slot(step.request_id)
        if self.shard.is_first:
            steps = [Step(s.request_id, s.pos, self.embed(s.x)) for s in steps]
        slots = [self.slot[s.request_id] for s in steps]
        lo, hi = min(slots), max(slots) + 1
        x, seqlens = self._rows(dict(zip(slots, steps)), lo, hi, T)

        io = self.session.io_binding()
        io.bind_output("logits" if self.shard.is_last else "hidden_out")
        io.bind_cpu_input("hidden", x)
        io.bind_cpu_input("seqlens_k", seqlens)
        io.bind_cpu_input("total_sequence_length", np.array(seqlens.max() + 1, np.int32))
        if self.shard.is_last:
            io.bind_cpu_input("last_rows", np.arange(hi - lo, dtype=np.int64) * T + T - 1)
        for i in range(self.layers):
            for j, kind in enumerate(("key", "value")):
                view = self.pool[i, j, lo:hi]  # contiguous: slots are the outer axis of what follows
                for bind, name in ((io.bind_input, f"past_{kind}_{i}"), (io.bind_output, f"present_{kind}_{i}")):
                    bind(name, "cpu", 0, np.float32, list(view.shape), view.ctypes.data)
        self.session.run_with_iobinding(io)
        result = io.get_outputs()[0].numpy()

        for step in steps:
            self.length[step.request_id] = step.pos + T
        if self.shard.is_last:
            return [result[slot - lo] for slot in slots]
        return [result[(slot - lo) * T:(slot - lo + 1) * T] for slot in slots]

    def _rows(self, by_slot: dict[int, Step], lo: int, hi: int, T: int):
        """Inputs and seqlens_k (last position) of the rows for slots lo..hi-1, dummies included."""
        owner = {slot: rid for rid, slot in self.slot.items()}
        rows, last_positions = [], []
        for slot in range(lo, hi):
            step = by_slot.get(slot)
            if step is not None:
                rows.append(step.x)
                start = step.pos
            else:  # a dummy row: writes one junk entry where the slot's next real step will write
                rows.append(np.zeros((T, self.config.hidden_size), np.float32))
                start = min(self.length.get(owner.get(slot), 0), self.capacity - T)
            last_positions.append(start + T - 1)
        return np.concatenate(rows, dtype=np.float32), np.array(last_positions, np.int32)

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """The embedding's rows of these token ids, as float32 hidden states."""
        x = self.embedding_rows(ids).astype(np.float32)
        if self.config.embedding_scale != 1.0:
            x *= np.float32(self.config.embedding_scale)
        return x

    def _assign_slot(self, request_id: str) -> None:
        if request_id in self.slot:
            return
        used = set(self.slot.values())
        free = next(s for s in range(self.pool.shape[2] + 1) if s not in used)
        if free == self.pool.shape[2]:  # all taken: double the pool (a copy, but only on growth)
            bigger = self._new_pool(2 * self.pool.shape[2])
            bigger[:, :, :self.pool.shape[2]] = self.pool
            self.pool = bigger
        self.slot[request_id] = free

    def _new_pool(self, slots: int) -> np.ndarray:
        c = self.config
        return lazy_zeros((self.layers, 2, slots, c.num_kv_heads, self.capacity, self.head_dim))


# ---- weights and the on-disk cache -------------------------------------------------------------

def float32_checkpoint(shard: Shard, config: ModelConfig, quant: str) -> dict[str, np.ndarray] | None:
    """At f32 from a float32 checkpoint, the checkpoint's own memory maps, which the session reads
    as they are; else None (a mixture of experts too: its experts are stacked into new arrays)."""
    if quant != "f32" or config.num_experts:
        return None
    tensors = load_shard(shard.model_dir, config, shard.start, shard.end)
    return tensors if all(t.dtype == np.float32 for t in tensors.values()) else None


def shapes(weights: dict[str, np.ndarray]) -> dict:
    return {name: (t.shape, t.dtype) for name, t in weights.items()}


def session_over(weights: dict[str, np.ndarray], model, options, quant: str):
    """A session whose initializers are OrtValues over `weights` (no copy of their bytes)."""
    import onnxruntime as ort

    used = {name for node in model.graph.node for name in node.input}   # not a first stage's embedding
    names = [n for n in weights if n in used]
    options.add_external_initializers(names, [ort.OrtValue.ortvalue_from_numpy(weights[n]) for n in names])
    # f16 keeps its weights float16 in memory and widens them per step; folding the Cast would
    # store a float32 copy instead.
    disabled = ["ConstantFolding"] if quant == "f16" else None
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=disabled)


GRAPH_VERSION = 3   # a session saved from an older graph is made again


def session_name(capacity: int) -> str:
    """The saved session's folder: its graph's KV inputs are sized by the capacity, and its
    prepacked layout suits this CPU's instruction set (a card moved to another board re-saves)."""
    return f"session-{capacity}-{cpu_features()}-g{GRAPH_VERSION}"


def cpu_features() -> str:
    import platform

    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        flags = next((line for line in lines if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return hashlib.sha256(f"{platform.machine()} {flags}".encode()).hexdigest()[:8]


def saved_session(shard: Shard, quant: str, cache_dir, capacity: int) -> Path:
    """The folder of the shard's saved session, inside the shard's cache directory beside its
    converted weights; both made by a child process the first time."""
    path = Path(cache_dir or DEFAULT_CACHE_DIR).expanduser() / cache_key(shard, quant)
    saved = path / session_name(capacity)
    if not (saved / "model.onnx").exists():
        global QUANTIZED_SHARDS
        QUANTIZED_SHARDS += not (path / "index.json").exists()
        job = {"model_dir": str(shard.model_dir), "start": shard.start, "end": shard.end,
               "num_layers": shard.num_layers, "quant": quant, "path": str(path), "capacity": capacity}
        done = subprocess.run([sys.executable, "-m", "appliance.engines.onnx_engine", json.dumps(job)])
        if done.returncode:
            raise RuntimeError(f"converting layers {shard.start}-{shard.end} to {quant} failed "
                               f"(exit code {done.returncode}); see the log above")
    return saved


def prepare_shard(shard: Shard, quant: str, path: Path, capacity: int) -> None:
    """Convert the weights (once), then let onnxruntime optimize the graph over them and save it
    with its prepacked weights in a data file beside it."""
    import onnxruntime as ort

    from appliance.engines.onnx_graph import build_graph, convert_weights

    config = ModelConfig.load(shard.model_dir)
    if not (path / "index.json").exists():
        hf = load_shard(shard.model_dir, config, shard.start, shard.end)
        save_arrays(path, convert_weights(hf, quant, shard.is_first, shard.is_last))
    weights = load_arrays(path)
    tmp = path / f"{session_name(capacity)}.tmp{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    options = ort.SessionOptions()
    options.log_severity_level = 3   # not the warning that the saved graph suits this machine only: it is its cache
    options.optimized_model_filepath = str(tmp / "model.onnx")
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "model.data")
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    options.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
    session_over(weights, build_graph(config, shard, shapes(weights), quant, capacity), options, quant)
    try:
        tmp.rename(path / session_name(capacity))
    except OSError:   # another process on this machine saved the same session first
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":   # saved_session's child: python -m appliance.engines.onnx_engine JOB
    job = json.loads(sys.argv[1])
    prepare_shard(Shard(Path(job["model_dir"]), job["start"], job["end"], job["num_layers"]), job["quant"],
                  Path(job["path"]), job["capacity"])
