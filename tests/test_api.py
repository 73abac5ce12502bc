"""The OpenAI-style API against a running 2-node cluster, through the official openai client."""
from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from tests.conftest import STORIES, STORY, LocalCluster, wait_for
from appliance.bus.protocol import Topics

MODEL = str(STORIES)


@pytest.fixture(scope="module")
def cluster(broker, tmp_path_factory):
    c = LocalCluster(broker, tmp_path_factory.mktemp("api")).start(2)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def client(cluster):
    return cluster.openai()


def test_models_lists_the_loaded_model(client):
    assert [m.id for m in client.models.list()] == [MODEL]


def test_completion_greedy_with_usage_and_length(client):
    r = client.completions.create(model=MODEL, prompt="", max_tokens=30, temperature=0)
    assert STORY.startswith(r.choices[0].text) and len(r.choices[0].text) > 60
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (1, 30, 31)


def test_stop_string_ends_with_finish_reason_stop(client):
    r = client.completions.create(model=MODEL, prompt="", max_tokens=60, temperature=0, stop=["Lily", "zzz"])
    assert r.choices[0].text == "Once upon a time, there was a little girl named "
    assert r.choices[0].finish_reason == "stop"


def test_streamed_completion_matches_the_plain_one_and_ends_with_done(client, cluster):
    plain = client.completions.create(model=MODEL, prompt="The cat", max_tokens=40, temperature=0, stop=". She")
    chunks = list(client.completions.create(model=MODEL, prompt="The cat", max_tokens=40, temperature=0,
                                            stop=". She", stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    raw = httpx.post(cluster.url + "/v1/completions", timeout=30,
                     json={"model": MODEL, "prompt": "", "max_tokens": 5, "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip().endswith("data: [DONE]")


def test_seed_makes_sampling_repeatable(client):
    def sample(seed):
        return client.completions.create(model=MODEL, prompt="Tom", max_tokens=30, temperature=1.0, top_p=0.9,
                                         seed=seed).choices[0].text
    assert sample(7) == sample(7)
    assert len({sample(s) for s in range(4)}) > 1


def test_chat_completion_without_a_template_uses_the_fallback(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": "Tell a story."},
                                                              {"role": "user", "content": "Once upon a time"}],
                                       max_tokens=20, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.usage.completion_tokens <= 20
    streamed = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Once upon a time"}],
                                              max_completion_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)


def test_async_client_streams(cluster):
    async def go():
        client = openai.AsyncOpenAI(base_url=cluster.url + "/v1", api_key="none", max_retries=0)
        stream = await client.completions.create(model=MODEL, prompt="", max_tokens=20, temperature=0, stream=True)
        return "".join([c.choices[0].text async for c in stream])
    assert STORY.startswith(asyncio.run(go()))


BAD_BODIES = [
    ("not json", 400), ("[1, 2]", 400), ('{"prompt": "x"}', 400), ('{"model": 5}', 400),
    ('{"model": "nope", "prompt": "x"}', 404),
    ('{"model": "%s", "prompt": 5}' % MODEL, 400),
    ('{"model": "%s", "prompt": "x", "max_tokens": "ten"}' % MODEL, 400),
    ('{"model": "%s", "prompt": "x", "max_tokens": 100000}' % MODEL, 400),
    ('{"model": "%s", "prompt": "x", "max_tokens": 0}' % MODEL, 400),
    ('{"model": "%s", "prompt": "x", "temperature": "hot"}' % MODEL, 400),
    ('{"model": "%s", "prompt": "x", "n": 2}' % MODEL, 400),
    ('{"model": "%s", "prompt": "x", "stop": [1]}' % MODEL, 400),
    ('{"model": "%s", "prompt": "x", "stream": "yes"}' % MODEL, 400),
    ('{"model": "%s", "prompt": "%s"}' % (MODEL, "story " * 600), 400),
]


@pytest.mark.parametrize("body,status", BAD_BODIES)
def test_bad_requests_get_openai_style_errors(cluster, body, status):
    r = httpx.post(cluster.url + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) >= {"message", "type", "param", "code"}


def test_bad_chat_messages_and_unknown_routes(cluster):
    for messages in (None, [], [{"role": "robot", "content": "x"}], [{"role": "user", "content": 3}]):
        r = httpx.post(cluster.url + "/v1/chat/completions", json={"model": MODEL, "messages": messages})
        assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    for extra in ({"enable_thinking": "yes"}, {"chat_template_kwargs": {"enable_thinking": 1}},
                  {"chat_template_kwargs": "think"}):
        r = httpx.post(cluster.url + "/v1/chat/completions", json={**chat, **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] in ("enable_thinking", "chat_template_kwargs")
    assert httpx.get(cluster.url + "/v1/nothing").json()["error"]["type"] == "not_found_error"
    # and the cluster keeps serving
    assert httpx.get(cluster.url + "/healthz").json()["ready"] is True


def test_openai_client_raises_on_unknown_model(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x")


def test_no_nodes_means_503(broker, tmp_path):
    lonely = LocalCluster(broker, tmp_path)
    try:
        lonely.start_panel()
        with pytest.raises(openai.APIStatusError) as e:
            lonely.openai().completions.create(model=MODEL, prompt="x", max_tokens=3)
        assert e.value.status_code == 503 and "no nodes" in e.value.message
    finally:
        lonely.stop()


def test_one_coordinator_plans_and_a_standby_takes_over_when_it_dies(broker, tmp_path):
    from appliance.broker import free_port, wait_for_port

    c = LocalCluster(broker, tmp_path)
    c.add_node("solo")      # a name of its own: node ids (and MQTT client ids) derive from it
    c.start_panel()
    try:
        c.watcher.wait(lambda w: w.ready(1), 60, "a plan over one loaded node")
        first = c.health()["coordinator"]
        assert first["leader"] is True
        port = free_port()
        standby = c._spawn("panel2", ["panel", "--model", MODEL, "--host", "127.0.0.1", "--port", str(port)])
        wait_for_port("127.0.0.1", port, 30, standby)
        url = f"http://127.0.0.1:{port}"
        second = httpx.get(url + "/healthz", timeout=5).json()
        assert second["coordinator"]["leader"] is False and second["coordinator"]["id"] != first["id"]
        # the standby serves on the leader's plan and publishes none of its own
        standby_client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        text = standby_client.completions.create(model=MODEL, prompt="", max_tokens=20, temperature=0).choices[0].text
        assert STORY.startswith(text) and text
        assert {p["coordinator"] for p in c.watcher.plans} == {first["id"]}

        c.panel.kill()      # no clean exit: the broker sends its Last Will
        c.watcher.wait(lambda w: w.plans[-1]["coordinator"] == second["coordinator"]["id"] and w.ready(1), 30,
                       "the standby to plan")
        assert httpx.get(url + "/healthz", timeout=5).json()["coordinator"]["leader"] is True
        text = standby_client.completions.create(model=MODEL, prompt="", max_tokens=20, temperature=0).choices[0].text
        assert STORY.startswith(text) and text
    finally:
        c.stop()
        standby.terminate()
        standby.wait(10)


def metric(url: str, name: str, **labels) -> float:
    """One sample's value from /metrics (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=5).text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def test_logprobs_on_completions_and_chat(client):
    r = client.completions.create(model=MODEL, prompt="Once", max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and chosen <= 0 and abs(max(top.values()) - chosen) < 1e-4   # greedy takes the best
    assert "".join(lp.tokens).replace(" ", "") == r.choices[0].text.replace(" ", "")
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], top_logprobs=2)


def test_a_client_that_disconnects_stops_its_generation_on_every_node(cluster):
    import json
    import threading

    import paho.mqtt.client as mqtt

    stopped = metric(cluster.url, "exo_requests_total", status="stopped")
    tokens = metric(cluster.url, "exo_completion_tokens_total")
    heartbeats, cond = {}, threading.Condition()

    def on_message(c, userdata, msg):
        with cond:
            heartbeats[msg.topic.split("/")[3]] = json.loads(msg.payload)
            cond.notify_all()
    watch = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    watch.on_message = on_message
    watch.on_connect = lambda c, *_: c.subscribe(Topics(cluster.cluster).node_status())
    host, port = cluster.broker.rsplit(":", 1)
    watch.connect(host, int(port))
    watch.loop_start()
    try:
        body = {"model": MODEL, "prompt": "Once", "max_tokens": 400, "temperature": 0, "stream": True}
        with httpx.stream("POST", cluster.url + "/v1/completions", json=body, timeout=30) as r:
            first = next(line for line in r.iter_lines() if line.startswith("data: "))
            assert json.loads(first[6:])["choices"]
        gone = time.time()
        wait_for(lambda: metric(cluster.url, "exo_requests_total", status="stopped") == stopped + 1, 10,
                 "the coordinator to record the request as stopped")
        assert metric(cluster.url, "exo_completion_tokens_total") - tokens < 50   # stopped within a few steps
        nodes = {s["node"] for s in cluster.health()["plan"]["shards"]}
        with cond:   # a heartbeat sent after the disconnect, from each node, holds no request
            assert cond.wait_for(lambda: all(heartbeats.get(n, {}).get("time", 0) > gone + 0.1
                                             and heartbeats[n]["requests"] == 0 for n in nodes), 10), heartbeats
    finally:
        watch.loop_stop()
        watch.disconnect()


def test_metrics_report_requests_latency_and_nodes(cluster, client):
    client.completions.create(model=MODEL, prompt="The", max_tokens=5, temperature=0)
    url = cluster.url
    assert metric(url, "exo_requests_total", status="done") >= 1
    assert metric(url, "exo_time_to_first_token_seconds_count") >= 1
    assert metric(url, "exo_step_seconds_count") >= 4
    assert metric(url, "exo_hop_seconds_count") == metric(url, "exo_step_seconds_count")
    assert 0 < metric(url, "exo_hop_seconds_sum") < metric(url, "exo_step_seconds_sum") / 3   # 2 nodes: 3 hops
    assert metric(url, "exo_prompt_tokens_total") >= 1
    nodes = [s["node"] for s in cluster.health()["plan"]["shards"]]
    for node in nodes:
        wait_for(lambda: metric(url, "exo_node_frames_total", node=node) > 0, 10, f"a heartbeat from {node}")
        assert metric(url, "exo_node_memory_total_bytes", node=node) > 0
        assert metric(url, "exo_node_frame_seconds_total", node=node) > 0
    assert httpx.get(url + "/metrics").headers["content-type"].startswith("text/plain")


CHAT_BAD_BODIES = [
    ({"model": MODEL}, 400), ({"model": MODEL, "messages": "hi"}, 400),
    ({"model": MODEL, "messages": [{"role": "user"}]}, 400),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 3}, 400),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": "5"}, 400),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**9}, 400),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_p": 2}, 400),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "seed": -1}, 400),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "logprobs": "yes"}, 400),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 9, "logprobs": True}, 400),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream_options": 1}, 400),
    ({"model": MODEL, "messages": [{"role": "user", "content": "story " * 600}]}, 400),
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, 404),
]


@pytest.mark.parametrize("body,status", CHAT_BAD_BODIES)
def test_bad_chat_requests_get_openai_style_errors(cluster, body, status):
    r = httpx.post(cluster.url + "/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"] and r.json()["error"]["type"]


def test_the_cluster_serves_after_every_bad_request_and_errors_reach_the_client(client, cluster):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=5, n=2)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "story " * 600}])
    r = client.completions.create(model=MODEL, prompt="", max_tokens=10, temperature=0, stop="zzz")
    assert STORY.startswith(r.choices[0].text) and r.choices[0].text
    assert httpx.get(cluster.url + "/openapi.json").json()["openapi"].startswith("3.")


def test_async_client_plain_and_streamed_chat(cluster):
    async def go():
        client = openai.AsyncOpenAI(base_url=cluster.url + "/v1", api_key="none", max_retries=0)
        messages = [{"role": "user", "content": "Once upon a time"}]
        plain = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
        stream = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                                      stream=True, stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        return plain, chunks
    plain, chunks = asyncio.run(go())
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


CHAT = [{"role": "user", "content": "Once upon a time"}]
UNSUPPORTED = [   # (endpoint, extra fields, the field the 400 must name)
    ("chat", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ("chat", {"tool_choice": "auto"}, "tool_choice"),
    ("chat", {"response_format": {"type": "json_object"}}, "response_format"),
    ("chat", {"n": 2}, "n"),
    ("text", {"n": 3}, "n"),
    ("text", {"best_of": 2}, "best_of"),
    ("text", {"echo": True}, "echo"),
    ("chat", {"presence_penalty": 0.5}, "presence_penalty"),
    ("chat", {"logit_bias": {"5": 10}}, "logit_bias"),
    ("chat", {"no_such_field": 1}, "no_such_field"),
]


@pytest.mark.parametrize("endpoint,extra,field", UNSUPPORTED, ids=[u[2] for u in UNSUPPORTED])
def test_what_the_cluster_does_not_do_is_a_400_naming_the_field(client, endpoint, extra, field):
    with pytest.raises(openai.BadRequestError) as e:
        if endpoint == "chat":
            client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, extra_body=extra)
        else:
            client.completions.create(model=MODEL, prompt="x", max_tokens=4, extra_body=extra)
    assert e.value.body["param"] == field and field in e.value.body["message"]


def test_what_changes_nothing_is_accepted(client):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, temperature=0, n=1, user="me",
                                       response_format={"type": "text"}, presence_penalty=0, frequency_penalty=0,
                                       tool_choice="none", metadata={"k": "v"})
    assert r.choices[0].message.content


def test_error_messages_name_the_field_and_the_range(cluster):
    r = httpx.post(cluster.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 0})
    assert r.json()["error"]["message"] == "'max_tokens' must be an integer of at least 1"
    r = httpx.post(cluster.url + "/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "temperature": 3})
    assert r.json()["error"]["message"] == "'temperature' must be a finite number between 0 and 2"


def test_models_says_when_the_model_was_loaded(client, cluster):
    created = client.models.list().data[0].created
    assert abs(created - time.time()) < 3600 and created <= time.time()


def test_refused_and_failed_requests_are_counted(cluster, client):
    rejected = metric(cluster.url, "exo_requests_total", status="rejected")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    assert metric(cluster.url, "exo_requests_total", status="rejected") == rejected + 2


def test_openapi_request_bodies_are_the_validating_schema(cluster):
    from appliance.panel.schema import ChatCompletionRequest

    doc = httpx.get(cluster.url + "/openapi.json").json()
    chat = doc["components"]["schemas"]["ChatCompletionRequest"]
    assert set(chat["properties"]) == set(ChatCompletionRequest.model_fields)
    assert chat["properties"]["model"]["enum"] == [MODEL] and chat["additionalProperties"] is False
    temperature = next(b for b in chat["properties"]["temperature"]["anyOf"] if b["type"] == "number")
    assert (temperature["minimum"], temperature["maximum"]) == (0, 2)
