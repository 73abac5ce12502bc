"""Rotary position embeddings, as Hugging Face transformers computes them: the one home of the
rope maths every engine uses (numpy per step, onnxruntime and tinygrad as tables).

`rope_tables` gives cos and sin [positions, rotary_dim / 2] of one layer's `Rope`; the engines
rotate the pairs (i, i + rotary_dim / 2) of each head's first `rotary_dim` dims and leave the
rest as they are (partial rotary, Phi-4-mini).
"""
from __future__ import annotations

import math

import numpy as np

from appliance.models.config import Rope


def inv_freq(rope: Rope, long: bool = False) -> np.ndarray:
    """The inverse frequencies; `long` picks longrope's long factors (positions past the original context)."""
    d = rope.rotary_dim
    base = 1.0 / (rope.theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    scaling = rope.scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return base
    if kind == "linear":
        return base / scaling["factor"]
    if kind == "freq_factors":   # llama.cpp's rope_freqs tensor: Llama 3's scaling, worked out per frequency
        return base / np.asarray(scaling["factors"], np.float64)
    if kind == "longrope":
        return base / np.asarray(scaling["long_factor" if long else "short_factor"], np.float64)
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / base
        scaled = np.where(wavelen > old_context / low, base / factor, base)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
        return np.where(medium, smoothed, scaled)
    raise ValueError(f"rope_scaling type {kind!r} is not supported")


def attention_factor(rope: Rope) -> float:
    """longrope scales cos and sin by this (1 for every other kind)."""
    scaling = rope.scaling or {}
    if scaling.get("rope_type") != "longrope":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return scaling["attention_factor"]
    factor = scaling["factor"]
    return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(scaling["original_max_position_embeddings"]))


def rope_tables(rope: Rope, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin, float32 [len(positions), rotary_dim / 2]. longrope takes its short factors while
    a position is inside the original context and its long ones past it, as transformers does
    token by token (it picks one set per forward pass, by the pass's last position)."""
    positions = np.asarray(positions)
    angles = positions[:, None] * inv_freq(rope)[None, :]
    original = (rope.scaling or {}).get("original_max_position_embeddings")
    if (rope.scaling or {}).get("rope_type") == "longrope" and (positions >= original).any():
        long = positions[:, None] * inv_freq(rope, long=True)[None, :]
        angles = np.where((positions >= original)[:, None], long, angles)
    scale = attention_factor(rope)
    return (np.cos(angles) * scale).astype(np.float32), (np.sin(angles) * scale).astype(np.float32)
