"""The panel's live feed: cluster changes (from MQTT) pushed to browsers as server-sent events.

One `EventHub` per app listens to the coordinator's cluster (node, status, plan) and to the
nodes' retained download topics, remembers what the pages need that the cluster forgets (nodes
gone offline, download progress), and fans every change out to the open `/api/events` streams.

A stream first says `hello`; the page then fetches `/api/state`, so nothing falls between the
snapshot and the events that follow it.
"""
from __future__ import annotations

import json
import queue
import threading
import time
from typing import Iterator

from flask import Blueprint, Response, current_app

from appliance.bus.protocol import parse_json
from appliance.coordinator.coordinator import Coordinator

events = Blueprint("events", __name__)

QUEUE_SIZE = 1000        # a stream this far behind is closed; the page reconnects and resyncs
WAKE_S = 1.0             # how often a stream looks for changes that come with no event
KEEPALIVE_S = 15.0       # a comment line this often keeps proxies from closing an idle stream


class EventHub:
    def __init__(self, coordinator: Coordinator):
        self.coordinator = coordinator
        self.lock = threading.Lock()
        self.known: dict[str, dict] = {}       # every node seen, online or not, by id
        self.downloads: dict[str, dict] = {}   # each node's latest download progress
        self.rates: dict[str, dict] = {}       # each node's rates between its last two heartbeats
        self.last_status: dict[str, dict] = {}
        self.streams: list[queue.Queue] = []
        with coordinator.cluster.lock:
            for node_id, info in coordinator.cluster.nodes.items():
                self.known[node_id] = dict(info)
        coordinator.cluster.listeners.append(self.on_cluster)
        coordinator.bus.on(coordinator.topics.node_download(), self.on_download, qos=1)

    # -- incoming, on the MQTT thread: remember, then fan out
    def on_cluster(self, kind: str, data: dict) -> None:
        if kind == "node":
            data = self.remember_node(data)
        elif kind == "status":
            data = {**data, **self.measure(data)}
        self.publish(kind, data)

    def measure(self, status: dict) -> dict:
        """A node's rates from its last two heartbeats: tokens/s (frames it ran: one per request's
        step) and its compute time per frame."""
        with self.lock:
            before, self.last_status[status["id"]] = self.last_status.get(status["id"]), status
            rates = {}
            try:
                seconds = float(status["time"]) - float(before["time"])
                frames = int(status["frames"]) - int(before["frames"])
                spent = float(status["frame_seconds"]) - float(before["frame_seconds"])
                if seconds > 0 and frames >= 0:   # idle, a node's time per frame is the last one it had
                    rates = {"tokens_per_s": round(frames / seconds, 2),
                             "ms_per_frame": round(1000 * spent / frames, 2) if frames
                             else self.rates.get(status["id"], {}).get("ms_per_frame")}
            except (KeyError, TypeError, ValueError):   # the first heartbeat, or a node of another version
                pass
            self.rates[status["id"]] = rates
            return rates

    def remember_node(self, data: dict) -> dict:
        with self.lock:
            if data.get("online"):
                self.known[data["id"]] = dict(data)
            else:   # a Last Will says only {id, online: false}: keep what we knew
                self.known[data["id"]] = {**self.known.get(data["id"], {}), **data, "online": False}
            return dict(self.known[data["id"]])

    def on_download(self, topic: str, payload: bytes) -> None:
        node_id = self.coordinator.topics.node_id_of(topic)
        with self.lock:
            if payload:
                self.downloads[node_id] = {**parse_json(payload), "node": node_id}
            else:
                self.downloads.pop(node_id, None)
            data = self.downloads.get(node_id) or {"node": node_id, "state": None}
        self.publish("download", data)

    def publish(self, kind: str, data: dict) -> None:
        with self.lock:
            streams = list(self.streams)
        for q in streams:
            try:
                q.put_nowait((kind, data))
            except queue.Full:
                self.drop(q)

    # -- streams
    def open(self) -> queue.Queue:
        q: queue.Queue = queue.Queue(QUEUE_SIZE)
        with self.lock:
            self.streams.append(q)
        return q

    def drop(self, q: queue.Queue) -> None:
        with self.lock:
            if q in self.streams:
                self.streams.remove(q)
        try:
            q.put_nowait(("close", {}))
        except queue.Full:
            pass   # the stream sees it is no longer registered on its next wake

    def close_all(self) -> None:
        """End every open stream, as the server stops: a server waits for its open connections,
        and a browser's EventSource would otherwise hold it to the end of its grace period."""
        with self.lock:
            streams = list(self.streams)
        for q in streams:
            self.drop(q)

    def snapshot_nodes(self) -> list[dict]:
        cluster = self.coordinator.cluster
        with cluster.lock, self.lock:
            nodes = {**self.known, **{i: {**n, "online": True} for i, n in cluster.nodes.items()}}
            return [{**n, "id": i, "status": {**cluster.status[i], **self.rates.get(i, {})}
                     if n.get("online") and i in cluster.status else None}
                    for i, n in sorted(nodes.items())]

    def snapshot_downloads(self) -> dict[str, dict]:
        with self.lock:
            return {i: dict(d) for i, d in self.downloads.items()}


def hub() -> EventHub:
    return current_app.extensions["exo_events"]


def attach(app, coordinator: Coordinator) -> EventHub:
    app.extensions["exo_events"] = EventHub(coordinator)
    app.register_blueprint(events)
    return app.extensions["exo_events"]


def sse(kind: str, data) -> str:
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def plan_data(coordinator: Coordinator) -> dict:
    """What a `plan` event carries: the plan (or why there is none) and the model it is for."""
    cluster = coordinator.cluster
    with cluster.lock:
        plan = cluster.plan.to_dict() if cluster.plan else None
        return {"plan": plan, "plan_error": cluster.plan_error,
                "model": coordinator.model.id if coordinator.model else None}


def requests_mark(coordinator: Coordinator) -> tuple:
    """Changes when a request starts, gets a token or ends."""
    return tuple((r.id, r.status, r.completion_tokens) for r in list(coordinator.history))


def stream(hub: EventHub) -> Iterator[str]:
    q = hub.open()
    coordinator = hub.coordinator
    plan_mark, req_mark = plan_data(coordinator), requests_mark(coordinator)
    admission_mark, throughput_mark = coordinator.admission.state(), coordinator.throughput.snapshot()
    last_write = time.monotonic()
    try:
        yield sse("hello", {"time": time.time()})
        while True:
            try:
                kind, data = q.get(timeout=WAKE_S)
            except queue.Empty:
                kind, data = None, None
            if kind == "close":
                return
            if kind == "plan":
                data = plan_mark = plan_data(coordinator)
            if kind:
                yield sse(kind, data)
                last_write = time.monotonic()
            # Changes that no MQTT message announces: a plan that failed, a model (un)loaded,
            # a request that started or ended.
            now_plan, now_req = plan_data(coordinator), requests_mark(coordinator)
            if now_plan != plan_mark:
                plan_mark = now_plan
                yield sse("plan", now_plan)
                last_write = time.monotonic()
            if now_req != req_mark:
                req_mark = now_req
                yield sse("requests", coordinator.recent_requests())
                last_write = time.monotonic()
            if (now_throughput := coordinator.throughput.snapshot()) != throughput_mark:
                throughput_mark = now_throughput
                yield sse("throughput", now_throughput)
                last_write = time.monotonic()
            if (now_admission := coordinator.admission.state()) != admission_mark:
                admission_mark = now_admission
                yield sse("admission", now_admission)
                last_write = time.monotonic()
            if time.monotonic() - last_write > KEEPALIVE_S:
                yield ": keepalive\n\n"
                last_write = time.monotonic()
    finally:
        hub.drop(q)


@events.get("/api/events")
def event_stream():
    return Response(stream(hub()), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
