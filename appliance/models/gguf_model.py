"""GGUF files (llama.cpp's format, what Ollama and LM Studio hold) as a model, read with the
`gguf` package, llama.cpp's own reader.

A GGUF model is a file (or split files `NAME-00001-of-0000N.gguf`) holding metadata, a tokenizer
and tensors. Here it becomes what the rest of the appliance knows: `config_dict` the config.json
a Hugging Face checkpoint would have; `tensor_names` and `load` its tensors under Hugging Face
names, memory-mapped (a node touches only its own layers' pages); `tokenizer` a `tokenizers`
tokenizer built from the GGUF vocabulary ("gpt2" BPE or "llama" SentencePiece).

Weight types: F32, F16 and BF16 come back as arrays over the file; quantized ones (Q8_0, Q4_0,
Q4_K, Q5_K, Q6_K, ...) as `Blocks`, their raw blocks over the file, which `weights.as_float32`
dequantizes (the whole tensor, or only the embedding rows a lookup reads). llama.cpp's
conventions are undone here: the llama architecture's q/k rows are permuted for its rope, and
Gemma's norms are stored as 1 + w.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np

SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")
MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text", "phi3": "phi3",
               "qwen3moe": "qwen3_moe"}

# GGUF tensor name (after "blk.N.") -> Hugging Face name (after "model.layers.N.")
LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_qkv": "self_attn.qkv_proj",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    # a mixture of experts: the router, and every expert's matrix stacked in one [experts, rows, cols]
    # tensor (weights.load_shard gives each expert its own view under its Hugging Face name)
    "ffn_gate_inp": "mlp.gate", "ffn_gate_exps": "mlp.experts.gate_proj", "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
}
GEMMA3_NAMES = {"ffn_norm": "pre_feedforward_layernorm", "post_attention_norm": "post_attention_layernorm",
                "post_ffw_norm": "post_feedforward_layernorm"}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def is_gguf(path) -> bool:
    return str(path).endswith(".gguf")


def find_gguf(folder: Path) -> Path | None:
    """The GGUF model in a folder: its one file, or the first of its splits."""
    files = sorted(f for f in Path(folder).glob("*.gguf") if "mmproj" not in f.name)
    firsts = [f for f in files if not SPLIT.search(f.name) or SPLIT.search(f.name).group(1) == "00001"]
    if len(firsts) > 1:
        raise FileNotFoundError(f"{folder} holds several GGUF models ({', '.join(f.name for f in firsts)}): name one")
    return firsts[0] if firsts else None


def gguf_files(path: Path) -> list[Path]:
    """A GGUF model's files: the file itself, or every split of a split model."""
    path = Path(path)
    m = SPLIT.search(path.name)
    if not m:
        return [path]
    stem = path.name[:m.start()]
    files = [path.with_name(f"{stem}-{i:05d}-of-{m.group(2)}.gguf") for i in range(1, int(m.group(2)) + 1)]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(f"split GGUF model {path.name}: missing {', '.join(missing)}")
    return files


@functools.lru_cache(maxsize=8)
def _readers(files: tuple[tuple[str, int, int], ...]):
    """The files' readers (their headers parsed once), keyed by each file's name, size and mtime."""
    from gguf import GGUFReader

    return tuple(GGUFReader(name) for name, _, _ in files)


class GGUF:
    """The metadata and tensors of one GGUF model (all its splits)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.readers = _readers(tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in gguf_files(self.path)))
        self.fields = self.readers[0].fields
        self.tensors = {t.name: t for r in self.readers for t in r.tensors}
        self.arch = self.get("general.architecture")
        if self.arch not in MODEL_TYPES:
            raise ValueError(f"GGUF architecture {self.arch!r} is not supported (supported: {sorted(MODEL_TYPES)})")

    def get(self, key: str, default=None):
        field = self.fields.get(key)
        return default if field is None else field.contents()

    def arch_get(self, key: str, default=None):
        return self.get(f"{self.arch}.{key}", default)

    def floats(self, name: str) -> list[float]:
        return [float(x) for x in np.asarray(self.tensors[name].data, np.float32).reshape(-1)]

    # ---- config ----
    def config_dict(self) -> dict:
        """The config.json a Hugging Face checkpoint of this model would have."""
        heads = self.arch_get("attention.head_count")
        hidden = self.arch_get("embedding_length")
        head_dim = self.arch_get("attention.key_length") or hidden // heads
        eos = [self.get(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
               if self.get(k) is not None]
        c = {
            "model_type": MODEL_TYPES[self.arch], "hidden_size": hidden,
            "intermediate_size": self.arch_get("feed_forward_length"),
            "num_hidden_layers": self.arch_get("block_count"), "num_attention_heads": heads,
            "num_key_value_heads": self.arch_get("attention.head_count_kv") or heads, "head_dim": head_dim,
            "vocab_size": self.arch_get("vocab_size") or len(self.fields["tokenizer.ggml.tokens"].data),
            "rms_norm_eps": self.arch_get("attention.layer_norm_rms_epsilon", 1e-6),
            "rope_theta": self.arch_get("rope.freq_base", 10000.0),
            "max_position_embeddings": self.arch_get("context_length", 2048),
            "tie_word_embeddings": "output.weight" not in self.tensors,
            "attention_bias": "blk.0.attn_q.bias" in self.tensors,
            "torch_dtype": {0: "float32", 1: "float16", 32: "bfloat16"}.get(self.get("general.file_type"), "float16"),
            "bos_token_id": self.get("tokenizer.ggml.bos_token_id"), "eos_token_id": list(dict.fromkeys(eos)),
        }
        if self.arch_get("expert_count"):   # llama.cpp renormalises qwen3moe's top k (as Qwen3-30B-A3B's norm_topk_prob)
            c.update(num_experts=self.arch_get("expert_count"), num_experts_per_tok=self.arch_get("expert_used_count"),
                     moe_intermediate_size=self.arch_get("expert_feed_forward_length") or c["intermediate_size"],
                     norm_topk_prob=bool(self.arch_get("expert_weights_norm", True)))
            if self.arch == "llama":   # Mixtral is written as a llama with experts
                c["model_type"] = "mixtral"
        scaling = self.arch_get("rope.scaling.type")
        if scaling == "linear":
            c["rope_scaling"] = {"rope_type": "linear", "factor": self.arch_get("rope.scaling.factor")}
        elif scaling not in (None, "none"):
            raise ValueError(f"GGUF rope scaling {scaling!r} is not supported")
        if "rope_freqs.weight" in self.tensors:   # llama.cpp's form of Llama 3's rope scaling
            c["rope_scaling"] = {"rope_type": "freq_factors", "factors": self.floats("rope_freqs.weight")}
        if self.arch == "gemma3":   # queries scaled by 1/sqrt(head_dim), as llama.cpp does for 1B to 12B
            c.update(hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=head_dim,
                     sliding_window=self.arch_get("attention.sliding_window"),
                     sliding_window_pattern=self.arch_get("attention.sliding_window_pattern", 6),
                     rope_local_base_freq=self.arch_get("rope.freq_base_swa", 10000.0),
                     final_logit_softcapping=self.arch_get("final_logit_softcapping"))
        if self.arch == "phi3":
            rotary = self.arch_get("rope.dimension_count", head_dim)
            c.update(partial_rotary_factor=rotary / head_dim, sliding_window=self.arch_get("attention.sliding_window"))
            if "rope_factors_long.weight" in self.tensors:
                original = self.arch_get("rope.scaling.original_context_length")
                c["original_max_position_embeddings"] = original
                c["rope_scaling"] = {"rope_type": "longrope", "original_max_position_embeddings": original,
                                     "short_factor": self.floats("rope_factors_short.weight"),
                                     "long_factor": self.floats("rope_factors_long.weight")}
                if self.arch_get("rope.scaling.attn_factor") is not None:
                    c["rope_scaling"]["attention_factor"] = self.arch_get("rope.scaling.attn_factor")
        return c

    # ---- tensors ----
    def hf_name(self, name: str) -> str | None:
        """A GGUF tensor's Hugging Face name (None: not a weight, e.g. rope factors)."""
        parts = name.split(".")
        if parts[0] == "blk":
            table = {**LAYER_NAMES, **GEMMA3_NAMES} if self.arch == "gemma3" else LAYER_NAMES
            base = table.get(parts[2])
            if base == "mlp.up_proj" and self.arch == "phi3":
                base = "mlp.gate_up_proj"   # Phi-3's fused gate and up: ffn_up holds both
            return None if base is None else f"model.layers.{parts[1]}.{base}.{parts[-1]}"
        base = TOP_NAMES.get(parts[0])
        return None if base is None else f"{base}.{parts[-1]}"

    def tensor_names(self) -> dict[str, str]:
        """Hugging Face name -> GGUF name, for every weight."""
        return {hf: name for name in self.tensors if (hf := self.hf_name(name)) is not None}

    def load(self, names: list[str]) -> dict[str, np.ndarray]:
        """The named tensors (Hugging Face names), over the memory-mapped file."""
        by_hf = self.tensor_names()
        out = {}
        for name in names:
            t = self.tensors[by_hf[name]]
            data = t.data
            if t.tensor_type.name == "BF16":
                from appliance.models.weights import _BF16
                data = _BF16(data.view(np.uint16))
            elif data.dtype == np.uint8:   # quantized blocks
                data = Blocks(data, t.tensor_type)
            if self.arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
                heads = self.arch_get("attention.head_count" if "q_proj" in name else "attention.head_count_kv")
                data = permute_rows(data, heads, undo=True)
            out[name] = data
        return out

    # ---- tokenizer ----
    def tokenizer_config(self) -> dict:
        tokens = self.fields["tokenizer.ggml.tokens"].contents()
        token = lambda key: tokens[self.get(key)] if self.get(key) is not None else None  # noqa: E731
        return {"bos_token": token("tokenizer.ggml.bos_token_id") if self.get("tokenizer.ggml.add_bos_token", True)
                else None,
                "eos_token": token("tokenizer.ggml.eos_token_id"), "chat_template": self.get("tokenizer.chat_template")}

    def tokenizer(self):
        from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

        kind = self.get("tokenizer.ggml.model")
        tokens = self.fields["tokenizer.ggml.tokens"].contents()
        types = self.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        vocab = {t: i for i, t in enumerate(tokens)}
        if kind == "gpt2":
            merges = [tuple(m.split(" ", 1)) for m in self.get("tokenizer.ggml.merges")]
            tok = Tokenizer(models.BPE(vocab, merges, ignore_merges=self.get("tokenizer.ggml.pre") in IGNORE_MERGES))
            regex = PRE_TOKENIZERS.get(self.get("tokenizer.ggml.pre"))
            if regex:
                tok.pre_tokenizer = pre_tokenizers.Sequence([
                    pre_tokenizers.Split(Regex(regex), "isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
            else:
                tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
        elif kind == "llama":   # SentencePiece BPE: merges ranked by the merged piece's score
            scores = self.get("tokenizer.ggml.scores")
            tok = Tokenizer(models.BPE(vocab, sentencepiece_merges(vocab, scores), byte_fallback=True,
                                       unk_token=tokens[self.get("tokenizer.ggml.unknown_token_id", 0)], fuse_unk=True))
            prefix = self.get("tokenizer.ggml.add_space_prefix", self.arch != "gemma3")
            tok.normalizer = normalizers.Sequence(([normalizers.Prepend("▁")] if prefix else [])
                                                  + [normalizers.Replace(" ", "▁")])
            tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                            + ([decoders.Strip(" ", 1, 0)] if prefix else []))
        else:
            raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (gpt2, llama)")
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, kind_ in zip(tokens, types) if kind_ in (3, 4)])   # control, user-defined
        bos = self.tokenizer_config()["bos_token"]
        if bos is not None:
            tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
        return tok


def Regex(pattern: str):
    from tokenizers import Regex as R
    return R(pattern)


# tokenizer.ggml.pre -> the pre-tokenizer's split pattern (the families in the catalog)
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {"llama-bpe": _LLAMA3, "llama3": _LLAMA3, "smaug-bpe": _LLAMA3,
                  "qwen2": _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")}
IGNORE_MERGES = {"llama-bpe", "llama3", "smaug-bpe"}


def sentencepiece_merges(vocab: dict[str, int], scores) -> list[tuple[str, str]]:
    """The merges of a SentencePiece BPE vocabulary: every split of a piece into two pieces,
    ranked by the merged piece's score (as transformers converts one)."""
    merges = []
    for piece, i in vocab.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                merges.append((-scores[i], vocab[left], vocab[right], left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


def permute_rows(w: np.ndarray, heads: int, undo: bool = False) -> np.ndarray:
    """llama.cpp's q/k row permutation for the llama architecture (its rope pairs dims (2i, 2i+1),
    Hugging Face's (i, i + D/2)), or with `undo` its inverse. Rows move whole, so quantized blocks
    move as they are."""
    half = w.shape[0] // heads // 2
    split = (heads, half, 2) if undo else (heads, 2, half)
    out = np.ascontiguousarray(np.asarray(w).reshape(*split, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))
    return Blocks(out, w.qtype) if isinstance(w, Blocks) else out.view(type(w))


class Blocks(np.ndarray):
    """A quantized tensor's raw blocks [rows, bytes per row], knowing its GGML type; indexing rows
    keeps the type, `weights.as_float32` dequantizes."""

    def __new__(cls, raw: np.ndarray, qtype):
        obj = np.asarray(raw).view(cls)
        obj.qtype = qtype
        return obj

    def __array_finalize__(self, obj):
        self.qtype = getattr(obj, "qtype", None)

    def dequantize(self) -> np.ndarray:
        from gguf.quants import dequantize

        return dequantize(np.asarray(self).view(np.uint8), self.qtype).astype(np.float32, copy=False)
