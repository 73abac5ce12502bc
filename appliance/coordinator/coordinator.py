"""The coordinator: owns requests. It sends each step's input to the first stage, waits for the
last stage's token on `coord/<id>/out`, and sends the next step, until a stop or the token limit.

A request never hangs: a node leaving, a re-plan, a node's error or a step timeout ends it with
a GenerationError that the API turns into an error response or an error event.
"""
from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from appliance.bus import frames
from appliance.bus.client import Bus, parse_json
from appliance.bus.topics import Topics
from appliance.config import Config
from appliance.coordinator.cluster import Cluster
from appliance.models.config import ModelConfig
from appliance.models.download import fetch_for_coordinator
from appliance.models.store import models_dir, resolve_model_dir
from appliance.models.tokenizer import Tokenizer

log = logging.getLogger(__name__)

READY_WAIT_S = 30.0       # how long a request waits for a plan that is still loading
STEP_TIMEOUT_S = 60.0     # a step with no answer this long has been lost
MAX_FRAME_BYTES = 1 << 20  # prefill activations travel in chunks of at most this size


class GenerationError(RuntimeError):
    status = 500


class Unavailable(GenerationError):
    status = 503


@dataclass
class Token:
    id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)   # the most likely ids and their logprobs
    compute_s: float = 0.0      # the nodes' compute time for this step; the rest of its round trip is hops


@dataclass
class LoadedModel:
    id: str
    path: Path
    config: ModelConfig
    tokenizer: Tokenizer


@dataclass
class RequestRecord:
    """What the panel's Requests page shows of one request."""
    id: str
    model: str
    nodes: list[str]
    prompt_tokens: int
    created: float = field(default_factory=time.time)
    completion_tokens: int = 0
    ttft_s: float | None = None
    tokens_per_s: float | None = None
    status: str = "running"          # running, done, error, stopped (by a stop string or a client gone)
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ActiveRequest:
    id: str
    plan_id: int
    nodes: list[str]
    replies: queue.Queue
    record: RequestRecord


class Observer:
    """Where the coordinator reports what it measures; the panel's /metrics installs a real one."""

    def step_done(self, seconds: float) -> None:
        pass

    def hop_done(self, seconds: float) -> None:
        pass

    def finished(self, record: RequestRecord) -> None:
        pass


def prefill_chunks(prompt: list[int], hidden_size: int) -> list[tuple[int, list[int]]]:
    """(position, token ids) chunks whose activations stay within MAX_FRAME_BYTES."""
    size = max(1, MAX_FRAME_BYTES // (hidden_size * 4))
    return [(pos, prompt[pos:pos + size]) for pos in range(0, len(prompt), size)]


class Coordinator:
    def __init__(self, config: Config):
        self.config = config
        self.id = frames.new_id()
        self.bus = Bus(config, client_id=f"exo-coord-{self.id[:12]}",
                       will=(Topics(config.cluster).coord_info(self.id), b""))   # clears our leadership claim
        self.topics = self.bus.topics
        self.cluster = Cluster(self.bus, self.id)
        self.cluster.listeners.append(self.on_cluster_event)
        self.model: LoadedModel | None = None
        self.active: dict[str, ActiveRequest] = {}
        self.history: collections.deque[RequestRecord] = collections.deque(maxlen=100)
        self.lock = threading.Lock()
        self.observer = Observer()

    def start(self) -> "Coordinator":
        self.cluster.subscribe()
        self.bus.on(self.topics.coord_out(self.id), self.on_reply)
        self.bus.on_connect(self.cluster.announce)
        self.bus.start()
        if self.config.model:
            self.load_model(self.config.model)
        return self

    def stop(self) -> None:
        self.cluster.withdraw()
        self.bus.stop()

    def load_model(self, model: str) -> LoadedModel:
        if Path(model).expanduser().is_dir():
            path = resolve_model_dir(model)
        else:   # a hub id: the coordinator needs only config.json and the tokenizer
            path = fetch_for_coordinator(model, cache=models_dir(self.config.models_dir))
        self.model = LoadedModel(model, path, ModelConfig.load(path), Tokenizer(path))
        self.cluster.set_model(model, self.model.config)
        return self.model

    def unload_model(self) -> None:
        """Stop serving: the nodes get a plan without shards and drop theirs."""
        self.model = None
        self.cluster.clear_model()

    # -- replies and cluster events, on the MQTT thread
    def on_reply(self, topic: str, payload: bytes) -> None:
        reply = parse_json(payload)
        request = self.active.get(str(reply.get("request_id")))
        if request is None:
            log.debug("reply for a finished request dropped")
            return
        request.replies.put(reply)

    def on_cluster_event(self, kind: str, data: dict) -> None:
        if kind == "node" and not data.get("online"):
            self.fail_requests(lambda r: data["id"] in r.nodes, f"node {data['id']} left the cluster mid-request")
        elif kind == "plan":
            self.fail_requests(lambda r: r.plan_id != data["plan_id"], "the cluster was re-planned mid-request")

    def fail_requests(self, which, message: str) -> None:
        for request in list(self.active.values()):
            if which(request):
                request.replies.put({"error": message, "status": 503})

    # -- generation
    def generate(self, prompt: list[int], max_tokens: int, sampling: frames.Sampling) -> Iterator[Token]:
        """Yield sampled tokens until an end-of-sequence token or `max_tokens`. Closing the
        generator early (a client gone, a stop string) frees the request on every node."""
        if self.model is None:
            raise Unavailable("no model is loaded")
        plan = self.cluster.wait_ready(READY_WAIT_S)
        if plan is None:
            errors = self.cluster.load_errors()
            reason = ("; ".join(errors) if errors else self.cluster.plan_error
                      or "the cluster's plan is still loading")
            raise Unavailable(f"the cluster cannot serve now: {reason}")
        request_id = frames.new_id()
        record = RequestRecord(request_id, self.model.id, plan.nodes, len(prompt))
        request = ActiveRequest(request_id, plan.plan_id, plan.nodes, queue.Queue(), record)
        self.active[request.id] = request
        self.history.append(record)
        started = time.monotonic()
        eos = set(self.model.config.eos_token_ids)
        first_node = self.topics.node_inbox(plan.nodes[0])

        def send(step: int, pos: int, tokens: list[int], flags: int) -> None:
            frame = frames.Frame(request.id, self.id, plan.plan_id, step, pos,
                                 np.asarray(tokens, dtype=np.int32), flags, sampling)
            self.bus.publish(first_node, frames.encode(frame))

        try:
            chunks = prefill_chunks(prompt, self.model.config.hidden_size)
            for i, (pos, tokens) in enumerate(chunks):
                send(0, pos, tokens, frames.SAMPLE if i == len(chunks) - 1 else 0)
            pos = len(prompt)
            sent_at = time.monotonic()
            for step in range(max_tokens):
                token = self._await_token(request, step)
                if step:
                    round_trip = time.monotonic() - sent_at
                    self.observer.step_done(round_trip)
                    # coordinator -> first node -> ... -> last node -> coordinator
                    self.observer.hop_done(max(0.0, round_trip - token.compute_s) / (len(plan.nodes) + 1))
                record.completion_tokens += 1
                elapsed = time.monotonic() - started
                if record.ttft_s is None:
                    record.ttft_s = elapsed
                elif elapsed > record.ttft_s:
                    record.tokens_per_s = (record.completion_tokens - 1) / (elapsed - record.ttft_s)
                if token.id in eos or step + 1 == max_tokens:
                    record.status = "done"
                    yield token
                    return
                send(step + 1, pos, [token.id], frames.SAMPLE)   # the next step goes out first
                sent_at = time.monotonic()
                pos += 1
                yield token
        except GenerationError as e:
            record.status, record.error = "error", str(e)
            raise
        finally:
            if record.status == "running":
                record.status = "stopped"   # the consumer closed the generator early
            self.active.pop(request.id, None)
            self.bus.publish_json(self.topics.ctl("free"), {"request_id": request.id}, qos=1)
            self.observer.finished(record)

    def recent_requests(self) -> list[dict]:
        """The last 100 requests, newest first."""
        return [r.to_dict() for r in reversed(self.history)]

    def _await_token(self, request: ActiveRequest, step: int) -> Token:
        while True:
            try:
                reply = request.replies.get(timeout=STEP_TIMEOUT_S)
            except queue.Empty:
                raise GenerationError(f"step {step} got no answer within {STEP_TIMEOUT_S:.0f} s") from None
            if "error" in reply:
                error = Unavailable if reply.get("status") == 503 else GenerationError
                raise error(reply["error"])
            if reply.get("step") == step:
                top = [(int(i), float(lp)) for i, lp in reply.get("top") or []]
                return Token(int(reply["token"]), float(reply.get("logprob", 0.0)), top,
                             float(reply.get("compute_s", 0.0)))
            log.debug("dropped a reply for step %s while waiting for step %d", reply.get("step"), step)
