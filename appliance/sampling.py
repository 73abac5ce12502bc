"""Turning the last stage's logits into a token: temperature, top-k, top-p, seeded.

The API checks the sampling parameters, but this is the last line: whatever arrives here (a
frame from an older coordinator, logits gone NaN in a broken engine), `sample` returns a token
and never hands numpy's sampler a probability that is not a finite number.
"""
from __future__ import annotations

import math

import numpy as np

from appliance.bus.protocol import Sampling


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities; a logit that is not finite gets -inf (probability 0)."""
    x = np.where(np.isfinite(logits), logits.astype(np.float64), -np.inf)
    if not np.isfinite(x).any():
        return np.full(x.shape, -math.log(len(x)))   # nothing to go on: uniform
    shifted = x - x.max()
    return shifted - np.log(np.exp(shifted).sum())


def greedy(logits: np.ndarray) -> int:
    """The best finite logit (token 0 when none is finite)."""
    finite = np.isfinite(logits)
    if not finite.any():
        return 0
    return int(np.argmax(np.where(finite, logits, -np.inf)))


def sample(logits: np.ndarray, s: Sampling, rng: np.random.Generator) -> int:
    """Temperature 0 means greedy argmax; otherwise sample from the cut distribution.

    Safe on any input: a temperature that is not a finite positive number, logits that are not
    all finite, or a temperature so small that the scaled logits overflow all mean greedy; a
    top_p that is not a number means no top-p cut."""
    logits = np.asarray(logits, dtype=np.float64)
    if not (math.isfinite(s.temperature) and s.temperature > 0) or not np.isfinite(logits).all():
        return greedy(logits)
    with np.errstate(over="ignore", invalid="ignore"):
        scaled = logits / s.temperature
    if not np.isfinite(scaled).all():
        return greedy(logits)
    top_p = s.top_p if math.isfinite(s.top_p) else 1.0
    if s.top_k <= 0 and top_p >= 1.0:   # no cut: no need to sort the vocabulary
        probs = np.exp(scaled - scaled.max())
        return int(rng.choice(len(probs), p=probs / probs.sum()))
    order = np.argsort(-scaled, kind="stable")
    if s.top_k > 0:
        order = order[:s.top_k]
    probs = np.exp(scaled[order] - scaled[order[0]])
    probs /= probs.sum()
    if top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(probs), top_p)) + 1   # smallest set reaching top_p
        order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
    return int(order[rng.choice(len(order), p=probs)])
