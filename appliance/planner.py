"""The planner: node capacities + model shape -> contiguous layer blocks. A pure function, no I/O.

Layers are split in proportion to each node's usable memory (like exo's ring memory-weighted
strategy), or to its measured speed when every node reports one, never giving a node more layers
than fit in its memory. Nodes are ordered by usable memory (largest first) and then by id, so the
same inputs always give the same plan.

A node's cost is counted as its engine holds the model (engines/footprint.py): each layer's
weights plus the KV room for the requests it reserves, the embedding on the first stage and the
head on the last. Nodes that share one machine share its memory (`host_memory`).
"""
from __future__ import annotations

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
        capacity = _layer_room(ordered)
        fitting = [n for n in ordered if capacity[n.id] > 0]
        if fitting != ordered:
            ordered = fitting
            continue
        if sum(capacity.values()) < config.num_layers:
            raise PlanError(_too_small(nodes, config))
        counts = _proportional(config.num_layers, ordered, _weights(ordered), capacity)
        holding = [n for n in ordered if counts[n.id]]
        if holding == ordered:
            break
        ordered = holding
    shards, start = [], 0
    for n in ordered:
        shards.append(ShardAssignment(n.id, start, start + counts[n.id]))
        start += counts[n.id]
    return shards


def _layer_room(ordered: list[NodeCapacity]) -> dict[str, int]:
    """How many layers each node holds, the first with the embedding, the last with the head."""
    room = {}
    for i, n in enumerate(ordered):
        fp = n.footprint
        fixed = fp.shard(0, i == 0, i == len(ordered) - 1, n.requests)
        room[n.id] = max(0, n.usable - fixed) // max(fp.layer + n.requests * fp.kv_layer, 1)
    return room


def _weights(ordered: list[NodeCapacity]) -> dict[str, float]:
    if all(n.speed for n in ordered):
        return {n.id: n.speed for n in ordered}
    return {n.id: max(1, n.usable // MEMORY_STEP) for n in ordered}


def _too_small(nodes: list[NodeCapacity], config: ModelConfig) -> str:
    need = nodes[0].footprint.shard(config.num_layers, True, True, nodes[0].requests) if nodes else config.total_bytes
    have = sum(n.usable for n in nodes)
    return (f"the model needs {need / 1e9:.2f} GB as the engines hold it (weights, embedding, head and "
            f"KV room); the cluster's {len(nodes)} node(s) have {have / 1e9:.2f} GB usable")


def _proportional(total: int, nodes: list[NodeCapacity], weight: dict, capacity: dict) -> dict[str, int]:
    """Largest-remainder split of `total` by weight, re-spreading what a full node cannot take."""
    counts = {n.id: 0 for n in nodes}
    open_nodes = list(nodes)
    left = total
    while left > 0:
        w = sum(weight[n.id] for n in open_nodes)
        shares = {n.id: left * weight[n.id] / w for n in open_nodes}
        given = {i: int(s) for i, s in shares.items()}
        by_remainder = sorted(open_nodes, key=lambda n: (-(shares[n.id] - given[n.id]), nodes.index(n)))
        for n in by_remainder[:left - sum(given.values())]:
            given[n.id] += 1
        for n in open_nodes:
            take = min(given[n.id], capacity[n.id] - counts[n.id])
            counts[n.id] += take
            left -= take
        open_nodes = [n for n in open_nodes if counts[n.id] < capacity[n.id]]
    return counts
