"""The coordinator: owns requests. It sends a prompt to the first stage and takes the last stage's
tokens on `coord/<id>/out` until a stop or the token limit. The last stage feeds each token back
as the next step itself (the prompt's frame allows it up to the token limit), so a token makes no
round trip through here; where a reply says it did not, the coordinator sends the next step.

An answer survives the cluster changing under it. The coordinator holds every token of every
request, so when a request is interrupted (a node of its plan leaves or falls silent, a re-plan,
the broker connection drops, a frame is lost, a node no longer holds the plan) it waits for the
cluster's next ready plan and replays the prompt plus the tokens so far as a prefill, under a new
wire id. The client's stream goes on; only after MAX_RESUMES interruptions, or when no plan can
serve, does the request end with an Unavailable error naming why.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import queue
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np

from appliance.bus import protocol
from appliance.bus.client import Bus
from appliance.config import Config
from appliance.coordinator.admission import Admission
from appliance.coordinator.cluster import Cluster
from appliance.coordinator.throughput import Throughput
from appliance.engines.base import MAX_REQUESTS
from appliance.models.config import GenerationDefaults, ModelConfig, generation_defaults
from appliance.models.download import fetch_for_coordinator, fetch_gguf_shard
from appliance.models.store import models_dir, parse_gguf_spec, resolve_model_dir
from appliance.models.tokenizer import Tokenizer

log = logging.getLogger(__name__)

READY_WAIT_S = 30.0       # how long a request waits for a plan that is still loading
STEP_TIMEOUT_S = 10.0     # no reply and no node listing the request as working this long: the step was lost
MAX_RESUMES = 5           # interruptions one request survives
RESUME_BACKOFF_S = 1.0    # the n-th resume waits (n - 1) times this: a node that is full gets time to make room
MAX_FRAME_BYTES = 1 << 20  # prefill activations travel in chunks of at most this size


class GenerationError(RuntimeError):
    status = 500


class Unavailable(GenerationError):
    status = 503


class Interrupted(Exception):
    """The request's current attempt cannot finish; it may resume on the next ready plan."""


@dataclass
class Token:
    id: int
    logprob: float | None = None   # None where the request did not ask for log-probabilities
    top: list[tuple[int, float]] = field(default_factory=list)   # the most likely ids and their logprobs
    compute_s: float = 0.0      # the nodes' compute time for this step; the rest of its round trip is hops
    continued: bool = False     # the last stage sent the next step itself
    received: float = 0.0       # when its reply came (time.monotonic()), however late the consumer takes it


@dataclass
class LoadedModel:
    id: str
    path: Path
    config: ModelConfig
    tokenizer: Tokenizer
    created: int = field(default_factory=lambda: int(time.time()))   # when it was loaded: /v1/models says so
    generation: GenerationDefaults = GenerationDefaults()

    @property
    def stop_ids(self) -> set[int]:
        """Every end-of-sequence id: config.json's and generation_config.json's."""
        return set(self.config.eos_token_ids) | set(self.generation.eos_token_ids)


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
    resumes: int = 0                 # times the request was replayed on a new plan
    endpoint: str = ""               # the API path it came in on
    max_tokens: int = 0
    sampling: dict = field(default_factory=dict)
    finish_reason: str | None = None  # the API's: stop (end of text or a stop string), length (max_tokens)
    duration_s: float | None = None   # from arrival to its end

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Attempt:
    """One run of a request on one plan, under its own wire id (a resume starts a new one)."""
    id: str
    plan_id: int
    nodes: list[str]
    replies: queue.Queue = field(default_factory=queue.Queue)
    progress_at: float = field(default_factory=time.monotonic)   # last reply, or a node saying it is working on it


class Observer:
    """Where the coordinator reports what it measures; the panel's /metrics installs a real one."""

    def step_done(self, seconds: float) -> None:
        pass

    def hop_done(self, seconds: float) -> None:
        pass

    def finished(self, record: RequestRecord) -> None:
        pass

    def rejected(self, status: int) -> None:
        """A request refused before it was run (a 4xx: invalid, unknown model, the queue full)."""


def prefill_chunks(prompt: list[int], hidden_size: int) -> list[tuple[int, list[int]]]:
    """(position, token ids) chunks whose activations stay within MAX_FRAME_BYTES."""
    size = max(1, MAX_FRAME_BYTES // (hidden_size * protocol.WIRE_ACTIVATIONS.itemsize))
    return [(pos, prompt[pos:pos + size]) for pos in range(0, len(prompt), size)]


class Coordinator:
    def __init__(self, config: Config):
        self.config = config
        self.id = protocol.new_id()
        self.bus = Bus(config, client_id=f"exo-coord-{self.id[:12]}",
                       will=(protocol.Topics(config.cluster).coord_info(self.id), protocol.COORD_WILL),
                       user=self.id, role="coord")
        self.topics = self.bus.topics
        self.cluster = Cluster(self.bus, self.id)
        self.cluster.listeners.append(self.on_cluster_event)
        self.model: LoadedModel | None = None
        self.active: dict[str, Attempt] = {}      # by wire id
        self.history: collections.deque[RequestRecord] = collections.deque(maxlen=100)
        self.lock = threading.Lock()
        self.observer = Observer()
        self.throughput = Throughput()
        self.admission = Admission(config.queue_limit, self.cluster_requests)

    def start(self) -> "Coordinator":
        self.cluster.subscribe()
        self.bus.on(self.topics.coord_out(self.id), self.on_reply)
        self.bus.on_connect(self.cluster.announce)
        self.bus.on_disconnect(lambda: self.interrupt(lambda a: True, "the broker connection was lost"))
        self.bus.start()
        if self.config.model:
            self.load_model(self.config.model)
        return self

    def stop(self) -> None:
        self.cluster.withdraw()
        self.bus.stop()

    def load_model(self, model: str) -> LoadedModel:
        if Path(model).expanduser().exists():   # a folder, or a GGUF file
            path = resolve_model_dir(model)
        elif parse_gguf_spec(model):   # a hub GGUF file: its header holds the config and the tokenizer
            path = fetch_gguf_shard(model, 0, 0, cache=models_dir(self.config.models_dir))
        else:   # a hub id: the coordinator needs only config.json and the tokenizer
            path = fetch_for_coordinator(model, cache=models_dir(self.config.models_dir))
        self.model = LoadedModel(model, path, ModelConfig.load(path), Tokenizer(path),
                                 generation=generation_defaults(path))
        self.cluster.set_model(model, self.model.config)
        return self.model

    def unload_model(self) -> None:
        """Stop serving: the nodes get a plan without shards and drop theirs."""
        self.model = None
        self.cluster.clear_model()

    # -- replies and cluster events, on the MQTT thread
    def on_reply(self, topic: str, payload: bytes) -> None:
        reply = protocol.parse_reply(payload)
        attempt = self.active.get(reply.request_id)
        if attempt is None:
            log.debug("reply for a finished request dropped")
            return
        sender = self.topics.sender_of(topic)
        if sender not in (attempt.nodes if reply.error is not None else attempt.nodes[-1:]):
            log.warning("dropped a reply from %s: tokens come from the plan's last node, errors from its nodes", sender)
            return
        attempt.replies.put((reply, time.monotonic()))

    def on_cluster_event(self, kind: str, data: dict) -> None:
        if kind == "node" and not data.get("online"):
            name = self.cluster.name_of(data["id"])
            why = "fell silent" if data.get("silent") else "left the cluster"
            self.interrupt(lambda a: data["id"] in a.nodes, f"node {name} {why}")
        elif kind == "plan":
            self.interrupt(lambda a: a.plan_id != data["plan_id"], "the cluster was re-planned")
        elif kind == "status":
            now = time.monotonic()
            working = data.get("working")
            for wire_id in working if isinstance(working, list) else []:
                attempt = self.active.get(wire_id) if isinstance(wire_id, str) else None
                if attempt:
                    attempt.progress_at = now

    def interrupt(self, which, reason: str) -> None:
        for attempt in list(self.active.values()):
            if which(attempt):
                attempt.replies.put(Interrupted(reason))

    # -- generation
    def generate(self, prompt: list[int], max_tokens: int, sampling: protocol.Sampling,
                 record: RequestRecord | None = None, logprobs: bool = False) -> Iterator[Token]:
        """Yield sampled tokens until an end-of-sequence token or `max_tokens`, resuming on a new
        plan when interrupted. Closing the generator early (a client gone, a stop string) frees the
        request on every node. `record`: what the Requests page shows of it, where the caller
        wants to add to it (the endpoint, the finish reason). `logprobs`: each token comes with its
        log-probability and the most likely ones (else they are None and empty)."""
        if self.model is None:
            raise Unavailable("no model is loaded")
        if sampling.seed is None:   # a seed of our own keeps a resumed request's draws the same
            sampling = replace(sampling, seed=secrets.randbits(62))
        record = record or RequestRecord(protocol.new_id(), self.model.id, [], len(prompt))
        record.max_tokens, record.sampling = max_tokens, asdict(sampling)
        with self.admission.place():
            yield from self._generate(prompt, max_tokens, sampling, record, logprobs)

    def _generate(self, prompt: list[int], max_tokens: int, sampling: protocol.Sampling,
                  record: RequestRecord, logprobs: bool) -> Iterator[Token]:
        self.history.append(record)
        generated: list[int] = []
        try:
            plan = self._wait_for_plan()
            record.nodes = plan.nodes
            started = time.monotonic()
            while True:
                try:
                    with contextlib.closing(self._attempt(plan, prompt + generated, len(generated),
                                                          max_tokens, sampling, logprobs)) as tokens:
                        for token in tokens:
                            generated.append(token.id)
                            self._count(record, started)
                            yield token
                    record.status = "done"
                    return
                except Interrupted as e:
                    record.resumes += 1
                    if record.resumes > MAX_RESUMES:
                        raise Unavailable(f"gave up after {MAX_RESUMES} interruptions, the last: {e}") from None
                    log.info("request %s interrupted (%s): resuming after %d tokens", record.id, e, len(generated))
                    time.sleep(RESUME_BACKOFF_S * (record.resumes - 1))   # a backoff, not a wait for an event
                    plan = self._wait_for_plan(after=f"{e}; ")
                    record.nodes = plan.nodes
        except GenerationError as e:
            record.status, record.error = "error", str(e)
            raise
        finally:
            if record.status == "running":
                record.status = "stopped"   # the consumer closed the generator early
            record.duration_s = time.time() - record.created
            self.observer.finished(record)

    def _wait_for_plan(self, after: str = ""):
        """The next ready plan; `after`: what interrupted the request, for the error if there is none."""
        reason = None
        if not self.bus.connected.wait(READY_WAIT_S):
            reason = "the MQTT broker is unreachable"
        elif (plan := self.cluster.wait_ready(READY_WAIT_S, patient=bool(after))) is None:
            reason = self.cluster.not_ready_reason()
        if reason:
            raise Unavailable(f"{after}the cluster cannot serve now: {reason}")
        return plan

    def _attempt(self, plan, tokens: list[int], first_step: int, max_tokens: int,
                 sampling: protocol.Sampling, logprobs: bool) -> Iterator[Token]:
        """Prefill `tokens` (the prompt, and on a resume what was generated so far) on `plan` and
        decode from step `first_step` on. Raises Interrupted when this plan cannot finish it."""
        attempt = Attempt(protocol.new_id(), plan.plan_id, plan.nodes)
        self.active[attempt.id] = attempt
        eos = self.model.stop_ids
        first_node = self.topics.node_inbox(plan.nodes[0], self.id)
        sample = protocol.SAMPLE | (protocol.LOGPROBS if logprobs else 0)   # the flags of a step's last frame

        def send(step: int, pos: int, ids: list[int], flags: int) -> None:
            frame = protocol.Frame(attempt.id, self.id, plan.plan_id, step, pos, np.asarray(ids, dtype=np.int32),
                                   flags, sampling, last_step=max(max_tokens - 1, 0))
            if not self.bus.publish(first_node, protocol.encode_frame(frame)):
                raise Interrupted("a frame could not be sent: the broker connection is down")

        try:
            chunks = prefill_chunks(tokens, self.model.config.hidden_size)
            for i, (pos, ids) in enumerate(chunks):
                send(first_step, pos, ids, sample if i == len(chunks) - 1 else 0)
            pos, sent_at, links = len(tokens), time.monotonic(), len(plan.nodes) + 1
            for step in range(first_step, max_tokens):
                token = self._await_token(attempt, step)
                if step > first_step:
                    self._observe_round_trip(token.received - sent_at, token, links)
                if token.id in eos or step + 1 == max_tokens:
                    yield token
                    return
                if not token.continued:
                    send(step + 1, pos, [token.id], sample)   # the next step goes out first
                # a step the last stage sent itself goes round the ring of stages, not through here: it
                # started about when this token's reply left the last stage
                sent_at, links = (token.received, len(plan.nodes)) if token.continued else \
                    (time.monotonic(), len(plan.nodes) + 1)
                pos += 1
                yield token
        finally:
            self.active.pop(attempt.id, None)
            self.bus.publish_json(self.topics.ctl("free"), protocol.free_command(attempt.id), qos=1)

    def _observe_round_trip(self, round_trip: float, token: Token, links: int) -> None:
        hop = (round_trip - token.compute_s) / links
        self.observer.step_done(round_trip)
        self.observer.hop_done(max(0.0, hop))
        self.throughput.step(round_trip, hop)

    def _count(self, record: RequestRecord, started: float) -> None:
        self.throughput.token()
        record.completion_tokens += 1
        elapsed = time.monotonic() - started
        if record.ttft_s is None:
            record.ttft_s = elapsed
        elif elapsed > record.ttft_s:
            record.tokens_per_s = (record.completion_tokens - 1) / (elapsed - record.ttft_s)

    def unready_reason(self) -> str | None:
        """None when a request would be served now, else why not (what /healthz says)."""
        if not self.bus.connected.is_set():
            return "the MQTT broker is unreachable"
        if self.model is None:
            return "no model is loaded"
        return None if self.cluster.ready_plan() else self.cluster.not_ready_reason()

    def cluster_requests(self) -> int:
        """Requests the cluster holds at once: the smallest node's, on the plan being served."""
        return self.cluster.capacity("requests") or self.config.max_requests or MAX_REQUESTS

    def context_limit(self) -> int:
        """Positions a request may use: the model's context, or less where the plan's engines hold fewer."""
        limit = self.model.config.max_position_embeddings
        held = self.cluster.capacity("positions")
        return min(limit, held) if held else limit

    def recent_requests(self) -> list[dict]:
        """The last 100 requests, newest first."""
        return [r.to_dict() for r in reversed(self.history)]

    def _await_token(self, attempt: Attempt, step: int) -> Token:
        """The token of `step`. The timeout counts from the last sign of progress, so a long prefill
        on a slow node that keeps listing the request in its heartbeat is not taken for a loss."""
        while True:
            left = attempt.progress_at + STEP_TIMEOUT_S - time.monotonic()
            try:
                item = attempt.replies.get(timeout=max(left, 0.05))
            except queue.Empty:
                if attempt.progress_at + STEP_TIMEOUT_S <= time.monotonic():
                    raise Interrupted(f"step {step} got no answer and no node worked on it for {STEP_TIMEOUT_S:.0f} s") from None
                continue
            if isinstance(item, Interrupted):
                raise item
            reply, received = item
            attempt.progress_at = time.monotonic()
            if reply.error is not None:
                if reply.retry:
                    raise Interrupted(reply.error)
                raise GenerationError(reply.error)
            if reply.step == step:
                return Token(reply.token, reply.logprob, reply.top, reply.compute_s, reply.continued, received)
            log.debug("dropped a reply for step %s while waiting for step %d", reply.step, step)
