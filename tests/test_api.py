"""The OpenAI-style API against a running 2-node cluster, through the official openai client."""
from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.conftest import STORIES, STORY, LocalCluster

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
