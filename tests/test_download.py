"""Downloads through huggingface_hub from a local stand-in for the hub (tests/fake_hub.py):
each node fetches only its own shards, a dropped connection resumes, offline mode is a clear error."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest

from tests.conftest import STORIES, STORY, LocalCluster
from tests.fake_hub import FakeHub, sharded_stories
from appliance.bus.protocol import Topics

REPO_ID = "exo-test/stories-sharded"
TOKEN = "hf_test_token"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """stories260K as a 7-file sharded checkpoint, served by a fake hub that wants a token."""
    folder = tmp_path_factory.mktemp("hub") / "stories-sharded"
    files = sharded_stories(STORIES, folder)
    hub = FakeHub({REPO_ID: folder}, token=TOKEN).start()
    yield hub, files
    hub.stop()


def snapshot_files(cache: Path) -> set[str]:
    snapshots = list((cache / ("models--" + REPO_ID.replace("/", "--")) / "snapshots").glob("*"))
    return {p.name for s in snapshots for p in s.iterdir()}


def needed_files(files: dict[str, list[str]], start: int, end: int, last: bool) -> set[str]:
    """From the layout: the embedding file (first stage, and the last since stories ties its head),
    the files of layers [start, end), the final norm's file on the last stage."""
    def holds(tensors, prefix):
        return any(t.startswith(prefix) for t in tensors)
    wanted = {"model.embed_tokens."} if start == 0 or last else set()
    wanted |= {f"model.layers.{i}." for i in range(start, end)} | ({"model.norm."} if last else set())
    return {f for f, tensors in files.items() if any(holds(tensors, p) for p in wanted)}


class HubCluster(LocalCluster):
    """A LocalCluster whose processes download from the fake hub, each into a cache of its own."""

    def _spawn(self, name, args):
        self.env = {**self.env, "EXO_MODELS_DIR": str(self.tmp / "cache" / name)}
        return super()._spawn(name, args)


class DownloadWatcher:
    def __init__(self, broker: str, cluster: str):
        self.states: dict[str, dict] = {}
        self.cond = threading.Condition()
        host, port = broker.rsplit(":", 1)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        self.client.on_connect = lambda c, *_: c.subscribe(Topics(cluster).node_download(), 1)
        self.client.on_message = self.on_message
        self.client.connect(host, int(port))
        self.client.loop_start()

    def on_message(self, client, userdata, msg):
        with self.cond:
            self.states[msg.topic.split("/")[3]] = json.loads(msg.payload)
            self.cond.notify_all()

    def wait_done(self, n: int, timeout: float) -> dict[str, dict]:
        with self.cond:
            assert self.cond.wait_for(lambda: sum(s["state"] == "done" for s in self.states.values()) >= n, timeout), \
                self.states
            return dict(self.states)

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


def test_two_nodes_download_only_the_shards_of_their_layers(broker, tmp_path, served, monkeypatch):
    hub, files = served
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    cluster = HubCluster(broker, tmp_path, model=REPO_ID)
    cluster.env.pop("HF_HUB_OFFLINE", None)
    downloads = DownloadWatcher(broker, cluster.cluster)
    try:
        cluster.start(2)
        text = cluster.openai().completions.create(model=REPO_ID, prompt="", max_tokens=40, temperature=0)
        assert STORY.startswith(text.choices[0].text) and len(text.choices[0].text) > 60

        plan = cluster.watcher.plans[-1]
        names = {cluster.node_id(n): n for n in ("n0", "n1")}
        for shard in plan["shards"]:
            got = snapshot_files(tmp_path / "cache" / names[shard["node"]])
            weights = {f for f in got if f.endswith(".safetensors")}
            assert weights == needed_files(files, shard["start"], shard["end"], shard["end"] == plan["num_layers"])
            assert weights != set(files), "a node fetched the whole model"
            assert {"config.json", "model.safetensors.index.json"} <= got and "tokenizer.json" not in got
        # the coordinator fetched config and tokenizer only
        panel = snapshot_files(tmp_path / "cache" / "panel")
        assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= panel
        assert not any(f.endswith(".safetensors") for f in panel)

        states = downloads.wait_done(2, 10)
        for node_id in names:
            s = states[node_id]
            assert s["model"] == REPO_ID and s["bytes"] == s["total"] > 0 and s["error"] is None
            assert s["speed"] > 0 and s["eta"] == 0
        fetches = [s for s in hub.seen if "/resolve/" in s.path]
        assert {s.auth for s in fetches} == {f"Bearer {TOKEN}"}     # HF_TOKEN went with every fetch
    finally:
        downloads.close()
        cluster.stop()


def test_a_dropped_connection_resumes_where_it_stopped(tmp_path, served, monkeypatch):
    from huggingface_hub import constants

    from appliance.models import download

    hub, files = served
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    # huggingface_hub keeps what arrived in 10 MB chunks; small chunks let a small file resume mid-way
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 4096)
    big = "model-00001-of-00007.safetensors"   # the embedding: the largest file
    hub.drop_once.add(big)
    before = len(hub.seen)
    states = []
    folder = download.fetch_shard(REPO_ID, 0, 1, download.Progress(REPO_ID, states.append), cache=tmp_path / "cache")

    served_file = next(iter(hub.repos.values())) / big
    assert (folder / big).read_bytes() == served_file.read_bytes()
    gets = [s for s in hub.seen[before:] if s.method == "GET" and s.path.endswith(big)]
    assert len(gets) == 2 and gets[0].range is None
    resumed_at = int(gets[1].range.removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= served_file.stat().st_size // 2
    assert states[-1]["state"] == "done" and states[-1]["bytes"] == states[-1]["total"]


def test_offline_with_nothing_cached_is_a_clear_error(tmp_path, served):
    hub, _ = served
    before = len(hub.seen)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": hub.url, "EXO_MODELS_DIR": str(tmp_path / "cache"),
           "EXO_CONFIG": str(tmp_path / "none.yaml")}
    (tmp_path / "none.yaml").write_text("{}\n")
    run = subprocess.run([sys.executable, "-m", "appliance", "models", "download", REPO_ID],
                         capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode != 0
    assert "HF_HUB_OFFLINE" in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert len(hub.seen) == before          # and nothing was asked of the hub


def test_models_download_fetches_everything_and_list_shows_the_catalog(tmp_path, served):
    hub, files = served
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "EXO_MODELS_DIR": str(tmp_path / "cache"),
           "EXO_CONFIG": str(tmp_path / "none.yaml")}
    env.pop("HF_HUB_OFFLINE", None)
    (tmp_path / "none.yaml").write_text("{}\n")
    run = subprocess.run([sys.executable, "-m", "appliance", "models", "download", REPO_ID],
                         capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 0, run.stderr
    assert set(files) | {"tokenizer.json", "config.json"} <= snapshot_files(tmp_path / "cache")
    listed = subprocess.run([sys.executable, "-m", "appliance", "models", "list"], capture_output=True, text=True,
                            env=env, timeout=30)
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in listed.stdout


def test_no_network_is_one_clear_line_after_a_few_tries_each_said(tmp_path):
    from appliance.broker import free_port

    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "EXO_MODELS_DIR": str(tmp_path / "cache"),
           "EXO_CONFIG": str(tmp_path / "none.yaml")}                  # nothing listens there: refused
    env.pop("HF_HUB_OFFLINE", None)
    (tmp_path / "none.yaml").write_text("{}\n")
    run = subprocess.run([sys.executable, "-m", "appliance", "models", "download", REPO_ID],
                         capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    lines = run.stderr.strip().splitlines()
    assert [line for line in lines if "does not answer" in line and "try " in line] == lines[:-1]
    assert len(lines) == 3 and "try 2 of 3" in lines[0] and "try 3 of 3" in lines[1]   # bounded, and said
    assert lines[-1].startswith("exo: cannot reach the hub at") and "after 3 tries" in lines[-1]
    assert len(set(lines)) == len(lines)                               # nothing printed twice


def test_loading_a_hub_model_without_network_is_a_504(broker, tmp_path):
    from appliance.broker import free_port

    c = LocalCluster(broker, tmp_path)
    c.env = {**c.env, "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "EXO_MODELS_DIR": str(tmp_path / "cache")}
    c.env.pop("HF_HUB_OFFLINE", None)
    try:
        c.start_panel()
        token = (tmp_path / "state" / "admin_token").read_text().strip()
        r = httpx.post(c.url + "/api/models/load", json={"model": REPO_ID}, timeout=60,
                       headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 504, r.text
        error = r.json()["error"]
        assert error["type"] == "upstream_unreachable" and "cannot reach the hub" in error["message"]
        assert "\n" not in error["message"]
    finally:
        c.stop()


def test_exo_says_in_the_terminal_how_each_nodes_download_goes(tmp_path, served):
    from appliance.broker import free_port
    from tests.conftest import wait_for

    hub, _ = served
    hub.chunk_delay = 0.2                                              # a slow line, so progress is seen
    (tmp_path / "none.yaml").write_text("{}\n")
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "EXO_MODELS_DIR": str(tmp_path / "cache"),
           "EXO_CONFIG": str(tmp_path / "none.yaml"), "EXO_STATE_DIR": str(tmp_path / "state")}
    env.pop("HF_HUB_OFFLINE", None)
    out = tmp_path / "exo.log"
    exo = subprocess.Popen([sys.executable, "-m", "appliance", "--model", REPO_ID, "--local-nodes", "2",
                            "--port", str(free_port())], stdout=out.open("wb"), stderr=subprocess.STDOUT, env=env)
    try:
        wait_for(lambda: "exo: ready" in out.read_text(), 60, "exo to be ready")
    finally:
        hub.chunk_delay = 0.0
        exo.send_signal(2)
        exo.wait(30)
    log = out.read_text()
    progress = re.findall(r"(local-\d): downloading \S+, (\d+) of (\d+) MB at [\d.]+ MB/s", log)
    assert progress, log
    done = set(re.findall(r"(local-\d): has the files of its layers of " + re.escape(REPO_ID), log))
    assert done == {"local-1", "local-2"}, log
    assert "%|" not in log                                             # no progress bars drawn over each other


def test_a_hub_that_answers_with_a_server_error_is_a_502(broker, tmp_path, served):
    hub, _ = served
    c = LocalCluster(broker, tmp_path)
    c.env = {**c.env, "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "EXO_MODELS_DIR": str(tmp_path / "cache")}
    c.env.pop("HF_HUB_OFFLINE", None)
    try:
        c.start_panel()
        token = (tmp_path / "state" / "admin_token").read_text().strip()
        hub.fail_status = 501                 # a status huggingface_hub does not retry, so the test is quick
        r = httpx.post(c.url + "/api/models/load", json={"model": REPO_ID}, timeout=60,
                       headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 502, r.text
        assert r.json()["error"]["type"] == "upstream_error" and "answered 501" in r.json()["error"]["message"]
    finally:
        hub.fail_status = None
        c.stop()
