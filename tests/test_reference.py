"""The numpy engine against Hugging Face transformers (torch CPU, float32 compute).

Each case builds a tiny random model with transformers' own config class, saves it with
`save_pretrained` and compares logits over a prefill and a few decode steps (KV cache), with the
model whole and split into chained shards.
"""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from appliance.engines.base import Shard, Step  # noqa: E402
from appliance.engines.numpy_engine import NumpyEngine  # noqa: E402
from appliance.models.config import ModelConfig  # noqa: E402
from appliance.models.weights import load_tensors, weight_map  # noqa: E402

pytestmark = pytest.mark.reference

TOLERANCE = 1e-4
LAYERS = 3
SPLITS = [(0, 3), (0, 1, 3), (0, 1, 2, 3)]   # whole, 2 shards, 3 shards
PROMPT = [5, 17, 42, 3, 88, 61, 9]           # prefill
DECODE = [23, 70, 1]                         # then one token at a time

TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=97, max_position_embeddings=64)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8}

TINY_KW = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)   # inside the tiny vocabulary
# Gemma 3: head_dim 16 with a query scalar of its own, sliding (4 positions) and global layers with
# their two rope bases (the global one linearly scaled, as 4B), soft-capped logits.
GEMMA3 = dict(num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=12, sliding_window=4,
              layer_types=["sliding_attention", "full_attention", "sliding_attention"],
              rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
              final_logit_softcapping=3.0)
# Phi-4-mini: rope over 3/4 of each head, longrope whose original context (8) the decode steps pass.
PHI3 = dict(num_key_value_heads=2, partial_rotary_factor=0.75, original_max_position_embeddings=8,
            rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                             "short_factor": [1.0, 1.5, 2.0], "long_factor": [3.0, 5.0, 8.0]})

# Mixtures of experts: 8 experts, 2 a token. Qwen3-MoE with the top 2's weights as the softmax left
# them and a dense layer (mlp_only_layers), then renormalised with every second layer sparse; Mixtral
# (always renormalised, a sliding window); Qwen2-MoE's shared expert behind its sigmoid gate.
EXPERTS = dict(num_key_value_heads=2, num_experts_per_tok=2, moe_intermediate_size=24)
MOE = {
    "qwen3-moe-dense-layer": ("Qwen3MoeConfig", dict(**EXPERTS, num_experts=8, norm_topk_prob=False,
                                                     mlp_only_layers=[1])),
    "qwen3-moe-norm-step2": ("Qwen3MoeConfig", dict(**EXPERTS, num_experts=8, norm_topk_prob=True,
                                                    decoder_sparse_step=2)),
    "mixtral-sliding": ("MixtralConfig", dict(num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                                              sliding_window=4)),
    "qwen2-moe-shared": ("Qwen2MoeConfig", dict(**EXPERTS, num_experts=8, shared_expert_intermediate_size=40)),
}

# name: (config class, config overrides, stored dtype, save_pretrained options)
CASES = {
    "llama": ("LlamaConfig", {}, torch.float32, {}),
    "llama-tied": ("LlamaConfig", dict(tie_word_embeddings=True), torch.float32, {}),
    "llama3-rope": ("LlamaConfig", dict(rope_scaling=LLAMA3, rope_theta=500000.0), torch.float32, {}),
    "llama3-rope-tied-gqa": ("LlamaConfig", dict(rope_scaling=LLAMA3, rope_theta=500000.0, tie_word_embeddings=True,
                                                 num_key_value_heads=2), torch.float32, {}),
    "llama-mqa-head_dim": ("LlamaConfig", dict(num_key_value_heads=1, head_dim=16), torch.float32, {}),
    "mistral-gqa-sliding": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=4), torch.float32, {}),
    "qwen2-bias-tied": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True), torch.float32, {}),
    "llama-fp16": ("LlamaConfig", dict(num_key_value_heads=2), torch.float16, {}),
    "qwen2-bf16": ("Qwen2Config", dict(num_key_value_heads=2), torch.bfloat16, {}),
    "llama-sharded": ("LlamaConfig", dict(num_key_value_heads=2), torch.float32, dict(max_shard_size="20KB")),
    **{name: (cls, {**TINY_KW, **kw}, torch.float32, {}) for name, (cls, kw) in {
        "qwen3": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=16)),
        "qwen3-tied": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)),
        "smollm3-no-rope-layers": ("SmolLM3Config", dict(num_key_value_heads=2, no_rope_layers=[1, 0, 1])),
        "gemma3-text": ("Gemma3TextConfig", GEMMA3),
        "phi3-longrope-partial": ("Phi3Config", PHI3),
        **MOE,
    }.items()},
    # (transformers' Gemma3ForConditionalGeneration does not soft-cap; the real 4B+ configs set no cap)
    "gemma3-multimodal": ("Gemma3Config", dict(text_config={**GEMMA3, "final_logit_softcapping": None}, vision_config=dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14),
        mm_tokens_per_image=4, tie_word_embeddings=True), torch.float32, {}),
}


def make_model(path, config_class, overrides, dtype, save_options):
    if config_class == "Gemma3Config":   # the multimodal checkpoint: a text tower inside
        config = transformers.Gemma3Config(**{**overrides, "text_config": {**TINY, **TINY_KW, **overrides["text_config"]}})
    else:
        config = getattr(transformers, config_class)(**{**TINY, **overrides})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # weights large enough that logits are O(1), and random biases and norms
        for name, p in model.named_parameters():
            p.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.2)
    model.to(dtype).save_pretrained(path, **save_options)
    return path


def legacy_config(path):
    """Rewrite config.json the way checkpoints from before transformers 5 spell it."""
    c = json.loads((path / "config.json").read_text())
    rope = c.pop("rope_parameters")
    c["rope_theta"] = rope.pop("rope_theta")
    c["rope_scaling"] = rope if rope["rope_type"] != "default" else None
    c["torch_dtype"] = c.pop("dtype")
    (path / "config.json").write_text(json.dumps(c))


def torch_logits(path):
    """Logits at the last prefill position and at each decode position, float32 compute: a
    prefill, then one token at a time with the KV cache, as generate() runs."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        out = model(torch.tensor([PROMPT]), use_cache=True)
        logits = [out.logits[0, -1].numpy()]
        for token in DECODE:
            out = model(torch.tensor([[token]]), cache=out.cache, use_cache=True)
            logits.append(out.logits[0, -1].numpy())
    return np.stack(logits)


def numpy_logits(path, bounds):
    engines = [NumpyEngine(Shard(path, a, b, LAYERS)) for a, b in zip(bounds, bounds[1:])]

    def step(pos, tokens):
        x = np.asarray(tokens, np.int32)
        for engine in engines:
            (x,) = engine.forward([Step("r", pos, x)])
        return x

    out = [step(0, PROMPT)]
    out += [step(len(PROMPT) + i, [token]) for i, token in enumerate(DECODE)]
    return np.stack(out)


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(tmp_path, case):
    path = make_model(tmp_path, *CASES[case])
    expected = torch_logits(path)
    assert np.abs(expected).max() > 0.1, "logits too small to tell anything apart"
    for bounds in SPLITS:
        got = numpy_logits(path, bounds)
        diff = np.abs(got - expected).max()
        print(f"{case} split {bounds}: max abs logit diff {diff:.2e}")
        assert diff < TOLERANCE, f"{case} split {bounds}: max abs diff {diff:.2e}"
        assert (got.argmax(-1) == expected.argmax(-1)).all()   # greedy picks the same tokens


@pytest.mark.parametrize("case", ["llama", "llama-tied", "qwen2-bias-tied", "qwen2-bf16", *MOE])
def test_sizes_the_planner_sees(tmp_path, case):
    path = make_model(tmp_path, *CASES[case])
    config, names = ModelConfig.load(path), list(weight_map(path))
    tensors = load_tensors(path, names)
    assert config.total_bytes == sum(t.nbytes for t in tensors.values())
    per_layer = [sum(tensors[n].size for n in names if n.startswith(f"model.layers.{i}.")) for i in range(LAYERS)]
    assert config.layer_params == max(per_layer)
    if config.num_experts:   # a token reads all but the experts it did not choose
        sparse = config.sparse_layers.index(True)
        expert = sum(tensors[n].size for n in names if ".experts.0." in n and f".layers.{sparse}." in n)
        assert config.active_layer_params == per_layer[sparse] - (config.num_experts - config.experts_per_token) * expert


def test_sharded_checkpoint_has_an_index(tmp_path):
    path = make_model(tmp_path, *CASES["llama-sharded"])
    assert (path / "model.safetensors.index.json").exists()
    assert len(list(path.glob("*.safetensors"))) > 2


def test_legacy_config_spelling(tmp_path):
    """Llama 3.1 checkpoints on the Hub write rope_theta + rope_scaling + torch_dtype."""
    path = make_model(tmp_path, *CASES["llama3-rope-tied-gqa"])
    modern = ModelConfig.load(path)
    legacy_config(path)
    assert ModelConfig.load(path) == modern
    assert modern.rope_theta == 500000.0 and modern.rope_scaling["rope_type"] == "llama3"
    diff = np.abs(numpy_logits(path, (0, 2, 3)) - torch_logits(path)).max()
    assert diff < TOLERANCE, f"max abs diff {diff:.2e}"


def test_batch_of_requests_matches_one_at_a_time(tmp_path):
    path = make_model(tmp_path, *CASES["qwen2-bias-tied"])
    alone = numpy_logits(path, (0, 3))
    engine = NumpyEngine(Shard(path, 0, 3, LAYERS))
    other = np.asarray([7, 8, 9], np.int32)
    first, _ = engine.forward([Step("a", 0, np.asarray(PROMPT, np.int32)), Step("b", 0, other)])
    np.testing.assert_allclose(first, alone[0], atol=1e-5)
    for i, token in enumerate(DECODE):
        out, _ = engine.forward([Step("a", len(PROMPT) + i, np.asarray([token], np.int32)),
                                 Step("b", len(other) + i, np.asarray([token], np.int32))])
        np.testing.assert_allclose(out, alone[i + 1], atol=1e-5)
    engine.free("a")
    assert engine.requests() == ["b"]


def onnx_logits(path, bounds, quant, cache_dir):
    from appliance.engines.onnx_engine import OnnxEngine

    engines = [OnnxEngine(Shard(path, a, b, LAYERS), quant=quant, cache_dir=cache_dir) for a, b in zip(bounds, bounds[1:])]

    def step(pos, tokens):
        x = np.asarray(tokens, np.int32)
        for engine in engines:
            (x,) = engine.forward([Step("r", pos, x)])
        return x

    return np.stack([step(0, PROMPT)] + [step(len(PROMPT) + i, [t]) for i, t in enumerate(DECODE)])


@pytest.mark.parametrize("case", MOE)
def test_onnxruntime_mixtures_match_transformers(tmp_path, case):
    """onnxruntime's MoE op (f32) routes as transformers does: the same logits, the same greedy tokens."""
    path = make_model(tmp_path / "model", *CASES[case])
    expected = torch_logits(path)
    for bounds in SPLITS[:2]:
        got = onnx_logits(path, bounds, "f32", tmp_path / "cache")
        diff = np.abs(got - expected).max()
        print(f"{case} onnxruntime split {bounds}: max abs logit diff {diff:.2e}")
        assert diff < TOLERANCE, f"{case} split {bounds}: max abs diff {diff:.2e}"
        assert (got.argmax(-1) == expected.argmax(-1)).all()
