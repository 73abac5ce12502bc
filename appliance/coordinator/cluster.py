"""The coordinator's view of the cluster: which nodes are online, and the plan it publishes.

Nodes arrive and leave through their retained `info` (a Last Will marks a dead node offline),
and their heartbeats keep them in: a node silent for MISSED_HEARTBEATS intervals (stopped, or its
cable pulled with the TCP connection left half-open, or a retained info of a node that died while
the broker was down) is planned out until it speaks again. Any change of the online set schedules
a re-plan; a short debounce lets a burst of arrivals (a cluster booting) end in one plan.

Exactly one coordinator plans: each announces itself on a retained `coord/<id>/info` (with a
Last Will that clears it), and the leader is the online one that started first (then lowest id).
Every coordinator computes the same answer from the same retained messages. A standby follows
the leader's plan (and can serve requests on it); when the leader's Last Will arrives, the next
one takes over and re-plans.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from appliance.bus import protocol
from appliance.bus.client import Bus
from appliance.bus.protocol import parse_json
from appliance.models.config import ModelConfig
from appliance.engines.base import MAX_CONTEXT
from appliance.engines.footprint import DEFAULT_QUANT, Footprint, footprint
from appliance.planner import NodeCapacity, Plan, PlanError, host_memory, split_layers

log = logging.getLogger(__name__)

REPLAN_DEBOUNCE_S = 0.5
SILENCE_S = protocol.MISSED_HEARTBEATS * protocol.HEARTBEAT_S


class Cluster:
    def __init__(self, bus: Bus, coordinator_id: str):
        self.bus, self.topics, self.coordinator_id = bus, bus.topics, coordinator_id
        self.nodes: dict[str, dict] = {}        # online nodes' info, by id
        self.status: dict[str, dict] = {}       # latest heartbeat, by id
        self.silent: dict[str, dict] = {}       # info of nodes online by their info but not heard from
        self.heard: dict[str, float] = {}       # when each node last spoke (monotonic)
        self.names: dict[str, str] = {}         # every node id ever seen -> its name, for messages
        self.connections = 0                    # our connections to the broker so far
        self.spoke: set[str] = set()            # nodes heard (a heartbeat) since our last connect
        self.plan: Plan | None = None
        self.plan_error: str | None = None
        self.model: str = ""
        self.model_config: ModelConfig | None = None
        self.last_plan_id = 0
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)   # notified on any node or plan change
        self.listeners: list[Callable[[str, dict], None]] = []
        self._replan_timer: threading.Timer | None = None
        self.started = time.time()
        self.coordinators: dict[str, float] = {}   # online coordinators: id -> start time
        self.claims: dict[str, dict] = {}          # online coordinators: id -> their claim
        self.can_host = False                      # our machine may start the cluster's broker (keeper.py)
        self.hosts_broker = False                  # our machine runs the broker we are on
        self.broker = ""                           # the broker of our last connection
        self.announced = False                     # our own announcement came back: leadership is known
        self.withdrawn = False                     # we are stopping: our claim is being cleared
        self.is_leader = False
        self.leaders_plan: Plan | None = None

    def subscribe(self) -> None:
        t = self.topics
        self.bus.on(t.node_info(), self.on_info, qos=1)
        self.bus.on(t.node_status(), self.on_status)
        self.bus.on(t.plan, self.on_retained_plan, qos=1)
        self.bus.on(t.coord_info(), self.on_coordinator, qos=1)
        self.bus.on_connect(self.forgive_silence)
        threading.Thread(target=self.watch_heartbeats, name="heartbeats", daemon=True).start()

    def announce(self) -> None:
        """On every (re)connect: our claim, retained so coordinators that start later see it, and,
        if we lead, our plan again (a restarted broker may have forgotten it)."""
        self.bus.publish_json(self.topics.coord_info(self.coordinator_id),
                              {"id": self.coordinator_id, "online": True, "started": self.started,
                               "can_host": self.can_host, "hosts_broker": self.hosts_broker}, qos=1, retain=True)
        with self.lock:
            plan = self.plan if self.is_leader and self.plan and self.plan.coordinator == self.coordinator_id else None
        if plan:
            self.bus.publish_json(self.topics.plan, plan.to_dict(), qos=1, retain=True)

    def withdraw(self) -> None:
        """Clear our claim before a clean exit (a crash clears it through the Last Will). Without a
        connection there is nothing to clear: the broker has sent our Will, or will."""
        self.withdrawn = True
        if not self.bus.connected.is_set():
            return
        try:
            self.bus.client.publish(self.topics.coord_info(self.coordinator_id), b"", qos=1,
                                    retain=True).wait_for_publish(2)
        except (RuntimeError, ValueError):   # the connection went while we waited
            pass

    def name_of(self, node_id: str) -> str:
        return self.names.get(node_id, node_id)

    # -- incoming
    def on_info(self, topic: str, payload: bytes) -> None:
        node_id = self.topics.node_id_of(topic)
        info = parse_json(payload) if payload else {"online": False}
        if info.get("online"):
            info["memory_available"] = int(info["memory_available"])  # the planner relies on it
            info["speed"] = float(info["speed"]) if info.get("speed") else None
        with self.lock:
            was_online = node_id in self.nodes
            self.silent.pop(node_id, None)
            if info.get("online"):
                self.nodes[node_id] = info
                self.heard[node_id] = time.monotonic()
                self.names[node_id] = str(info.get("name") or node_id)
            else:
                self.nodes.pop(node_id, None)
                self.status.pop(node_id, None)
            if was_online != (node_id in self.nodes):
                log.info("node %s is %s", self.name_of(node_id), "online" if node_id in self.nodes else "offline")
                self.schedule_replan()
            self.changed.notify_all()
        self.emit("node", {"id": node_id, **info})

    def on_status(self, topic: str, payload: bytes) -> None:
        node_id = self.topics.node_id_of(topic)
        status = parse_json(payload)
        with self.lock:
            if node_id in self.nodes or node_id in self.silent:   # not every id a stranger makes up
                self.heard[node_id] = time.monotonic()
                if node_id not in self.spoke:
                    self.spoke.add(node_id)
                    self.changed.notify_all()
            back = self.silent.pop(node_id, None)
            if back:
                log.info("node %s speaks again", self.name_of(node_id))
                self.nodes[node_id] = back
                self.schedule_replan()
                self.changed.notify_all()
            if node_id in self.nodes:
                self.status[node_id] = status
        if back:
            self.emit("node", {"id": node_id, **back})
        self.emit("status", {"id": node_id, **status})

    # -- liveness
    def watch_heartbeats(self) -> None:
        while True:
            time.sleep(protocol.HEARTBEAT_S / 4)
            if self.bus.connected.is_set():
                self.plan_out_silent()

    def plan_out_silent(self) -> None:
        cutoff = time.monotonic() - SILENCE_S
        with self.lock:
            quiet = [i for i in self.nodes if self.heard.get(i, 0) < cutoff]
            for node_id in quiet:
                log.warning("node %s has been silent for %.0f s: planned out", self.name_of(node_id), SILENCE_S)
                self.silent[node_id] = self.nodes.pop(node_id)
                self.status.pop(node_id, None)
            if quiet:
                self.schedule_replan()
                self.changed.notify_all()
        for node_id in quiet:
            self.emit("node", {"id": node_id, "online": False, "silent": True})

    def forgive_silence(self) -> None:
        """After our own reconnect, nobody has been silent: we were the one not listening. But a
        node may not be back yet (what we hold of it may be a retained leftover): until it sends a
        heartbeat, a plan with it is not ready, so no frame is sent to a node not there to take it."""
        with self.lock:
            now = time.monotonic()
            self.heard = {i: now for i in self.heard}
            self.connections += 1
            self.spoke = set()
            forgotten = self.forget_old_broker() if self.broker and self.bus.address != self.broker else []
            self.broker = self.bus.address
        for node_id in forgotten:   # offline until they announce themselves here
            self.emit("node", {"id": node_id, "online": False})

    def forget_old_broker(self) -> list[str]:
        """On another broker (the old one's host left, or two merged), what the old one told us is
        history: whoever is still here announces itself again, and the dead send no Will here.
        Returns the nodes forgotten."""
        log.info("on the broker at %s now: forgetting the nodes and coordinators of the old one", self.bus.address)
        forgotten = list(self.nodes)
        self.nodes, self.status, self.silent = {}, {}, {}
        self.coordinators = {i: t for i, t in self.coordinators.items() if i == self.coordinator_id}
        self.claims = {i: c for i, c in self.claims.items() if i == self.coordinator_id}
        self.schedule_replan()
        self.changed.notify_all()
        return forgotten

    def on_retained_plan(self, topic: str, payload: bytes) -> None:
        """Plans published by others (the leader, or a coordinator before us): keep plan ids
        monotonic, and a standby follows the leader's plan."""
        if not payload:
            return
        plan = Plan.from_dict(parse_json(payload))
        if not 0 < plan.plan_id <= protocol.MAX_PLAN_ID:
            raise ValueError(f"plan id {plan.plan_id} is out of range")
        with self.lock:
            self.last_plan_id = max(self.last_plan_id, plan.plan_id)
            if plan.coordinator != self.coordinator_id:
                self.leaders_plan = plan
        self.follow_leader()

    def follow_leader(self) -> None:
        """A standby serves on the leader's newest plan when it is for our model."""
        with self.lock:
            plan = self.leaders_plan
            if self.is_leader or plan is None or plan.model != self.model or (self.plan and self.plan.plan_id >= plan.plan_id):
                return
            self.plan, self.plan_error = plan, None
            self.changed.notify_all()
        self.emit("plan", plan.to_dict())

    def on_coordinator(self, topic: str, payload: bytes) -> None:
        coord_id = self.topics.coord_id_of(topic)
        info = parse_json(payload) if payload else {}
        if coord_id == self.coordinator_id and not info.get("online") and self.withdrawn:
            return   # our own goodbye, as we stop
        with self.lock:
            if info.get("online"):
                self.coordinators[coord_id] = float(info.get("started", 0))
                self.claims[coord_id] = info
            else:
                self.coordinators.pop(coord_id, None)
                self.claims.pop(coord_id, None)
            self.announced = self.announced or coord_id == self.coordinator_id
            was, self.is_leader = self.is_leader, self.announced and self.leader() == self.coordinator_id
        if self.is_leader != was:
            log.info("this coordinator is %s", "the leader: it plans" if self.is_leader else "a standby")
            if self.is_leader:
                self.schedule_replan(0)

    def leader(self) -> str | None:
        with self.lock:
            return min(self.coordinators, key=lambda c: (self.coordinators[c], c), default=None)

    def emit(self, kind: str, data: dict) -> None:
        for listener in list(self.listeners):
            listener(kind, data)

    # -- planning
    def set_model(self, model: str, config: ModelConfig) -> None:
        with self.lock:
            self.model, self.model_config = model, config
        self.follow_leader()
        self.schedule_replan(0)

    def clear_model(self) -> None:
        """No model: the leader publishes a plan without shards, so every node drops its shard."""
        with self.lock:
            self.model, self.model_config, self.plan, self.plan_error = "", None, None, "no model is loaded"
            if not self.is_leader:
                return
            self.last_plan_id = max(self.last_plan_id + 1, int(time.time()))
            empty = Plan(self.last_plan_id, "", 0, [], self.coordinator_id)
            self.changed.notify_all()
        self.bus.publish_json(self.topics.plan, empty.to_dict(), qos=1, retain=True)
        self.emit("plan", empty.to_dict())

    def schedule_replan(self, delay: float = REPLAN_DEBOUNCE_S) -> None:
        with self.lock:
            if self._replan_timer:
                self._replan_timer.cancel()
            self._replan_timer = threading.Timer(delay, self.replan)
            self._replan_timer.daemon = True
            self._replan_timer.start()

    def capacities(self) -> list[NodeCapacity]:
        """The online nodes as the planner sees them: each node's share of its machine's memory,
        and the model as its engine would hold it with the KV room for the requests it reserves."""
        with self.lock:
            nodes = [{**n, "id": i} for i, n in sorted(self.nodes.items())]
        memory = host_memory(nodes)
        return [NodeCapacity(n["id"], memory[n["id"]], n.get("speed"), self._footprint(n), _reserved(n))
                for n in nodes]

    def _footprint(self, node: dict) -> Footprint | None:
        if not self.model_config or node.get("engine") not in DEFAULT_QUANT:
            return None   # a node of an older version: its weights count as stored
        positions = int((node.get("limits") or {}).get("positions") or MAX_CONTEXT)
        return footprint(self.model_config, node["engine"], str(node.get("quant") or ""), positions,
                         bool(node.get("float16_arithmetic")))

    def replan(self, force: bool = False) -> None:
        """Plan the online nodes. The same plan again is published only when `force`d (an admin's
        "plan again": every node takes the new plan id, drops its caches and reloads only what moved)."""
        with self.lock:
            if not self.model_config or not self.is_leader:
                return
            capacities = self.capacities()
            try:
                if not capacities:
                    raise PlanError("no nodes are online")
                previous = self.plan.nodes if self.plan and self.plan.model == self.model else []
                shards = split_layers(capacities, self.model_config, keep_order=previous)
            except PlanError as e:
                self.plan, self.plan_error = None, str(e)
                # No node yet is how every cluster starts; a plan the nodes there cannot hold is news.
                log.log(logging.INFO if not capacities else logging.WARNING, "no plan: %s", e)
                self.changed.notify_all()
                return
            mine = self.plan and self.plan.coordinator == self.coordinator_id
            if mine and not force and self.plan.model == self.model and self.plan.shards == shards:
                return   # nothing changed (two triggers for one event): a new plan would only end requests in flight
            self.last_plan_id = max(self.last_plan_id + 1, int(time.time()))
            self.plan = Plan(self.last_plan_id, self.model, self.model_config.num_layers, shards,
                             self.coordinator_id)
            self.plan_error = None
            self.changed.notify_all()
        log.info("plan %d: %s", self.plan.plan_id,
                 ", ".join(f"{self.name_of(s.node)} [{s.start},{s.end})" for s in self.plan.shards))
        self.bus.publish_json(self.topics.plan, self.plan.to_dict(), qos=1, retain=True)
        self.emit("plan", self.plan.to_dict())

    # -- readiness
    def ready_plan(self) -> Plan | None:
        """The current plan if every node in it has loaded its shard, else None."""
        with self.lock:
            plan = self.plan
            if plan is None:
                return None
            for node in plan.nodes:
                if self.shard_info(node).get("plan_id") != plan.plan_id or (self.connections > 1 and node not in self.spoke):
                    return None
                if (self.status.get(node) or {}).get("serving") is False:   # its worker died or is stuck
                    return None
            return plan

    def shard_info(self, node: str) -> dict:
        """What a node's info says of the shard it holds ({} when none, or it is not online)."""
        return (self.nodes.get(node) or {}).get("shard") or {}

    def capacity(self, what: str) -> int | None:
        """The smallest capacity of the ready plan's nodes: "positions" one request may hold, or
        "requests" held at once. None without a ready plan, or when a node does not say."""
        with self.lock:
            plan = self.ready_plan()
            found = [(self.shard_info(n).get("capacity") or {}).get(what) for n in plan.nodes] if plan else []
        return min(found) if found and all(isinstance(f, int) for f in found) else None

    def load_errors(self) -> list[str]:
        with self.lock:
            plan_id = self.plan.plan_id if self.plan else None
            return [f"{self.name_of(i)}: {n['load_error']['error']}" for i, n in self.nodes.items()
                    if n.get("load_error") and n["load_error"].get("plan_id") == plan_id]

    def not_ready_reason(self) -> str:
        """Why there is no ready plan, in a user's words, naming nodes by name."""
        with self.lock:
            if self.model_config is None:
                return "no model is loaded"
            if self.plan is None:
                return self.plan_error or "no plan yet"
            if errors := self.load_errors():
                return "; ".join(errors)
            waiting = [self.name_of(n) for n in self.plan.nodes if self.shard_info(n).get("plan_id") != self.plan.plan_id
                       or (self.connections > 1 and n not in self.spoke)]
            stuck = [self.name_of(n) for n in self.plan.nodes if (self.status.get(n) or {}).get("serving") is False]
        if stuck:
            return f"node(s) {', '.join(stuck)} not serving"
        if waiting:
            return f"the plan is loading on {', '.join(waiting)}"
        return "the cluster's plan is still loading"

    def wait_ready(self, timeout: float, patient: bool = False) -> Plan | None:
        """The ready plan, waiting for it up to `timeout`; without one at once when no node is
        online, unless `patient` (a resumed request: the nodes are on their way back)."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                plan = self.ready_plan()
                left = deadline - time.monotonic()
                nobody = self.plan is None and self.plan_error and not self.nodes and not patient
                if plan or left <= 0 or self.load_errors() or nobody:
                    return plan
                self.changed.wait(left)


def _reserved(node: dict) -> int:
    """The full KV caches a node's plan must leave room for: its max_requests, or at least one."""
    return max(1, int((node.get("limits") or {}).get("requests") or 0))
