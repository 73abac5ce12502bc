"""Engines: one interface (`base.Engine`), several backends, chosen by name."""
from __future__ import annotations

from appliance.engines.base import Engine, Shard, Step

__all__ = ["Engine", "Shard", "Step", "ENGINES", "load_engine"]

# name -> "module:Class", imported only when chosen so a node pulls in just its own backend.
ENGINES = {
    "numpy": "appliance.engines.numpy_engine:NumpyEngine",
}


def load_engine(name: str, shard: Shard, **options) -> Engine:
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
    module_name, class_name = ENGINES[name].split(":")
    module = __import__(module_name, fromlist=[class_name])
    return getattr(module, class_name)(shard, **options)
