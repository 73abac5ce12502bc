"""The planner: node capacities + model shape -> contiguous layer blocks. A pure function, no I/O.

Each node's shard, its layers with the embedding on the first stage and the head on the last, is
in proportion to the node's usable memory (like exo's ring memory-weighted strategy), or to its
measured speed when every node reports one, never giving a node more layers than fit in its
memory. So a large head (a vocabulary of 128k tokens is several layers' worth) leaves its stage
fewer layers. Nodes are ordered by usable memory (largest first) and then by id, so the same
inputs always give the same plan.

A node's cost is counted as its engine holds the model (engines/footprint.py): each layer's
weights plus the KV room for the requests it reserves, the embedding on the first stage (none
where the engine reads its rows from the file) and the head on the last. Nodes that share one
machine share its memory (`host_memory`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from appliance.engines.footprint import Footprint
from appliance.models.config import ModelConfig

USABLE_FRACTION = 0.8   # of available memory; the rest is headroom for KV caches and the runtime


class PlanError(ValueError):
    pass


@dataclass(frozen=True)
class NodeCapacity:
    id: str
    memory_available: int           # bytes this node may fill (its share of its machine's memory)
    speed: float | None = None      # measured, e.g. layers per second; optional
    footprint: Footprint | None = None   # as its engine holds the model; None: weights as stored
    requests: int = 1               # full KV caches it reserves room for

    @property
    def usable(self) -> int:
        return int(self.memory_available * USABLE_FRACTION)


def host_memory(nodes: list[dict]) -> dict[str, int]:
    """node id -> the memory it may plan with. A node's info says its machine's free memory
    (`memory_available`), what its own loaded shard holds (`memory_held`, free again when it
    reloads) and which machine it is (`host_id`). Nodes of one machine split its memory evenly."""
    machines: dict[str, list[dict]] = {}
    for n in nodes:
        machines.setdefault(str(n.get("host_id") or n["id"]), []).append(n)
    memory = {}
    for group in machines.values():
        free = max(int(n.get("memory_available") or 0) for n in group)
        total = free + sum(int(n.get("memory_held") or 0) for n in group)
        memory.update({n["id"]: total // len(group) for n in group})
    return memory


def stored_footprint(config: ModelConfig) -> Footprint:
    head = config.embedding_bytes + config.hidden_size * config.bytes_per_param
    return Footprint(config.layer_bytes, config.embedding_bytes, head, 0)


@dataclass(frozen=True)
class ShardAssignment:
    node: str
    start: int
    end: int


@dataclass
class Plan:
    plan_id: int
    model: str
    num_layers: int
    shards: list[ShardAssignment]
    coordinator: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        shards = [ShardAssignment(str(s["node"]), int(s["start"]), int(s["end"])) for s in data["shards"]]
        return cls(int(data["plan_id"]), str(data["model"]), int(data["num_layers"]), shards,
                   str(data.get("coordinator", "")))

    def shard_of(self, node_id: str) -> ShardAssignment | None:
        return next((s for s in self.shards if s.node == node_id), None)

    def next_after(self, node_id: str) -> str | None:
        """The node that holds the layers after this node's, or None for the last stage."""
        ids = [s.node for s in self.shards]
        i = ids.index(node_id)
        return ids[i + 1] if i + 1 < len(ids) else None

    @property
    def nodes(self) -> list[str]:
        return [s.node for s in self.shards]


MEMORY_STEP = 256 * 2**20   # memory counts in these steps when layers are shared out, so a node's
                            # free memory moving a little (it just loaded its shard) moves no layer


def split_layers(nodes: list[NodeCapacity], config: ModelConfig, keep_order: list[str] = ()) -> list[ShardAssignment]:
    """`keep_order`: the previous plan's nodes. Those still here keep their order in the pipeline
    (loading a shard changes a node's free memory, which must not swap nodes and make every node
    reload); new nodes follow, largest first."""
    nodes = [replace(n, footprint=n.footprint or stored_footprint(config)) for n in nodes]
    kept = {node_id: i for i, node_id in enumerate(keep_order)}
    ordered = sorted(nodes, key=lambda n: (kept.get(n.id, len(kept)), -n.usable, n.id))
    while True:   # a node left with no layer goes, so the first and last stages are real ones
        ends, per_layer = _ends(ordered)
        capacity = {n.id: max(0, n.usable - ends[n.id]) // per_layer[n.id] for n in ordered}
        fitting = [n for n in ordered if capacity[n.id] > 0]
        if fitting != ordered:
            ordered = fitting
            continue
        if sum(capacity.values()) < config.num_layers:
            raise PlanError(_too_small(nodes, config))
        ends_in_layers = {n.id: ends[n.id] / per_layer[n.id] for n in ordered}
        counts = _balanced(config.num_layers, ordered, _weights(ordered), capacity, ends_in_layers)
        holding = [n for n in ordered if counts[n.id]]
        if holding == ordered:
            break
        ordered = holding
    shards, start = [], 0
    for n in ordered:
        shards.append(ShardAssignment(n.id, start, start + counts[n.id]))
        start += counts[n.id]
    return shards


def _ends(ordered: list[NodeCapacity]) -> tuple[dict[str, int], dict[str, int]]:
    """What each node holds beside its layers (the first stage the embedding as its engine holds it,
    the last the head), and what one layer costs it (weights and the KV room it reserves)."""
    ends, per_layer = {}, {}
    for i, n in enumerate(ordered):
        fp = n.footprint
        ends[n.id] = fp.shard(0, i == 0, i == len(ordered) - 1, n.requests)
        per_layer[n.id] = max(fp.layer + n.requests * fp.kv_layer, 1)
    return ends, per_layer


def _weights(ordered: list[NodeCapacity]) -> dict[str, float]:
    if all(n.speed for n in ordered):
        return {n.id: n.speed for n in ordered}
    return {n.id: max(1, n.usable // MEMORY_STEP) for n in ordered}


def _too_small(nodes: list[NodeCapacity], config: ModelConfig) -> str:
    need = nodes[0].footprint.shard(config.num_layers, True, True, nodes[0].requests) if nodes else config.total_bytes
    have = sum(n.usable for n in nodes)
    return (f"the model needs {need / 1e9:.2f} GB as the engines hold it (weights, embedding, head and "
            f"KV room); the cluster's {len(nodes)} node(s) have {have / 1e9:.2f} GB usable")


def _balanced(total: int, nodes: list[NodeCapacity], weight: dict, capacity: dict, ends: dict) -> dict[str, int]:
    """`total` layers shared out so that each node's whole shard, its layers and its ends (in layers'
    worth), is in proportion to its weight: the last stage's head counts, so it holds fewer layers.
    Largest remainder first, never more than a node's capacity, and every node whose share of the
    layers alone comes to one or more holds at least one (an end never pushes a node out)."""
    whole, w = total + sum(ends.values()), sum(weight.values())
    target = {n.id: whole * weight[n.id] / w - ends[n.id] for n in nodes}
    least = {n.id: min(capacity[n.id], 1 if total * weight[n.id] / w >= 1 else 0) for n in nodes}
    counts = {n.id: min(capacity[n.id], max(least[n.id], math.floor(target[n.id]))) for n in nodes}
    while (left := total - sum(counts.values())) != 0:
        if left > 0:   # one more layer to the node furthest below its target
            n = max((n for n in nodes if counts[n.id] < capacity[n.id]), key=lambda n: target[n.id] - counts[n.id])
            counts[n.id] += 1
        else:          # one fewer from the node furthest above it
            n = min((n for n in nodes if counts[n.id] > least[n.id]), key=lambda n: target[n.id] - counts[n.id])
            counts[n.id] -= 1
    return counts
