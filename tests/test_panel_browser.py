"""The panel in a real browser: Debian's headless Chromium driven by Playwright (no browser
download), against a real 3-node cluster. Screenshots go to test-artifacts/screenshots/.

Needs Debian's chromium (tests/system.py).
"""
from __future__ import annotations

import contextlib
import json
import re
import time

import httpx
import pytest

from playwright.sync_api import Page, sync_playwright

from tests.conftest import REPO, STORIES, LocalCluster
from tests.system import chromium, needs
from appliance.bus.protocol import Topics

pytestmark = needs("chromium")
CHROMIUM = chromium()

SHOTS = REPO / "test-artifacts" / "screenshots"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT_MS = 15_000


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory):
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, args=ARGS,
            headless=True, viewport={"width": 1200, "height": 900})
        context.set_default_timeout(WAIT_MS)
        yield context
        context.close()


class Browser:
    """Opens pages of one cluster's panel and keeps every console error and page error they raise."""

    def __init__(self, context, url: str):
        self.context, self.url, self.errors, self.pages = context, url, [], []

    def open(self, path: str, width: int = 1200, height: int = 900) -> Page:
        page = self.context.new_page()
        page.set_viewport_size({"width": width, "height": height})
        page.on("console", lambda m: m.type == "error" and self.errors.append(f"{path}: {m.text}"))
        page.on("pageerror", lambda e: self.errors.append(f"{path}: {e}"))
        page.goto(self.url + path)
        page.wait_for_selector("#live.on")          # the event stream is open and the snapshot asked for
        self.pages.append(page)
        return page

    def close(self):
        for page in self.pages:
            page.close()


@pytest.fixture(scope="module")
def cluster(broker, tmp_path_factory):
    c = LocalCluster(broker, tmp_path_factory.mktemp("panel-browser")).start(3)
    yield c
    c.stop()


@pytest.fixture
def browser(browser_context, cluster):
    b = Browser(browser_context, cluster.url)
    yield b
    b.close()


@contextlib.contextmanager
def download_progress(cluster, name: str, progress: dict):
    """A node's retained download progress on the bus (as a downloading node publishes it), then cleared."""
    topic = Topics(cluster.cluster).node_download(cluster.node_id(name))
    cluster.publish(topic, [json.dumps(progress).encode()], retain=True)
    try:
        yield
    finally:
        cluster.publish(topic, [b""], retain=True)


def shot(page: Page, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def plan_of(cluster) -> dict:
    return httpx.get(cluster.url + "/api/state", timeout=5).json()["plan"]


def cards(page: Page) -> dict[str, str]:
    return page.eval_on_selector_all(".card.node", "els => Object.fromEntries(els.map(e => [e.dataset.nodeId, e.dataset.online]))")


def segments(page: Page) -> list[dict]:
    return page.eval_on_selector_all("#bar .seg[data-node]", """els => els.map(e => ({node: e.dataset.node,
        start: +e.dataset.start, end: +e.dataset.end, layers: +e.dataset.layers}))""")


def test_cluster_page_shows_a_card_per_node_and_the_ring(browser, cluster):
    page = browser.open("/")
    page.wait_for_function("document.querySelectorAll('.card.node').length === 3")
    plan = plan_of(cluster)
    assert cards(page) == {s["node"]: "true" for s in plan["shards"]}
    order = page.eval_on_selector_all(".card.node", "els => els.map(e => e.dataset.nodeId)")
    assert order == [s["node"] for s in plan["shards"]]                 # in the plan's order
    text = page.inner_text("#nodes")
    assert all(name in text for name in ("n0", "n1", "n2")) and "Memory" in text and "CPU" in text
    assert "Tokens/s" in text and "Queue" in text and "SoC temp." in text
    page.wait_for_function("[...document.querySelectorAll('.card.node dd')].some(d => d.textContent.includes('%'))")
    members = page.eval_on_selector_all(".topology-svg g.member", "els => els.map(e => e.dataset.nodeId)")
    assert members == ["coordinator", *[s["node"] for s in plan["shards"]]]
    assert page.locator(".topology-svg path.ring").count() == 4       # coordinator -> 3 nodes -> back
    assert label_collisions(page) == []
    assert page.eval_on_selector("#chart svg", "e => +e.dataset.points") == 120   # 10 minutes of 5 s
    shot(page, "cluster")
    assert browser.errors == []


def label_collisions(page: Page) -> list:
    """Topology labels that overlap each other, a node's circle or the ring's arrows."""
    return page.evaluate("""() => {
        const svg = document.querySelector('.topology-svg');
        const boxes = [...svg.querySelectorAll('g.member text')].map(t => [t.textContent, t.getBBox()]);
        const circles = [...svg.querySelectorAll('g.member circle')].map(c => c.getBBox());
        const ring = [...svg.querySelectorAll('path.ring')].flatMap(p => {
            const n = Math.ceil(p.getTotalLength() / 2);
            return [...Array(n + 1).keys()].map(i => p.getPointAtLength(p.getTotalLength() * i / n));
        });
        const meet = (a, b) => a.x < b.x + b.width && b.x < a.x + a.width && a.y < b.y + b.height && b.y < a.y + a.height;
        const inside = (pt, b) => pt.x > b.x && pt.x < b.x + b.width && pt.y > b.y && pt.y < b.y + b.height;
        const found = [];
        boxes.forEach(([name, box], i) => {
            boxes.slice(i + 1).forEach(([other, b]) => meet(box, b) && found.push([name, other]));
            circles.forEach(c => meet(box, c) && found.push([name, 'a circle']));
            if (ring.some(pt => inside(pt, box))) found.push([name, 'the ring']);
        });
        return found;
    }""")


def test_split_bar_matches_the_plan(browser, cluster):
    page = browser.open("/split")
    plan = plan_of(cluster)
    page.wait_for_function(f"document.querySelector('#bar').dataset.planId === '{plan['plan_id']}'")
    assert segments(page) == [{**s, "layers": s["end"] - s["start"]} for s in plan["shards"]]
    widths = page.eval_on_selector_all("#bar .seg", "els => els.map(e => e.getBoundingClientRect().width)")
    per_layer = [w / (s["end"] - s["start"]) for w, s in zip(widths, plan["shards"])]
    assert max(per_layer) - min(per_layer) < 4, widths                 # widths proportional to layers
    assert page.locator("#shares tbody tr").count() == 3
    shot(page, "split")
    assert browser.errors == []


def test_models_page_lists_the_catalog_and_shows_api_errors(browser, cluster):
    page = browser.open("/models")
    state = httpx.get(cluster.url + "/api/state", timeout=5).json()
    page.wait_for_function(f"document.querySelectorAll('#catalog tbody tr').length === {len(state['catalog'])}")
    assert len(state["catalog"]) >= 10
    for m in state["catalog"]:
        row = page.locator(f'#catalog tr[data-model="{m["id"]}"]')
        assert m["name"] in row.inner_text() and ("fits" in row.inner_text()) == m["fits"]
        assert row.locator("td.sizes [data-quant]").count() == 3                # q4, q8, f16
        assert ("B active" in row.inner_text()) == bool(m["active_params"])    # a mixture: what a token reads
        assert row.locator("button.danger").count() == (1 if m["cached"] else 0)   # Delete only what is cached
    # three nodes on this one machine: one host, whose memory they share
    assert page.locator("#hosts li").count() == len(state["hosts"]) == 1
    assert "3 node(s) online on 1 machine(s)" in page.inner_text("#fit-summary")
    with download_progress(cluster, "n0", {"model": state["catalog"][0]["id"], "state": "downloading",
                                            "bytes": 3 * 10**8, "total": 10**9, "speed": 2.5e7, "eta": 28.0}):
        node = cluster.node_id("n0")
        item = page.locator(f'#catalog tr[data-model="{state["catalog"][0]["id"]}"] li[data-node="{node}"]')
        item.wait_for()
        assert item.get_attribute("data-state") == "downloading"
        assert all(part in item.inner_text() for part in ("30 %", "300 MB of 1.0 GB", "25.0 MB/s", "28 s left"))
        shot(page, "models")
        cluster_page = browser.open("/")                                # and on the node's card
        cluster_page.locator(f'.card.node[data-node-id="{node}"] .download').wait_for()
        assert "300 MB of 1.0 GB" in cluster_page.inner_text(f'.card.node[data-node-id="{node}"]')
        shot(cluster_page, "cluster-downloading")

    page.click("#folder-form button[type=submit]")                    # no folder typed
    page.wait_for_selector("#flash.error")
    assert "path of a model folder" in page.inner_text("#flash")
    folder = "/nonexistent/model-folder"
    page.fill("#folder", folder)
    page.click("#folder-form button[type=submit]")                    # no token yet: the page asks for it
    page.wait_for_function("document.querySelector('#flash').textContent.includes('admin token')")

    page.fill("#token", "not-the-admin-token")
    page.click("#token-form button[type=submit]")
    assert page.evaluate("localStorage.getItem('exo.adminToken')") == "not-the-admin-token"
    page.click("#folder-form button[type=submit]")
    expected = httpx.post(cluster.url + "/api/models/load", json={"model": folder}, timeout=5,
                          headers={"Authorization": "Bearer not-the-admin-token"})
    assert expected.status_code >= 400
    message = expected.json()["error"]["message"]
    page.wait_for_function("msg => document.querySelector('#flash').textContent === msg", arg=message)
    shot(page, "models-error")
    # The browser logs the refused call itself; that one is expected, nothing else is.
    assert [e for e in browser.errors if "Failed to load resource" not in e] == []


def open_settings(page: Page) -> None:
    if not page.eval_on_selector("#settings", "e => e.open"):
        page.click("#settings summary")


def test_chat_streams_an_answer_with_ttft_and_rate(browser, cluster, capsys):
    page = browser.open("/chat")
    page.wait_for_function("!document.querySelector('#send').disabled")
    open_settings(page)
    page.fill("#max-tokens", "64")
    page.fill("#temperature", "0")
    page.fill("#prompt", "Tell me a story about a cat.")
    page.press("#prompt", "Enter")
    page.wait_for_function("document.querySelector('#figures').dataset.ttft !== undefined")
    figures = page.eval_on_selector("#figures", "e => ({...e.dataset, text: e.textContent})")
    answer = page.inner_text(".msg.assistant .body")
    chunks = int(page.eval_on_selector(".msg.assistant .body", "e => e.dataset.chunks"))
    assert answer.strip() and chunks > 1                              # it came in pieces, as it streamed
    assert float(figures["ttft"]) > 0 and float(figures["tokensPerS"]) > 0 and int(figures["tokens"]) > 1
    assert "time to first token" in figures["text"] and "tokens/s" in figures["text"]
    shot(page, "chat")
    with capsys.disabled():
        print(f"\nchat: TTFT {float(figures['ttft']) * 1000:.0f} ms, {float(figures['tokensPerS']):.1f} tokens/s, "
              f"{figures['tokens']} tokens, {chunks} chunks")

    requests = browser.open("/requests")
    requests.wait_for_selector("#requests tbody tr[data-request-id]")
    row = requests.inner_text("#requests tbody tr[data-request-id] >> nth=0")
    assert "done" in row and "chat/completions" in row and all(name in row for name in ("n0", "n1", "n2"))
    assert requests.inner_text("#admission").startswith("0 running of 32 places · 0 waiting")
    shot(requests, "requests")
    requests.click("#requests tbody tr[data-request-id] >> nth=0")
    requests.wait_for_selector("#detail[open]")
    detail = requests.inner_text("#detail")
    assert "/v1/chat/completions" in detail and "temperature 0" in detail and "of at most 64" in detail
    shot(requests, "requests-detail")
    assert browser.errors == []


def test_markdown_is_rendered_by_the_vendored_libraries_and_sanitized(browser):
    page = browser.open("/chat")
    html = page.evaluate("renderMarkdown('# Hi\\n**bold** and `code`\\n\\n- one\\n- two\\n\\n"
                         "<img src=x onerror=alert(1)> <script>alert(2)</script> [link](javascript:alert(3))\\n\\n"
                         "| a | b |\\n|---|---|\\n| 1 | 2 |')")
    for part in ("<h1>Hi</h1>", "<strong>bold</strong>", "<code>code</code>", "<li>one</li>", "<table>", "<td>1</td>"):
        assert part in html, html
    assert "onerror" not in html and "<script" not in html and "javascript:" not in html, html
    assert browser.errors == []


def test_chat_system_prompt_sampling_cut_mark_regenerate_and_copy(browser, cluster):
    browser.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=cluster.url)
    page = browser.open("/chat")
    page.wait_for_function("!document.querySelector('#send').disabled")
    open_settings(page)
    page.fill("#system", "You tell stories about cats.")
    page.fill("#max-tokens", "5")
    page.fill("#temperature", "0.9")
    page.fill("#top-p", "0.8")
    page.fill("#seed", "7")
    sent = []
    page.on("request", lambda r: r.url.endswith("/v1/chat/completions") and sent.append(json.loads(r.post_data)))
    page.fill("#prompt", "Once upon a time")
    page.press("#prompt", "Enter")
    page.wait_for_selector(".msg.assistant .cut")                     # 5 tokens: cut at max tokens, and says so
    assert "cut at max tokens" in page.inner_text(".msg.assistant")
    body = sent[0]
    assert body["messages"][0] == {"role": "system", "content": "You tell stories about cats."}
    assert (body["max_tokens"], body["temperature"], body["top_p"], body["seed"]) == (5, 0.9, 0.8, 7)
    first = page.inner_text(".msg.assistant .body")

    page.click(".msg.assistant .copy")
    page.wait_for_function("document.querySelector('.msg.assistant .copy').textContent === 'Copied'")
    assert page.evaluate("navigator.clipboard.readText()") == first
    shot(page, "chat-cut")

    page.click("#regenerate")                                         # the same seed: the same answer again
    page.wait_for_function("document.querySelectorAll('.msg.assistant .cut').length === 1 && "
                           "!document.querySelector('.msg.assistant .body').classList.contains('streaming')")
    assert page.locator(".msg.assistant").count() == 1 and page.locator(".msg.user").count() == 1
    assert page.inner_text(".msg.assistant .body") == first and len(sent) == 2 and sent[1] == sent[0]

    page.fill("#max-tokens", "400")                                   # stop one that is under way
    page.fill("#prompt", "Tell me more")
    page.press("#prompt", "Enter")
    page.wait_for_function("(document.querySelectorAll('.msg.assistant .body')[1] || {}).dataset?.chunks > 2")
    page.click("#stop")
    page.wait_for_function("document.querySelectorAll('.msg.assistant')[1].dataset.finish === 'stopped'")
    page.wait_for_function("!document.querySelector('#send').disabled")   # redrawn on the next frame
    assert browser.errors == []


def test_pages_fit_a_phone_screen(browser):
    for path, name in [("/", "cluster"), ("/split", "split"), ("/models", "models"), ("/chat", "chat"),
                       ("/requests", "requests")]:
        page = browser.open(path, width=390, height=844)
        page.wait_for_function("document.querySelector('main h1') && document.querySelector('#live.on')")
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"{path} is {overflow}px wider than a phone"
        shot(page, f"phone-{name}")
        if name == "cluster":
            assert label_collisions(page) == []
    assert browser.errors == []


def test_with_api_keys_the_panel_asks_for_one_then_goes_live(browser_context, broker, tmp_path):
    c = LocalCluster(broker, tmp_path)
    (c.tmp / "none.yaml").write_text("api_keys: [sk-panel]\n")
    c.add_node("keyed")
    c.start_panel()
    c.watcher.wait(lambda w: w.ready(1), 60, "a plan over one loaded node")
    b = Browser(browser_context, c.url)
    try:
        page = browser_context.new_page()
        page.goto(c.url + "/")
        page.wait_for_selector("#key-form:not([hidden])")
        assert "API keys" in page.inner_text("#flash") and page.locator(".card.node").count() == 0
        shot(page, "cluster-asks-for-a-key")
        page.fill("#key", "sk-wrong")
        page.click("#key-form button[type=submit]")
        page.wait_for_function("document.querySelector('#flash').textContent.includes('refused')")
        page.fill("#key", "sk-panel")
        page.click("#key-form button[type=submit]")
        page.wait_for_selector("#live.on")
        page.wait_for_selector(".card.node")
        assert page.is_hidden("#key-form")
        chat = b.open("/chat")                                        # the key serves the chat too
        chat.wait_for_function("!document.querySelector('#send').disabled")
        chat.fill("#prompt", "Once upon a time")
        chat.press("#prompt", "Enter")
        chat.wait_for_function("document.querySelector('#figures').dataset.tokens > 0")
        page.close()
        assert [e for e in b.errors if "Failed to load resource" not in e] == []
    finally:
        b.close()
        browser_context.clear_cookies()   # a cookie is per host, not per port: other panels on 127.0.0.1 would get it
        c.stop()


def start_cluster(broker, tmp_path, names: list[str]) -> LocalCluster:
    """A cluster beside the module's: node ids derive from names, so its nodes need names of their own."""
    c = LocalCluster(broker, tmp_path)
    for name in names:
        c.add_node(name)
    c.start_panel()
    c.watcher.wait(lambda w: w.ready(len(names)), 60, f"a plan over {len(names)} loaded nodes")
    return c


def test_live_update_when_a_node_dies(browser_context, broker, tmp_path):
    c = start_cluster(broker, tmp_path, ["live0", "live1", "live2"])
    b = Browser(browser_context, c.url)
    try:
        cluster_page, split_page = b.open("/"), b.open("/split")
        cluster_page.wait_for_function("document.querySelectorAll('.card.node[data-online=true]').length === 3")
        split_page.wait_for_function("document.querySelectorAll('#bar .seg[data-node]').length === 3")
        victim = c.node_id("live1")
        started = time.monotonic()
        c.nodes["live1"].kill()
        cluster_page.wait_for_selector(f'.card.node[data-node-id="{victim}"][data-online=false]')
        offline_s = time.monotonic() - started
        split_page.wait_for_function(f"""(() => {{ const segs = [...document.querySelectorAll('#bar .seg[data-node]')];
            return segs.length === 2 && !segs.some(s => s.dataset.node === '{victim}'); }})()""")
        redrawn_s = time.monotonic() - started
        assert offline_s < 5 and redrawn_s < 5, (offline_s, redrawn_s)
        plan = plan_of(c)
        assert segments(split_page) == [{**s, "layers": s["end"] - s["start"]} for s in plan["shards"]]
        assert cards(cluster_page)[victim] == "false" and list(cards(cluster_page).values()).count("true") == 2
        shot(cluster_page, "cluster-node-offline")
        shot(split_page, "split-node-offline")
        print(f"node offline on the page after {offline_s:.2f} s, split redrawn after {redrawn_s:.2f} s")
        assert b.errors == []
    finally:
        b.close()
        c.stop()


def test_loading_a_hub_model_shows_each_nodes_download_and_then_that_it_loaded(browser_context, broker, tmp_path):
    from tests.fake_hub import FakeHub, sharded_stories

    repo = "exo-test/stories-slow"
    files = sharded_stories(STORIES, tmp_path / "hub")
    hub = FakeHub({repo: tmp_path / "hub"}, chunk_delay=0.2).start()
    c = LocalCluster(broker, tmp_path / "cluster")
    c.env = {**c.env, "HF_ENDPOINT": hub.url, "EXO_MODELS_DIR": str(tmp_path / "cache")}
    c.env.pop("HF_HUB_OFFLINE", None)
    for name in ("dl0", "dl1"):
        c.add_node(name)
    c.start_panel()
    c.watcher.wait(lambda w: w.ready(2), 60, "a plan over two loaded nodes")
    b = Browser(browser_context, c.url)
    try:
        cluster_page, models = b.open("/"), b.open("/models")
        models.fill("#token", (c.tmp / "state" / "admin_token").read_text().strip())
        models.click("#token-form button[type=submit]")
        models.fill("#folder", repo)
        models.click("#folder-form button[type=submit]")
        models.wait_for_function("document.querySelector('#flash').textContent.startsWith('Loading')")
        card = cluster_page.locator(".card.node .download").first       # a node's bytes and rate, as they come
        card.wait_for()
        assert re.search(r"\d+ % · [\d.]+ [KM]B of [\d.]+ [KM]B · [\d.]+ [KM]B/s", card.inner_text()), card.inner_text()
        shot(cluster_page, "cluster-downloading-live")
        models.wait_for_function("document.querySelector('#flash').textContent.startsWith('Loaded')", timeout=60_000)
        assert "ready to chat" in models.inner_text("#flash")
        models.wait_for_selector("#flash", state="hidden", timeout=10_000)   # the banner goes once it has said so
        assert cluster_page.locator(".card.node .download").count() == 0
        assert len(files) == 7 and c.health()["plan"]["model"] == repo
        assert [e for e in b.errors if "Failed to load resource" not in e] == []
    finally:
        b.close()
        c.stop()
        hub.stop()
