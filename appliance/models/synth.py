"""Synthetic models: the real config of a known model, random weights and a small working tokenizer.

`exo models synth` uses this to benchmark and test at real shapes without downloading anything.
The tokenizer is a byte-level BPE trained on a few built-in sentences; its vocabulary is padded
with `<|reserved_N|>` entries to exactly the config's `vocab_size`, and the model's special tokens
sit at their real ids.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from appliance.models.weights import f32_to_bf16

# The configs of the real checkpoints (their config.json, trimmed to what matters here).
_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
          "attention_bias": False, "mlp_bias": False}
SHAPES: dict[str, dict] = {
    "tinyllama-1.1b": {**_LLAMA, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                       "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000,
                       "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                       "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2},
    "llama-3.2-1b": {**_LLAMA, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
                     "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
                     "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                     "tie_word_embeddings": True, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]},
    "qwen2.5-0.5b": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
                     "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
                     "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                     "tie_word_embeddings": True, "bos_token_id": 151643, "eos_token_id": 151645},
    "smollm2-135m": {**_LLAMA, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
                     "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
                     "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2},
    "qwen3-0.6b": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_act": "silu",
                   "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
                   "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 40960,
                   "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "attention_bias": False, "tie_word_embeddings": True,
                   "bos_token_id": 151643, "eos_token_id": 151645},
    "gemma3-1b": {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
                  "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152, "intermediate_size": 6912,
                  "num_hidden_layers": 26, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
                  "vocab_size": 262144, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
                  "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "rope_scaling": None,
                  "sliding_window": 512, "sliding_window_pattern": 6, "query_pre_attn_scalar": 256,
                  "final_logit_softcapping": None, "attn_logit_softcapping": None, "attention_bias": False,
                  "tie_word_embeddings": True, "bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0},
    "smollm3-3b": {"architectures": ["SmolLM3ForCausalLM"], "model_type": "smollm3", "hidden_act": "silu",
                   "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16,
                   "num_key_value_heads": 4, "vocab_size": 128256, "max_position_embeddings": 65536,
                   "rms_norm_eps": 1e-6, "rope_theta": 5000000.0, "no_rope_layer_interval": 4,
                   "attention_bias": False, "tie_word_embeddings": True, "bos_token_id": 128000,
                   "eos_token_id": 128012, "pad_token_id": 128004},
    # Phi-4-mini's longrope factors here are stand-ins of the right length (48: rotary_dim / 2)
    "phi4-mini": {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_act": "silu",
                  "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 24,
                  "num_key_value_heads": 8, "vocab_size": 200064, "max_position_embeddings": 131072,
                  "original_max_position_embeddings": 4096, "partial_rotary_factor": 0.75, "rms_norm_eps": 1e-5,
                  "rope_theta": 10000.0, "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 48,
                                                          "long_factor": [1.0 + i for i in range(48)]},
                  "sliding_window": 262144, "attention_bias": False, "tie_word_embeddings": True,
                  "bos_token_id": 199999, "eos_token_id": 199999, "pad_token_id": 199999},
    # Mixtures of experts: Qwen3-30B-A3B (128 experts, 8 a token) and Mixtral 8x7B (8 experts, 2 a token).
    "qwen3-30b-a3b": {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_act": "silu",
                      "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
                      "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
                      "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1,
                      "mlp_only_layers": [], "vocab_size": 151936, "max_position_embeddings": 40960,
                      "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "attention_bias": False,
                      "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151645},
    "mixtral-8x7b": {**_LLAMA, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096,
                     "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000,
                     "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0,
                     "sliding_window": None, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2},
}
# `synthesize(..., tiny=True)`: the family's layer at test size (vocabulary and special ids kept;
# a mixture keeps its expert count and k, each expert 64 wide).
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "max_position_embeddings": 256}
TINY_EXPERT = 64

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3 = ("<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
TEMPLATES = Path(__file__).parent / "templates"   # the families' real chat templates
MISTRAL = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
           "{% else %}{{ m['content'] }}</s>{% endif %}{% endfor %}")
ZEPHYR = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")

# Special tokens at their real ids, and (bos, eos, chat template) as tokenizer_config.json names them.
SPECIALS = {
    "tinyllama-1.1b": ({0: "<unk>", 1: "<s>", 2: "</s>"}, ("<s>", "</s>", ZEPHYR)),
    "llama-3.2-1b": ({128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128006: "<|start_header_id|>",
                      128007: "<|end_header_id|>", 128008: "<|eom_id|>", 128009: "<|eot_id|>"},
                     ("<|begin_of_text|>", "<|eot_id|>", LLAMA3)),
    "qwen2.5-0.5b": ({151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>"},
                     (None, "<|im_end|>", CHATML)),
    "smollm2-135m": ({0: "<|endoftext|>", 1: "<|im_start|>", 2: "<|im_end|>"},
                     ("<|im_start|>", "<|im_end|>", CHATML)),
    "qwen3-0.6b": ({151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>", 151667: "<think>",
                    151668: "</think>"}, (None, "<|im_end|>", (TEMPLATES / "qwen3.jinja").read_text())),
    "gemma3-1b": ({0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 105: "<start_of_turn>", 106: "<end_of_turn>"},
                  ("<bos>", "<eos>", (TEMPLATES / "gemma3.jinja").read_text())),
    "smollm3-3b": ({128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128004: "<|finetune_right_pad_id|>",
                    128011: "<|im_start|>", 128012: "<|im_end|>"},
                   (None, "<|im_end|>", (TEMPLATES / "smollm3.jinja").read_text())),
    "qwen3-30b-a3b": ({151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>", 151667: "<think>",
                       151668: "</think>"}, (None, "<|im_end|>", (TEMPLATES / "qwen3.jinja").read_text())),
    "mixtral-8x7b": ({0: "<unk>", 1: "<s>", 2: "</s>"}, ("<s>", "</s>", MISTRAL)),
    "phi4-mini": ({199999: "<|endoftext|>", 200018: "<|endofprompt|>", 200019: "<|assistant|>", 200020: "<|end|>",
                   200021: "<|user|>", 200022: "<|system|>"},
                  (None, "<|endoftext|>", (TEMPLATES / "phi4.jinja").read_text())),
}
# generation_config.json of the families that ship several stop ids and sampling defaults
GENERATION = {
    "qwen3-0.6b": {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "do_sample": True, "temperature": 0.6,
                   "top_k": 20, "top_p": 0.95},
    "qwen3-30b-a3b": {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "do_sample": True, "temperature": 0.6,
                      "top_k": 20, "top_p": 0.95},
    "gemma3-1b": {"bos_token_id": 2, "eos_token_id": [1, 106], "do_sample": True, "top_k": 64, "top_p": 0.95},
    "phi4-mini": {"bos_token_id": 199999, "eos_token_id": [200020, 199999]},
}

TRAINING_TEXT = """Once upon a time, there was a little girl named Lily. She loved to play outside in the park.
One day, she saw a big red ball under a tree. "Can I play with you?" asked the small dog.
The sun was warm and the sky was blue. They ran and laughed until it was time to go home.
A Raspberry Pi cluster runs a language model: each node holds a block of transformer layers,
passes activations to the next node over MQTT, and the last node samples the next token.
Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000, punctuation . , ; : ! ? ' " ( ) [ ] { } - + * / = < >
"""


# torch_dtype -> (safetensors dtype, numpy storage); Hub checkpoints are mostly bfloat16
STORED = {"float32": ("F32", np.float32), "float16": ("F16", np.float16), "bfloat16": ("BF16", np.uint16)}


def synthesize(shape: str, out_dir: str | Path, *, seed: int = 0, dtype: str = "float32",
               layers: int | None = None, tiny: bool | dict = False) -> Path:
    """Write config.json, model.safetensors, tokenizer.json and tokenizer_config.json (and the
    family's generation_config.json) to out_dir. `tiny`: the layer at test size (TINY), with a
    4-position sliding window and an 8-position original context for longrope, so short tests
    cross both; a dict sets other test sizes."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    if dtype not in STORED:
        raise ValueError(f"dtype must be one of {', '.join(STORED)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = dict(SHAPES[shape], torch_dtype=dtype)
    if layers is not None:
        config["num_hidden_layers"] = layers
    if tiny:
        sizes = {**TINY, **(tiny if isinstance(tiny, dict) else {})}
        config.update(sizes)
        config["vocab_size"] = max(1024, max(SPECIALS[shape][0]) + 1)   # the special ids must still fit
        if config.get("sliding_window"):   # (Mixtral writes null: no window)
            config["sliding_window"], config["sliding_window_pattern"] = 4, 2
        if "query_pre_attn_scalar" in config:   # as the 1B and 4B have it: the head size
            config["query_pre_attn_scalar"] = sizes["head_dim"]
        if "original_max_position_embeddings" in config:
            half = int(sizes["head_dim"] * config["partial_rotary_factor"]) // 2
            config["original_max_position_embeddings"] = 8
            config["rope_scaling"] = {"type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(half)],
                                      "long_factor": [2.0 + i for i in range(half)]}
        if "no_rope_layer_interval" in config:
            config["no_rope_layer_interval"] = 2
        if "moe_intermediate_size" in config:
            config["moe_intermediate_size"] = TINY_EXPERT
        elif config["model_type"] == "mixtral":   # Mixtral's experts are intermediate_size wide
            config["intermediate_size"] = TINY_EXPERT
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if shape in GENERATION:
        (out / "generation_config.json").write_text(json.dumps(GENERATION[shape], indent=2))
    write_random_weights(config, out / "model.safetensors", seed=seed, dtype=dtype)
    write_tokenizer(shape, config["vocab_size"], out)
    return out


def tensor_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    h, inter = c["hidden_size"], c["intermediate_size"]
    head_dim = c.get("head_dim") or h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * head_dim, c["num_key_value_heads"] * head_dim
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], h)}
    experts = c.get("num_experts") or c.get("num_local_experts") or 0
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q)})
        if experts:   # every layer sparse (the two shapes here), named as Qwen-MoE checkpoints name them
            width = c.get("moe_intermediate_size") or inter
            mlp = [p + "mlp.gate.weight"] if c["model_type"] != "mixtral" else [p + "block_sparse_moe.gate.weight"]
            shapes[mlp[0]] = (experts, h)
            for e in range(experts):
                x = p + f"mlp.experts.{e}." if c["model_type"] != "mixtral" else p + f"block_sparse_moe.experts.{e}."
                names = ("gate_proj", "up_proj", "down_proj") if c["model_type"] != "mixtral" else ("w1", "w3", "w2")
                shapes.update({x + names[0] + ".weight": (width, h), x + names[1] + ".weight": (width, h),
                               x + names[2] + ".weight": (h, width)})
        else:
            shapes.update({p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                           p + "mlp.down_proj.weight": (h, inter)})
        if c["model_type"] == "qwen2":
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
        if c["model_type"] in ("qwen3", "qwen3_moe", "gemma3_text"):
            shapes.update({p + "self_attn.q_norm.weight": (head_dim,), p + "self_attn.k_norm.weight": (head_dim,)})
        if c["model_type"] == "gemma3_text":
            shapes.update({p + "pre_feedforward_layernorm.weight": (h,), p + "post_feedforward_layernorm.weight": (h,)})
        if c["model_type"] == "phi3":   # fused, as Phi-3 checkpoints store them
            for a, b, fused in (("q_proj", "v_proj", "self_attn.qkv_proj"), ("gate_proj", "up_proj", "mlp.gate_up_proj")):
                parts = [k for k in shapes if k.startswith(p) and k.split(".")[-2] in (a, "k_proj", b)
                         and k.split(".")[-3] == fused.split(".")[0]]
                rows = sum(shapes.pop(k)[0] for k in parts)
                shapes[p + fused + ".weight"] = (rows, h)
    shapes["model.norm.weight"] = (h,)
    if not c.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = (c["vocab_size"], h)
    return shapes


def write_random_weights(config: dict, path: Path, *, seed: int, dtype: str) -> None:
    """Stream a safetensors file tensor by tensor, so a full-size model never sits in memory."""
    stored, storage = STORED[dtype]
    shapes = tensor_shapes(config)
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = int(np.prod(shape)) * np.dtype(storage).itemsize
        header[name] = {"dtype": stored, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # keep the tensor data 8-byte aligned
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in shapes.items():
            if name.endswith("norm.weight"):
                t = 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
            else:
                t = 0.02 * rng.standard_normal(shape, dtype=np.float32)
            f.write((f32_to_bf16(t) if dtype == "bfloat16" else t.astype(storage)).tobytes())


def write_tokenizer(shape: str, vocab_size: int, out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials, (bos, eos, template) = SPECIALS[shape]
    low = [specials[i] for i in sorted(specials) if i < 16]  # ids 0, 1, 2...: trained in first
    assert [i for i in sorted(specials) if i < 16] == list(range(len(low)))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(vocab_size, 1024), special_tokens=low, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TRAINING_TEXT.splitlines(), trainer)
    if bos is not None:  # like Llama's tokenizers: encode() starts with BOS
        bos_id = next(i for i, t in specials.items() if t == bos)
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, bos_id)])

    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    for i, special in specials.items():   # a special inside the trained ids (Gemma's 105, 106): it takes the
        if 16 <= i < len(by_id):          # id, the token that held it moves to the end
            vocab[by_id[i]] = len(vocab)
            vocab[special] = i
    for i in range(len(vocab), vocab_size):  # pad to the config's vocab, specials at their real ids
        vocab[specials.get(i, f"<|reserved_{i}|>")] = i
    data["added_tokens"] = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True} for i, t in sorted(specials.items())]
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": bos, "eos_token": eos, "chat_template": template, "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": SHAPES[shape]["max_position_embeddings"], "add_bos_token": bos is not None,
    }, indent=2))
