"""Well-known models that fit Pis and Macs, by Hugging Face repo id.

Figures are from each model's config.json and its published bfloat16 safetensors; `bytes` is
the size of the weights as stored (what the cluster's memory must hold at 16-bit).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class CatalogModel:
    id: str            # Hugging Face repo id
    name: str
    params: int
    layers: int
    hidden_size: int
    bytes: int
    license: str

    def to_dict(self) -> dict:
        return asdict(self)


CATALOG = [
    CatalogModel("HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2 135M Instruct", 134_515_008, 30, 576, 269_060_552, "apache-2.0"),
    CatalogModel("HuggingFaceTB/SmolLM2-360M-Instruct", "SmolLM2 360M Instruct", 361_821_120, 32, 960, 723_674_912, "apache-2.0"),
    CatalogModel("HuggingFaceTB/SmolLM2-1.7B-Instruct", "SmolLM2 1.7B Instruct", 1_711_376_384, 24, 2048, 3_422_777_952, "apache-2.0"),
    CatalogModel("Qwen/Qwen2.5-0.5B-Instruct", "Qwen2.5 0.5B Instruct", 494_032_768, 24, 896, 988_097_824, "apache-2.0"),
    CatalogModel("Qwen/Qwen2.5-1.5B-Instruct", "Qwen2.5 1.5B Instruct", 1_543_714_304, 28, 1536, 3_087_467_144, "apache-2.0"),
    CatalogModel("Qwen/Qwen2.5-3B-Instruct", "Qwen2.5 3B Instruct", 3_085_938_688, 36, 2048, 6_171_926_112, "qwen-research"),
    CatalogModel("TinyLlama/TinyLlama-1.1B-Chat-v1.0", "TinyLlama 1.1B Chat", 1_100_048_384, 22, 2048, 2_200_119_864, "apache-2.0"),
    CatalogModel("meta-llama/Llama-3.2-1B-Instruct", "Llama 3.2 1B Instruct", 1_235_814_400, 16, 2048, 2_471_645_608, "llama3.2"),
    CatalogModel("meta-llama/Llama-3.2-3B-Instruct", "Llama 3.2 3B Instruct", 3_212_749_824, 28, 3072, 6_425_499_648, "llama3.2"),
    CatalogModel("mistralai/Mistral-7B-Instruct-v0.3", "Mistral 7B Instruct v0.3", 7_248_023_552, 32, 4096, 14_496_047_104, "apache-2.0"),
    CatalogModel("meta-llama/Llama-3.1-8B-Instruct", "Llama 3.1 8B Instruct", 8_030_261_248, 32, 4096, 16_060_522_496, "llama3.1"),
]

BY_ID = {m.id: m for m in CATALOG}
