"""The planner: node capacities + model shape -> contiguous layer blocks. A pure function, no I/O.

Layers are split in proportion to each node's usable memory (like exo's ring memory-weighted
strategy), or to its measured speed when every node reports one, never giving a node more layers
than fit in its memory. Nodes are ordered by usable memory (largest first) and then by id, so the
same inputs always give the same plan.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from appliance.models.config import ModelConfig

USABLE_FRACTION = 0.8   # of available memory; the rest is headroom for KV caches and the runtime


class PlanError(ValueError):
    pass


@dataclass(frozen=True)
class NodeCapacity:
    id: str
    memory_available: int           # bytes
    speed: float | None = None      # measured, e.g. layers per second; optional

    @property
    def usable(self) -> int:
        return int(self.memory_available * USABLE_FRACTION)


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
    layers = config.num_layers
    kept = {node_id: i for i, node_id in enumerate(keep_order)}
    ordered = sorted(nodes, key=lambda n: (kept.get(n.id, len(kept)), -n.usable, n.id))
    capacity = {n.id: n.usable // max(config.layer_bytes, 1) for n in ordered}
    ordered = [n for n in ordered if capacity[n.id] > 0]   # too small for even one layer: none
    if sum(capacity[n.id] for n in ordered) < layers:
        have = sum(n.usable for n in nodes) / 1e9
        raise PlanError(f"the model needs {config.num_layers * config.layer_bytes / 1e9:.2f} GB for its layers; "
                        f"the cluster's {len(nodes)} node(s) have {have:.2f} GB usable")
    by_speed = all(n.speed for n in ordered)
    weight = {n.id: (n.speed if by_speed else max(1, n.usable // MEMORY_STEP)) for n in ordered}
    counts = _proportional(layers, ordered, weight, capacity)
    shards, start = [], 0
    for n in ordered:
        if counts[n.id]:
            shards.append(ShardAssignment(n.id, start, start + counts[n.id]))
            start += counts[n.id]
    return shards


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
