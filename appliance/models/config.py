"""The shape of a model, read from a Hugging Face `config.json`."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED = {"llama", "mistral", "qwen2", "qwen3", "smollm3", "gemma3_text", "phi3", "qwen3_moe", "qwen2_moe", "mixtral"}
# Mixture-of-experts families -> the dense family whose attention they share.
MOE_BASE = {"qwen3_moe": "qwen3", "qwen2_moe": "qwen2", "mixtral": "mistral"}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def _ids(value) -> tuple[int, ...]:
    """An id, a list of ids or None (as config files write eos_token_id) -> a tuple of ids."""
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (value,)


@dataclass(frozen=True)
class Rope:
    """One rotary embedding: its base, its scaling (None: plain) and how many of a head's dims it turns."""
    theta: float
    scaling: dict | None
    rotary_dim: int

    def __hash__(self):   # engines keep one table per distinct rope
        return hash((self.theta, json.dumps(self.scaling, sort_keys=True), self.rotary_dim))


def _rope(values: dict) -> tuple[float | None, dict | None]:
    """A rope dict as configs write it (`rope_parameters` or `rope_scaling`) -> (theta, scaling or None)."""
    scaling = {k: v for k, v in (values or {}).items() if k != "rope_theta"}
    if scaling.get("rope_type", scaling.get("type")) in (None, "default"):
        scaling = None
    return (values or {}).get("rope_theta"), scaling


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer, described by flags the engines all read (one description, three
    engines): the Llama layer is the default, and each family turns on what it adds."""
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
    sliding_window: int | None = None    # attend to at most this many positions (on sliding layers)
    torch_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    qk_norm: bool = False                # RMSNorm over each head of q and k before rope (Qwen3, Gemma 3)
    norm_offset: float = 0.0             # norms scale by offset + w (Gemma: 1 + w)
    sandwich_norms: bool = False         # norms after attention and after the MLP too (Gemma 3)
    activation: str = "silu"             # the MLP's gate: "silu" or "gelu_tanh" (Gemma's GeGLU)
    embedding_scale: float = 1.0         # embeddings are multiplied by this (Gemma: sqrt(hidden))
    query_scale: float | None = None     # attention scores' scale; None: 1/sqrt(head_dim)
    final_logit_softcapping: float | None = None   # logits = cap * tanh(logits / cap)
    partial_rotary_factor: float = 1.0   # rope turns this share of each head's dims (Phi-4-mini 0.75)
    sliding_layers: tuple[bool, ...] = ()   # per layer: the sliding window applies (empty: all layers)
    rope_layers: tuple[bool, ...] = ()      # per layer: rope applies (SmolLM3's no-rope layers; empty: all)
    local_rope_theta: float | None = None   # sliding layers' own rope base (Gemma 3), unscaled
    # Mixture of experts (Qwen3-MoE, Qwen2-MoE, Mixtral): a sparse layer's MLP is `num_experts`
    # MLPs of `moe_intermediate_size`, of which a router picks `experts_per_token` per token.
    num_experts: int = 0                 # 0: a dense model
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True          # the chosen experts' softmax weights renormalised to sum 1
    sparse_layers: tuple[bool, ...] = ()  # per layer: its MLP is the experts (decoder_sparse_step, mlp_only_layers)
    shared_expert_size: int = 0          # Qwen2-MoE: one more MLP every token runs, gated by a sigmoid

    @classmethod
    def from_dict(cls, c: dict) -> "ModelConfig":
        if "text_config" in c:   # a multimodal checkpoint (Gemma 3 4B+): its text tower
            c = {**c["text_config"], **{k: c[k] for k in ("tie_word_embeddings", "eos_token_id", "bos_token_id",
                                                            "torch_dtype", "dtype") if k in c}}
            c.setdefault("model_type", "gemma3_text")
        model_type = {"gemma3": "gemma3_text"}.get(c.get("model_type", "llama"), c.get("model_type", "llama"))
        if model_type not in SUPPORTED:
            raise ValueError(f"model_type {model_type!r} is not supported (supported: {sorted(SUPPORTED)})")
        family = MOE_BASE.get(model_type, model_type)   # the attention's family
        if family in ("qwen2", "qwen3") and c.get("use_sliding_window"):
            raise ValueError(f"{model_type} with use_sliding_window is not supported")
        if c.get("attn_logit_softcapping"):
            raise ValueError("attention logit soft-capping (Gemma 2) is not supported")
        heads, layers = c["num_attention_heads"], c["num_hidden_layers"]
        head_dim = c.get("head_dim") or c["hidden_size"] // heads
        gemma = model_type == "gemma3_text"
        # transformers 5 writes `rope_parameters` (theta inside; Gemma 3: one per layer type);
        # older configs `rope_theta` + `rope_scaling` (+ Gemma 3's `rope_local_base_freq`).
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        local_theta = c.get("rope_local_base_freq")
        if "full_attention" in rope:
            local_theta = (rope.get("sliding_attention") or {}).get("rope_theta", local_theta)
            rope = rope["full_attention"]
        theta, scaling = _rope(rope)
        partial = c.get("partial_rotary_factor") or rope.get("partial_rotary_factor") or 1.0
        if scaling:
            scaling = {k: v for k, v in scaling.items() if k != "partial_rotary_factor"}
            if scaling.get("rope_type", scaling.get("type")) == "longrope":   # Phi-3.5 / Phi-4-mini
                original = scaling.get("original_max_position_embeddings") or c["original_max_position_embeddings"]
                scaling = {"factor": c.get("max_position_embeddings", original) / original, **scaling,
                           "rope_type": "longrope", "original_max_position_embeddings": original}
        types = c.get("layer_types")
        if gemma and not types:
            pattern = c.get("sliding_window_pattern", 6)
            types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)]
        sliding = tuple(t == "sliding_attention" for t in types) if gemma else ()
        window = c.get("sliding_window") if family in ("mistral", "phi3") or gemma else None
        if model_type == "smollm3":
            rope_layers = tuple(bool(x) for x in c.get("no_rope_layers") or
                                [(i + 1) % c.get("no_rope_layer_interval", 4) != 0 for i in range(layers)])
        else:
            rope_layers = ()
        return cls(
            model_type=model_type,
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            vocab_size=c["vocab_size"],
            rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=theta or c.get("rope_theta", 10000.0),
            max_position_embeddings=c.get("max_position_embeddings", 2048),
            tie_word_embeddings=c.get("tie_word_embeddings", gemma),
            attention_bias=c.get("attention_bias", c.get("qkv_bias", family == "qwen2")),
            rope_scaling=scaling,
            sliding_window=window,
            torch_dtype=c.get("torch_dtype") or c.get("dtype") or "float32",
            bos_token_id=c.get("bos_token_id"),
            eos_token_ids=_ids(c.get("eos_token_id")),
            qk_norm=family in ("qwen3", "gemma3_text"),
            norm_offset=1.0 if gemma else 0.0,
            sandwich_norms=gemma,
            activation=_activation(c.get("hidden_activation") or c.get("hidden_act") or "silu"),
            embedding_scale=c["hidden_size"] ** 0.5 if gemma else 1.0,
            query_scale=c["query_pre_attn_scalar"] ** -0.5 if gemma else None,
            final_logit_softcapping=c.get("final_logit_softcapping"),
            partial_rotary_factor=partial,
            sliding_layers=sliding,
            rope_layers=rope_layers,
            local_rope_theta=local_theta if gemma else None,
            **_experts(c, model_type, layers),
        )

    # Per layer: what the shared description says each layer does.
    def window(self, layer: int) -> int | None:
        """The layer's sliding window (positions a query sees, itself included), None: all."""
        if self.sliding_layers and not self.sliding_layers[layer]:
            return None
        return self.sliding_window

    def rope(self, layer: int) -> Rope | None:
        """The layer's rotary embedding, None where the layer has none (SmolLM3)."""
        if self.rope_layers and not self.rope_layers[layer]:
            return None
        rotary_dim = int(self.head_dim * self.partial_rotary_factor)
        if self.local_rope_theta and self.window(layer):
            return Rope(self.local_rope_theta, None, rotary_dim)
        return Rope(self.rope_theta, self.rope_scaling, rotary_dim)

    def is_sparse(self, layer: int) -> bool:
        """The layer's MLP is a mixture of experts."""
        return bool(self.sparse_layers) and self.sparse_layers[layer]

    @property
    def attention_scale(self) -> float:
        return self.query_scale if self.query_scale is not None else self.head_dim ** -0.5

    @classmethod
    def load(cls, model_dir: str | Path) -> "ModelConfig":
        if str(model_dir).endswith(".gguf"):   # a GGUF file: its metadata says what config.json would
            from appliance.models.gguf_model import GGUF
            return cls.from_dict(GGUF(model_dir).config_dict())
        path = Path(model_dir) / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"{model_dir} has no config.json: not a Hugging Face model folder")
        return cls.from_dict(json.loads(path.read_text()))

    # Sizes, for the planner: weights are counted at their stored dtype.
    @property
    def bytes_per_param(self) -> int:
        return DTYPE_BYTES.get(self.torch_dtype, 4)

    def mlp_params(self, layer: int, active: bool = False) -> int:
        """The layer's MLP: dense, or every expert (`active`: the k a token runs) with the router
        and the shared expert and its gate."""
        h = self.hidden_size
        if not self.is_sparse(layer):
            return 3 * h * self.intermediate_size
        experts = self.experts_per_token if active else self.num_experts
        shared = 3 * h * self.shared_expert_size + h if self.shared_expert_size else 0
        return experts * 3 * h * self.moe_intermediate_size + self.num_experts * h + shared

    def params_of_layer(self, layer: int, active: bool = False) -> int:
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        attention = h * self.num_heads * self.head_dim * 2 + h * kv * 2
        bias = self.num_heads * self.head_dim + 2 * kv if self.attention_bias else 0
        norms = (4 if self.sandwich_norms else 2) * h + (2 * self.head_dim if self.qk_norm else 0)
        return attention + bias + self.mlp_params(layer, active) + norms

    @property
    def layer_params(self) -> int:
        """The largest layer (a model mixing sparse and dense layers is planned by its larger kind)."""
        return max(self.params_of_layer(i) for i in self._layer_kinds())

    @property
    def active_layer_params(self) -> int:
        """What one token reads of the largest layer: a sparse layer's router and k chosen experts."""
        return max(self.params_of_layer(i, active=True) for i in self._layer_kinds())

    def _layer_kinds(self) -> list[int]:
        """One layer of each kind (sparse, dense) the model has."""
        kinds = {self.is_sparse(i): i for i in range(self.num_layers)}
        return list(kinds.values()) or [0]

    @property
    def layer_bytes(self) -> int:
        return self.layer_params * self.bytes_per_param

    @property
    def active_layer_bytes(self) -> int:
        return self.active_layer_params * self.bytes_per_param

    @property
    def embedding_bytes(self) -> int:
        return self.vocab_size * self.hidden_size * self.bytes_per_param

    @property
    def total_bytes(self) -> int:
        head = 0 if self.tie_word_embeddings else self.embedding_bytes
        final_norm = self.hidden_size * self.bytes_per_param
        layers = sum(self.params_of_layer(i) for i in range(self.num_layers)) * self.bytes_per_param
        return layers + self.embedding_bytes + head + final_norm


def _experts(c: dict, model_type: str, layers: int) -> dict:
    """The mixture-of-experts fields of a config (Mixtral: every layer sparse, always renormalised)."""
    if model_type not in MOE_BASE:
        return {}
    step, dense = c.get("decoder_sparse_step") or 1, set(c.get("mlp_only_layers") or ())
    return dict(num_experts=c.get("num_experts") or c["num_local_experts"],
                experts_per_token=c["num_experts_per_tok"],
                moe_intermediate_size=c.get("moe_intermediate_size") or c["intermediate_size"],
                norm_topk_prob=c.get("norm_topk_prob", False) if model_type != "mixtral" else True,
                sparse_layers=tuple(i not in dense and (i + 1) % step == 0 for i in range(layers)),
                shared_expert_size=c.get("shared_expert_intermediate_size") or 0)


def _activation(name: str) -> str:
    if name in ("silu", "swish"):
        return "silu"
    if name in ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new"):
        return "gelu_tanh"
    raise ValueError(f"activation {name!r} is not supported (silu, gelu_pytorch_tanh)")


@dataclass(frozen=True)
class GenerationDefaults:
    """What `generation_config.json` asks for, as the coordinator uses it; a request overrides it."""
    eos_token_ids: tuple[int, ...] = ()
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                       # 0: no top-k cut
    do_sample: bool = False              # False: the file sets no sampling (the API's own defaults hold)

    def sampling(self) -> dict:
        """The sampling a request gets for the fields it leaves out: the file's where it samples
        (Qwen3: temperature 0.6, top_p 0.95, top_k 20), else the OpenAI API's (1.0, 1.0, no top-k)."""
        if not self.do_sample:
            return {"temperature": 1.0, "top_p": 1.0, "top_k": 0}
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}


def generation_defaults(model_dir: str | Path) -> GenerationDefaults:
    """Stop ids (generation_config.json's and config.json's together: Qwen3 and Gemma 3 list
    several) and sampling defaults."""
    model_dir = Path(model_dir)
    path = model_dir / "generation_config.json"
    g = json.loads(path.read_text()) if path.is_file() else {}
    if model_dir.suffix == ".gguf":   # llama.cpp writes a model's sampling defaults as general.sampling.*
        from appliance.models.gguf_model import GGUF
        gguf = GGUF(model_dir)
        g = {name: gguf.get(f"general.sampling.{key}") for name, key in
             (("temperature", "temp"), ("top_p", "top_p"), ("top_k", "top_k")) if gguf.get(f"general.sampling.{key}")}
        g["do_sample"] = bool(g)
    eos = tuple(dict.fromkeys(_ids(g.get("eos_token_id")) + ModelConfig.load(model_dir).eos_token_ids))
    return GenerationDefaults(
        eos_token_ids=eos,
        temperature=g.get("temperature", 1.0),
        top_p=g.get("top_p", 1.0),
        top_k=g.get("top_k", 0) or 0,
        do_sample=g.get("do_sample", False),
    )
