"""Every engine agrees with the numpy reference (issue 5, point 3), batches decode steps of several
requests into one call, and the onnxruntime engine caches its quantized shard on disk."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("DEV", "CPU")  # tinygrad: clang on the CPU unless a test run asks for a GPU

from appliance.engines import ENGINES, GPU_DEVICE_NODES, Shard, Step, load_engine, pick_default_engine  # noqa: E402
from appliance.models.config import ModelConfig  # noqa: E402
from appliance.models.synth import SHAPES  # noqa: E402
from appliance.models.tokenizer import Tokenizer  # noqa: E402
from tests.system import needs, needs_opencl  # noqa: E402
from tests.test_synth import synth_model  # noqa: E402

STORIES = Path(__file__).resolve().parents[1] / ".." / "shared" / "models" / "stories260K" / "hf"
needs_stories = pytest.mark.skipif(not (STORIES / "config.json").exists(), reason="shared/models/stories260K absent")
needs_clang = needs("clang")  # tinygrad's CPU backend compiles its kernels with clang
needs_ggml = needs("ggml")    # the ggml-python bindings, which build ggml on install
FAST = ["onnxruntime", pytest.param("ggml", marks=needs_ggml), pytest.param("tinygrad", marks=needs_clang)]
# tinygrad on OpenCL (pocl in CI): a GPU-style backend, whose buffers live apart from host memory
ON_A_DEVICE = FAST + [pytest.param("tinygrad-cl", marks=needs_opencl)]
needs_mount_namespace = pytest.mark.skipif(
    sys.platform != "linux" or os.geteuid() != 0 or not shutil.which("unshare"),
    reason="needs root on Linux for a private mount namespace")
TEXT = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
        "One day, she saw a big red ball under a tree. She wanted to play with it, so she asked her mom.")


def whole(model_dir) -> Shard:
    layers = ModelConfig.load(model_dir).num_layers
    return Shard(Path(model_dir), 0, layers, layers)


def engine(name: str, shard: Shard, tmp_path, **options):
    if name in ("onnxruntime", "ggml"):
        options = {"quant": "f32", "cache_dir": tmp_path, **options}
    if name == "tinygrad-cl":
        name, options = "tinygrad", {"device": "CL", **options}
    return load_engine(name, shard, **options)


def rss_file() -> int:
    """This process's resident pages of mapped files, in bytes."""
    return int(next(line for line in open("/proc/self/status") if line.startswith("RssFile")).split()[1]) << 10


def greedy(engine, prompt: list[int], new: int) -> list[int]:
    """Prefill in two chunks, then decode token by token."""
    half = len(prompt) // 2
    engine.forward([Step("g", 0, np.array(prompt[:half], np.int32))])
    logits = engine.forward([Step("g", half, np.array(prompt[half:], np.int32))])[0]
    tokens = [int(np.argmax(logits))]
    for i in range(new - 1):
        logits = engine.forward([Step("g", len(prompt) + i, np.array(tokens[-1:], np.int32))])[0]
        tokens.append(int(np.argmax(logits)))
    engine.free("g")
    return tokens


@needs_stories
@pytest.mark.parametrize("name", ON_A_DEVICE)
def test_greedy_tokens_match_numpy_on_stories260k(name, tmp_path):
    prompt = Tokenizer(STORIES).encode("Once upon a time, there was a")
    expected = greedy(load_engine("numpy", whole(STORIES)), prompt, 24)
    assert greedy(engine(name, whole(STORIES), tmp_path), prompt, 24) == expected


@needs_stories
@pytest.mark.parametrize("name", ON_A_DEVICE)
def test_a_pipeline_of_two_shards_matches_numpy(name, tmp_path):
    """Activations out of a first shard feed a last shard, as between two nodes."""
    ids = np.array(Tokenizer(STORIES).encode("The cat sat on the mat."), np.int32)
    expected = load_engine("numpy", whole(STORIES)).forward([Step("r", 0, ids)])[0]
    first = engine(name, Shard(STORIES, 0, 2, 5), tmp_path)
    last = engine(name, Shard(STORIES, 2, 5, 5), tmp_path)
    hidden = first.forward([Step("r", 0, ids)])[0]
    assert hidden.shape == (len(ids), 64)
    np.testing.assert_allclose(last.forward([Step("r", 0, hidden)])[0], expected, atol=1e-4)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", FAST)
def test_f32_logits_match_numpy_on_real_configs(name, shape, tmp_path):
    model_dir = synth_model(shape)
    if name in ("tinygrad", "ggml") and ModelConfig.load(model_dir).num_experts:
        with pytest.raises(ValueError, match="does not run mixtures of experts"):
            engine(name, whole(model_dir), tmp_path)
        return
    prompt = np.array(Tokenizer(model_dir).encode("Once upon a time, a node said"), np.int32)
    steps = [Step("r", 0, prompt), Step("r", len(prompt), prompt[-1:]), Step("r", len(prompt) + 1, prompt[:1])]
    reference = load_engine("numpy", whole(model_dir))
    under_test = engine(name, whole(model_dir), tmp_path)
    for step in steps:
        np.testing.assert_allclose(under_test.forward([step])[0], reference.forward([step])[0], atol=1e-3)


@needs_stories
@pytest.mark.parametrize("name,options", [pytest.param("onnxruntime", {}, id="onnxruntime"),
                                          pytest.param("tinygrad", {}, id="tinygrad", marks=needs_clang),
                                          pytest.param("tinygrad-cl", {}, id="tinygrad-cl", marks=needs_opencl)] +
                         [pytest.param("onnxruntime", {"quant": q}, id=f"onnxruntime-{q}") for q in ("q8", "q4")] +
                         [pytest.param("ggml", {"quant": q}, id=f"ggml-{q}", marks=needs_ggml)
                          for q in ("f32", "q8", "q4")])
def test_batched_decode_gives_each_request_its_own_logits(name, options, tmp_path):
    """Three requests at different lengths decode in one call, and get what each gets alone.
    Quantized: each row's activations are quantized with a scale of their own, never the batch's."""
    prompts = [np.array(p, np.int32) for p in ([1, 400, 34], [1, 20, 21, 22, 23, 24, 25], [1, 7])]
    alone = engine(name, whole(STORIES), tmp_path, **options)
    batched = engine(name, whole(STORIES), tmp_path, **options)
    for e in (alone, batched):
        for i, p in enumerate(prompts):
            e.forward([Step(f"r{i}", 0, p)])
    for n in range(3):  # several rounds: the second one replays tinygrad's JIT
        steps = [Step(f"r{i}", len(p) + n, np.array([5 + n + i], np.int32)) for i, p in enumerate(prompts)]
        together = batched.forward(steps)
        for step, got in zip(steps, together):
            np.testing.assert_allclose(got, alone.forward([step])[0], atol=1e-5)
    assert sorted(batched.requests()) == ["r0", "r1", "r2"]
    batched.free("r1")
    assert sorted(batched.requests()) == ["r0", "r2"]


@needs_stories
@pytest.mark.parametrize("name", FAST)
def test_prompts_prefilled_in_one_call_each_get_their_last_rows_logits(name, tmp_path):
    """Three prompts of different lengths in one call: each gets what numpy gives it alone, the
    logits of its own last row (the last stage of ggml and onnxruntime carries only those rows
    past the model's last attention)."""
    prompts = [np.array(p, np.int32) for p in ([1, 400, 34], [1, 20, 21, 22, 23, 24, 25], [1, 7])]
    reference = load_engine("numpy", whole(STORIES))
    together = engine(name, whole(STORIES), tmp_path).forward([Step(f"r{i}", 0, p) for i, p in enumerate(prompts)])
    assert len(together) == len(prompts)
    for i, (p, got) in enumerate(zip(prompts, together)):
        np.testing.assert_allclose(got, reference.forward([Step(f"r{i}", 0, p)])[0], atol=1e-4)


@needs_stories
@needs_ggml
def test_a_ggml_decode_graphs_mask_is_the_one_its_position_needs(tmp_path):
    """A span graph's one-row masks are slices of a row made once per window: key k is visible
    where 0 <= pos - k < window."""
    from appliance.engines import ggml_engine

    g = ggml_engine.Graph(engine("ggml", whole(STORIES), tmp_path, max_seq=64), [Step("r", 0, np.array([1], np.int32))],
                          spans=(16,))
    try:
        keys = np.arange(16)
        for window in (None, 1, 4):
            for pos in range(16):
                seen = (pos - keys >= 0) & (pos - keys < (window or 17))
                np.testing.assert_array_equal(g.row_mask(16, pos, window), np.where(seen, 0, -np.inf)[None].astype(np.float16))
    finally:
        g.free()


@needs_ggml
@pytest.mark.parametrize("quant", ["q4", "q8"])
@pytest.mark.parametrize("rows", [1, 3])
def test_ggml_holds_quantized_matrices_where_its_kernels_run_and_agree(quant, rows):
    """The quantized matrices go into the first of ggml's extra buffers that takes them all, as
    llama.cpp picks: AMX where the CPU has it, the build's tile kernels run (a build by gcc 12 dies
    at its first tile load) and every matrix fills whole tiles of 32 rows; else CPU_REPACK. A
    product, of one row (a decode step) or more (a prompt), is the one of the plain blocks."""
    import ggml

    from appliance.engines import ggml_engine

    kind, rng = ggml_engine.MATRIX_TYPES[quant], np.random.default_rng(0)
    blocks, ragged = (ggml_engine.quantize(rng.standard_normal((n, 96)).astype(np.float32), kind) for n in (64, 48))
    backend = ggml.ggml_backend_cpu_init()
    offered = [ggml.ggml_backend_buft_name(b) for b in ggml_engine.extra_buffer_types(backend)]
    held = ggml_engine.weight_buffer_type(backend, [blocks])
    amx = b"AMX" in offered and ggml_engine.amx_runs()
    assert ggml.ggml_backend_buft_name(held) == (b"AMX" if amx else b"CPU_REPACK")
    assert ggml.ggml_backend_buft_name(ggml_engine.weight_buffer_type(backend, [blocks, ragged])) == b"CPU_REPACK"
    assert ggml_engine.weight_buffer_type(backend, []) is None
    x = rng.standard_normal((rows, 96)).astype(np.float32)
    np.testing.assert_allclose(ggml_engine.matrix_product(blocks, kind, x, held),
                               ggml_engine.matrix_product(blocks, kind, x), atol=1e-4)


@needs_ggml
def test_a_ggml_graphs_products_start_on_cache_lines(tmp_path):
    """ggml's allocator lays a graph's tensors end to end after its inputs: each input is padded to
    whole cache lines, so that no product's output starts mid-line (ggml's AMX kernels store 64
    bytes at a time, and a split store made a prefill take 1.7× as long). A prompt's last stage
    takes the index of its last row, an input of 4 bytes."""
    import ggml

    from appliance.engines import ggml_engine

    e = engine("ggml", whole(synth_model("smollm2-135m")), tmp_path, quant="q8")
    for prompts in ([128], [37, 4], [1, 2, 3]):
        steps = [Step(f"r{i}", 0, np.arange(3, 3 + n, dtype=np.int32)) for i, n in enumerate(prompts)]
        graph = ggml_engine.Graph(e, steps)
        try:
            graph.compute()
            nodes = [ggml.ggml_graph_node(graph.graph, i) for i in range(ggml.ggml_graph_n_nodes(graph.graph))]
            products = [t for t in nodes if t.contents.op == ggml.GGML_OP_MUL_MAT]
            assert products and all(t.contents.data % 64 == 0 for t in products), prompts
        finally:
            graph.free()


@needs_ggml
def test_ggml_pads_the_layers_matrices_for_amx_and_computes_the_same(tmp_path, monkeypatch):
    """Where ggml's AMX kernels hold the matrices, a layer's matrix gets zero rows after its own,
    so that its product's rows do not lie a multiple of 2 KiB apart (each of those products took
    1.5 to 2.2 times as long on a prompt). A prompt then takes the whole padded product, viewed
    back to the matrix's width; a few rows take the matrix's own rows. The logits are those of the
    matrices as they are. Padding is forced here where AMX does not run, to check the views all
    the same."""
    import ggml

    from appliance.engines import ggml_engine

    shard = whole(synth_model("smollm2-135m"))   # widths 960, 576, 3,072: even numbers of blocks
    backend = ggml.ggml_backend_cpu_init()
    amx = ggml_engine.is_amx(ggml_engine.weight_buffer_type(backend, [np.zeros((32, 18), np.uint8)]))
    ggml.ggml_backend_free(backend)
    assert bool(engine("ggml", shard, tmp_path, quant="q8").tensors.rows) == amx

    def run(pad: bool) -> list[np.ndarray]:
        monkeypatch.setattr(ggml_engine, "is_amx", lambda buffer_type: pad and buffer_type is not None)
        e = engine("ggml", shard, tmp_path, quant="q8")
        assert bool(e.tensors.rows) == pad
        for name, rows in e.tensors.rows.items():
            assert e.tensors[name].contents.ne[1] == ggml_engine.padded_rows(rows) > rows, name
        prompts = [e.forward([Step(f"r{n}", 0, np.arange(3, 3 + n, dtype=np.int32))])[0] for n in (37, 3)]
        steps = e.forward([Step(f"r{n}", n, np.array([5], np.int32)) for n in (37, 3)])
        mixed = e.forward([Step("r37", 38, np.array([6], np.int32)), Step("r3", 4, np.arange(9, 21, dtype=np.int32))])
        return [*prompts, *steps, *mixed]

    for padded, plain in zip(run(True), run(False)):
        np.testing.assert_allclose(padded, plain, rtol=0, atol=1e-5)


def test_padded_rows_are_whole_blocks_of_32_an_odd_number_of_them():
    from appliance.engines.ggml_engine import padded_rows

    assert [padded_rows(n) for n in (2048, 2560, 5632, 11264, 96, 100, 32)] == [2080, 2592, 5664, 11296, 96, 160, 32]


def vm_flags(address: int) -> list[str]:
    """The flags of this process's mapping that holds `address` (/proc/self/smaps' VmFlags)."""
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(a, 16) for a in head.split("-"))
            inside = start <= address < end
        elif inside and head == "VmFlags:":
            return line.split()[1:]
    raise LookupError(f"no mapping holds {address:#x}")


def huge_page_advice_shows() -> bool:
    """Whether advice for huge pages shows in this process's VmFlags: not without the kernel's
    transparent huge pages, nor under qemu-user (tests/arm64_engines.py), which swallows it."""
    import ctypes
    import mmap

    from appliance.engines.base import whole_pages
    from appliance.engines.weight_cache import HUGE_PAGE, advise_huge_pages

    probe = mmap.mmap(-1, 2 * HUGE_PAGE)   # holds a whole huge page, wherever it starts
    address = ctypes.addressof(ctypes.c_char.from_buffer(probe))
    try:
        advise_huge_pages(address, 2 * HUGE_PAGE)
        return "hg" in vm_flags(whole_pages(address, 2 * HUGE_PAGE, HUGE_PAGE)[0])
    finally:
        probe.close()


@needs_ggml
def test_a_ggml_compute_buffer_asks_for_huge_pages(tmp_path):
    """Each new compute buffer is advised as the weights' buffer is (a q4 prefill 2.5 % faster):
    the mapping over its whole 2 MiB pages carries the kernel's `hg` flag (MADV_HUGEPAGE)."""
    import ggml

    from appliance.engines import ggml_engine
    from appliance.engines.base import whole_pages
    from appliance.engines.weight_cache import HUGE_PAGE

    if not huge_page_advice_shows():
        pytest.skip("advice for huge pages does not show here (no THP, or qemu-user)")

    e = engine("ggml", whole(synth_model("smollm2-135m", layers=2)), tmp_path, quant="q8")
    for request, length in (("short", 8), ("long", 512)):   # the second outgrows the first's buffer
        graph = ggml_engine.Graph(e, [Step(request, 0, np.arange(3, 3 + length, dtype=np.int32))])
        try:
            graph.compute()
            buffer = graph.out.contents.buffer
            base, size = ggml.ggml_backend_buffer_get_base(buffer), ggml.ggml_backend_buffer_get_size(buffer)
            first, end = whole_pages(base, size, HUGE_PAGE)
            if end > first:
                assert "hg" in vm_flags(first), (request, size)
        finally:
            graph.free()
    assert size >= 4 * HUGE_PAGE   # the long prompt's buffer holds whole huge pages: the check ran


@needs_ggml
def test_the_cpu_does_float16_arithmetic_where_ggml_runs_float16_natively():
    """The engine keeps float16 keys and values where the CPU adds float16 itself (the kernel's
    hardware capabilities), which is where ggml's float16 vector arithmetic runs: x86 has neither,
    the Pi 5's Cortex-A76 both (under qemu too, which sets the emulated core's capabilities)."""
    import ggml

    from appliance.engines.footprint import cpu_has_float16_arithmetic

    assert cpu_has_float16_arithmetic() == bool(ggml.ggml_cpu_has_fp16_va())


@needs_ggml
@pytest.mark.parametrize("float16_arithmetic", [True, False])
@pytest.mark.parametrize("quant", ["f32", "f16", "q8", "q4"])
def test_ggml_keeps_keys_and_values_in_float16_where_the_cpu_does_float16_arithmetic(quant, float16_arithmetic,
                                                                                    tmp_path, monkeypatch):
    """llama.cpp's default beside quantized or float16 weights, where the CPU adds float16 itself
    (the Pi 5): half a long context's memory. Elsewhere (x86) float32, which attention reads without
    converting. The planner counts the cache as the engine holds it."""
    from appliance.engines import ggml_engine
    from appliance.engines.footprint import footprint

    monkeypatch.setattr(ggml_engine, "cpu_has_float16_arithmetic", lambda: float16_arithmetic)
    model_dir = synth_model("smollm2-135m", layers=4)
    under_test = load_engine("ggml", Shard(Path(model_dir), 0, 2, 4), quant=quant, cache_dir=tmp_path, max_seq=256)
    under_test.forward([Step("r", 0, np.array([1, 2, 3], np.int32))])
    cache = under_test.caches["r"]
    assert cache.k.itemsize == cache.v.itemsize == (2 if float16_arithmetic and quant != "f32" else 4)
    counted = footprint(ModelConfig.load(model_dir), "ggml", quant, under_test.capacity, float16_arithmetic).kv_layer
    assert under_test.kv_bytes() == 2 * counted == cache.k.nbytes + cache.v.nbytes


@needs_stories
@needs_ggml
def test_ggml_decode_graphs_follow_their_request_across_spans_and_evictions(tmp_path):
    """ggml keeps a decode graph per request and span and points it at each next position: one
    token a step from 0 to the capacity (past a span, into a clamped last one), two requests taking
    turns with more requests than graphs kept, each gets what numpy gets."""
    from appliance.engines import ggml_engine

    under_test = engine("ggml", whole(STORIES), tmp_path, max_seq=ggml_engine.SPAN + 40)
    reference = load_engine("numpy", whole(STORIES))
    rng = np.random.default_rng(3)
    tokens = rng.integers(3, 500, under_test.capacity).astype(np.int32)
    for pos, token in enumerate(tokens):
        for rid in ("a", "b") if pos < 12 else ("a",):
            step = Step(rid, pos, np.array([token], np.int32))
            if pos in (0, 1, 11, ggml_engine.SPAN - 1, ggml_engine.SPAN, len(tokens) - 1):
                np.testing.assert_allclose(under_test.forward([step])[0], reference.forward([step])[0], atol=1e-4)
            else:
                under_test.forward([step]), reference.forward([step])
        if pos == 5:   # more requests than graphs kept: "a" and "b" lose theirs, then rebuild them
            for n in range(ggml_engine.KEPT_DECODERS):
                under_test.forward([Step(f"other{n}", 0, np.array([7], np.int32))])
    assert len(under_test.decoders) <= ggml_engine.KEPT_DECODERS
    under_test.free("a")
    assert not [k for k in under_test.decoders if "a" in k[0]]


class BesideNumpy:
    """An engine under test and the numpy reference given the same stories260K prompts and decode
    steps (a random token each): each step's logits checked against numpy's."""

    def __init__(self, under_test, seed: int):
        self.under_test, self.reference = under_test, load_engine("numpy", whole(STORIES))
        self.rng, self.pos = np.random.default_rng(seed), {}

    def prefill(self, rid: str, n: int) -> None:
        prompt = self.rng.integers(3, 500, n).astype(np.int32)
        for e in (self.under_test, self.reference):
            e.forward([Step(rid, 0, prompt)])
        self.pos[rid] = n

    def decode(self, rids) -> None:
        """One step of each request, all in one call to the engine under test."""
        batch = [Step(rid, self.pos[rid], self.rng.integers(3, 500, 1).astype(np.int32)) for rid in rids]
        for got, step in zip(self.under_test.forward(batch), batch):
            np.testing.assert_allclose(got, self.reference.forward([step])[0], atol=1e-4)
            self.pos[step.request_id] += 1

    def free(self, rid: str) -> None:
        for e in (self.under_test, self.reference):
            e.free(rid)


@needs_stories
@needs_ggml
def test_ggml_attends_once_for_requests_in_neighbouring_slots(tmp_path):
    """Requests' KV caches sit side by side in banks of ggml_engine.BANK slots, and a decode graph
    attends once a layer for each run of neighbouring slots. More requests than a bank holds, one
    freed in the middle (its rows zeros again) and its slot taken by a newcomer, all decoding
    together in an order that is not their slots': each gets what numpy gets, every step."""
    import ggml

    from appliance.engines import ggml_engine

    under_test = engine("ggml", whole(STORIES), tmp_path, max_seq=64)
    both = BesideNumpy(under_test, seed=7)
    names = [f"r{i}" for i in range(ggml_engine.BANK + 2)]
    for i, rid in enumerate(names):
        both.prefill(rid, 3 + i)
    bank = under_test.caches["r3"].bank
    both.free("r3")
    assert not bank.k[:, 3].any() and not bank.v[:, 3].any() and bank.k[:, 4].any()
    both.prefill("new", 5)
    assert under_test.caches["new"].place == (0, 3)
    for _ in range(3):
        both.decode([rid for rid in reversed(names) if rid != "r3"] + ["new"])
    [graph] = under_test.decoders.values()
    nodes = [ggml.ggml_graph_node(graph.graph, i) for i in range(ggml.ggml_graph_n_nodes(graph.graph))]
    attentions = sum(t.contents.op == ggml.GGML_OP_FLASH_ATTN_EXT for t in nodes)
    assert attentions == 2 * ModelConfig.load(STORIES).num_layers   # a run in each bank


@needs_stories
@needs_ggml
def test_ggml_decodes_on_after_a_longer_prompt_moves_its_compute_buffer(tmp_path):
    """A prompt longer than any before makes ggml's allocator free its compute buffer for a bigger
    one, while the decode graph of the requests already going is kept for their next step. That
    step must not run in the freed buffer: there it corrupted the heap and the node died. Run in a
    child whose allocations of 4 KiB and more are each a mapping of their own, so that a freed
    buffer is unmapped and touching it faults at once, and checked against numpy step by step."""
    steps = f"""
from pathlib import Path
from tests.test_engines import STORIES, BesideNumpy, engine, whole
both = BesideNumpy(engine("ggml", whole(STORIES), Path({str(tmp_path)!r})), seed=3)
for rid in ("a", "b"):
    both.prefill(rid, 3)
both.decode(["a", "b"])
both.prefill("long", 300)
both.decode(["a", "b"])
both.decode(["a", "b", "long"])
"""
    child = subprocess.run([sys.executable, "-c", steps], cwd=Path(__file__).resolve().parents[1],
                           env=dict(os.environ, MALLOC_MMAP_THRESHOLD_="4096"), capture_output=True, text=True,
                           timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]


def test_a_freed_part_of_a_kv_cache_is_zeros_again_and_its_pages_given_back():
    """zero_again on one slot of a lazily made cache: its whole pages go back to the system, the
    edges of pages it shares with its neighbours are zeroed, and the neighbours keep their rows."""
    import psutil

    from appliance.engines.base import lazy_zeros, zero_again

    process = psutil.Process()
    cache = lazy_zeros((22, 3, 512, 256))   # 11.5 MB a slot
    cache[:, 1], cache[:, 2] = 1.0, 2.0
    before = process.memory_info().rss
    for layer in cache[:, 1]:
        zero_again(layer)
    given_back = before - process.memory_info().rss
    assert not cache[:, 1].any() and (cache[:, 2] == 2).all()
    assert given_back > 10 << 20, f"{given_back / 2**20:.1f} MB given back"
    ragged = lazy_zeros((3, 3, 10, 100))    # 4,000 bytes a slot's layer: rows across page edges
    ragged[:] = 5.0
    for layer in ragged[:, 1]:
        zero_again(layer)
    assert not ragged[:, 1].any() and (ragged[:, 0] == 5).all() and (ragged[:, 2] == 5).all()

@needs_stories
@needs_ggml
def test_ggml_decodes_requests_together_in_one_graph_pointed_at_their_next_steps(tmp_path):
    """Decode steps of several requests share one graph, built once and pointed at each next step
    while the same requests decode together: requests at different positions, one crossing into
    its next span while the others stay in theirs, then one leaving and another joining. Each
    request gets what numpy gets, every step."""
    from appliance.engines import ggml_engine

    under_test = engine("ggml", whole(STORIES), tmp_path, max_seq=ggml_engine.SPAN + 40)
    both = BesideNumpy(under_test, seed=5)
    for rid, n in (("a", ggml_engine.SPAN - 5), ("b", 3), ("c", 40)):   # "a" crosses a span on its 6th step
        both.prefill(rid, n)
    graphs = []
    for t in range(12):
        if t == 8:
            both.prefill("d", 7)
        both.decode(("a", "b", "c") if t < 8 else ("c", "a", "d"))
        graphs.append(next(iter(under_test.decoders.values())) if len(under_test.decoders) == 1 else None)
    assert graphs[1] is graphs[0] is not None          # the same requests in the same spans: one graph, pointed on
    assert graphs[5] is not graphs[4] is graphs[1]     # "a" in its next span: built again
    assert graphs[9] is not graphs[7]                  # another set of requests


@pytest.mark.parametrize("quant", ["f32", "f16", "q8", "q4"])
def test_batched_decode_through_experts_gives_each_request_its_own_logits(quant, tmp_path):
    """Rows of a batch choose different experts (128, 8 a token): each still gets what it gets alone."""
    model_dir = synth_model("qwen3-30b-a3b")
    prompts = [np.array(p, np.int32) for p in ([1, 400, 34], [1, 20, 21, 22, 23, 24, 25], [1, 7])]
    alone, batched = (engine("onnxruntime", whole(model_dir), tmp_path, quant=quant) for _ in range(2))
    for e in (alone, batched):
        for i, p in enumerate(prompts):
            e.forward([Step(f"r{i}", 0, p)])
    for n in range(2):
        steps = [Step(f"r{i}", len(p) + n, np.array([5 + n + i], np.int32)) for i, p in enumerate(prompts)]
        for step, got in zip(steps, batched.forward(steps)):
            np.testing.assert_allclose(got, alone.forward([step])[0], atol=1e-5)


@needs_stories
@pytest.mark.parametrize("name", ON_A_DEVICE)
def test_prefill_chunks_of_any_length_at_any_position_match_numpy(name, tmp_path):
    """Chunks of 3 to 8 tokens at moving positions: tinygrad pads each to 4 or 8 and replays its
    compiled graphs, whose padded rows must change nothing."""
    rng = np.random.default_rng(1)
    under_test, reference = engine(name, whole(STORIES), tmp_path), load_engine("numpy", whole(STORIES))
    for request in range(2):
        pos = 0
        for length in (3, 5, 4, 7, 8, 6):
            step = Step(f"r{request}", pos, rng.integers(3, 500, length).astype(np.int32))
            np.testing.assert_allclose(under_test.forward([step])[0], reference.forward([step])[0], atol=1e-4)
            pos += length


def perplexity(engine, ids: list[int]) -> float:
    """Teacher-forced, one token a step: the engine returns only the last position's logits."""
    nll = []
    for i in range(len(ids) - 1):
        logits = engine.forward([Step("ppl", i, np.array([ids[i]], np.int32))])[0].astype(np.float64)
        logits -= logits.max()
        nll.append(np.log(np.exp(logits).sum()) - logits[ids[i + 1]])
    engine.free("ppl")
    return float(np.exp(np.mean(nll)))


def quantized_perplexity_deltas(name: str, label: str, model_dir, ids: list[int], tmp_path) -> dict[str, float]:
    """Each quant's perplexity relative to f32 on one engine (printed: the figures in docs/performance.md)."""
    f32 = perplexity(engine(name, whole(model_dir), tmp_path), ids)
    delta = {}
    for quant in ("f16", "q8", "q4"):
        ppl = perplexity(engine(name, whole(model_dir), tmp_path, quant=quant), ids)
        delta[quant] = ppl / f32 - 1
        print(f"{name} {label} perplexity f32 {f32:.4f}  {quant} {ppl:.4f}  ({100 * delta[quant]:+.3f} %)")
    return delta


QUANTIZING = ["onnxruntime", pytest.param("ggml", marks=needs_ggml)]


@needs_stories
@pytest.mark.parametrize("name", QUANTIZING)
def test_quantized_perplexity_stays_close_to_f32(name, tmp_path):
    delta = quantized_perplexity_deltas(name, "stories260K", STORIES, Tokenizer(STORIES).encode(TEXT), tmp_path)
    assert abs(delta["f16"]) < 0.001
    assert abs(delta["q8"]) < 0.01
    assert abs(delta["q4"]) < 0.15  # measured +7.6 %: a 260K-parameter model is fragile


DENSE_FAMILIES = ["qwen3-0.6b", "gemma3-1b", "smollm3-3b", "phi4-mini"]
FAMILIES = DENSE_FAMILIES + ["qwen3-30b-a3b", "mixtral-8x7b"]


# ggml runs no mixtures of experts (test_f32_logits_match_numpy_on_real_configs checks it says so)
@pytest.mark.parametrize("name,shape", [("onnxruntime", shape) for shape in FAMILIES] +
                         [pytest.param("ggml", shape, marks=needs_ggml) for shape in DENSE_FAMILIES])
def test_quantized_perplexity_of_each_family(name, shape, tmp_path):
    """The 2025 families (random weights at test size, a 4-position sliding window, longrope past
    its original context): f16 and q8 stay close to f32, q4 within its error; the figures go to
    docs/performance.md."""
    model_dir = synth_model(shape)
    delta = quantized_perplexity_deltas(name, shape, model_dir, Tokenizer(model_dir).encode(TEXT)[:24], tmp_path)
    assert abs(delta["f16"]) < 0.001
    assert abs(delta["q8"]) < 0.01
    assert abs(delta["q4"]) < 0.05


def test_a_second_construction_reuses_the_quantized_shard(tmp_path):
    from appliance.engines import onnx_engine

    model_dir = synth_model("smollm2-135m")
    before = onnx_engine.QUANTIZED_SHARDS
    first = load_engine("onnxruntime", whole(model_dir), quant="q4", cache_dir=tmp_path)
    stamp = first.cache_path.stat().st_mtime_ns
    second = load_engine("onnxruntime", whole(model_dir), quant="q4", cache_dir=tmp_path)
    assert onnx_engine.QUANTIZED_SHARDS == before + 1
    assert second.cache_path == first.cache_path and second.cache_path.stat().st_mtime_ns == stamp
    other = load_engine("onnxruntime", Shard(model_dir, 0, 1, 2), quant="q4", cache_dir=tmp_path)
    assert other.cache_path != first.cache_path  # keyed by layer range
    step = Step("r", 0, np.array([1, 2, 3], np.int32))
    np.testing.assert_array_equal(first.forward([step])[0], second.forward([step])[0])


def test_engine_registry_and_default():
    assert {"numpy", "onnxruntime", "tinygrad"} <= set(ENGINES)
    gpu = sys.platform == "darwin" or any(os.path.exists(d) for d in GPU_DEVICE_NODES)
    if not gpu:
        assert pick_default_engine() == "onnxruntime"
    with pytest.raises(ValueError, match="quant"):
        load_engine("onnxruntime", whole(synth_model("smollm2-135m")), quant="q3")


def in_mount_namespace(script: str, *args: str, **options) -> subprocess.CompletedProcess:
    """Run a shell script in a private mount namespace; $0 is this Python, $1... are `args`."""
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, sys.executable, *args],
                          capture_output=True, text=True, **options)


@needs_mount_namespace
@pytest.mark.parametrize("device,library", [("nvidiactl", "cuda"), ("kfd", "amdhip64")])
def test_the_default_engine_is_tinygrad_where_a_gpu_driver_is_present(device, library, tmp_path):
    """In a private mount namespace that has the driver's device node (on a tmpfs over /dev) and
    its library (a stub built here), the real probe finds a GPU and picks tinygrad."""
    subprocess.run(["cc", "-shared", "-fPIC", f"-Wl,-soname,lib{library}.so.1", "-o", tmp_path / f"lib{library}.so",
                    "-x", "c", "-"], input=b"void stub(void) {}\n", check=True)
    (tmp_path / "dev").mkdir()
    inside = f"""set -e
        mount --bind /dev {tmp_path}/dev
        mount -t tmpfs tmpfs /dev
        for node in null zero random urandom; do touch /dev/$node; mount --bind {tmp_path}/dev/$node /dev/$node; done
        touch /dev/{device}
        exec "$0" -c 'from appliance.engines import pick_default_engine; print(pick_default_engine())'"""
    env = {**os.environ, "LD_LIBRARY_PATH": str(tmp_path), "LIBRARY_PATH": str(tmp_path)}
    picked = in_mount_namespace(inside, env=env, check=True).stdout.strip()
    assert picked == "tinygrad"


def test_embedding_rows_read_from_the_file_are_never_mapped_in(tmp_path):
    """A first stage reads a token's embedding row with pread (weight_cache.FileRows): the row's
    bytes, and none of the map. Reading the same rows through the map makes pages resident around
    each (16 pages at least, a whole large folio where the page cache has them)."""
    from appliance.engines.weight_cache import FileRows, load_arrays, save_arrays

    rng = np.random.default_rng(0)
    save_arrays(tmp_path / "shard", [("embedding", rng.integers(0, 255, (32000, 1088), dtype=np.uint8)),
                                     ("norm", np.ones(64, np.float32))])
    embedding = load_arrays(tmp_path / "shard")["embedding"]
    tokens = rng.choice(len(embedding), 64, replace=False)
    rows = FileRows(embedding)

    before = rss_file()
    read = rows.read(tokens)
    assert rss_file() - before < 1 << 20
    mapped = embedding[tokens].copy()   # the same rows through the map
    assert rss_file() - before > 2 << 20
    assert np.array_equal(read, mapped)
    with pytest.raises(ValueError, match="not one of the 32000 rows"):
        rows.read([32000])


@needs_stories
@needs_mount_namespace
@pytest.mark.parametrize("name", ["numpy", *ON_A_DEVICE])
def test_an_engine_loads_a_model_from_a_read_only_folder(name, tmp_path):
    """A node may only read its model store (an image's read-only filesystem, another user's
    files): in a private mount namespace the model folder is a read-only bind mount."""
    ro = tmp_path / "ro"
    ro.mkdir()
    prompt = [1, 400, 34]
    code = (f"import numpy as np; from pathlib import Path; from appliance.engines import Step; "
            f"from tests.test_engines import engine, whole; "
            f"e = engine({name!r}, whole(Path({str(ro)!r})), Path({str(tmp_path / 'cache')!r})); "
            f"print(int(np.argmax(e.forward([Step('r', 0, np.array({prompt}, np.int32))])[0])))")
    inside = f"""set -e
        mount --bind {STORIES.resolve()} {ro}
        mount -o remount,bind,ro {ro}
        if touch {ro}/probe 2>/dev/null; then echo "the bind mount is writable"; exit 1; fi
        exec "$0" -c "$1" """
    run = in_mount_namespace(inside, code, cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stderr[-2000:]
    expected = load_engine("numpy", whole(STORIES)).forward([Step("r", 0, np.array(prompt, np.int32))])[0]
    assert int(run.stdout.split()[-1]) == int(np.argmax(expected))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", ON_A_DEVICE)
def test_a_half_precision_checkpoint_matches_numpy(name, dtype, tmp_path):
    """Half-precision weights are widened once (numpy, onnxruntime f32 via its cache) or on the
    device (tinygrad, bfloat16 from its bits): all compute in float32 and agree."""
    from appliance.models.synth import synthesize

    model_dir = synthesize("smollm2-135m", tmp_path / "model", seed=3, dtype=dtype, layers=1)
    step = Step("r", 0, np.array([1, 5, 9, 200], np.int32))
    expected = load_engine("numpy", whole(model_dir)).forward([step])[0]
    np.testing.assert_allclose(engine(name, whole(model_dir), tmp_path / "cache").forward([step])[0], expected, atol=1e-3)


@needs_stories
def test_onnx_kv_pool_grows_and_skips_requests_left_out(tmp_path):
    """More requests than slots double the pool; a batch that leaves out a request in the middle
    of the slot range (a dummy row) leaves that request's cache intact."""
    pooled = engine("onnxruntime", whole(STORIES), tmp_path, slots=1)
    alone = engine("onnxruntime", whole(STORIES), tmp_path)
    prompts = {f"r{i}": np.array([1, 30 + i, 40 + i, 50 + i][:2 + i], np.int32) for i in range(3)}
    for e in (pooled, alone):
        for rid, p in prompts.items():
            e.forward([Step(rid, 0, p)])
    assert pooled.pool.shape[2] == 4
    for n in range(2):
        steps = [Step(rid, len(prompts[rid]) + n, np.array([9 + n], np.int32)) for rid in ("r0", "r2")]
        for step, got in zip(steps, pooled.forward(steps)):
            np.testing.assert_allclose(got, alone.forward([step])[0], atol=1e-5)
    step = Step("r1", len(prompts["r1"]), np.array([11], np.int32))
    np.testing.assert_allclose(pooled.forward([step])[0], alone.forward([step])[0], atol=1e-5)


def test_a_kv_cache_is_resident_only_where_written():
    """A TinyLlama-sized cache (22 layers, 2,048 positions, 256 wide: 46 MB) after one position of
    every layer: a page a layer, not the 2 MB huge pages numpy's own zeros would fault in."""
    import psutil

    from appliance.engines.base import lazy_zeros

    process = psutil.Process()
    before = process.memory_info().rss
    cache = lazy_zeros((22, 2048, 256))
    cache[:, 0] = 1.0
    grown = process.memory_info().rss - before
    assert cache.sum() == 22 * 256 and not cache[:, 1:].any()
    assert grown < 4 << 20, f"one position made {grown / 2**20:.1f} MB resident"


def test_a_file_read_while_paging_out_stays_mostly_out_of_memory(tmp_path):
    """onnxruntime reads a saved session's whole data file while it builds the session: paging
    out as it reads keeps the load's peak low. Here a reader walks a 64 MB map a megabyte at a time."""
    import mmap

    from appliance.engines.weight_cache import paging_out

    path = tmp_path / "model.data"
    with open(path, "wb") as f:
        f.write(b"\1" * (64 << 20))
        os.fsync(f.fileno())   # clean pages, as a saved session's are

    def peak_while_reading() -> int:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            pages, base, peak = np.frombuffer(m, np.uint8)[::4096], rss_file(), 0
            for first in range(0, len(pages), 256):
                assert pages[first:first + 256].sum() == 256   # a megabyte's pages faulted in
                peak = max(peak, rss_file() - base)
                time.sleep(0.002)   # a loader's pace: 64 MB in about 0.15 s
            del pages
        return peak

    assert peak_while_reading() > 56 << 20   # without paging out, the whole file stays resident
    with paging_out(path, every_s=0.01):
        peak = peak_while_reading()
    assert peak < 24 << 20, f"{peak / 2**20:.0f} MB of the file were resident at once"


@needs_stories
def test_an_onnxruntime_node_runs_its_saved_session_without_onnx(tmp_path):
    """The onnx package (14 MB in a process) builds graphs: a child process does that on the first
    load, and the node that runs the saved session never imports it."""
    code = (f"import sys\nfrom appliance.engines.base import Shard, Step\n"
            f"from appliance.engines.onnx_engine import OnnxEngine\nimport numpy as np\n"
            f"e = OnnxEngine(Shard({str(STORIES)!r}, 0, 5, 5), quant='q8', cache_dir={str(tmp_path)!r})\n"
            f"print(int(np.argmax(e.forward([Step('r', 0, np.array([1], np.int32))])[0])), 'onnx' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stderr[-2000:]
    expected = load_engine("numpy", whole(STORIES)).forward([Step("r", 0, np.array([1], np.int32))])[0]
    assert run.stdout.split() == [str(int(np.argmax(expected))), "False"]


@pytest.mark.parametrize("name", QUANTIZING)
def test_converting_a_shard_leaves_its_source_pages_behind(name, tmp_path):
    """A first load reads the checkpoint's matrices from their memory map and writes what they
    become to the cache: each source matrix's pages are let go once written, so the conversion
    never holds the checkpoint whole (TinyLlama q8, whole: onnxruntime's child 5,528 -> 3,430 MiB
    at its peak; half the layers on ggml 1,402 -> 599 MiB)."""
    if name == "ggml":
        from appliance.engines.ggml_engine import convert_weights
    else:
        from appliance.engines.onnx_graph import convert_weights as to_initializers

        def convert_weights(tensors, quant):
            return to_initializers(tensors, quant, first=False, last=False)

    rows, matrices = 2048, 8
    source = np.memmap(tmp_path / "weights.f16", np.float16, "w+", shape=(matrices * rows, 2048))
    source[:] = 0.01
    source.flush()
    source = np.memmap(tmp_path / "weights.f16", np.float16, "r", shape=(matrices * rows, 2048))   # clean pages
    tensors = {f"model.layers.{i}.mlp.down_proj.weight": source[i * rows:(i + 1) * rows] for i in range(matrices)}

    base, peak = rss_file(), 0
    for _, converted in convert_weights(tensors, "q8"):
        assert len(converted) in (rows, rows * 2048 // 32)   # a matrix's rows, or its blocks' scales
        peak = max(peak, rss_file() - base)
    assert peak < 24 << 20, f"{peak / 2**20:.0f} MB of the 64 MB checkpoint were resident at once"


# -- what the planner counts is what the engines hold (issue 13, point 3)
def held_bytes(engine) -> int:
    """The engine's arrays, less an embedding whose rows it reads from the file (none of it held)."""
    if engine.name in ("onnxruntime", "ggml"):
        arrays = engine.weights if engine.name == "onnxruntime" else engine.arrays
        read = "model.embed_tokens.weight" if engine.embedding_rows else None
        return sum(a.nbytes for name, a in arrays.items() if name != read)
    arrays = [*engine.w.values(), engine.embed, getattr(engine, "head", None)]
    distinct = {id(a): a for a in arrays if a is not None and not (a is engine.embed and not engine.shard.is_first)}
    return sum(a.nbytes for a in distinct.values())   # a tied float32 head is the embedding's own map


@pytest.mark.parametrize("name,quant,shape",
                         [(name, quant, shape) for name, quant in (("onnxruntime", "q4"), ("onnxruntime", "q8"),
                                                                   ("onnxruntime", "f16"), ("numpy", "f32"))
                          for shape in ("smollm2-135m", "qwen3-30b-a3b")] +
                         [pytest.param("ggml", quant, "smollm2-135m", marks=needs_ggml) for quant in ("q4", "q8", "f16")])
@pytest.mark.parametrize("part", ["first", "last"])
def test_the_footprint_is_what_the_engine_holds(name, quant, part, shape, tmp_path):
    from appliance.engines.footprint import footprint

    model_dir = synth_model(shape, layers=4)
    config = ModelConfig.load(model_dir)
    shard = Shard(Path(model_dir), 0, 2, 4) if part == "first" else Shard(Path(model_dir), 2, 4, 4)
    options = {"quant": quant, "cache_dir": tmp_path} if name in ("onnxruntime", "ggml") else {}
    held = held_bytes(load_engine(name, shard, **options))
    counted = footprint(config, name, quant).shard(2, part == "first", part == "last", requests=0)
    assert counted == pytest.approx(held, rel=0.02)
