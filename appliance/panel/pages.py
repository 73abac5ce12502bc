"""The panel's pages and the JSON snapshot they render from.

Each page is a small template around one plain script (static/panel.js): the script fetches
`/api/state`, draws the page, then follows `/api/events` (events.py) to keep it live.
Everything is served from the package: no CDN, so the panel works on a LAN with no internet.
"""
from __future__ import annotations

from flask import Blueprint, current_app, jsonify, render_template

from appliance.coordinator.coordinator import Coordinator
from appliance.engines.footprint import DEFAULT_QUANT, WEIGHT_BYTES
from appliance.models.catalog import CATALOG
from appliance.models.store import cached_snapshot, models_dir
from appliance.panel.events import hub
from appliance.planner import USABLE_FRACTION, host_memory

pages = Blueprint("pages", __name__)

PAGES = [   # (endpoint, path, title)
    ("cluster", "/", "Cluster"),
    ("split", "/split", "Model split"),
    ("models", "/models", "Models"),
    ("chat", "/chat", "Chat"),
    ("requests", "/requests", "Requests"),
]


def coordinator() -> Coordinator:
    return current_app.config["coordinator"]


def _page(name: str):
    title = next(t for e, _, t in PAGES if e == name)
    return lambda: render_template(f"{name}.html", page=name, title=title, pages=PAGES)


for _endpoint, _path, _title in PAGES:
    pages.add_url_rule(_path, _endpoint, _page(_endpoint))


# -- the snapshot
def with_usable(nodes: list[dict]) -> list[dict]:
    """Each node with `usable`: the memory the planner may fill on it (its share of its machine's
    memory, as planner.NodeCapacity.usable), so nodes of one machine do not count it twice."""
    online = [n for n in nodes if n.get("online")]
    memory = host_memory(online)
    return [{**n, "usable": int(memory.get(n.get("id"), 0) * USABLE_FRACTION)} for n in nodes]


def node_quant(node: dict) -> str:
    """The quant a node holds weights in: its own, or its engine's default."""
    return str(node.get("quant") or DEFAULT_QUANT.get(str(node.get("engine")), "f32"))


def catalog_fit(online: list[dict], cache=None) -> list[dict]:
    """Each catalog model: its size in each quant (footprint.WEIGHT_BYTES), whether the online
    nodes can hold its layers between them, each in its own quant, and whether it is in this
    machine's model cache (`cache`: the folder; None: not looked at).

    A layer's size is taken as the model's weights / layers, which counts the embeddings in too: a
    little pessimistic, never optimistic."""
    rows = []
    for m in CATALOG:
        sizes = {q: int(m.params * b) for q, b in WEIGHT_BYTES.items()}
        per_layer = {q: -(-size // m.layers) for q, size in sizes.items()}
        fits_layers = sum(n["usable"] // per_layer[node_quant(n)] for n in online)
        need = max((sizes[node_quant(n)] for n in online), default=sizes["f32"])
        rows.append({**m.to_dict(), "sizes": sizes, "fits": fits_layers >= m.layers, "needs_bytes": need,
                     "usable_bytes": sum(n["usable"] for n in online),
                     "cached": bool(cache and cached_snapshot(m.id, cache))})
    return rows


def hosts(online: list[dict]) -> list[dict]:
    """The machines the online nodes run on (nodes of one machine share its memory), in the
    order their first node appears."""
    machines: dict[str, dict] = {}
    for n in online:
        key = str(n.get("host_id") or n["id"])
        host = machines.setdefault(key, {"host_id": key, "hostname": n.get("hostname"), "nodes": [], "usable": 0,
                                         "memory_total": n.get("memory_total")})
        host["nodes"].append(n["id"])
        host["usable"] += n["usable"]
    return list(machines.values())


def model_state(c: Coordinator) -> dict | None:
    if c.model is None:
        return None
    config = c.model.config
    return {"id": c.model.id, "path": str(c.model.path), "num_layers": config.num_layers,
            "layer_bytes": config.layer_bytes, "total_bytes": config.total_bytes}


def state() -> dict:
    c = coordinator()
    events = hub()
    nodes = with_usable(events.snapshot_nodes())
    online = [n for n in nodes if n.get("online")]
    cluster = c.cluster
    with cluster.lock:
        plan = cluster.plan.to_dict() if cluster.plan else None
        plan_error = cluster.plan_error
    ready = cluster.ready_plan()
    return {
        "cluster": c.config.cluster,
        "coordinator": c.id,
        "broker": c.config.broker,
        "nodes": nodes,
        "plan": plan,
        "plan_error": plan_error,
        "ready": ready is not None,
        "model": model_state(c),
        "catalog": catalog_fit(online, models_dir(c.config.models_dir)),
        "hosts": hosts(online),
        "throughput": c.throughput.snapshot(),
        "downloads": events.snapshot_downloads(),
        "requests": c.recent_requests(),
        "admission": c.admission.state(),
    }


@pages.get("/api/state")
def api_state():
    return jsonify(state())
