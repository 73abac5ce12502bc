"""Engines: one interface (`base.Engine`), several backends, chosen by name."""
from __future__ import annotations

from appliance.engines.base import Engine, Shard, Step

__all__ = ["Engine", "Shard", "Step", "ENGINES", "GPU_DEVICE_NODES", "load_engine", "pick_default_engine"]

# name -> "module:Class", imported only when chosen so a node pulls in just its own backend.
ENGINES = {
    "numpy": "appliance.engines.numpy_engine:NumpyEngine",
    "ggml": "appliance.engines.ggml_engine:GgmlEngine",
    "onnxruntime": "appliance.engines.onnx_engine:OnnxEngine",
    "tinygrad": "appliance.engines.tinygrad_engine:TinygradEngine",
}


def load_engine(name: str, shard: Shard, **options) -> Engine:
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
    module_name, class_name = ENGINES[name].split(":")
    module = __import__(module_name, fromlist=[class_name])
    return getattr(module, class_name)(shard, **options)


GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/kfd")  # NVIDIA's driver, AMD's compute driver


def pick_default_engine() -> str:
    """"tinygrad" where a GPU backend is present (Metal on a Mac, CUDA, AMD), else "onnxruntime".
    Cheap: looks for the drivers' libraries and devices, imports neither engine."""
    import ctypes.util
    import os
    import sys

    if sys.platform == "darwin":  # Metal
        return "tinygrad"
    if any(os.path.exists(p) for p in GPU_DEVICE_NODES) and \
            any(ctypes.util.find_library(lib) for lib in ("cuda", "amdhip64", "hsa-runtime64")):
        return "tinygrad"
    return "onnxruntime"
