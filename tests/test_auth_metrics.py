"""A chat model made here (ChatML template, random weights) on a cluster with API keys: the prompt the
coordinator builds is the template's, /v1 needs a key, admin actions need the admin token."""
from __future__ import annotations

import json
import os
import stat

import httpx
import numpy as np
import openai
import pytest
from safetensors.numpy import save_file
from tokenizers import Tokenizer

from tests.conftest import STORIES, LocalCluster

API_KEY = "sk-test-key"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MESSAGES = [{"role": "system", "content": "You tell short stories."},
            {"role": "user", "content": "A story about a cat, please."},
            {"role": "assistant", "content": "Once upon a time there was a cat."},
            {"role": "user", "content": "And then?"}]


def make_chat_model(folder) -> str:
    """stories260K's tokenizer plus ChatML special tokens, a llama config and random weights."""
    folder.mkdir(parents=True)
    tok = Tokenizer.from_file(str(STORIES / "tokenizer.json"))
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.save(str(folder / "tokenizer.json"))
    vocab, hidden, layers, heads, kv, inter = tok.get_vocab_size(), 64, 2, 4, 2, 128
    eos = tok.token_to_id("<|im_end|>")
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "vocab_size": vocab, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": eos,
        "hidden_act": "silu", "torch_dtype": "float32"}))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "<|im_end|>", "unk_token": "<unk>", "chat_template": CHATML,
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 256}))
    rng = np.random.default_rng(0)
    head_dim = hidden // heads

    def w(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)
    tensors = {"model.embed_tokens.weight": w(vocab, hidden), "model.norm.weight": np.ones(hidden, np.float32)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors |= {p + "input_layernorm.weight": np.ones(hidden, np.float32),
                    p + "post_attention_layernorm.weight": np.ones(hidden, np.float32),
                    p + "self_attn.q_proj.weight": w(heads * head_dim, hidden),
                    p + "self_attn.k_proj.weight": w(kv * head_dim, hidden),
                    p + "self_attn.v_proj.weight": w(kv * head_dim, hidden),
                    p + "self_attn.o_proj.weight": w(hidden, heads * head_dim),
                    p + "mlp.gate_proj.weight": w(inter, hidden), p + "mlp.up_proj.weight": w(inter, hidden),
                    p + "mlp.down_proj.weight": w(hidden, inter)}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return str(folder)


@pytest.fixture(scope="module")
def chat_cluster(broker, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chat")
    model = make_chat_model(tmp / "chat-model")
    c = LocalCluster(broker, tmp / "cluster", model=model)
    (c.tmp / "none.yaml").write_text(f"api_keys: [{API_KEY}, other-key]\n")
    yield c.start(1)
    c.stop()


@pytest.fixture(scope="module")
def client(chat_cluster):
    return openai.OpenAI(base_url=chat_cluster.url + "/v1", api_key=API_KEY, max_retries=0)


def admin(cluster: LocalCluster) -> dict:
    path = cluster.tmp / "state" / "admin_token"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    return {"Authorization": "Bearer " + path.read_text().strip()}


def test_chat_prompt_is_what_the_template_renders(chat_cluster, client):
    from transformers import AutoTokenizer

    expected = AutoTokenizer.from_pretrained(chat_cluster.model).apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    from appliance.models.tokenizer import Tokenizer

    assert Tokenizer(chat_cluster.model).apply_chat_template(MESSAGES) == list(expected)   # the same ids...
    r = client.chat.completions.create(model=chat_cluster.model, messages=MESSAGES, max_tokens=3, temperature=0)
    assert r.usage.prompt_tokens == len(expected) > 20                                      # ...and the coordinator's
    assert r.choices[0].finish_reason in ("stop", "length")
    # the admin token was printed at start and is the one kept in the state dir
    assert admin(chat_cluster)["Authorization"].split()[1] in chat_cluster.log("panel")


def test_api_keys_guard_v1_and_the_panels_data(chat_cluster, client):
    assert [m.id for m in client.models.list()] == [chat_cluster.model]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic " + API_KEY}):
        r = httpx.get(chat_cluster.url + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=chat_cluster.url + "/v1", api_key="nope", max_retries=0).models.list()
    assert httpx.get(chat_cluster.url + "/v1/models", headers={"Authorization": "Bearer other-key"}).status_code == 200
    assert httpx.get(chat_cluster.url + "/healthz").status_code == 200          # not behind the key
    assert httpx.get(chat_cluster.url + "/").status_code == 200                 # nor the pages: they hold no data
    for path in ("/api/state", "/api/events", "/metrics"):                     # node names, hosts, requests
        assert httpx.get(chat_cluster.url + path).status_code == 401, path
        with httpx.stream("GET", chat_cluster.url + path, headers={"Authorization": f"Bearer {API_KEY}"}) as r:
            assert r.status_code == 200, path
    # the panel's own GETs may carry the key as a cookie (an EventSource sends no header); the API may not
    cookie = {"Cookie": f"exo_api_key={API_KEY}"}
    assert httpx.get(chat_cluster.url + "/api/state", headers=cookie).status_code == 200
    assert httpx.get(chat_cluster.url + "/v1/models", headers=cookie).status_code == 401
    assert httpx.get(chat_cluster.url + "/metrics", headers=cookie).status_code == 401


def test_metrics_public_lets_a_scraper_in_without_a_key(broker, tmp_path):
    c = LocalCluster(broker, tmp_path)
    (c.tmp / "none.yaml").write_text(f"api_keys: [{API_KEY}]\nmetrics_public: true\n")
    try:
        c.start_panel()
        assert httpx.get(c.url + "/metrics").status_code == 200
        assert httpx.get(c.url + "/api/state").status_code == 401
    finally:
        c.stop()


def test_admin_actions_need_the_admin_token(chat_cluster):
    url = chat_cluster.url
    for path in ("/api/models/load", "/api/models/unload", "/api/models/delete", "/api/replan"):
        for headers in ({}, {"Authorization": f"Bearer {API_KEY}"}):   # an API key is not the admin token
            assert httpx.post(url + path, json={"model": "x/y"}, headers=headers).status_code == 401


def test_admin_replan_unload_load_and_delete(chat_cluster, client):
    url, auth, watcher = chat_cluster.url, admin(chat_cluster), chat_cluster.watcher
    plans = len(watcher.plans)
    assert httpx.post(url + "/api/replan", headers=auth).status_code == 202
    watcher.wait(lambda w: len(w.plans) > plans and w.ready(1), 30, "a new plan, loaded")

    assert httpx.post(url + "/api/models/unload", headers=auth).json()["status"] == "unloaded"
    watcher.wait(lambda w: w.plans[-1]["shards"] == [] and all(not n.get("shard") for n in w.nodes.values()
                                                                if n.get("online")), 30, "the node to drop its shard")
    assert client.models.list().data == []
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=chat_cluster.model, messages=MESSAGES, max_tokens=2)

    r = httpx.post(url + "/api/models/load", headers=auth, json={"model": chat_cluster.model})
    assert r.status_code == 202, r.text
    watcher.wait(lambda w: w.ready(1), 30, "the model to load again")
    assert client.chat.completions.create(model=chat_cluster.model, messages=MESSAGES, max_tokens=2).choices

    assert httpx.post(url + "/api/models/load", headers=auth, json={"model": "/no/such/folder"}).status_code == 404
    assert httpx.post(url + "/api/models/load", headers=auth, json={}).status_code == 400
    assert httpx.post(url + "/api/models/delete", headers=auth, json={"model": "nobody/nothing"}).status_code == 404
    assert httpx.post(url + "/api/models/delete", headers=auth, json={"model": chat_cluster.model}).status_code == 409
    assert httpx.get(url + "/healthz").json()["ready"] is True   # and it keeps serving
