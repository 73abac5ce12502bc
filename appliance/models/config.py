"""The shape of a model, read from a Hugging Face `config.json`."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED = {"llama", "mistral", "qwen2"}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def _ids(value) -> tuple[int, ...]:
    """An id, a list of ids or None (as config files write eos_token_id) -> a tuple of ids."""
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (value,)


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool                 # q/k/v projections carry a bias (Qwen2)
    rope_scaling: dict | None = None     # e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    sliding_window: int | None = None    # Mistral v0.1: attend to at most this many positions
    torch_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    @classmethod
    def from_dict(cls, c: dict) -> "ModelConfig":
        model_type = c.get("model_type", "llama")
        if model_type not in SUPPORTED:
            raise ValueError(f"model_type {model_type!r} is not supported (supported: {sorted(SUPPORTED)})")
        if model_type == "qwen2" and c.get("use_sliding_window"):
            raise ValueError("Qwen2 with use_sliding_window is not supported")
        heads = c["num_attention_heads"]
        # transformers 5 writes `rope_parameters` (theta inside); older configs `rope_theta` + `rope_scaling`.
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        if scaling.get("rope_type", scaling.get("type")) in (None, "default"):
            scaling = None
        return cls(
            model_type=model_type,
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_layers=c["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            vocab_size=c["vocab_size"],
            rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta") or c.get("rope_theta", 10000.0),
            max_position_embeddings=c.get("max_position_embeddings", 2048),
            tie_word_embeddings=c.get("tie_word_embeddings", False),
            attention_bias=c.get("attention_bias", model_type == "qwen2"),
            rope_scaling=scaling,
            sliding_window=c.get("sliding_window") if model_type == "mistral" else None,
            torch_dtype=c.get("torch_dtype") or c.get("dtype") or "float32",
            bos_token_id=c.get("bos_token_id"),
            eos_token_ids=_ids(c.get("eos_token_id")),
        )

    @classmethod
    def load(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"{model_dir} has no config.json: not a Hugging Face model folder")
        return cls.from_dict(json.loads(path.read_text()))

    # Sizes, for the planner: weights are counted at their stored dtype.
    @property
    def bytes_per_param(self) -> int:
        return DTYPE_BYTES.get(self.torch_dtype, 4)

    @property
    def layer_params(self) -> int:
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        attention = h * self.num_heads * self.head_dim * 2 + h * kv * 2
        bias = self.num_heads * self.head_dim + 2 * kv if self.attention_bias else 0
        mlp = 3 * h * self.intermediate_size
        return attention + bias + mlp + 2 * h

    @property
    def layer_bytes(self) -> int:
        return self.layer_params * self.bytes_per_param

    @property
    def embedding_bytes(self) -> int:
        return self.vocab_size * self.hidden_size * self.bytes_per_param

    @property
    def total_bytes(self) -> int:
        head = 0 if self.tie_word_embeddings else self.embedding_bytes
        final_norm = self.hidden_size * self.bytes_per_param
        return self.num_layers * self.layer_bytes + self.embedding_bytes + head + final_norm


@dataclass(frozen=True)
class GenerationDefaults:
    """What `generation_config.json` asks for, as the coordinator uses it; a request overrides it."""
    eos_token_ids: tuple[int, ...] = ()
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                       # 0: no top-k cut
    do_sample: bool = False              # False: greedy, as transformers does without the file


def generation_defaults(model_dir: str | Path) -> GenerationDefaults:
    """Stop ids and sampling defaults: generation_config.json, else config.json's eos ids."""
    model_dir = Path(model_dir)
    path = model_dir / "generation_config.json"
    g = json.loads(path.read_text()) if path.exists() else {}
    eos = _ids(g.get("eos_token_id")) or ModelConfig.load(model_dir).eos_token_ids
    return GenerationDefaults(
        eos_token_ids=eos,
        temperature=g.get("temperature", 1.0),
        top_p=g.get("top_p", 1.0),
        top_k=g.get("top_k", 0) or 0,
        do_sample=g.get("do_sample", False),
    )
