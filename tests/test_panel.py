"""The panel's pages, its /api/state snapshot and its /api/events live feed, against a real
cluster: mosquitto, `exo node` processes and an `exo panel` process."""
from __future__ import annotations

import json
import re
import threading
import time

import httpx
import pytest

from appliance.config import Config
from appliance.coordinator.coordinator import Coordinator
from appliance.models.catalog import CATALOG
from appliance.panel import create_app
from appliance.panel.pages import catalog_fit
from tests.conftest import STORIES, LocalCluster
from appliance.bus.protocol import Topics

PAGES = ["/", "/split", "/models", "/chat", "/requests"]
ASSETS = ["/static/panel.js", "/static/panel.css"]
# Vendored as published: their URLs are a licence comment, a bug-report hint and XML namespaces.
VENDORED = {"/static/vendor/marked.umd.js": ("github.com/markedjs/marked",),
            "/static/vendor/purify.min.js": ("github.com/babel/babel", "www.w3.org/")}
URL = re.compile(r"""(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s"'<>)]*""", re.I)
NOT_FETCHED = {"http://www.w3.org/2000/svg"}   # the SVG namespace: a name, never requested


@pytest.fixture(scope="module")
def cluster(broker, tmp_path_factory):
    c = LocalCluster(broker, tmp_path_factory.mktemp("panel")).start(2)
    yield c
    c.stop()


def state(cluster) -> dict:
    return httpx.get(cluster.url + "/api/state", timeout=5).json()


class Events:
    """Reads /api/events as a browser's EventSource would: `event:` and `data:` lines."""

    def __init__(self, url: str):
        self.client = httpx.Client(timeout=httpx.Timeout(5, read=15))
        self.response = self.client.send(self.client.build_request("GET", url + "/api/events"), stream=True)
        self.lines = self.response.iter_lines()

    def next(self) -> tuple[str, dict]:
        kind, data = None, None
        for line in self.lines:
            if line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:"):
                data = json.loads(line[5:])
            elif not line and kind:
                return kind, data
        raise EOFError("the event stream ended")

    def until(self, predicate, timeout: float, what: str) -> tuple[str, dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            kind, data = self.next()
            if predicate(kind, data):
                return kind, data
        raise TimeoutError(f"no {what} within {timeout} s")

    def close(self):
        self.response.close()
        self.client.close()


@pytest.fixture
def events(cluster):
    e = Events(cluster.url)
    assert e.next()[0] == "hello"
    yield e
    e.close()


def test_state_holds_nodes_plan_model_and_catalog(cluster):
    s = state(cluster)
    plan = cluster.watcher.plans[-1]
    assert s["plan"]["plan_id"] == plan["plan_id"] and s["plan"]["shards"] == plan["shards"]
    assert s["ready"] is True and s["plan_error"] is None
    assert s["model"]["id"] == str(STORIES) and s["model"]["num_layers"] == plan["num_layers"]
    assert {n["name"] for n in s["nodes"]} == {"n0", "n1"}
    assert all(n["online"] and n["device_model"] and n["memory_total"] > 0 for n in s["nodes"])
    assert {n["id"] for n in s["nodes"]} == {sh["node"] for sh in plan["shards"]}
    assert s["cluster"] == cluster.cluster and s["broker"] == cluster.broker
    assert [m["id"] for m in s["catalog"]] == [m.id for m in CATALOG] and len(s["catalog"]) >= 10
    assert all(isinstance(m["fits"], bool) and m["layers"] > 0 and m["bytes"] > 0 for m in s["catalog"])
    usable = sum(n["usable"] for n in s["nodes"])
    assert all(m["usable_bytes"] == usable for m in s["catalog"])
    # both nodes run on this one machine: they share its memory instead of each counting all of it
    assert len({n["host_id"] for n in s["nodes"]}) == 1
    machine = max(n["memory_available"] for n in s["nodes"]) + sum(n["memory_held"] for n in s["nodes"])
    assert usable <= machine * 0.8 < 2 * min(n["usable"] for n in s["nodes"]) + 2
    assert s["downloads"] == {} and isinstance(s["requests"], list)


def test_catalog_fit_counts_whole_layers_per_node_in_its_own_quant():
    small = CATALOG[0]                                   # SmolLM2 135M: 135 M weights in 30 layers
    rows = {m["id"]: m for m in catalog_fit([{"id": "a", "usable": 8 * 10**8, "engine": "numpy"}])}
    assert rows[small.id]["fits"] is True and rows["meta-llama/Llama-3.1-8B-Instruct"]["fits"] is False
    sizes = rows[small.id]["sizes"]                      # q4 in 4-bit blocks of 32 with a float32 scale
    assert sizes["f32"] == 4 * small.params and sizes["f16"] == 2 * small.params
    assert sizes["q8"] == small.params and sizes["q4"] == int(small.params * 0.625)
    # 300 MB holds the model in q8 (onnxruntime's default) but not in f32 (numpy's)
    room = {"id": "a", "usable": 3 * 10**8}
    assert next(m for m in catalog_fit([{**room, "engine": "onnxruntime"}]) if m["id"] == small.id)["fits"] is True
    assert next(m for m in catalog_fit([{**room, "engine": "numpy"}]) if m["id"] == small.id)["fits"] is False
    # Enough memory in sum, but each node holds less than one layer: it does not fit.
    per_layer = -(-sizes["f32"] // small.layers)
    crumbs = [{"id": str(i), "usable": per_layer - 1000, "engine": "numpy"} for i in range(small.layers * 2)]
    assert next(m for m in catalog_fit(crumbs) if m["id"] == small.id)["fits"] is False
    assert all(m["fits"] is False for m in catalog_fit([]))


def test_four_8gb_pis_hold_qwen3_30b_a3b_at_q4_and_two_do_not():
    """A mixture of experts is held whole (every expert), so its size is its full parameter count."""
    pi = {"usable": int(7.3 * 2**30 * 0.8), "engine": "onnxruntime", "quant": "q4"}   # an 8 GB Pi 5's free memory
    fits = {n: next(m for m in catalog_fit([{**pi, "id": str(i)} for i in range(n)]) if m["id"] == "Qwen/Qwen3-30B-A3B")
            for n in (2, 4)}
    assert fits[4]["fits"] is True and fits[2]["fits"] is False
    assert fits[4]["active_params"] < fits[4]["params"] / 9


def test_state_and_events_carry_heartbeats(cluster, events):
    kind, data = events.until(lambda k, d: k == "status", 5, "status event")
    assert data["id"] in {n["id"] for n in state(cluster)["nodes"]}
    assert 0 <= data["cpu_percent"] <= 100 and data["memory_total"] > data["memory_available"] > 0
    node = next(n for n in state(cluster)["nodes"] if n["id"] == data["id"])
    assert node["status"]["memory_total"] == data["memory_total"]


def test_requests_show_tokens_ttft_and_nodes(cluster, events):
    body = {"model": str(STORIES), "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0}
    answer = httpx.post(cluster.url + "/v1/completions", json=body, timeout=30).json()
    request = state(cluster)["requests"][0]
    assert request["completion_tokens"] == answer["usage"]["completion_tokens"] == 12
    assert request["prompt_tokens"] == answer["usage"]["prompt_tokens"]
    assert request["status"] == "done" and request["ttft_s"] > 0 and request["tokens_per_s"] > 0
    assert request["nodes"] == [s["node"] for s in cluster.watcher.plans[-1]["shards"]]
    _, pushed = events.until(lambda k, d: k == "requests" and d and d[0]["id"] == request["id"]
                             and d[0]["status"] == "done", 5, "requests event for the finished request")
    assert pushed[0]["completion_tokens"] == 12


def test_download_progress_reaches_state_and_events(cluster, events):
    node_id = cluster.node_id("n0")
    topic = Topics(cluster.cluster).node_download(node_id)
    progress = {"model": CATALOG[0].id, "state": "downloading", "bytes": 1000, "total": 4000,
                "speed": 500.0, "eta": 6.0, "error": None}
    cluster.publish(topic, [json.dumps(progress).encode()], retain=True)
    _, data = events.until(lambda k, d: k == "download" and d["node"] == node_id, 5, "download event")
    assert data == {**progress, "node": node_id}
    assert state(cluster)["downloads"][node_id]["bytes"] == 1000
    cluster.publish(topic, [b""], retain=True)   # cleared
    _, data = events.until(lambda k, d: k == "download" and d["node"] == node_id, 5, "download cleared")
    assert data["state"] is None and node_id not in state(cluster)["downloads"]


def test_events_push_a_new_plan_when_a_node_joins(broker, tmp_path):
    # Node ids derive from names: this cluster's nodes must not share the module cluster's.
    c = LocalCluster(broker, tmp_path)
    c.add_node("first")
    c.start_panel()
    c.watcher.wait(lambda w: w.ready(1), 60, "a plan over the first node")
    e = Events(c.url)
    try:
        assert e.next()[0] == "hello"
        c.add_node("joiner")
        _, data = e.until(lambda k, d: k == "plan" and d["plan"] and len(d["plan"]["shards"]) == 2, 30,
                          "a plan over two nodes")
        assert data["model"] == str(STORIES) and data["plan_error"] is None
        assert data["plan"]["shards"][0]["start"] == 0 and data["plan"]["shards"][-1]["end"] == data["plan"]["num_layers"]
        _, node = e.until(lambda k, d: k == "node" and d.get("name") == "joiner", 10, "the joiner's info")
        assert node["online"] is True
    finally:
        e.close()
        c.stop()


def test_pages_are_served_with_no_outside_urls(cluster):
    for path in PAGES + ASSETS:
        response = httpx.get(cluster.url + path, timeout=5)
        assert response.status_code == 200, path
        assert set(URL.findall(response.text)) <= NOT_FETCHED, path
    for path, allowed in VENDORED.items():
        response = httpx.get(cluster.url + path, timeout=5)
        assert response.status_code == 200, path
        assert all(any(a in url for a in allowed) for url in URL.findall(response.text)), path
    html = httpx.get(cluster.url + "/", timeout=5).text
    for ref in re.findall(r"""(?:src|href)="([^"]+)\"""", html):
        assert ref.startswith(("/", "data:")), ref
        if ref.startswith("/"):
            assert httpx.get(cluster.url + ref, timeout=5).status_code == 200, ref
    assert '<meta name="viewport"' in html


def test_each_page_names_itself_in_the_nav(cluster):
    for path in PAGES:
        html = httpx.get(cluster.url + path, timeout=5).text
        current = re.search(r'<a href="([^"]+)" aria-current="page">', html)
        assert current and current.group(1) == path, path


def test_bad_requests_get_json_errors(cluster):
    for method, path, status in [("POST", "/api/state", 405), ("POST", "/api/events", 405),
                                 ("GET", "/no-such-page", 404), ("GET", "/static/nope.js", 404)]:
        response = httpx.request(method, cluster.url + path, timeout=5)
        assert response.status_code == status, path
        assert response.json()["error"]["message"], path


@pytest.fixture
def app_without_model(broker):
    """The app in this process, on a coordinator with no model and no nodes."""
    coordinator = Coordinator(Config(broker=broker, cluster="empty" + str(time.time_ns()))).start()
    yield create_app(coordinator)
    coordinator.stop()


def test_state_without_model_or_nodes(app_without_model):
    s = app_without_model.test_client().get("/api/state").get_json()
    assert s["model"] is None and s["plan"] is None and s["ready"] is False and s["nodes"] == []
    assert len(s["catalog"]) == len(CATALOG) and not any(m["fits"] for m in s["catalog"])


def test_close_all_ends_open_streams(app_without_model):
    """What a stopping server calls, so an open panel tab does not hold up its shutdown."""
    response = app_without_model.test_client().get("/api/events", buffered=False)
    chunks = response.iter_encoded()
    assert next(chunks).startswith(b"event: hello")
    hub = app_without_model.extensions["exo_events"]
    assert len(hub.streams) == 1
    hub.close_all()
    rest: list[bytes] = []
    drain = threading.Thread(target=lambda: rest.extend(chunks), daemon=True)
    drain.start()
    drain.join(5)
    assert not drain.is_alive(), "the stream is still open"
    assert rest == [] and hub.streams == []


def test_catalog_rows_say_which_models_are_cached_here(tmp_path):
    small = CATALOG[0]
    assert not any(m["cached"] for m in catalog_fit([], tmp_path))
    (tmp_path / ("models--" + small.id.replace("/", "--")) / "snapshots" / "abc").mkdir(parents=True)
    assert {m["id"] for m in catalog_fit([], tmp_path) if m["cached"]} == {small.id}


def test_hosts_group_nodes_of_one_machine_and_add_up_their_shares():
    from appliance.panel.pages import hosts

    nodes = [{"id": "a", "host_id": "pi", "hostname": "pi5", "usable": 2, "memory_total": 8},
             {"id": "b", "host_id": "pi", "hostname": "pi5", "usable": 2, "memory_total": 8},
             {"id": "c", "host_id": "mac", "hostname": "mac", "usable": 5, "memory_total": 16},
             {"id": "d", "usable": 1}]                                  # an older node: a machine of its own
    assert [(h["hostname"], h["nodes"], h["usable"]) for h in hosts(nodes)] == [
        ("pi5", ["a", "b"], 4), ("mac", ["c"], 5), (None, ["d"], 1)]


def test_throughput_counts_tokens_per_bucket_over_the_window():
    from appliance.coordinator.throughput import BUCKET_S, WINDOW_S, Throughput

    t, start = Throughput(), 1_000_000.0                               # a bucket boundary
    for i in range(50):
        t.token(start + i * 0.1)                                       # 50 tokens in the first 5 s
    for i in range(10):
        t.token(start + BUCKET_S + i * 0.1)                            # 10 in the next 1 s
    t.step(0.004, 0.001)
    snap = t.snapshot(now=start + BUCKET_S + 2)
    assert len(snap["series"]) == WINDOW_S // BUCKET_S
    assert snap["series"][-2:] == [10.0, 5.0]                          # 50 / 5 s; 10 over the 2 s that passed
    assert snap["tokens_per_s"] == 5.0 and (snap["step_s"], snap["hop_s"]) == (0.004, 0.001)
    bunched = Throughput()   # steps of 4 ms, 3 of them compute; a reply held up 8 ms, two right behind it
    for round_trip in (0.0118, 0.0001, 0.0001):
        bunched.step(round_trip, round_trip - 0.003)
    snap = bunched.snapshot()
    assert (snap["step_s"], snap["hop_s"]) == pytest.approx((0.004, 0.001))
    assert Throughput().snapshot()["series"] == [0.0] * (WINDOW_S // BUCKET_S)
