"""Turning the last stage's logits into a token: temperature, top-k, top-p, seeded."""
from __future__ import annotations

import numpy as np

from appliance.bus.protocol import Sampling


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


def sample(logits: np.ndarray, s: Sampling, rng: np.random.Generator) -> int:
    """Temperature 0 means greedy argmax; otherwise sample from the cut distribution."""
    if s.temperature <= 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / s.temperature
    if s.top_k <= 0 and s.top_p >= 1.0:   # no cut: no need to sort the vocabulary
        probs = np.exp(scaled - scaled.max())
        return int(rng.choice(len(probs), p=probs / probs.sum()))
    order = np.argsort(-scaled, kind="stable")
    if s.top_k > 0:
        order = order[:s.top_k]
    probs = np.exp(scaled[order] - scaled[order[0]])
    probs /= probs.sum()
    if s.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(probs), s.top_p)) + 1   # smallest set reaching top_p
        order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
    return int(order[rng.choice(len(order), p=probs)])
