"""Write a GGUF file from a safetensors model folder with the `gguf` package, the way llama.cpp's
convert_hf_to_gguf.py lays one out (its names, llama's q/k row permutation, Gemma's 1 + w norms,
Phi-3's fused tensors and rope factors), so the tests read files like the ones people download.

gguf-py quantizes Q8_0 and Q4_0 (and BF16) but has no K-quant quantizer: Q4_K, Q5_K and Q6_K
tensors get random blocks with sane scales. `dequantized_copy` writes what a GGUF file holds
back out as a float32 safetensors folder, the reference a GGUF model must match exactly.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, quants

from appliance.engines.rope import inv_freq
from appliance.models.config import ModelConfig
from appliance.models.gguf_model import GEMMA3_NAMES, LAYER_NAMES, TOP_NAMES, permute_rows
from appliance.models.weights import as_float32, canonical_name, load_tensors, weight_map

ARCHES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3", "phi3": "phi3",
          "qwen3_moe": "qwen3moe", "mixtral": "llama"}
EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
K_QUANTS = {"Q4_K": 0, "Q5_K": 0, "Q6_K": 208}   # where the block's f16 scale d sits


def gguf_name(hf: str, arch: str) -> str:
    table = {**LAYER_NAMES, **GEMMA3_NAMES} if arch == "gemma3" else dict(LAYER_NAMES)
    if arch == "phi3":
        table["ffn_up"] = "mlp.gate_up_proj"
    parts = hf.split(".")
    if parts[0] == "model" and parts[1] == "layers":
        base = ".".join(parts[3:-1])
        return f"blk.{parts[2]}.{next(g for g, h in table.items() if h == base)}.{parts[-1]}"
    base = ".".join(parts[:-1])
    return f"{next(g for g, h in TOP_NAMES.items() if h == base)}.{parts[-1]}"


def random_blocks(shape: tuple[int, int], qtype: GGMLQuantizationType, rng) -> np.ndarray:
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (shape[0], shape[1] // block, size), dtype=np.uint8)
    at = K_QUANTS[qtype.name]
    raw[..., at:at + 2] = np.frombuffer(np.float16(1e-4).tobytes(), np.uint8)   # d
    if qtype.name != "Q6_K":
        raw[..., 2:4] = np.frombuffer(np.float16(5e-5).tobytes(), np.uint8)     # dmin
    return raw.reshape(shape[0], -1)


def write_gguf(model_dir: Path, path: Path, qtype: str = "F32", split_max_tensors: int = 0, seed: int = 0) -> Path:
    """model_dir's model as a GGUF file; 2-D weights stored as `qtype`, norms as F32. With
    `split_max_tensors`, split files NAME-0000i-of-0000N.gguf; returns the first."""
    model_dir, path = Path(model_dir), Path(path)
    c, raw_config = ModelConfig.load(model_dir), json.loads((model_dir / "config.json").read_text())
    arch, rng = ARCHES[c.model_type], np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = GGUFWriter(path, arch, split_max_tensors=split_max_tensors)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_heads)
    w.add_head_count_kv(c.num_kv_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    w.add_file_type(0 if qtype == "F32" else 1)
    if c.sliding_window:
        w.add_sliding_window(c.sliding_window)
    if (c.rope_scaling or {}).get("rope_type") == "llama3":   # llama.cpp's rope_freqs: a factor per frequency
        rope = c.rope(0)
        plain = inv_freq(dataclasses.replace(rope, scaling=None))
        w.add_tensor("rope_freqs.weight", (plain / inv_freq(rope)).astype(np.float32))
    if arch == "gemma3":
        w.add_rope_freq_base_swa(c.local_rope_theta)
        w.add_uint32("gemma3.attention.sliding_window_pattern", raw_config.get("sliding_window_pattern", 6))
    if arch == "phi3":
        rope = c.rope(0)
        w.add_rope_dimension_count(rope.rotary_dim)
        w.add_rope_scaling_orig_ctx_len(rope.scaling["original_max_position_embeddings"])
        w.add_tensor("rope_factors_long.weight", np.asarray(rope.scaling["long_factor"], np.float32))
        w.add_tensor("rope_factors_short.weight", np.asarray(rope.scaling["short_factor"], np.float32))
    if c.num_experts:
        w.add_expert_count(c.num_experts)
        w.add_expert_used_count(c.experts_per_token)
        w.add_expert_feed_forward_length(c.moe_intermediate_size)
    _add_tokenizer(w, model_dir, c)
    names = list(weight_map(model_dir))
    for name, t in stack_experts(load_tensors(model_dir, names)).items():
        t = as_float32(t)
        if name.endswith("norm.weight"):
            t = t + np.float32(c.norm_offset)   # llama.cpp stores Gemma's norms as 1 + w
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            t = permute_rows(t, c.num_heads if "q_proj" in name else c.num_kv_heads)
        if t.ndim == 1 or qtype == "F32":
            w.add_tensor(gguf_name(name, arch), np.ascontiguousarray(t, np.float32))
        elif qtype == "F16":
            w.add_tensor(gguf_name(name, arch), t.astype(np.float16))
        else:
            q = GGMLQuantizationType[qtype]
            data = random_blocks(t.shape, q, rng) if qtype in K_QUANTS else quants.quantize(t, q)
            w.add_tensor(gguf_name(name, arch), data, raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if split_max_tensors:
        return next(path.parent.glob(path.stem + "-00001-of-*.gguf"))
    return path


def stack_experts(tensors: dict) -> dict:
    """Each layer's experts as llama.cpp stores them: one [experts, rows, cols] tensor per matrix."""
    out, experts = {}, {}
    for name, t in tensors.items():
        name = canonical_name(name)   # Mixtral's block_sparse_moe.experts.E.w1 -> mlp.experts.E.gate_proj
        if match := EXPERT.match(name):
            layer, e, kind = match.groups()
            experts.setdefault(f"model.layers.{layer}.mlp.experts.{kind}_proj.weight", {})[int(e)] = as_float32(t)
        else:
            out[name] = t
    return {**out, **{name: np.stack([parts[e] for e in sorted(parts)]) for name, parts in experts.items()}}


def _add_tokenizer(w: GGUFWriter, model_dir: Path, c: ModelConfig) -> None:
    """The folder's byte-level BPE tokenizer (synth's) as a "gpt2" GGUF vocabulary."""
    data = json.loads((model_dir / "tokenizer.json").read_text())
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    vocab = data["model"]["vocab"]
    tokens = [None] * len(vocab)
    for token, i in vocab.items():
        tokens[i] = token
    specials = {t["id"] for t in data["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in specials else 1 for i in range(len(tokens))])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]])
    if c.bos_token_id is not None:
        w.add_bos_token_id(c.bos_token_id)
    w.add_add_bos_token(bool(config.get("bos_token")))
    w.add_eos_token_id(vocab[config["eos_token"]])
    others = [i for i in c.eos_token_ids if i != vocab[config["eos_token"]]]
    if others:   # Gemma's <end_of_turn>: llama.cpp's end-of-turn id
        w.add_eot_token_id(others[0])
    w.add_chat_template(config["chat_template"])


def dequantized_copy(gguf_path: Path, model_dir: Path, out: Path) -> Path:
    """A float32 safetensors folder holding exactly the values the GGUF file holds (norms back
    to w), with model_dir's config and tokenizer."""
    from safetensors.numpy import save_file

    from appliance.models.gguf_model import GGUF

    out.mkdir(parents=True, exist_ok=True)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / f, out / f)
    config = json.loads((out / "config.json").read_text())
    config["torch_dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config))
    c, g = ModelConfig.load(out), GGUF(gguf_path)
    tensors = {}
    for name, t in g.load(list(g.tensor_names())).items():
        t = as_float32(t)
        tensors[name] = np.ascontiguousarray(t - np.float32(c.norm_offset) if name.endswith("norm.weight") else t)
    save_file(tensors, str(out / "model.safetensors"))
    return out
