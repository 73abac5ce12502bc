"""The cluster end to end: real mosquitto, real node and panel processes, the official openai client."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import psutil
import pytest

from appliance.broker import free_port
from appliance.bus import protocol
from tests.conftest import STORIES, STORY, wait_for
from tests.test_api import metric
from tests.system import needs

PROMPTS = ["Once upon a time", "The dog", "Lily and Tom went to the"]
MODEL = str(STORIES)


def complete(cluster, prompt="", max_tokens=64, **kw):
    return cluster.openai().completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, **kw)


def greedy_texts(cluster) -> list[str]:
    return [complete(cluster, p, max_tokens=24).choices[0].text for p in PROMPTS]


def test_all_in_one_exo_writes_the_story_and_ctrl_c_stops_everything(tmp_path):
    port = free_port()
    env = {**os.environ, "EXO_STATE_DIR": str(tmp_path), "EXO_CONFIG": str(tmp_path / "c.yaml")}
    (tmp_path / "c.yaml").write_text("{}\n")
    log = open(tmp_path / "exo.log", "wb")
    exo = subprocess.Popen([sys.executable, "-m", "appliance", "--model", MODEL, "--local-nodes", "3",
                            "--port", str(port), "--host", "127.0.0.1", "--cluster", "allinone"],
                           stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)

        def answer():
            try:
                return client.completions.create(model=MODEL, prompt="", max_tokens=48, temperature=0)
            except (openai.APIConnectionError, openai.InternalServerError):
                return None  # not up yet, or 503 while the plan loads
        result = wait_for(answer, 60, "the all-in-one exo to answer")
        assert result.choices[0].text.startswith(STORY[:95])
        assert result.choices[0].finish_reason == "length"
        children = psutil.Process(exo.pid).children(recursive=True)
        assert len(children) >= 4  # the broker and three nodes
    finally:
        exo.send_signal(signal.SIGINT)
        exo.wait(20)
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"left running after Ctrl-C: {alive}"


def test_three_nodes_write_the_story(local_cluster):
    cluster = local_cluster(3)
    text = complete(cluster, max_tokens=48).choices[0].text
    assert text.startswith(STORY[:95]), text


def test_greedy_tokens_are_the_same_for_1_3_and_5_nodes(local_cluster):
    results = {}
    for n in (1, 3, 5):
        cluster = local_cluster(n)
        results[n] = greedy_texts(cluster)
        assert complete(cluster, max_tokens=48).choices[0].text.startswith(STORY[:95])
        assert len(cluster.health()["plan"]["shards"]) == n
        cluster.stop()
    assert results[1] == results[3] == results[5]
    assert all(results[1])


@needs("clang")
def test_each_node_may_run_a_different_engine(local_cluster):
    """numpy, onnxruntime and tinygrad nodes in one pipeline pass activations between them."""
    cluster = local_cluster(3, engines=("numpy", "onnxruntime", "tinygrad"), quant="f32")
    assert complete(cluster, max_tokens=48).choices[0].text.startswith(STORY[:95])
    shards = [info["shard"] for info in cluster.watcher.nodes.values() if info.get("shard")]
    assert sorted(s["engine"] for s in shards) == ["numpy", "onnxruntime", "tinygrad"]


def test_a_node_killed_while_idle_is_planned_out(local_cluster):
    cluster = local_cluster(3)
    victim = cluster.node_id("n1")
    started = time.monotonic()
    cluster.nodes["n1"].kill()
    cluster.watcher.wait(lambda w: w.ready(2) and victim not in [s["node"] for s in w.plans[-1]["shards"]],
                         10, "a new plan without the killed node")
    assert time.monotonic() - started < 10
    assert complete(cluster, max_tokens=48).choices[0].text.startswith(STORY[:95])


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 42}], ids=["greedy", "seeded"])
def test_a_node_killed_mid_stream_is_resumed_on_a_new_plan(local_cluster, sampling):
    """The coordinator replays the prompt and the tokens so far on the two nodes left: the client
    sees one stream, the same text as an undisturbed run (seeded draws depend on seed and step only)."""
    cluster = local_cluster(3)
    undisturbed = cluster.openai().completions.create(model=MODEL, prompt="", max_tokens=200, **sampling).choices[0].text
    stream = cluster.openai().completions.create(model=MODEL, prompt="", max_tokens=200, stream=True, **sampling)
    received = []
    for chunk in stream:
        received.append(chunk.choices[0].text)
        if len(received) == 3:
            cluster.nodes["n1"].kill()
    assert "".join(received) == undisturbed
    assert cluster.watcher.ready(2)
    requests = httpx.get(cluster.url + "/api/state", timeout=5).json()["requests"]
    assert requests[0]["resumes"] >= 1 and requests[0]["status"] == "done"
    assert metric(cluster.url, "exo_request_resumes_total") >= 1


def test_malformed_frames_and_json_are_dropped_and_the_node_keeps_serving(local_cluster):
    cluster = local_cluster(2)
    first = cluster.node_id("n0")
    t = protocol.Topics(cluster.cluster)
    good = protocol.encode_frame(protocol.Frame(protocol.new_id(), protocol.new_id(), 1, 0, 0, __import__("numpy").zeros(3, "int32")))
    garbage = {
        t.node_inbox(first, cluster.watcher.plans[-1]["coordinator"]): [b"", b"\x00" * 3, b"nonsense" * 20, good[:40], good[:-2], b"EXOX" + good[4:],
                                    good[:7] + b"\x09" + good[8:]],
        t.plan: [b"{", b"[]", b'{"plan_id": "x"}', b"\xff\xfe"],
        t.ctl("free"): [b"not json", b"{}", b"[1,2]"],
        # and what the coordinator reads
        t.node_info("fake"): [b"{", b'{"online": true, "memory_available": "lots"}', b'{"online": true}'],
        t.node_status("fake"): [b"\x00", b"3"],
        t.coord_out(cluster.watcher.plans[-1]["coordinator"], first): [b"{", b'{"request_id": 5}'],
    }
    for topic, payloads in garbage.items():
        cluster.publish(topic, payloads)
    assert complete(cluster, max_tokens=48).choices[0].text.startswith(STORY[:95])
    assert all(p.poll() is None for p in [cluster.panel, *cluster.nodes.values()])
    log = cluster.log("n0")
    assert "dropped a malformed frame" in log and "dropped a message" in log


def test_the_pure_python_broker_carries_a_whole_cluster(tmp_path):
    from appliance.broker import EmbeddedBroker
    from tests.conftest import LocalCluster

    broker = EmbeddedBroker(port=free_port(), kind="python").start()
    cluster = LocalCluster(broker.address, tmp_path)
    try:
        cluster.start(2)
        assert complete(cluster, max_tokens=48).choices[0].text.startswith(STORY[:95])
        victim = cluster.node_id("n1")
        cluster.nodes["n1"].kill()   # the Last Will works there too
        cluster.watcher.wait(lambda w: w.ready(1) and victim not in [s["node"] for s in w.plans[-1]["shards"]],
                             10, "a new plan without the killed node")
    finally:
        cluster.stop()
        broker.stop()


@needs("mosquitto")
def test_a_broker_that_does_not_stop_when_asked_is_killed_and_reaped():
    from appliance.broker import EmbeddedBroker

    broker = EmbeddedBroker(port=free_port(), kind="mosquitto").start()
    os.kill(broker.process.pid, signal.SIGSTOP)   # hung: SIGTERM waits, SIGKILL does not
    broker.stop()
    assert broker.process.returncode == -signal.SIGKILL
    assert not psutil.pid_exists(broker.process.pid)   # a zombie would still have its pid


def test_a_catalog_id_not_on_disk_is_a_clear_error_and_nothing_is_left_running(tmp_path):
    env = {**os.environ, "EXO_STATE_DIR": str(tmp_path), "EXO_CONFIG": str(tmp_path / "c.yaml"),
           "EXO_MODELS_DIR": str(tmp_path / "models"), "HF_HUB_OFFLINE": "1"}
    (tmp_path / "c.yaml").write_text("{}\n")
    exo = subprocess.run([sys.executable, "-m", "appliance", "--model", "Qwen/Qwen2.5-0.5B-Instruct",
                          "--port", str(free_port()), "--local-nodes", "2"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert exo.returncode != 0
    assert str(tmp_path / "models" / "models--Qwen--Qwen2.5-0.5B-Instruct") in exo.stderr


def test_node_and_panel_need_a_broker(tmp_path):
    env = {**os.environ, "EXO_CONFIG": str(tmp_path / "c.yaml")}
    (tmp_path / "c.yaml").write_text("{}\n")
    # The panel's port is taken (as 52415, in the ephemeral range, can be by any outgoing
    # connection): the usage error is still the one said, before anything touches the network.
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = str(taken.getsockname()[1])
        for command in (["node"], ["panel", "--host", "127.0.0.1", "--port", port]):
            run = subprocess.run([sys.executable, "-m", "appliance", *command], capture_output=True, text=True,
                                 env=env)
            assert run.returncode != 0 and "no broker given" in run.stderr, run.stderr


def test_a_prompt_sent_in_many_chunks_gives_the_same_tokens(broker, tmp_path, monkeypatch):
    from appliance.config import Config
    from appliance.coordinator import coordinator as coordinator_module
    from tests.conftest import LocalCluster

    cluster = LocalCluster(broker, tmp_path)
    for name in ("n0", "n1"):
        cluster.add_node(name)
    coordinator = coordinator_module.Coordinator(Config(broker=broker, cluster=cluster.cluster, model=MODEL)).start()
    try:
        cluster.watcher.wait(lambda w: w.ready(2), 30, "a plan over 2 loaded nodes")
        prompt = coordinator.model.tokenizer.encode("Lily and Tom went to the park. " * 12)
        greedy = protocol.Sampling(temperature=0)
        whole = [t.id for t in coordinator.generate(prompt, 20, greedy)]
        monkeypatch.setattr(coordinator_module, "MAX_FRAME_BYTES", 16 * 64 * 2)   # 16 tokens a chunk
        assert len(coordinator_module.prefill_chunks(prompt, 64)) > 5
        assert [t.id for t in coordinator.generate(prompt, 20, greedy)] == whole
    finally:
        coordinator.stop()
        cluster.stop()


@pytest.mark.parametrize("nodes", [1, 2])
def test_the_last_stage_sends_the_next_steps_itself(broker, tmp_path, nodes):
    """The coordinator sends the prompt and nothing more: each token comes back `continued`, the
    last stage having sent the next step itself (into its own queue, or to the first stage), but
    the last. A request ended early (a stop string, a client gone) is freed on every node, and the
    step already on its way is dropped there without an error."""
    from appliance.config import Config
    from appliance.coordinator.coordinator import Coordinator
    from tests.conftest import LocalCluster

    cluster = LocalCluster(broker, tmp_path)
    for n in range(nodes):
        cluster.add_node(f"n{n}")
    coordinator = Coordinator(Config(broker=broker, cluster=cluster.cluster, model=MODEL)).start()
    frames_sent = []
    publish = coordinator.bus.publish
    coordinator.bus.publish = lambda topic, *a, **kw: (frames_sent.append(topic) if "/in/" in topic else None,
                                                      publish(topic, *a, **kw))[1]
    try:
        cluster.watcher.wait(lambda w: w.ready(nodes), 30, f"a plan over {nodes} loaded node(s)")
        tokenizer = coordinator.model.tokenizer
        tokens = list(coordinator.generate(tokenizer.encode("Once upon a time"), 24, protocol.Sampling(0)))
        assert len(tokens) == 24 and len(frames_sent) == 1
        assert [t.continued for t in tokens] == [True] * 23 + [False]
        assert tokenizer.decode([t.id for t in tokens]).startswith(", there was a little girl named Lily")
        assert all(t.logprob is None and t.top == [] for t in tokens)   # not asked for

        asked = list(coordinator.generate(tokenizer.encode("Once upon a time"), 6, protocol.Sampling(0), logprobs=True))
        assert [t.id for t in asked] == [t.id for t in tokens[:6]] and len(frames_sent) == 2
        assert all(t.logprob <= 0 and t.top[0][0] == t.id and t.top[0][1] == pytest.approx(t.logprob, abs=1e-5)
                   for t in asked)   # greedy: the likeliest token

        stream = coordinator.generate(tokenizer.encode("Once upon a time"), 200, protocol.Sampling(0))
        assert len([next(stream) for _ in range(3)]) == 3
        stream.close()   # as a stop string does
        closed, plan_nodes = time.time(), coordinator.cluster.plan.nodes
        wait_for(lambda: all((s := coordinator.cluster.status.get(n, {})).get("time", 0) > closed and s["requests"] == 0
                             for n in plan_nodes), 10, "every node's heartbeat to say it freed the request")
        assert len(frames_sent) == 3
        for n in range(nodes):
            assert "refused a frame" not in cluster.log(f"n{n}")
    finally:
        coordinator.stop()
        cluster.stop()


def test_a_step_is_timed_from_reply_to_reply_not_at_the_consumers_pace(broker, tmp_path):
    """The step and hop the panel shows run from one token's reply to the next. A consumer that
    takes each token late (a slow client) finds the next one already waiting; that step did take
    time, on the nodes, while the consumer was busy."""
    from appliance.config import Config
    from appliance.coordinator.coordinator import Coordinator
    from tests.conftest import LocalCluster

    cluster = LocalCluster(broker, tmp_path)
    for n in range(2):
        cluster.add_node(f"n{n}")
    coordinator = Coordinator(Config(broker=broker, cluster=cluster.cluster, model=MODEL)).start()
    try:
        cluster.watcher.wait(lambda w: w.ready(2), 30, "a plan over 2 loaded nodes")
        for _ in coordinator.generate(coordinator.model.tokenizer.encode("Once upon a time"), 12, protocol.Sampling(0)):
            time.sleep(0.05)   # the client's pace: the last stage sends each step on without waiting for it
        seen = coordinator.throughput.snapshot()
        assert 0 < seen["hop_s"] and 2 * seen["hop_s"] < seen["step_s"] < 0.05, seen   # 2 links a step
    finally:
        coordinator.stop()
        cluster.stop()


def test_a_taken_port_or_an_unreachable_broker_is_one_clear_line(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for args in (["--port", str(port), "--host", "127.0.0.1"],
                     ["panel", "--broker", "127.0.0.1:1", "--port", str(port), "--host", "127.0.0.1"]):
            run = subprocess.run([sys.executable, "-m", "appliance", *args], capture_output=True, text=True, timeout=30)
            assert run.returncode != 0 and f"port {port} on 127.0.0.1 is already in use" in run.stderr
    run = subprocess.run([sys.executable, "-m", "appliance", "panel", "--broker", "127.0.0.1:1", "--port",
                          str(free_port())], capture_output=True, text=True, timeout=30)
    assert run.returncode != 0 and "cannot reach the MQTT broker at 127.0.0.1:1" in run.stderr
    assert "Traceback" not in run.stderr


def test_a_replan_that_changes_nothing_keeps_the_plan_and_its_requests(broker, tmp_path):
    """Two triggers for one event (a node coming online, the model being set) used to publish a
    second, identical plan, which ended the requests in flight with a 503."""
    from appliance.config import Config
    from appliance.coordinator.coordinator import Coordinator
    from tests.conftest import LocalCluster

    cluster = LocalCluster(broker, tmp_path)
    cluster.add_node("n0")
    coordinator = Coordinator(Config(broker=broker, cluster=cluster.cluster, model=MODEL)).start()
    try:
        cluster.watcher.wait(lambda w: w.ready(1), 30, "a plan over 1 loaded node")
        plan = coordinator.cluster.plan
        tokens = coordinator.generate(coordinator.model.tokenizer.encode("Once upon a time"), 8, protocol.Sampling(0))
        first = next(tokens)
        coordinator.cluster.replan()
        assert coordinator.cluster.plan is plan
        assert len([first, *tokens]) == 8
    finally:
        coordinator.stop()
        cluster.stop()


def test_a_new_plan_that_keeps_a_nodes_layers_does_not_reload_them(local_cluster):
    """Plan again with the same nodes: every node adopts the new plan id without loading weights,
    and a request caught by it resumes with the same text."""
    cluster = local_cluster(2)
    undisturbed = complete(cluster, max_tokens=200).choices[0].text
    stream = cluster.openai().completions.create(model=MODEL, prompt="", max_tokens=200, temperature=0, stream=True)
    received, before = [], cluster.watcher.plans[-1]["plan_id"]
    logged = {name: len(cluster.log(name)) for name in cluster.nodes}   # a boot may have loaded twice
    for chunk in stream:
        received.append(chunk.choices[0].text)
        if len(received) == 3:
            token = (cluster.tmp / "state" / "admin_token").read_text().strip()
            assert httpx.post(cluster.url + "/api/replan", headers={"Authorization": f"Bearer {token}"}).status_code == 202
    assert "".join(received) == undisturbed
    cluster.watcher.wait(lambda w: w.plans[-1]["plan_id"] > before and w.ready(2), 10, "the new plan, adopted")
    for name in cluster.nodes:
        log = cluster.log(name)[logged[name]:]
        assert "loaded layers" not in log and "without reloading" in log, log
