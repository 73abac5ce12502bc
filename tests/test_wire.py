"""Hidden states travel between stages as float16 (`protocol.wire_activations`): half the bytes of
float32, with the logits of the stage after it within 1e-2 of float32 frames on real shapes, and
greedy text unchanged."""
from __future__ import annotations

import numpy as np
import pytest

from appliance.bus import protocol
from appliance.engines import Shard, Step, load_engine
from appliance.models.synth import SHAPES
from appliance.models.tokenizer import Tokenizer
from tests.test_engines import STORIES, needs_stories
from tests.test_synth import synth_model


def two_stages(model_dir, tmp_path):
    options = {"quant": "f32", "cache_dir": tmp_path}
    return (load_engine("onnxruntime", Shard(model_dir, 0, 1, 2), **options),
            load_engine("onnxruntime", Shard(model_dir, 1, 2, 2), **options))


def test_activations_travel_as_float16_clipped_to_its_range():
    hidden = np.array([[1.0, -2.5, 1e6, -1e6]], np.float32)
    sent = protocol.wire_activations(hidden)
    assert sent.dtype == np.float16 and np.isfinite(sent).all()
    frame = protocol.Frame(protocol.new_id(), protocol.new_id(), 1, 0, 0, sent)
    decoded = protocol.decode_frame(protocol.encode_frame(frame)).tensor
    assert decoded.dtype == np.float16 and decoded.nbytes == hidden.nbytes // 2
    assert decoded.tolist() == [[1.0, -2.5, 65504.0, -65504.0]]


@pytest.mark.parametrize("shape", SHAPES)
def test_float16_frames_keep_the_logits_of_float32_frames_on_real_shapes(shape, tmp_path):
    model_dir = synth_model(shape)
    first, last = two_stages(model_dir, tmp_path)
    prompt = np.array(Tokenizer(model_dir).encode("Once upon a time, a node said"), np.int32)
    steps = [(0, prompt), (len(prompt), prompt[-1:]), (len(prompt) + 1, prompt[:1])]
    for pos, ids in steps:
        hidden = first.forward([Step("r", pos, ids)])[0]
        exact = last.forward([Step("f32", pos, hidden)])[0]
        wire = last.forward([Step("f16", pos, protocol.wire_activations(hidden))])[0]
        assert np.abs(wire - exact).max() < 1e-2, f"{shape} at position {pos}"


@needs_stories
def test_greedy_text_through_float16_frames_is_unchanged_on_stories260k(tmp_path):
    whole = load_engine("numpy", Shard(STORIES, 0, 5, 5))
    first = load_engine("numpy", Shard(STORIES, 0, 2, 5))
    last = load_engine("numpy", Shard(STORIES, 2, 5, 5))
    expected, got = [1], [1]   # from BOS
    for pos in range(48):
        expected.append(int(np.argmax(whole.forward([Step("w", pos, np.array(expected[-1:], np.int32))])[0])))
        hidden = first.forward([Step("p", pos, np.array(got[-1:], np.int32))])[0]
        got.append(int(np.argmax(last.forward([Step("p", pos, protocol.wire_activations(hidden))])[0])))
    assert got == expected
    assert Tokenizer(STORIES).decode(got).startswith("Once upon a time, there was a little girl named Lily.")
