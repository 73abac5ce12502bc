"""Well-known models that fit Pis and Macs, by their makers' Hugging Face repo ids.

Figures are from each model's config.json and its published bfloat16 safetensors; `bytes` is
the size of the weights as stored (what the cluster's memory must hold at 16-bit). `quants` is
what the weights take at each of our engines' quantizations and in GGUF files of each type,
worked out from the parameter count and the type's bits per weight (Q8_0: 34 bytes a block of
32, Q4_0: 18; Q4_K_M mixes Q4_K and Q6_K blocks, 4.89 bits a weight on average, as llama.cpp
quotes it; onnxruntime q8 and q4 as engines/footprint.py counts them): within a few percent of
the files, since norms and metadata are left out. `gguf` names a GGUF repository of the model and
its files per type (`--model REPO:FILE.gguf`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from appliance.engines.footprint import WEIGHT_BYTES

GGUF_BITS_PER_WEIGHT = {"Q8_0": 8.5, "Q6_K": 6.5625, "Q4_K_M": 4.89, "Q4_0": 4.5}


@dataclass(frozen=True)
class CatalogModel:
    id: str            # Hugging Face repo id
    name: str
    params: int
    layers: int
    hidden_size: int
    bytes: int
    license: str
    gguf: dict[str, str] = field(default_factory=dict)   # type -> "REPO:FILE.gguf"
    active_params: int = 0   # a mixture of experts: what one token reads (embedding and head counted); 0: dense

    @property
    def quants(self) -> dict[str, int]:
        """Bytes the weights take per quantization (ours: bf16, q8, q4; GGUF types this model has)."""
        ours = {"bf16": self.params * 2, **{q: self.params * WEIGHT_BYTES[q] for q in ("q8", "q4")}}
        return {kind: int(size) for kind, size in {
            **ours, **{t: self.params * GGUF_BITS_PER_WEIGHT[t] / 8 for t in self.gguf}}.items()}

    def to_dict(self) -> dict:
        return {**asdict(self), "quants": self.quants}


CATALOG = [
    CatalogModel("HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2 135M Instruct", 134_515_008, 30, 576, 269_060_552, "apache-2.0"),
    CatalogModel("HuggingFaceTB/SmolLM2-360M-Instruct", "SmolLM2 360M Instruct", 361_821_120, 32, 960, 723_674_912, "apache-2.0"),
    CatalogModel("HuggingFaceTB/SmolLM2-1.7B-Instruct", "SmolLM2 1.7B Instruct", 1_711_376_384, 24, 2048, 3_422_777_952, "apache-2.0"),
    CatalogModel("Qwen/Qwen2.5-0.5B-Instruct", "Qwen2.5 0.5B Instruct", 494_032_768, 24, 896, 988_097_824, "apache-2.0"),
    CatalogModel("Qwen/Qwen2.5-1.5B-Instruct", "Qwen2.5 1.5B Instruct", 1_543_714_304, 28, 1536, 3_087_467_144, "apache-2.0"),
    CatalogModel("Qwen/Qwen2.5-3B-Instruct", "Qwen2.5 3B Instruct", 3_085_938_688, 36, 2048, 6_171_926_112, "qwen-research"),
    CatalogModel("TinyLlama/TinyLlama-1.1B-Chat-v1.0", "TinyLlama 1.1B Chat", 1_100_048_384, 22, 2048, 2_200_119_864, "apache-2.0"),
    CatalogModel("meta-llama/Llama-3.2-1B-Instruct", "Llama 3.2 1B Instruct", 1_235_814_400, 16, 2048, 2_471_645_608, "llama3.2",
                 {"Q8_0": "bartowski/Llama-3.2-1B-Instruct-GGUF:Llama-3.2-1B-Instruct-Q8_0.gguf",
                  "Q4_K_M": "bartowski/Llama-3.2-1B-Instruct-GGUF:Llama-3.2-1B-Instruct-Q4_K_M.gguf"}),
    CatalogModel("meta-llama/Llama-3.2-3B-Instruct", "Llama 3.2 3B Instruct", 3_212_749_824, 28, 3072, 6_425_499_648, "llama3.2",
                 {"Q8_0": "bartowski/Llama-3.2-3B-Instruct-GGUF:Llama-3.2-3B-Instruct-Q8_0.gguf",
                  "Q4_K_M": "bartowski/Llama-3.2-3B-Instruct-GGUF:Llama-3.2-3B-Instruct-Q4_K_M.gguf"}),
    CatalogModel("Qwen/Qwen3-0.6B", "Qwen3 0.6B", 596_049_920, 28, 1024, 1_192_099_840, "apache-2.0",
                 {"Q8_0": "Qwen/Qwen3-0.6B-GGUF:Qwen3-0.6B-Q8_0.gguf"}),
    CatalogModel("Qwen/Qwen3-1.7B", "Qwen3 1.7B", 2_031_739_904, 28, 2048, 4_063_479_808, "apache-2.0",
                 {"Q8_0": "Qwen/Qwen3-1.7B-GGUF:Qwen3-1.7B-Q8_0.gguf"}),
    CatalogModel("Qwen/Qwen3-4B", "Qwen3 4B", 4_022_468_096, 36, 2560, 8_044_936_192, "apache-2.0",
                 {"Q8_0": "Qwen/Qwen3-4B-GGUF:Qwen3-4B-Q8_0.gguf", "Q4_K_M": "Qwen/Qwen3-4B-GGUF:Qwen3-4B-Q4_K_M.gguf"}),
    CatalogModel("Qwen/Qwen3-8B", "Qwen3 8B", 8_190_735_360, 36, 4096, 16_381_470_720, "apache-2.0",
                 {"Q8_0": "Qwen/Qwen3-8B-GGUF:Qwen3-8B-Q8_0.gguf", "Q4_K_M": "Qwen/Qwen3-8B-GGUF:Qwen3-8B-Q4_K_M.gguf"}),
    CatalogModel("google/gemma-3-1b-it", "Gemma 3 1B it", 999_885_952, 26, 1152, 1_999_771_904, "gemma",
                 {"Q4_0": "google/gemma-3-1b-it-qat-q4_0-gguf:gemma-3-1b-it-q4_0.gguf"}),
    CatalogModel("google/gemma-3-4b-it", "Gemma 3 4B it (text)", 3_880_099_328, 34, 2560, 8_600_158_944, "gemma",
                 {"Q4_0": "google/gemma-3-4b-it-qat-q4_0-gguf:gemma-3-4b-it-q4_0.gguf"}),
    CatalogModel("HuggingFaceTB/SmolLM3-3B", "SmolLM3 3B", 3_075_098_624, 36, 2048, 6_150_197_248, "apache-2.0",
                 {"Q8_0": "ggml-org/SmolLM3-3B-GGUF:SmolLM3-Q8_0.gguf", "Q4_K_M": "ggml-org/SmolLM3-3B-GGUF:SmolLM3-Q4_K_M.gguf"}),
    CatalogModel("microsoft/Phi-4-mini-instruct", "Phi-4-mini instruct", 3_836_021_760, 32, 3072, 7_672_043_520, "mit",
                 {"Q8_0": "bartowski/microsoft_Phi-4-mini-instruct-GGUF:microsoft_Phi-4-mini-instruct-Q8_0.gguf",
                  "Q4_K_M": "bartowski/microsoft_Phi-4-mini-instruct-GGUF:microsoft_Phi-4-mini-instruct-Q4_K_M.gguf"}),
    # A mixture of experts: 128 experts a layer, 8 a token. Every expert is held, so it needs several
    # Pis (q4 ~19 GB: four 8 GB boards), but a token reads ~3.3 B weights (ModelConfig.active_layer_params).
    CatalogModel("Qwen/Qwen3-30B-A3B", "Qwen3 30B-A3B (MoE)", 30_532_122_624, 48, 2048, 61_064_245_248, "apache-2.0",
                 {"Q8_0": "Qwen/Qwen3-30B-A3B-GGUF:Qwen3-30B-A3B-Q8_0.gguf",
                  "Q4_K_M": "Qwen/Qwen3-30B-A3B-GGUF:Qwen3-30B-A3B-Q4_K_M.gguf"}, active_params=3_353_032_704),
    CatalogModel("mistralai/Mistral-7B-Instruct-v0.3", "Mistral 7B Instruct v0.3", 7_248_023_552, 32, 4096, 14_496_047_104, "apache-2.0"),
    CatalogModel("meta-llama/Llama-3.1-8B-Instruct", "Llama 3.1 8B Instruct", 8_030_261_248, 32, 4096, 16_060_522_496, "llama3.1"),
]

BY_ID = {m.id: m for m in CATALOG}
