"""Hostile input (issue 13): what a request can send, the sampler's last line of defence, slow
and idle connections, and flags checked before anything starts."""
from __future__ import annotations

import math

import numpy as np
import pytest

from appliance.bus.frames import Sampling
from appliance.sampling import log_softmax, sample

NAN, INF = math.nan, math.inf


# -- the sampler: whatever arrives, a token, and numpy's sampler never sees a NaN
@pytest.mark.parametrize("temperature,top_p,top_k", [
    (NAN, 1.0, 0), (INF, 1.0, 0), (-INF, 0.9, 0), (1e-320, 1.0, 0), (1e-320, 0.5, 3),
    (1.0, NAN, 0), (1.0, INF, 0), (1.0, -INF, 5), (0.8, -1.0, 0), (0.8, 0.0, 0),
])
def test_non_finite_or_extreme_sampling_parameters_give_a_token(temperature, top_p, top_k):
    logits = np.array([0.5, 3.0, 1.0, -2.0], dtype=np.float32)
    token = sample(logits, Sampling(temperature, top_p, top_k, 1), np.random.default_rng(1))
    assert 0 <= token < len(logits)
    if not math.isfinite(temperature) or temperature < 1e-300:
        assert token == 1   # greedy


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_non_finite_logits_fall_back_to_the_best_finite_one(bad):
    logits = np.array([0.5, 3.0, bad, 1.0], dtype=np.float32)
    for s in (Sampling(1.0), Sampling(0.7, 0.9, 2), Sampling(0)):
        assert sample(logits, s, np.random.default_rng(0)) == 1
    assert np.isneginf(log_softmax(logits)[2]) and np.isfinite(log_softmax(logits)[[0, 1, 3]]).all()
    assert sample(np.full(4, NAN), Sampling(1.0), np.random.default_rng(0)) == 0
