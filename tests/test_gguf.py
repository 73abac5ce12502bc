"""GGUF files (issue 16, point 2): written here with the `gguf` package from synthetic models,
read back as models whose logits are the safetensors path's (exact at F32; otherwise exactly
those of the values the file holds, dequantized into a safetensors checkpoint, and within the
quantization's error of the original)."""
from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("DEV", "CPU")

from appliance.engines import Shard, Step, load_engine  # noqa: E402
from appliance.models.config import ModelConfig, generation_defaults  # noqa: E402
from appliance.models.gguf_model import GGUF  # noqa: E402
from appliance.models.store import resolve_model_dir  # noqa: E402
from appliance.models.synth import synthesize  # noqa: E402
from appliance.models.tokenizer import Tokenizer  # noqa: E402
from tests.gguf_writer import dequantized_copy, write_gguf  # noqa: E402
from tests.system import needs  # noqa: E402

_ROOT = tempfile.mkdtemp(prefix="exo-gguf-")
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)
K_SIZES = {"hidden_size": 256, "intermediate_size": 512, "head_dim": 64}   # K-quant rows are 256-element blocks
TEXT = "Once upon a time, a node said hello to 42 others."
ARCHES = {"llama": "llama-3.2-1b", "qwen2": "qwen2.5-0.5b", "qwen3": "qwen3-0.6b", "gemma3": "gemma3-1b",
          "phi3": "phi4-mini"}


@functools.cache
def model(shape: str, k_sizes: bool = False) -> Path:
    return synthesize(shape, f"{_ROOT}/{shape}-{k_sizes}", seed=1, layers=2, tiny=K_SIZES if k_sizes else True)


@functools.cache
def gguf(shape: str, qtype: str) -> Path:
    k_sizes = qtype.endswith("_K")
    return write_gguf(model(shape, k_sizes), Path(f"{_ROOT}/{shape}-{qtype}.gguf"), qtype)


def logits(path, engine="numpy", **options) -> np.ndarray:
    """A prefill and three decode steps, the model whole."""
    layers = ModelConfig.load(path).num_layers
    e = load_engine(engine, Shard(Path(path), 0, layers, layers), **options)
    ids = np.array(Tokenizer(path).encode(TEXT), np.int32)
    out = [e.forward([Step("r", 0, ids)])[0]]
    out += [e.forward([Step("r", len(ids) + i, ids[i:i + 1])])[0] for i in range(3)]
    return np.stack(out)


@pytest.mark.parametrize("arch", ARCHES)
def test_f32_gguf_gives_the_safetensors_logits(arch):
    """Each architecture's metadata, names and llama.cpp conventions (llama's q/k permutation and
    rope_freqs, Gemma's 1 + w norms and sliding layers, Phi-3's fused tensors and longrope factors)."""
    shape = ARCHES[arch]
    path = gguf(shape, "F32")
    assert GGUF(path).arch == arch
    assert ModelConfig.load(path).num_layers == 2
    np.testing.assert_allclose(logits(path), logits(model(shape)), atol=1e-5)


# type -> how far from the original model's logits the file's own rounding may take them
TYPES = {"F16": 0.01, "BF16": 0.05, "Q8_0": 0.05, "Q4_0": 1.0, "Q4_K": None, "Q5_K": None, "Q6_K": None}


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("shape", ["gemma3-1b", "tinyllama-1.1b"])   # (small vocabularies: quick)
def test_every_weight_type_reads_as_the_values_it_holds(shape, qtype):
    """The GGUF model computes with exactly what its blocks hold (as a safetensors checkpoint of
    the dequantized values does), and stays within the type's error of the original. K-quant
    blocks are random (gguf-py has no K-quantizer), so only the first holds for them. (llama's
    q/k rows move as quantized blocks.)"""
    k_sizes = qtype.endswith("_K")
    path = gguf(shape, qtype)
    got = logits(path)
    reference = dequantized_copy(path, model(shape, k_sizes), Path(f"{_ROOT}/{shape}-{qtype}-dequantized"))
    np.testing.assert_allclose(got, logits(reference), atol=1e-5)
    if TYPES[qtype] is not None:
        assert np.abs(got - logits(model(shape))).max() < TYPES[qtype]


@pytest.mark.parametrize("engine,quant", [("onnxruntime", "f32"), ("onnxruntime", "f16"), ("onnxruntime", "q8"),
                                          ("onnxruntime", "q4"), pytest.param("tinygrad", "f32", marks=needs("clang"))] +
                         [pytest.param("ggml", q, marks=needs("ggml")) for q in ("f32", "q8", "q4")])
@pytest.mark.parametrize("arch,qtype", [("gemma3", "Q8_0"), ("phi3", "Q4_0")])
def test_engines_run_gguf_models(arch, qtype, engine, quant, tmp_path):
    path = gguf(ARCHES[arch], qtype)
    expected = logits(path)
    got = logits(path, engine, quant=quant, **({"cache_dir": tmp_path} if engine in ("onnxruntime", "ggml") else {}))
    tolerance = {"f32": 1e-4, "f16": 0.01, "q8": 0.1, "q4": 1.0}[quant] * max(1.0, np.abs(expected).max())
    assert np.abs(got - expected).max() < tolerance


def test_q4_0_and_q8_0_blocks_reach_matmulnbits_as_they_are(tmp_path):
    """At q4 a Q4_0 file's blocks, at q8 a Q8_0 file's, are what MatMulNBits multiplies by: unpacked
    as MatMulNBits reads them ((q - zero point) * scale), they are the file's values, bit for bit."""
    from appliance.engines.onnx_engine import OnnxEngine
    from appliance.models.weights import as_float32, load_shard

    name = "model.layers.0.mlp.down_proj.weight"
    for qtype, quant, bits in (("Q4_0", "q4", 4), ("Q8_0", "q8", 8)):
        path = gguf("gemma3-1b", qtype)
        engine = OnnxEngine(Shard(path, 0, 2, 2), quant=quant, cache_dir=tmp_path / quant)
        packed, scales = engine.weights[name + ".q"], engine.weights[name + ".scales"]
        if bits == 4:
            q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(packed.shape[0], packed.shape[1], 32)
        else:
            q = packed
        values = (q.astype(np.float32) - 2 ** (bits - 1)) * scales.reshape(packed.shape[0], -1, 1)
        held = as_float32(load_shard(path, engine.config, 0, 2)[name])
        np.testing.assert_array_equal(values.reshape(held.shape), held)
        got = logits(path, "onnxruntime", quant=quant, cache_dir=tmp_path / quant)
        assert np.abs(got - logits(path)).max() < 0.1   # what is left: the activations' int8 rounding


def test_a_qwen3moe_file_loads_its_experts_and_q4_0_experts_reach_qmoe_as_they_are(tmp_path):
    """llama.cpp's qwen3moe: the router (ffn_gate_inp) and each matrix of all experts stacked in one
    tensor (ffn_gate_exps ...). F32: the safetensors model's logits exactly; Q4_0 at q4: QMoE's
    blocks are the file's (fc2 of expert 3 unpacked is the file's down_proj of expert 3)."""
    from appliance.engines.onnx_engine import OnnxEngine
    from appliance.models.weights import as_float32, load_shard

    config = ModelConfig.load(gguf("qwen3-30b-a3b", "F32"))
    assert (config.model_type, config.num_experts, config.experts_per_token) == ("qwen3_moe", 128, 8)
    assert config.moe_intermediate_size == 64 and config.norm_topk_prob and all(config.sparse_layers)
    np.testing.assert_array_equal(logits(gguf("qwen3-30b-a3b", "F32")), logits(model("qwen3-30b-a3b")))
    path = gguf("qwen3-30b-a3b", "Q4_0")
    engine = OnnxEngine(Shard(path, 0, 2, 2), quant="q4", cache_dir=tmp_path)
    fc2 = "model.layers.1.mlp.experts.fc2"
    packed, scales = engine.weights[fc2 + ".q"][3], engine.weights[fc2 + ".scales"][3]   # expert 3
    q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(packed.shape[0], -1, 32)
    values = (q.astype(np.float32) - 8) * scales[..., None]
    held = as_float32(load_shard(path, engine.config, 1, 2)["model.layers.1.mlp.experts.3.down_proj.weight"])
    np.testing.assert_array_equal(values.reshape(held.shape), held)
    got = logits(path, "onnxruntime", quant="q4", cache_dir=tmp_path)
    assert np.abs(got - logits(path)).max() < 0.1   # the activations' int8 rounding


def test_a_mixtral_file_is_a_llama_with_experts():
    path = gguf("mixtral-8x7b", "F32")
    config = ModelConfig.load(path)
    assert (config.model_type, config.num_experts, config.experts_per_token) == ("mixtral", 8, 2)
    np.testing.assert_array_equal(logits(path), logits(model("mixtral-8x7b")))


@needs("ggml")
def test_q4_0_and_q8_0_blocks_reach_ggml_as_they_are(tmp_path):
    """The ggml engine holds a Q4_0 file's blocks at q4 and a Q8_0 file's at q8 byte for byte."""
    from appliance.engines.ggml_engine import GgmlEngine
    from appliance.models.weights import load_shard

    name = "model.layers.0.mlp.down_proj.weight"
    for qtype, quant in (("Q4_0", "q4"), ("Q8_0", "q8")):
        path = gguf("gemma3-1b", qtype)
        engine = GgmlEngine(Shard(path, 0, 2, 2), quant=quant, cache_dir=tmp_path / quant)
        held = load_shard(path, engine.config, 0, 2)[name]
        np.testing.assert_array_equal(engine.arrays[name], np.asarray(held).view(np.uint8))
        assert np.abs(logits(path, "ggml", quant=quant, cache_dir=tmp_path / quant) - logits(path)).max() < 0.1


def test_the_tokenizer_and_chat_template_come_from_the_file():
    for shape in ("qwen3-0.6b", "gemma3-1b", "llama-3.2-1b"):
        ours, original = Tokenizer(gguf(shape, "F32")), Tokenizer(model(shape))
        assert ours.encode(TEXT) == original.encode(TEXT)
        assert ours.decode(ours.encode(TEXT)) == TEXT
        chat = [{"role": "user", "content": "hi"}]
        assert ours.render_chat(chat) == original.render_chat(chat)
        assert ours.apply_chat_template(chat) == original.apply_chat_template(chat)
    assert set(generation_defaults(gguf("gemma3-1b", "F32")).eos_token_ids) == {1, 106}   # eos and end-of-turn


@pytest.mark.skipif(not (Path(__file__).resolve().parents[1] / ".." / "shared" / "models" / "stories260K" / "hf"
                         / "tokenizer.json").exists(), reason="shared/models/stories260K absent")
def test_a_sentencepiece_vocabulary_tokenizes_as_its_tokenizer_json(tmp_path):
    """A "llama" (SentencePiece BPE) GGUF vocabulary, from stories260K's: pieces scored by rank."""
    import json

    import gguf as gguf_package

    stories = Path(__file__).resolve().parents[1] / ".." / "shared" / "models" / "stories260K" / "hf"
    data = json.loads((stories / "tokenizer.json").read_text())
    tokens = sorted(data["model"]["vocab"], key=data["model"]["vocab"].get)
    w = gguf_package.GGUFWriter(tmp_path / "stories.gguf", "llama")
    for key, value in (("llama.block_count", 5), ("llama.embedding_length", 64), ("llama.attention.head_count", 8)):
        w.add_uint32(key, value)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([-float(i) for i in range(len(tokens))])
    w.add_token_types([3 if t in ("<s>", "</s>") else 2 if t == "<unk>" else 6 if t.startswith("<0x") else 1
                       for t in tokens])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours, theirs = Tokenizer(tmp_path / "stories.gguf"), Tokenizer(stories)
    for text in ("Once upon a time, there was a little girl named Lily.", "Zürich 🙂 x", "The end."):
        assert ours.encode(text) == theirs.encode(text), text
        assert ours.decode(ours.encode(text)) == theirs.decode(theirs.encode(text))


def test_split_files_a_folder_and_a_file_are_one_model(tmp_path):
    shape = "gemma3-1b"
    first = write_gguf(model(shape), tmp_path / "split" / "model.gguf", "Q8_0", split_max_tensors=10)
    assert first.name == "model-00001-of-00003.gguf" and len(list(first.parent.glob("*.gguf"))) == 3
    assert resolve_model_dir(str(first.parent)) == first.resolve()
    assert resolve_model_dir(str(gguf(shape, "Q8_0"))) == gguf(shape, "Q8_0").resolve()
    np.testing.assert_allclose(logits(first), logits(gguf(shape, "Q8_0")), atol=1e-6)
    (first.parent / "model-00002-of-00003.gguf").unlink()
    with pytest.raises(FileNotFoundError, match="missing model-00002-of-00003.gguf"):
        ModelConfig.load(first.parent / "model-00001-of-00003.gguf")


def test_a_node_maps_only_its_own_layers():
    """A stage of layer 0 of 2 reads layer 0's tensors and the embedding, nothing of layer 1."""
    from appliance.models.weights import load_shard

    path = gguf("gemma3-1b", "Q8_0")
    config = ModelConfig.load(path)
    first = load_shard(path, config, 0, 1)
    assert not any(n.startswith("model.layers.1.") for n in first) and "model.embed_tokens.weight" in first
    last = load_shard(path, config, 1, 2)
    assert not any(n.startswith("model.layers.0.") for n in last)
    for tensors in (first, last):   # views of the mapped file, not copies
        assert all(not t.flags.owndata for t in tensors.values())
    assert sum(t.nbytes for t in first.values()) < path.stat().st_size


def test_a_node_maps_only_its_own_layers_experts():
    """A mixture's stage maps its own layers' experts, each expert a view of the stacked tensor."""
    from appliance.models.weights import load_shard

    path = gguf("qwen3-30b-a3b", "Q8_0")
    last = load_shard(path, ModelConfig.load(path), 1, 2)
    assert not any(n.startswith("model.layers.0.") for n in last)
    assert len([n for n in last if ".mlp.experts." in n]) == 3 * 128
    assert all(not t.flags.owndata for t in last.values())


def test_a_node_downloads_only_its_layers_byte_ranges_and_resumes(tmp_path, monkeypatch):
    """Point 3: from the (fake) hub, a node holding layers 2-3 of 4 fetches the GGUF header and its
    own tensors' byte ranges into a sparse file; a dropped transfer goes on from where it stopped;
    a second fetch asks for nothing more; the coordinator needs only the header."""
    from appliance.models import download
    from tests.fake_hub import FakeHub

    source = synthesize("gemma3-1b", tmp_path / "src", seed=2, layers=4, tiny=True)
    served = write_gguf(source, tmp_path / "repo" / "tiny-Q8_0.gguf", "Q8_0")
    hub = FakeHub({"exo-test/tiny-gguf": served.parent}).start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setattr(download, "GGUF_HEADER_GUESS", 4096)
        hub.drop_once.add(served.name)
        spec, cache = f"exo-test/tiny-gguf:{served.name}", tmp_path / "cache"
        states = []
        path = download.fetch_gguf_shard(spec, 2, 4, download.Progress(spec, states.append), cache=cache)
        gets = [s for s in hub.seen if s.method == "GET"]
        assert gets[0].range == "bytes=0-4095" and gets[1].range == "bytes=2048-4095"   # resumed half way

        fetched = sum(int(b) - int(a) + 1 for a, b in (s.range.removeprefix("bytes=").split("-") for s in gets))
        size, on_disk = served.stat().st_size, path.stat().st_blocks * 512
        layers_01 = [t for name, t in GGUF(served).tensors.items() if name.startswith(("blk.0.", "blk.1."))]
        for s in gets:   # nothing of layers 0 and 1 was asked for
            a, b = map(int, s.range.removeprefix("bytes=").split("-"))
            assert not any(a < t.data_offset + t.n_bytes and t.data_offset <= b for t in layers_01)
        print(f"half the layers of a {size}-byte GGUF: {fetched} bytes fetched, {on_disk} on disk")
        others = sum(t.n_bytes for t in layers_01)
        assert fetched <= size - others + 2048                   # (+ the half fetched twice, as it dropped)
        assert on_disk <= size - others + 4 * 4096               # a sparse file: 4 KB blocks at the ends of ranges
        assert states[-1]["state"] == "done" and states[-1]["bytes"] == states[-1]["total"]

        hidden = load_engine("numpy", Shard(served, 0, 2, 4)).forward([Step("r", 0, np.array([2, 5, 9], np.int32))])[0]
        got = load_engine("numpy", Shard(path, 2, 4, 4)).forward([Step("r", 0, hidden)])[0]
        expected = load_engine("numpy", Shard(served, 0, 4, 4)).forward([Step("r", 0, np.array([2, 5, 9], np.int32))])[0]
        np.testing.assert_allclose(got, expected, atol=1e-6)

        before = len(hub.seen)
        assert download.fetch_gguf_shard(spec, 2, 4, cache=cache) == path
        assert not [s for s in hub.seen[before:] if s.method == "GET"]            # all of it was there
        coordinator = download.fetch_gguf_shard(spec, 0, 0, cache=tmp_path / "coordinator")
        assert ModelConfig.load(coordinator) == ModelConfig.load(served)
        assert Tokenizer(coordinator).encode(TEXT) == Tokenizer(served).encode(TEXT)
    finally:
        hub.stop()


def test_a_cluster_of_two_nodes_serves_a_gguf_file(local_cluster):
    """`--model FILE.gguf` end to end: two nodes split Qwen3 (test size, Q8_0), the coordinator
    builds the prompt with the file's template and tokenizer, and greedy decoding gives what the
    numpy engine gives on the whole file; generation stops at one of the file's end ids or the
    token budget."""
    path = gguf("qwen3-0.6b", "Q8_0")
    cluster = local_cluster(2, model=path)
    client = cluster.openai()
    model_id = client.models.list().data[0].id
    r = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=6, temperature=0)
    tokenizer = Tokenizer(path)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    engine = load_engine("numpy", Shard(path, 0, 2, 2))
    logits = engine.forward([Step("g", 0, np.array(prompt, np.int32))])[0]
    tokens = [int(np.argmax(logits))]
    while len(tokens) < 6 and tokens[-1] not in generation_defaults(path).eos_token_ids:
        logits = engine.forward([Step("g", len(prompt) + len(tokens) - 1, np.array(tokens[-1:], np.int32))])[0]
        tokens.append(int(np.argmax(logits)))
    expected = [t for t in tokens if t not in generation_defaults(path).eos_token_ids]
    assert r.usage.completion_tokens == len(tokens) and r.choices[0].message.content == tokenizer.decode(expected)
    print(f"{len(tokens)} tokens: {r.choices[0].message.content!r}")
