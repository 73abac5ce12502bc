"""Prometheus /metrics: requests, tokens, time to first token and per-step latency, measured by the
coordinator; memory, CPU, temperature and frame timing per node, from the nodes' heartbeats.

What each latency is:
  exo_time_to_first_token_seconds  request start (plan ready) to the first token back (prefill)
  exo_step_seconds                 one decode step, token to token: from the coordinator having the
                                   token before to having this one (the last node sends the step on
                                   itself, or the coordinator does)
  exo_hop_seconds                  per hop of that step: (the step - the nodes' compute, which the
                                   frames carry) / its hops (nodes: a ring of stages; nodes + 1 where
                                   the coordinator sent it); broker, network and queue time
  exo_node_frame_seconds_total     each node's own time from starting a batch of frames to having
                                   published its results (compute + publish, queue wait excluded)
"""
from __future__ import annotations

from flask import Blueprint, Response, current_app
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from appliance.coordinator.coordinator import Coordinator, RequestRecord

metrics = Blueprint("metrics", __name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
HOP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)

# heartbeat field -> (metric name, help)
NODE_GAUGES = {
    "memory_available": ("exo_node_memory_available_bytes", "Memory available on the node"),
    "memory_total": ("exo_node_memory_total_bytes", "Memory of the node"),
    "cpu_percent": ("exo_node_cpu_percent", "CPU use of the node"),
    "temperature": ("exo_node_temperature_celsius", "SoC temperature of the node"),
    "queue_depth": ("exo_node_queue_depth", "Work items waiting in the node's queue"),
    "requests": ("exo_node_requests", "Requests whose KV cache the node holds"),
}
NODE_COUNTERS = {
    "frames": ("exo_node_frames", "Activation frames the node has run"),
    "frame_seconds": ("exo_node_frame_seconds", "Node time from starting a batch of frames to publishing results"),
}


class PrometheusObserver:
    """Receives the coordinator's measurements (see Coordinator.observer)."""

    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter("exo_requests", "Requests by outcome: done, stopped (a stop string, a client gone), "
                                "error (failed while or before running), rejected (a 4xx: invalid, unknown model, "
                                "the queue full)", ["status"], registry=registry)
        self.prompt_tokens = Counter("exo_prompt_tokens", "Prompt tokens processed", registry=registry)
        self.completion_tokens = Counter("exo_completion_tokens", "Tokens generated", registry=registry)
        self.resumes = Counter("exo_request_resumes", "Requests replayed on a new plan after an interruption "
                               "(a node lost or silent, a re-plan, the broker connection lost)", registry=registry)
        self.ttft = Histogram("exo_time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS,
                              registry=registry)
        self.step = Histogram("exo_step_seconds", "Round trip of one decode step through all nodes",
                              buckets=LATENCY_BUCKETS, registry=registry)

        self.hop = Histogram("exo_hop_seconds", "Per-hop latency of a decode step (broker, network, queues)",
                             buckets=HOP_BUCKETS, registry=registry)

    def step_done(self, seconds: float) -> None:
        self.step.observe(seconds)

    def hop_done(self, seconds: float) -> None:
        self.hop.observe(seconds)

    def rejected(self, status: int) -> None:
        self.requests.labels("rejected").inc()

    def finished(self, record: RequestRecord) -> None:
        self.requests.labels(record.status).inc()
        self.prompt_tokens.inc(record.prompt_tokens)
        self.completion_tokens.inc(record.completion_tokens)
        self.resumes.inc(record.resumes)
        if record.ttft_s is not None:
            self.ttft.observe(record.ttft_s)


class NodeCollector:
    """Per-node gauges and counters from the latest heartbeat of each online node."""

    def __init__(self, coordinator: Coordinator):
        self.cluster = coordinator.cluster

    def collect(self):
        with self.cluster.lock:
            status = {i: dict(s) for i, s in self.cluster.status.items()}
        families = [GaugeMetricFamily(name, text, labels=["node"]) for name, text in NODE_GAUGES.values()]
        families += [CounterMetricFamily(name, text, labels=["node"]) for name, text in NODE_COUNTERS.values()]
        fields = list(NODE_GAUGES) + list(NODE_COUNTERS)
        for node, s in sorted(status.items()):
            for field, family in zip(fields, families):
                if isinstance(s.get(field), (int, float)) and not isinstance(s.get(field), bool):
                    family.add_metric([node], float(s[field]))
        yield from families


class AdmissionCollector:
    """How full the cluster is: requests running, waiting in the queue, and the places there are."""

    def __init__(self, coordinator: Coordinator):
        self.admission = coordinator.admission

    def collect(self):
        state = self.admission.state()
        for key, text in [("running", "Requests running"), ("waiting", "Requests waiting for a place"),
                          ("capacity", "Requests the cluster holds at once"), ("queue_limit", "Requests that may wait")]:
            yield GaugeMetricFamily(f"exo_requests_{key}", text, value=state[key])


def install(app, coordinator: Coordinator) -> None:
    registry = CollectorRegistry()
    coordinator.observer = PrometheusObserver(registry)
    registry.register(NodeCollector(coordinator))
    registry.register(AdmissionCollector(coordinator))
    app.config["metrics_registry"] = registry
    app.register_blueprint(metrics)


@metrics.get("/metrics")
def scrape():
    return Response(generate_latest(current_app.config["metrics_registry"]), mimetype=CONTENT_TYPE_LATEST)
