"""The node agent: announce, heartbeat, follow the plan, run its shard.

MQTT handlers only parse and enqueue; one worker thread owns the engine and does everything
heavy (loading a shard, running steps), so the network loop never stalls. Decode steps of
different requests that wait in the queue together go through the engine as one batch.

The last stage samples each token and, where the frame's last_step allows, feeds it back as the
next step itself: into its own queue when it holds every layer, else to the first stage. A
token then costs no round trip through the coordinator, which only listens (and frees the
request when a stop string or a client gone ends it early).
"""
from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import psutil

from appliance import __version__
from appliance.bus import protocol
from appliance.bus.client import Bus
from appliance.bus.protocol import parse_json
from appliance.config import Config
from appliance.engines import ENGINES, Shard, Step, load_engine, pick_default_engine
from appliance.engines.footprint import DEFAULT_QUANT, cpu_has_float16_arithmetic, footprint
from appliance.models.config import generation_defaults
from appliance.models.store import models_dir, parse_gguf_spec, resolve_model_dir
from appliance.node import system
from appliance.node.identity import node_id
from appliance.planner import Plan
from appliance.sampling import log_softmax, sample, step_rng, top_indices

log = logging.getLogger(__name__)

MAX_BATCH = 32
GATHER_S = 0.003         # how long a batch may wait for the other in-flight requests' steps
RECENT_S = 1.0           # a request that ran a step this recently is in flight: a batch waits for it
IDLE_REQUEST_S = 120.0   # a request untouched this long has been abandoned: free its cache
EVICTABLE_S = 4.0        # when full, the least recently used request idle this long makes room
MAX_WORKING_IDS = 256    # request ids a heartbeat lists as queued or running here
FREED_KEPT = 1024        # freed request ids remembered: their frames still on the way are dropped quietly
STUCK_S = 120.0          # a worker that has not come round its loop this long, with work waiting, is stuck


@dataclass
class Refusal:
    message: str
    retry: bool = False    # the request may succeed on another attempt (the coordinator resumes it)


@dataclass
class Loaded:
    plan: Plan
    engine: object
    next_node: str | None
    requests: int          # requests this node holds at once (max_requests, or what its memory allows)
    stop_ids: frozenset[int] = frozenset()   # end-of-sequence ids: a last stage does not go on past one


class NodeAgent:
    def __init__(self, config: Config):
        self.config = config
        self.id = node_id(config.state_dir, config.name)
        self.engine_name = pick_default_engine() if config.engine == "auto" else config.engine
        self.quant = config.quant or DEFAULT_QUANT[self.engine_name]
        topics = protocol.Topics(config.cluster)
        self.bus = Bus(config, client_id=f"exo-node-{config.cluster}-{self.id}",
                       will=(topics.node_info(self.id), protocol.node_will(self.id)), user=self.id, role="node")
        self.topics = self.bus.topics
        self.work: queue.Queue = queue.Queue()
        self.loaded: Loaded | None = None
        self.load_error: dict | None = None
        self.last_used: dict[str, float] = {}
        self.freed: collections.OrderedDict[str, None] = collections.OrderedDict()   # the last FREED_KEPT freed
        self.running: list[str] = []                   # the request ids of the batch in the engine now
        self.worker_thread: threading.Thread | None = None
        self.worker_beat = time.monotonic()            # when the worker last came round its loop
        self.stopping = threading.Event()
        self.frames_run, self.frame_seconds = 0, 0.0   # for /metrics: this node's time per frame
        self.coordinators: set[str] = set()            # coordinators with a claim: they may send a first stage its frames

    # -- what the node tells the cluster
    def info(self) -> dict:
        shard = None
        if self.loaded:
            s = self.loaded.plan.shard_of(self.id)
            shard = {"plan_id": self.loaded.plan.plan_id, "model": self.loaded.plan.model,
                     "start": s.start, "end": s.end, "engine": self.loaded.engine.name,
                     "capacity": {"positions": self.loaded.engine.capacity, "requests": self.loaded.requests}}
        return {"id": self.id, "name": self.config.name, "online": True, "version": __version__,
                "roles": ["node"], "engines": sorted(ENGINES), "engine": self.engine_name, "quant": self.quant,
                "limits": {"positions": self.config.max_context, "requests": self.config.max_requests},
                **system.machine_info(), "memory_held": self.memory_held(), "speed": None, "cached_models": [],
                "shard": shard, "load_error": self.load_error}

    def memory_held(self) -> int:
        """What the loaded shard holds (the planner may give it out again): its weights and its
        requests' KV room, counted as the planner counts them."""
        if not self.loaded:
            return 0
        engine, shard = self.loaded.engine, self.loaded.engine.shard
        held = footprint(engine.config, self.engine_name, self.quant, engine.capacity, cpu_has_float16_arithmetic())
        return held.shard(shard.end - shard.start, shard.is_first, shard.is_last, self.loaded.requests)

    def announce(self) -> None:
        self.bus.publish_json(self.topics.node_info(self.id), self.info(), qos=1, retain=True)

    def heartbeat(self) -> None:
        shard = self.loaded and self.loaded.plan.shard_of(self.id)
        status = {"id": self.id, "time": time.time(), **system.machine_status(),
                  "shard": [shard.start, shard.end] if shard else None,
                  "queue_depth": self.work.qsize(), "working": self.working(), "serving": self.serving(),
                  "requests": len(self.loaded.engine.requests()) if self.loaded else 0,
                  "frames": self.frames_run, "frame_seconds": round(self.frame_seconds, 6)}
        self.bus.publish_json(self.topics.node_status(self.id), status)

    def serving(self) -> bool:
        """Whether the worker is there and moving: the coordinator counts a plan with a node that is
        not as not ready (and /healthz says so)."""
        alive = self.worker_thread is not None and self.worker_thread.is_alive()
        return alive and (self.work.empty() or time.monotonic() - self.worker_beat < STUCK_S)

    def working(self) -> list[str]:
        """Requests with a step queued or running here: the coordinator counts them as progressing."""
        with self.work.mutex:
            queued = [item[1].request_id for item in self.work.queue if item[0] == "frame"]
        return list(dict.fromkeys(self.running + queued))[:MAX_WORKING_IDS]

    # -- MQTT handlers: parse, then enqueue for the worker
    def on_plan(self, topic: str, payload: bytes) -> None:
        if not payload:
            return
        plan = Plan.from_dict(parse_json(payload))
        if not 0 < plan.plan_id <= protocol.MAX_PLAN_ID:
            raise ValueError(f"plan id {plan.plan_id} is out of range")
        self.work.put(("plan", plan))

    def on_frame(self, topic: str, payload: bytes) -> None:
        try:
            frame = protocol.decode_frame(payload)
        except protocol.FrameError as e:
            log.warning("dropped a malformed frame on %s: %s", topic, e)
            return
        sender = self.topics.sender_of(topic)
        if not self.may_send(sender, frame):
            log.warning("dropped a frame from %s: neither the stage before this node nor its coordinator", sender)
            return
        self.work.put(("frame", frame))

    def may_send(self, sender: str, frame: protocol.Frame) -> bool:
        """Frames come from the coordinator the replies go to, or from the stage before this one."""
        if sender == frame.coordinator_id and sender in self.coordinators:
            return True
        loaded = self.loaded
        if loaded is None:
            return False
        nodes = loaded.plan.nodes
        if self.id not in nodes:
            return False
        before = nodes.index(self.id) - 1   # the first stage's is the last: its next decode steps
        return nodes[before] == sender and (before >= 0 or frame.pos > 0)

    def on_coordinator(self, topic: str, payload: bytes) -> None:
        coord_id = self.topics.coord_id_of(topic)
        if payload and parse_json(payload).get("online"):
            self.coordinators.add(coord_id)
        else:
            self.coordinators.discard(coord_id)

    def on_free(self, topic: str, payload: bytes) -> None:
        self.work.put(("free", str(parse_json(payload)["request_id"])))

    # -- the worker
    def load(self, plan: Plan) -> None:
        if self.loaded and plan.plan_id <= self.loaded.plan.plan_id:
            return
        shard = plan.shard_of(self.id)
        if self.adopt(plan, shard):
            return
        self.loaded, self.last_used = None, {}
        if shard is None:
            log.info("plan %d gives this node no layers", plan.plan_id)
        else:
            try:
                model_dir = self.model_files(plan.model, shard.start, shard.end)
                options = {"quant": self.quant, "max_seq": self.config.max_context}
                engine = load_engine(self.engine_name, Shard(model_dir, shard.start, shard.end, plan.num_layers),
                                     **options)
                room = self.config.max_requests or engine.request_room(psutil.virtual_memory().available)
                stop_ids = frozenset(generation_defaults(model_dir).eos_token_ids)
                self.loaded, self.load_error = Loaded(plan, engine, plan.next_after(self.id), room, stop_ids), None
                log.info("plan %d: loaded layers [%d, %d) of %s", plan.plan_id, shard.start, shard.end, plan.model)
            except Exception as e:
                log.exception("plan %d: cannot load my shard", plan.plan_id)
                self.load_error = {"plan_id": plan.plan_id, "error": str(e)}
        self.announce()

    def adopt(self, plan: Plan, shard) -> bool:
        """Take a new plan that leaves this node's layers as they are without reloading: only the
        plan id and the next stage change. The KV caches go (requests that continue replay)."""
        loaded = self.loaded
        held = loaded and loaded.plan.shard_of(self.id)
        if not (held and shard and plan.model == loaded.plan.model and plan.num_layers == loaded.plan.num_layers
                and (shard.start, shard.end) == (held.start, held.end)):
            return False
        for request_id in loaded.engine.requests():
            loaded.engine.free(request_id)
        self.loaded, self.last_used = replace(loaded, plan=plan, next_node=plan.next_after(self.id)), {}
        log.info("plan %d: kept layers [%d, %d) without reloading", plan.plan_id, shard.start, shard.end)
        self.announce()
        return True

    # -- downloads: a plan for a hub model fetches the files of this node's layers first
    def model_files(self, model: str, start: int, end: int) -> Path:
        if Path(model).expanduser().exists():   # a folder, or a GGUF file
            return resolve_model_dir(model)
        from appliance.models.download import Progress, fetch_gguf_shard, fetch_shard   # huggingface_hub, httpx: 7 MB a node
        progress = Progress(model, report=self.publish_download)
        fetch = fetch_gguf_shard if parse_gguf_spec(model) else fetch_shard   # ORG/REPO:FILE.gguf: byte ranges
        try:
            return fetch(model, start, end, progress, cache=models_dir(self.config.models_dir))
        except Exception as e:
            progress.send("error", str(e))
            raise

    def publish_download(self, state: dict) -> None:
        self.bus.publish_json(self.topics.node_download(self.id), state, qos=1, retain=True)

    def run_frames(self, batch: list[protocol.Frame]) -> None:
        loaded = self.loaded
        batch = [f for f in batch if f.request_id not in self.freed]   # their next steps, still on the way
        unfit = {f: self.unfit(f, loaded) for f in batch}
        for f, refusal in unfit.items():
            if refusal:
                log.warning("refused a frame of request %s: %s", f.request_id, refusal.message)
                self.reply_error(f, refusal.message, refusal.retry)
        batch = [f for f in batch if not unfit[f]]
        if not batch:
            return
        started = time.monotonic()
        self.running = [f.request_id for f in batch]
        try:
            outputs = loaded.engine.forward([Step(f.request_id, f.pos, f.tensor) for f in batch])
        except Exception as e:
            log.exception("engine failed on a batch of %d", len(batch))
            for f in batch:
                self.reply_error(f, f"node {self.config.name}: {e}")
            return
        finally:
            self.running = []
        now = time.monotonic()
        batch_us = int((now - started) * 1e6)   # every frame of the batch waited for all of it
        for f, out in zip(batch, outputs):
            self.last_used[f.request_id] = now
            compute_us = f.compute_us + batch_us
            if loaded.next_node is not None:
                sent = replace(f, tensor=protocol.wire_activations(out), compute_us=compute_us)
                self.bus.publish(self.topics.node_inbox(loaded.next_node, self.id), protocol.encode_frame(sent))
            elif f.flags & protocol.SAMPLE:   # the frame as it came (its rows give the next position)
                self.reply_token(replace(f, compute_us=compute_us), out)
        self.frames_run += len(batch)
        self.frame_seconds += time.monotonic() - started

    def unfit(self, f: protocol.Frame, loaded: Loaded | None) -> "Refusal | None":
        """Why this node cannot run a (well-formed) frame, or None. Taking a new request's first
        frame reserves its place here."""
        name = self.config.name
        if not loaded or f.plan_id != loaded.plan.plan_id:
            return Refusal(f"node {name} does not hold plan {f.plan_id}'s shard", retry=True)
        engine = loaded.engine
        if f.pos + len(f.tensor) > engine.capacity:
            return Refusal(f"position {f.pos + len(f.tensor)} is past the capacity of {engine.capacity} positions")
        if loaded.plan.shard_of(self.id).start == 0:
            if f.tensor.dtype != protocol.TOKEN_IDS:
                return Refusal("the first stage takes token ids")
            if not (0 <= f.tensor.min() and f.tensor.max() < engine.config.vocab_size):
                return Refusal(f"token ids must be below {engine.config.vocab_size}")
        elif f.tensor.dtype == protocol.TOKEN_IDS or f.tensor.shape[1] != engine.config.hidden_size:
            return Refusal(f"node {name} takes activations of width {engine.config.hidden_size}, "
                           f"got {f.tensor.dtype} {f.tensor.shape}")
        if f.request_id not in self.last_used:
            if f.pos > 0:   # its cache is gone (evicted, or a plan adopted): the coordinator replays
                return Refusal(f"node {name} holds no cache for this request", retry=True)
            if not self.make_room(loaded.requests):
                return Refusal(f"node {name} is full: {loaded.requests} requests in flight", retry=True)
            self.last_used[f.request_id] = time.monotonic()
        return None

    def reply_token(self, f: protocol.Frame, logits: np.ndarray) -> None:
        token = sample(logits, f.sampling, step_rng(f.sampling.seed, f.step))
        continued = self.continue_with(f, token)   # the next step goes out before the reply
        logprob, top = None, []
        if f.flags & protocol.LOGPROBS:   # only where the request asked: about 0.25 ms a token
            logprobs = log_softmax(logits)
            logprob = float(logprobs[token])
            top = [(int(i), float(logprobs[i])) for i in top_indices(logprobs, protocol.TOP_LOGPROBS)]
        self.bus.publish_json(self.topics.coord_out(f.coordinator_id, self.id),
                              protocol.token_reply(f, token, continued, logprob, top))

    def continue_with(self, f: protocol.Frame, token: int) -> bool:
        """Send the step after `f`, fed its token, where the frame allows it: not past last_step, not
        after an end-of-sequence token, not for a coordinator gone. Whether it was sent."""
        loaded = self.loaded
        if f.step >= f.last_step or token in loaded.stop_ids or f.coordinator_id not in self.coordinators:
            return False
        first = loaded.plan.nodes[0]
        if first == self.id:
            self.work.put(("frame", f.next_step(token)))
            return True
        return self.bus.publish(self.topics.node_inbox(first, self.id), protocol.encode_frame(f.next_step(token)))

    def reply_error(self, f: protocol.Frame, message: str, retry: bool = False) -> None:
        self.bus.publish_json(self.topics.coord_out(f.coordinator_id, self.id), protocol.error_reply(f, message, retry))

    def free(self, request_id: str) -> None:
        if self.loaded:
            self.loaded.engine.free(request_id)
        self.last_used.pop(request_id, None)

    def finish(self, request_id: str) -> None:
        """The coordinator is done with a request: free it, and drop its frames still on the way
        (the steps a last stage sent itself before the word came)."""
        self.free(request_id)
        self.freed[request_id] = None
        while len(self.freed) > FREED_KEPT:
            self.freed.popitem(last=False)

    def make_room(self, room: int) -> bool:
        """Room for one more of `room` requests: free, or made by evicting the least recently used idle one."""
        if len(self.last_used) < room:
            return True
        oldest = min(self.last_used, key=self.last_used.get)
        if self.last_used[oldest] > time.monotonic() - EVICTABLE_S:
            return False
        log.info("full: evicting request %s, idle %.0f s", oldest, time.monotonic() - self.last_used[oldest])
        self.free(oldest)
        return True

    def free_abandoned(self) -> None:
        cutoff = time.monotonic() - IDLE_REQUEST_S
        for request_id in [r for r, t in self.last_used.items() if t < cutoff]:
            self.free(request_id)

    def worker(self) -> None:
        swept = time.monotonic()
        while not self.stopping.is_set():
            self.worker_beat = time.monotonic()
            if time.monotonic() - swept >= protocol.HEARTBEAT_S:   # on a timer, also under load
                self.free_abandoned()
                swept = time.monotonic()
            try:
                kind, item = self.work.get(timeout=protocol.HEARTBEAT_S)
            except queue.Empty:
                continue
            try:
                self.handle(kind, item)
            except Exception:
                log.exception("the worker could not handle a %s", kind)

    def handle(self, kind: str, item) -> None:
        if kind == "plan":
            self.load(item)
        elif kind == "free":
            self.finish(item)
        elif kind == "frame":
            self.run_frames(self.take_batch(item))

    def take_batch(self, first: protocol.Frame) -> list[protocol.Frame]:
        """The frame just taken plus, from the queue behind it, the oldest waiting frame of each
        other request: every request moves one step per batch, so a long prompt's chunks do not
        hold up everyone else's decode steps. At most one prompt chunk goes in a batch, and no
        batch waits for more than one: eight prompts arriving together would otherwise all be
        prefilled before anyone's next token. While fewer requests than are in flight have a
        frame here, wait a moment (GATHER_S) for theirs: their replies were sent together and
        their next steps arrive together, one MQTT message at a time. The scan stops at a plan
        or free command, which must not be overtaken."""
        batch, seen = [first], {first.request_id}
        has_chunk = len(first.tensor) > 1
        deadline = time.monotonic() + GATHER_S
        while True:
            with self.work.mutex:
                for item in list(self.work.queue):
                    if len(batch) == MAX_BATCH or item[0] != "frame":
                        return batch
                    frame, chunk = item[1], len(item[1].tensor) > 1
                    if frame.request_id in seen:
                        continue
                    seen.add(frame.request_id)        # taken or not, a request's later frames wait their turn
                    if chunk and has_chunk:
                        continue
                    batch.append(frame)
                    has_chunk = has_chunk or chunk
                    self.work.queue.remove(item)
                if len(batch) >= self.in_flight() or time.monotonic() >= deadline:
                    return batch
                self.work.not_empty.wait(deadline - time.monotonic())

    def in_flight(self) -> int:
        """Requests that ran a step here within RECENT_S: the ones whose next step is coming."""
        recent = time.monotonic() - RECENT_S
        return sum(1 for t in list(self.last_used.values()) if t >= recent)

    # -- life cycle
    def start(self) -> "NodeAgent":
        t = self.topics
        self.bus.on(t.plan, self.on_plan, qos=1)
        self.bus.on(t.node_inbox(self.id), self.on_frame)
        self.bus.on(t.ctl("free"), self.on_free, qos=1)
        self.bus.on(t.coord_info(), self.on_coordinator, qos=1)
        self.bus.on_connect(self.announce)
        self.bus.start()
        self.start_worker()
        return self

    def start_worker(self) -> None:
        self.worker_thread = threading.Thread(target=self.worker, name="node-worker", daemon=True)
        self.worker_thread.start()

    def serve_forever(self) -> None:
        while not self.stopping.wait(protocol.HEARTBEAT_S):
            if not self.worker_thread.is_alive():
                log.error("the worker thread died: starting it again")
                self.start_worker()
            self.heartbeat()

    def stop(self) -> None:
        self.stopping.set()
        self.bus.publish(self.topics.node_info(self.id), protocol.node_will(self.id), qos=1, retain=True)
        self.bus.stop()
