"""`appliance.models.synth`: real configs, random weights, a working tokenizer."""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile

import numpy as np
import pytest

from appliance.models.config import ModelConfig
from appliance.models.synth import SHAPES, synthesize, tensor_shapes
from appliance.models.tokenizer import Tokenizer
from appliance.models.weights import load_tensors, weight_map

_ROOT = tempfile.mkdtemp(prefix="exo-synth-")
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)


# The 2025 families at test size (synth's TINY): their vocabularies (up to 262144) at full width
# would write gigabytes per test model.
AT_TEST_SIZE = {"qwen3-0.6b", "gemma3-1b", "smollm3-3b", "phi4-mini", "qwen3-30b-a3b", "mixtral-8x7b"}


@functools.cache
def synth_model(shape: str, layers: int = 2):
    """A small synthesized model, made once per test session (test_engines uses it too)."""
    return synthesize(shape, f"{_ROOT}/{shape}-{layers}", seed=0, layers=layers, tiny=shape in AT_TEST_SIZE)


# Parameter counts of the real checkpoints, to the precision they are usually quoted.
FULL_PARAMS = {"tinyllama-1.1b": 1.10e9, "llama-3.2-1b": 1.24e9, "qwen2.5-0.5b": 0.494e9, "smollm2-135m": 0.135e9,
               "qwen3-0.6b": 0.596e9, "gemma3-1b": 1.0e9, "smollm3-3b": 3.08e9, "phi4-mini": 3.84e9,
               "qwen3-30b-a3b": 30.5e9, "mixtral-8x7b": 46.7e9}


@pytest.mark.parametrize("shape", SHAPES)
def test_full_shapes_have_the_real_parameter_count(shape):
    params = sum(int(np.prod(s)) for s in tensor_shapes(SHAPES[shape]).values())
    assert params == pytest.approx(FULL_PARAMS[shape], rel=0.01)


@pytest.mark.parametrize("shape", SHAPES)
def test_synth_model_loads(shape):
    model_dir = synth_model(shape)
    config = ModelConfig.load(model_dir)
    assert config.num_layers == 2
    assert config.vocab_size == SHAPES[shape]["vocab_size"] or shape in AT_TEST_SIZE   # (Gemma's shrinks to 1024)
    assert config.model_type == SHAPES[shape]["model_type"]
    names = list(weight_map(model_dir))
    tensors = load_tensors(model_dir, names)
    assert tensors["model.embed_tokens.weight"].shape == (config.vocab_size, config.hidden_size)
    assert all(np.isfinite(t[:4]).all() for t in tensors.values())
    assert ("lm_head.weight" in tensors) == (not config.tie_word_embeddings)


@pytest.mark.parametrize("shape", SHAPES)
def test_synth_tokenizer_works(shape):
    model_dir = synth_model(shape)
    config, tokenizer = ModelConfig.load(model_dir), Tokenizer(model_dir)
    assert tokenizer.vocab_size == config.vocab_size
    text = "Once upon a time, a Pi cluster said héllo 🙂 to 42 nodes."
    ids = tokenizer.encode(text)
    assert max(ids) < config.vocab_size
    assert tokenizer.decode(ids) == text
    assert len(tokenizer.encode(text, add_special_tokens=False)) < len(text.encode())  # BPE merged something
    assert tokenizer.token_id(tokenizer.eos_token) in config.eos_token_ids
    if config.bos_token_id is not None and tokenizer.bos_token is not None:
        assert tokenizer.token_id(tokenizer.bos_token) == config.bos_token_id
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert "hi" in tokenizer.decode(chat) and max(chat) < config.vocab_size
    assert len(chat) > len(tokenizer.encode("hi", add_special_tokens=False)) + 1   # the turn's markup is there


def test_seed_makes_weights_reproducible(tmp_path):
    a = synthesize("smollm2-135m", tmp_path / "a", seed=1, layers=1)
    b = synthesize("smollm2-135m", tmp_path / "b", seed=1, layers=1)
    c = synthesize("smollm2-135m", tmp_path / "c", seed=2, layers=1, dtype="float16")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert ModelConfig.load(c).torch_dtype == "float16"
    assert (c / "model.safetensors").stat().st_size < (a / "model.safetensors").stat().st_size


def test_bfloat16_weights_are_what_torch_writes(tmp_path):
    """A bfloat16 checkpoint, as most on the Hub are: the bits torch rounds to, read back by the loader."""
    torch = pytest.importorskip("torch")
    from appliance.models.weights import as_float32, load_tensors

    model = synthesize("smollm2-135m", tmp_path, seed=4, layers=1, dtype="bfloat16")
    f32 = synthesize("smollm2-135m", tmp_path / "f32", seed=4, layers=1)
    name = "model.layers.0.mlp.up_proj.weight"
    exact = load_tensors(f32, [name])[name]
    expected = torch.from_numpy(np.array(exact)).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(as_float32(load_tensors(model, [name])[name]), expected)
    assert ModelConfig.load(model).torch_dtype == "bfloat16"


def test_unknown_shape_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown shape"):
        synthesize("gpt-5", tmp_path)


def test_exo_models_synth_writes_a_model_the_cluster_can_load(tmp_path):
    import json
    import subprocess
    import sys

    from appliance.models.config import ModelConfig
    from appliance.models.tokenizer import Tokenizer

    out = tmp_path / "smol"
    subprocess.run([sys.executable, "-m", "appliance", "models", "synth", "--shape", "smollm2-135m", "--out", str(out),
                    "--layers", "2", "--dtype", "bfloat16"], check=True, capture_output=True, timeout=120)
    config = ModelConfig.load(out)
    assert (config.num_layers, config.hidden_size, config.torch_dtype) == (2, 576, "bfloat16")
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    assert Tokenizer(out).encode("hello world")
