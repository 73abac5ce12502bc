"""Turning the last stage's logits into a token: temperature, top-k, top-p, seeded.

The API checks the sampling parameters, but this is the last line: whatever arrives here (a
frame from an older coordinator, logits gone NaN in a broken engine), `sample` returns a token
and never hands numpy's sampler a probability that is not a finite number.
"""
from __future__ import annotations

import math
import random

import numpy as np

from appliance.bus.protocol import Sampling


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities (float32, summed in float64); a logit that is not finite gets -inf (probability 0)."""
    x = np.asarray(logits, dtype=np.float32)
    finite = np.isfinite(x)
    if not finite.all():
        if not finite.any():
            return np.full(x.shape, -math.log(len(x)), np.float32)   # nothing to go on: uniform
        x = np.where(finite, x, -np.inf)
    shifted = x - x.max()
    return shifted - np.float32(math.log(np.exp(shifted).sum(dtype=np.float64)))


def step_rng(seed: int | None, step: int) -> random.Random:
    """A step's randomness, from the request's seed (>= 0) and the step: a request resumed on
    another node draws the same. A draw takes one number from it: Python's generator, set up once
    a token, costs a quarter of numpy's there (35 against 130 us right after a decode step)."""
    return random.Random() if seed is None else random.Random(seed << 32 | step)


def greedy(logits: np.ndarray) -> int:
    """The best finite logit (token 0 when none is finite)."""
    best = int(np.argmax(logits))
    if math.isfinite(logits[best]):   # argmax takes a NaN or +inf where there is one
        return best
    finite = np.isfinite(logits)
    if not finite.any():
        return 0
    return int(np.argmax(np.where(finite, logits, -np.inf)))


def sample(logits: np.ndarray, s: Sampling, rng: random.Random | np.random.Generator) -> int:
    """Temperature 0 means greedy argmax; otherwise sample from the cut distribution.

    Safe on any input: a temperature that is not a finite positive number, logits that are not
    all finite, or a temperature so small that the scaled logits overflow all mean greedy; a
    top_p that is not a number means no top-p cut."""
    logits = np.asarray(logits, dtype=np.float32)
    if not (math.isfinite(s.temperature) and s.temperature > 0) or not np.isfinite(logits).all():
        return greedy(logits)
    # A temperature below float32's smallest is 0 there: the division gives inf, and greedy follows.
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        scaled = logits / np.float32(s.temperature)
    if not np.isfinite(scaled).all():
        return greedy(logits)
    top_p = s.top_p if math.isfinite(s.top_p) else 1.0
    if s.top_k <= 0 and top_p >= 1.0:   # no cut: no need to sort the vocabulary
        return draw(np.exp(scaled - scaled.max()), rng)
    order = top_indices(scaled, s.top_k) if s.top_k > 0 else np.argsort(-scaled, kind="stable")
    weights = np.exp(scaled[order] - scaled[order[0]])
    if top_p < 1.0:
        cumulative = np.cumsum(weights, dtype=np.float64)
        keep = int(np.searchsorted(cumulative, top_p * cumulative[-1])) + 1   # smallest set reaching top_p
        order, weights = order[:keep], weights[:keep]
    return int(order[draw(weights, rng)])


BLOCK = 256   # draw and top_indices work on blocks of this many entries: a vocabulary in a few hundred


def blocks(values: np.ndarray, fill: float) -> np.ndarray:
    """values as rows of BLOCK, the last one padded with `fill`."""
    pad = -len(values) % BLOCK
    if pad:
        values = np.concatenate([values, np.full(pad, fill, values.dtype)])
    return values.reshape(-1, BLOCK)


def draw(weights: np.ndarray, rng: random.Random | np.random.Generator) -> int:
    """An index drawn in proportion to finite non-negative weights (the largest one positive), as
    rng.choice does but in two short running sums (the blocks', then one block's) instead of one
    of the whole vocabulary, which is sequential and costs more than the rest of a draw."""
    rows = blocks(weights, 0.0)
    block_sums = np.cumsum(rows.sum(axis=1, dtype=np.float64))
    target = min(rng.random() * block_sums[-1], np.nextafter(block_sums[-1], 0))
    b = int(np.searchsorted(block_sums, target, side="right"))   # the first block past the target: its sum > 0
    target -= block_sums[b - 1] if b else 0.0
    i = min(int(np.searchsorted(np.cumsum(rows[b], dtype=np.float64), target, side="right")), BLOCK - 1)
    while rows[b, i] == 0:   # rounding carried the target past the block's last weight: the last one
        i -= 1
    return b * BLOCK + i


def top_indices(values: np.ndarray, k: int) -> np.ndarray:
    """The indices of the k largest values, largest first. The k blocks with the largest maxima
    hold them all (a block holding one of them has a maximum at least the k-th largest, and only
    blocks holding one of them can), so only those are partitioned, not the whole vocabulary."""
    k = min(k, len(values))
    rows = blocks(values, -np.inf)
    chosen = np.argpartition(-rows.max(axis=1), k - 1)[:k] if len(rows) > k else np.arange(len(rows))
    candidates = (chosen[:, None] * BLOCK + np.arange(BLOCK)).ravel()
    candidates = candidates[candidates < len(values)]
    top = candidates[np.argpartition(-values[candidates], k - 1)[:k]]
    return top[np.argsort(-values[top], kind="stable")]
