"""The pure parts: planner, activation frames, config layering, sampling, stop strings."""
from __future__ import annotations

import json
import time
from dataclasses import replace

import numpy as np
import pytest

from appliance.bus import protocol
from appliance.config import load_config, parse_address
from appliance.models.config import ModelConfig
from appliance.panel.api import held_back
from appliance.engines.footprint import Footprint, footprint
from appliance.planner import NodeCapacity, PlanError, host_memory, split_layers
from appliance.coordinator.coordinator import MAX_FRAME_BYTES, prefill_chunks
from appliance.sampling import draw, greedy, sample, step_rng, top_indices

GB = 10**9


def model(layers=22, hidden=2048):
    return ModelConfig.from_dict({"hidden_size": hidden, "intermediate_size": 5632, "num_hidden_layers": layers,
                                  "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000,
                                  "torch_dtype": "bfloat16"})


def blocks(shards):
    return [(s.node, s.end - s.start) for s in shards]


# -- planner
def test_layers_split_by_memory_contiguous_and_complete():
    # weights as stored (no engine named): the first holds the embedding, the last the head, each
    # about 1.5 layers' worth, and each node's whole shard is in proportion to its memory
    shards = split_layers([NodeCapacity("a", 8 * GB), NodeCapacity("b", 4 * GB), NodeCapacity("c", 4 * GB)], model(20))
    assert blocks(shards) == [("a", 10), ("b", 6), ("c", 4)]
    assert [s.start for s in shards] == [0, 10, 16] and shards[-1].end == 20


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 11])
def test_any_number_of_nodes_and_deterministic(n):
    nodes = [NodeCapacity(f"n{i}", (i % 3 + 3) * GB) for i in range(n)]
    first = split_layers(nodes, model())
    assert split_layers(list(reversed(nodes)), model()) == first
    assert sum(s.end - s.start for s in first) == 22
    assert all(a.end == b.start for a, b in zip(first, first[1:]))


def test_a_node_too_small_for_one_layer_gets_none():
    layer = model().layer_bytes
    shards = split_layers([NodeCapacity("big", 8 * GB), NodeCapacity("tiny", layer // 2)], model())
    assert blocks(shards) == [("big", 22)]


def test_a_full_node_spills_onto_the_others():
    layer = model().layer_bytes
    small = NodeCapacity("small", int(3 * layer / 0.8) + 1)   # room for exactly 3 layers
    shards = split_layers([small, NodeCapacity("x", 2 * GB), NodeCapacity("y", 2 * GB)], model())
    assert dict(blocks(shards))["small"] <= 3 and sum(n for _, n in blocks(shards)) == 22


def test_speed_refines_the_split_when_every_node_reports_it():
    shards = split_layers([NodeCapacity("a", 8 * GB, speed=1.0), NodeCapacity("b", 8 * GB, speed=3.0)], model(20))
    assert dict(blocks(shards)) == {"a": 4, "b": 16}   # 5.75 and 17.25 layers' worth, the ends included


def test_too_little_memory_is_a_clear_error():
    with pytest.raises(PlanError, match="needs .* GB"):
        split_layers([NodeCapacity("a", GB // 10)], model())


def test_nodes_on_one_machine_share_its_memory():
    one_box = [{"id": f"local-{i}", "host_id": "box", "memory_available": 24 * GB, "memory_held": 0} for i in range(3)]
    pi = {"id": "pi", "host_id": "pi", "memory_available": 7 * GB, "memory_held": GB}
    assert host_memory([*one_box, pi]) == {"local-0": 8 * GB, "local-1": 8 * GB, "local-2": 8 * GB, "pi": 8 * GB}


def test_weights_count_as_the_engine_holds_them():
    config = model(layers=22)
    room = 2 * GB   # an f32 TinyLlama (4.4 GB) does not fit; at q4 (about 0.7 GB) it does
    with pytest.raises(PlanError, match="needs 4.[0-9]+ GB"):
        split_layers([NodeCapacity("a", room, footprint=footprint(config, "numpy"))], config)
    shards = split_layers([NodeCapacity("a", room, footprint=footprint(config, "onnxruntime", "q4"))], config)
    assert blocks(shards) == [("a", 22)]


LLAMA_3_1_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
                "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
                "torch_dtype": "bfloat16", "tie_word_embeddings": False}
PI5_8GB = 7 * GB   # what an 8 GB Pi 5 has free with Raspberry Pi OS Lite running


def test_llama_3_1_8b_at_q4_fits_one_8gb_pi_and_two_hold_even_halves():
    """The Pi budget's claim, on onnxruntime: the first stage reads its rows of the embedding from
    the file (its 1.05 GB of float16 are not held), so one Pi holds the model; on two, the second
    holds the head (0.33 GB, two layers' worth) and so two layers fewer."""
    config = ModelConfig.from_dict(LLAMA_3_1_8B)
    fp = footprint(config, "onnxruntime", "q4", positions=2048)
    assert fp.embedding == 0 and fp.shard(32, True, True, 1) < 0.8 * PI5_8GB
    assert blocks(split_layers([NodeCapacity("pi1", PI5_8GB, footprint=fp)], config)) == [("pi1", 32)]
    shards = split_layers([NodeCapacity(f"pi{i}", PI5_8GB, footprint=fp) for i in (1, 2)], config)
    assert blocks(shards) == [("pi1", 17), ("pi2", 15)]
    held = [fp.shard(17, True, False, 1), fp.shard(15, False, True, 1)]
    assert abs(held[0] - held[1]) < fp.layer + fp.kv_layer


def test_the_planner_counts_a_ggml_nodes_kv_room_as_its_cpu_holds_it(broker):
    """ggml keeps keys and values float16 only where the CPU does float16 arithmetic, which a node
    says in its announcement: an x86 node's room is counted float32, a Pi 5's float16."""
    from appliance.bus.client import Bus
    from appliance.config import Config
    from appliance.coordinator.cluster import Cluster

    cluster = Cluster(Bus(Config(broker=broker), client_id=f"kv-room-{protocol.new_id()[:8]}"), "c")
    cluster.model_config = config = model(layers=4)
    for name, float16 in (("x86", False), ("pi5", True)):
        cluster.nodes[name] = {"host_id": name, "memory_available": 8 * GB, "memory_held": 0, "engine": "ggml",
                               "quant": "q4", "limits": {"positions": 2048}, "float16_arithmetic": float16}
    rooms = {n.id: n.footprint.kv_layer for n in cluster.capacities()}
    numbers = min(2048, config.max_position_embeddings) * 2 * config.num_kv_heads * config.head_dim   # keys, values
    assert rooms == {"x86": numbers * 4, "pi5": numbers * 2}


def test_the_kv_room_of_reserved_requests_is_counted():
    config = model(layers=22)
    fp = footprint(config, "onnxruntime", "q8", positions=2048)   # 1 GB weights, 45 MB KV per request
    assert split_layers([NodeCapacity("a", 2 * GB, footprint=fp, requests=4)], config)
    with pytest.raises(PlanError):
        split_layers([NodeCapacity("a", 2 * GB, footprint=fp, requests=32)], config)


def test_the_first_stage_counts_the_embedding_and_the_last_the_head():
    config = model(layers=4)
    fp = Footprint(layer=100_000_000, embedding=300_000_000, head=50_000_000, kv_layer=0)   # as a mapped embedding
    a = NodeCapacity("a", int((2 * fp.layer + fp.head) / 0.8) + 1, speed=1.0, footprint=fp)   # two layers and the head
    b = NodeCapacity("b", 8 * GB, speed=1.0, footprint=fp)
    # b's embedding is worth three layers, so balance would give a three: it has room for two
    assert blocks(split_layers([a, b], config, keep_order=["b", "a"])) == [("b", 2), ("a", 2)]
    assert blocks(split_layers([a, b], config, keep_order=["a", "b"])) == [("b", 4)]   # no room for the embedding


def test_a_head_larger_than_a_fair_share_does_not_push_its_node_out():
    """A head worth fifty layers (a vocabulary of 262k tokens on a narrow model) is more than the
    last node's fair share of the whole: it still holds a layer and the head, not nothing."""
    fp = Footprint(layer=10_000_000, embedding=0, head=500_000_000, kv_layer=0)
    nodes = [NodeCapacity(name, 8 * GB, footprint=fp) for name in ("a", "b")]
    assert blocks(split_layers(nodes, model(layers=18))) == [("a", 17), ("b", 1)]


def test_two_like_nodes_hold_like_halves_when_the_head_is_large():
    """Llama 3.2 1B on ggml at q4: its tied head of 128,256 tokens (148 MB) is worth four layers,
    so the first of two like nodes takes two more layers, and neither holds more than half the
    model by more than a layer."""
    config = ModelConfig.from_dict({**LLAMA_3_1_8B, "hidden_size": 2048, "intermediate_size": 8192,
                                    "num_hidden_layers": 16, "tie_word_embeddings": True})
    fp = footprint(config, "ggml", "q4", positions=2048)
    shards = split_layers([NodeCapacity(f"pi{i}", PI5_8GB, footprint=fp) for i in (1, 2)], config)
    assert blocks(shards) == [("pi1", 10), ("pi2", 6)]
    held = [fp.shard(10, True, False, 1), fp.shard(6, False, True, 1)]
    assert abs(held[0] - held[1]) < fp.layer + fp.kv_layer


# -- frames
def test_frame_round_trip_keeps_every_field():
    tensor = np.arange(12, dtype=np.float32).reshape(3, 4)
    f = protocol.Frame(protocol.new_id(), protocol.new_id(), 7, 3, 42, tensor, protocol.SAMPLE,
                     protocol.Sampling(0.7, 0.9, 40, 1234), compute_us=5150, last_step=99)
    g = protocol.decode_frame(protocol.encode_frame(f))
    assert (g.request_id, g.coordinator_id, g.plan_id, g.step, g.pos, g.flags, g.compute_us, g.last_step) == \
           (f.request_id, f.coordinator_id, 7, 3, 42, protocol.SAMPLE, 5150, 99)
    assert g.sampling == protocol.Sampling(pytest.approx(0.7), pytest.approx(0.9), 40, 1234)
    np.testing.assert_array_equal(g.tensor, tensor)


def test_the_step_after_a_frame_follows_its_rows():
    """A last stage's next step: one position past the frame's rows (a prompt chunk's or one token's)."""
    f = protocol.Frame(protocol.new_id(), protocol.new_id(), 7, 3, 42, np.zeros((5, 4), np.float16), 0,
                       protocol.Sampling(0.7, seed=9), compute_us=5150, last_step=99)
    g = f.next_step(17)
    assert (g.request_id, g.coordinator_id, g.plan_id, g.step, g.pos, g.flags, g.compute_us, g.last_step) == \
           (f.request_id, f.coordinator_id, 7, 4, 47, protocol.SAMPLE, 0, 99)
    assert g.sampling == f.sampling and g.tensor.dtype == protocol.TOKEN_IDS and g.tensor.tolist() == [17]
    asked = replace(f, flags=protocol.SAMPLE | protocol.LOGPROBS)
    assert asked.next_step(17).flags == protocol.SAMPLE | protocol.LOGPROBS   # the request's wish holds to its end


def test_a_reply_carries_logprobs_only_where_asked():
    f = protocol.Frame(protocol.new_id(), protocol.new_id(), 7, 3, 42, np.zeros(1, np.int32), protocol.SAMPLE)
    plain = protocol.parse_reply(json.dumps(protocol.token_reply(f, 5, True)).encode())
    assert (plain.token, plain.logprob, plain.top, plain.continued) == (5, None, [], True)
    asked = protocol.parse_reply(json.dumps(protocol.token_reply(f, 5, False, -0.25, [(5, -0.25), (9, -2.0)])).encode())
    assert (asked.logprob, asked.top, asked.continued) == (-0.25, [(5, -0.25), (9, -2.0)], False)


def test_a_step_draws_the_same_from_the_same_seed_and_step():
    assert step_rng(7, 3).random() == step_rng(7, 3).random()
    assert len({step_rng(7, s).random() for s in range(50)} | {step_rng(8, 3).random()}) == 51
    assert step_rng(None, 3).random() != step_rng(None, 3).random()


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_greedy_never_picks_a_logit_that_is_not_finite(bad):
    logits = np.array([0.5, 3.0, 1.0], np.float32)
    for where in range(3):
        spoiled = logits.copy()
        spoiled[where] = bad
        assert greedy(spoiled) == (1 if where != 1 else 2)


def test_decode_step_frame_is_small():
    f = protocol.Frame(protocol.new_id(), protocol.new_id(), 1, 1, 1, np.zeros((1, 2048), np.float32))
    assert 8192 < len(protocol.encode_frame(f)) < 8192 + 100


@pytest.mark.parametrize("mangle", [lambda b: b[:10], lambda b: b"XXXX" + b[4:], lambda b: b[:-1],
                                    lambda b: b + b"\0", lambda b: b[:4] + b"\x07" + b[5:]])
def test_malformed_frames_raise_frame_error(mangle):
    good = protocol.encode_frame(protocol.Frame(protocol.new_id(), protocol.new_id(), 1, 0, 0, np.zeros(4, np.int32)))
    with pytest.raises(protocol.FrameError):
        protocol.decode_frame(mangle(good))


def test_prefill_chunks_stay_under_a_megabyte():
    chunks = prefill_chunks(list(range(1000)), hidden_size=2048)
    assert all(len(t) * 2048 * 2 <= MAX_FRAME_BYTES for _, t in chunks)   # float16 activations
    assert max(len(t) for _, t in chunks) == 256
    assert [p for p, _ in chunks] == [0, 256, 512, 768]
    assert sum((t for _, t in chunks), []) == list(range(1000))


# -- config
def test_config_layers_defaults_file_env_flags(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("cluster: lab\nbroker: pi1:1883\nport: 8000\napi_keys: [a, b]\n")
    env = {"EXO_PORT": "9000", "EXO_BROKER_TLS": "true"}
    c = load_config(path, env=env, cluster="flag")
    assert (c.cluster, c.broker, c.port, c.broker_tls, c.api_keys) == ("flag", "pi1:1883", 9000, True, ["a", "b"])
    assert load_config(path, env={}).port == 8000
    assert parse_address("pi1:1884") == ("pi1", 1884) and parse_address("pi1") == ("pi1", 1883)


def test_unknown_config_keys_are_refused(tmp_path):
    (tmp_path / "c.yaml").write_text("brokr: x\n")
    with pytest.raises(ValueError, match="unknown config keys: brokr"):
        load_config(tmp_path / "c.yaml", env={})


# -- sampling and stop strings
def test_sampling_greedy_topk_topp_and_seed():
    logits = np.array([1.0, 3.0, 2.0, 0.5])
    rng = np.random.default_rng(0)
    assert sample(logits, protocol.Sampling(temperature=0), rng) == 1
    assert {sample(logits, protocol.Sampling(1.0, 1.0, 1), rng) for _ in range(20)} == {1}
    assert {sample(logits, protocol.Sampling(1.0, 0.5, 0), rng) for _ in range(20)} == {1}
    assert {sample(logits, protocol.Sampling(5.0, 1.0, 2), rng) for _ in range(200)} == {1, 2}
    a = [sample(logits, protocol.Sampling(1.0), np.random.default_rng(5)) for _ in range(10)]
    assert a == [sample(logits, protocol.Sampling(1.0), np.random.default_rng(5)) for _ in range(10)]


def test_draw_follows_the_weights_and_never_takes_a_zero_one():
    rng = np.random.default_rng(1)
    weights = np.zeros(1000, np.float32)   # four blocks; the last one padded
    weights[[3, 300, 999]] = [1.0, 2.0, 5.0]
    counts = np.bincount([draw(weights, rng) for _ in range(8000)], minlength=1000)
    assert counts.sum() == counts[[3, 300, 999]].sum()
    assert np.allclose(counts[[3, 300, 999]] / 8000, [0.125, 0.25, 0.625], atol=0.02)


def test_top_indices_are_the_largest_first_whatever_the_blocks():
    rng = np.random.default_rng(2)
    for size in (1, 5, 255, 256, 257, 32000):
        values = rng.standard_normal(size).astype(np.float32)
        values[rng.integers(0, size, 3)] = -np.inf
        values[: size // 300] = 9.0   # ties, all in one block
        k = min(5, size)
        assert np.array_equal(values[top_indices(values, 5)], np.sort(values)[::-1][:k])


def test_held_back_keeps_a_possible_stop_prefix():
    assert held_back("the end of Li", ["Lily"]) == 2
    assert held_back("the end", ["Lily"]) == 0
    assert held_back("abc", []) == 0


# -- node batching
def test_a_batch_takes_one_step_of_each_request_and_stops_at_commands(tmp_path):
    from appliance.config import Config
    from appliance.node.agent import NodeAgent

    agent = NodeAgent(Config(broker="127.0.0.1:1", state_dir=str(tmp_path)))

    def frame(request, pos):
        return protocol.Frame(request, "0" * 32, 1, 0, pos, np.zeros(1, np.int32))
    a = [frame("a" * 32, p) for p in range(3)]          # a long prompt's chunks
    b, c, d = frame("b" * 32, 0), frame("c" * 32, 0), frame("d" * 32, 0)
    for item in [("frame", a[1]), ("frame", a[2]), ("frame", b), ("frame", c), ("free", "x"), ("frame", d)]:
        agent.work.put(item)
    assert agent.take_batch(a[0]) == [a[0], b, c]
    assert [item for _, item in agent.work.queue] == [a[1], a[2], "x", d]


def test_a_batch_takes_at_most_one_prompt_chunk(tmp_path):
    """Prompts arriving together are prefilled one chunk per batch, between everyone's decode
    steps; a request whose chunk waits keeps all its later frames behind it."""
    from appliance.config import Config
    from appliance.node.agent import NodeAgent

    agent = NodeAgent(Config(broker="127.0.0.1:1", state_dir=str(tmp_path)))

    def frame(request, pos, tokens):
        return protocol.Frame(request * 32, "0" * 32, 1, 0, pos, np.zeros(tokens, np.int32))
    a, b_chunk, b_tail, c, d = frame("a", 0, 3), frame("b", 0, 4), frame("b", 4, 1), frame("c", 9, 1), frame("d", 7, 1)
    for f in (b_chunk, c, b_tail, d):
        agent.work.put(("frame", f))
    assert agent.take_batch(a) == [a, c, d]
    assert [item for _, item in agent.work.queue] == [b_chunk, b_tail]
    agent.work.get()
    assert agent.take_batch(b_chunk) == [b_chunk]   # b's tail waits for its own chunk's batch to end


def test_abandoned_requests_do_not_hold_a_batch_and_are_freed_under_load(tmp_path):
    """A request that stopped sending steps (its coordinator gone, its free lost) neither makes
    every batch wait the gather window for it nor keeps its cache while others keep the node busy."""
    import threading

    from appliance.config import Config
    from appliance.node import agent as node_agent

    agent = node_agent.NodeAgent(Config(broker="127.0.0.1:1", state_dir=str(tmp_path)))
    now = time.monotonic()
    agent.last_used = {"old" * 10 + "ab": now - node_agent.IDLE_REQUEST_S - 1, "idle" * 8: now - 5, "live" * 8: now}
    assert agent.in_flight() == 1
    live = protocol.Frame("live" * 8, "0" * 32, 1, 0, 0, np.zeros(1, np.int32))
    assert agent.take_batch(live) == [live]
    assert time.monotonic() - now < node_agent.GATHER_S * 10   # it did not wait for the idle ones

    freed, done = [], threading.Event()
    agent.free = lambda request_id: (freed.append(request_id), agent.last_used.pop(request_id), done.set())
    agent.handle = lambda kind, item: agent.work.put(("frame", item))   # a node kept busy forever
    agent.work.put(("frame", live))
    worker = threading.Thread(target=agent.worker, daemon=True)
    worker.start()
    done.wait(3 * protocol.HEARTBEAT_S)
    agent.stopping.set()
    assert freed == ["old" * 10 + "ab"]


def test_a_new_plan_keeps_the_order_of_the_nodes_it_had():
    """Loading a shard lowers a node's free memory; that alone must not reorder the pipeline."""
    before = split_layers([NodeCapacity("a", 8 * GB), NodeCapacity("b", 7 * GB)], model())
    after = split_layers([NodeCapacity("a", 6 * GB), NodeCapacity("b", 7 * GB), NodeCapacity("c", 9 * GB)], model(),
                         keep_order=[s.node for s in before])
    assert [s.node for s in before] == ["a", "b"] and [s.node for s in after] == ["a", "b", "c"]
    nearly = split_layers([NodeCapacity("a", 8 * GB - 50 * 2**20), NodeCapacity("b", 8 * GB)], model(5),
                          keep_order=["a", "b"])
    assert nearly == split_layers([NodeCapacity("a", 8 * GB), NodeCapacity("b", 8 * GB - 40 * 2**20)], model(5),
                                  keep_order=["a", "b"])   # a little less free memory moves no layer


def test_a_node_whose_worker_is_dead_or_stuck_says_it_is_not_serving(tmp_path):
    import threading

    from appliance.config import Config
    from appliance.node import agent as node_agent

    agent = node_agent.NodeAgent(Config(broker="127.0.0.1:1", state_dir=str(tmp_path)))
    assert not agent.serving()                        # no worker yet
    agent.worker_thread = threading.Thread(target=threading.Event().wait, daemon=True)
    agent.worker_thread.start()
    assert agent.serving()
    agent.work.put(("free", "x"))
    agent.worker_beat -= node_agent.STUCK_S + 1       # work waiting, and the loop has not come round
    assert not agent.serving()


def test_a_node_holds_as_many_requests_as_a_quarter_of_its_free_memory_fits():
    from appliance.engines.base import MAX_REQUESTS, Engine, Shard
    from tests.conftest import STORIES

    engine = Engine(Shard(STORIES, 0, 2, 5))
    c = engine.config
    assert engine.kv_bytes() == 2 * 2 * c.num_kv_heads * c.head_dim * engine.capacity * 4
    assert engine.request_room(engine.kv_bytes() * 4 * 3) == 3
    assert engine.request_room(0) == 1 and engine.request_room(2**50) == MAX_REQUESTS


def test_uncut_sampling_follows_the_distribution():
    rng = np.random.default_rng(1)
    draws = [sample(np.array([0.0, np.log(3.0)]), protocol.Sampling(1.0), rng) for _ in range(4000)]
    assert 0.72 < np.mean(draws) < 0.78   # p(1) = 3/4


def test_the_bus_sends_each_message_at_once(broker):
    """Nagle's algorithm off: a reply sent right after a frame must not wait for the broker's delayed ACK."""
    import socket

    from appliance.bus.client import Bus
    from appliance.config import Config

    bus = Bus(Config(broker=broker), client_id=f"nodelay-{protocol.new_id()[:8]}").start()
    try:
        assert bus.client.socket().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        bus.stop()


def test_a_node_imports_no_engine_and_no_hub_client_it_does_not_use():
    """Each import is memory in every node process (onnx alone is 14 MB): checking a quant must
    not import onnxruntime's graph builder, nor a node's start the download code, nor a node
    given its broker zeroconf (3.7 MiB)."""
    import subprocess
    import sys

    code = ("import sys\nfrom appliance.config import load_config\nload_config(None, env={}, quant='q4', engine='ggml')\n"
            "import appliance.node.agent\nfrom appliance.cli import discover_broker\nfrom appliance.config import Config\n"
            "assert discover_broker(Config(broker='127.0.0.1:1')) is None\n"
            "print(' '.join(m for m in ('onnx', 'onnxruntime', 'huggingface_hub', 'httpx', 'zeroconf') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == []
