"""Where a decode step's time goes inside the onnxruntime engine: time per operator type.

    python -m appliance.engines.profile MODEL_DIR --quant q4 --rows 1,8

For each batch size it loads the whole model as one shard with onnxruntime's profiler on,
prefills that many requests, runs `--steps` decode steps of all of them at once and prints the
median step and, per operator type, the mean time and calls per step (prefill excluded).
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np

from appliance.engines.base import Shard, Step
from appliance.engines.onnx_engine import OnnxEngine
from appliance.models.config import ModelConfig


def profile(model_dir: Path, quant: str, rows: int, steps: int, prompt_tokens: int = 32) -> dict:
    layers = ModelConfig.load(model_dir).num_layers
    with tempfile.TemporaryDirectory(prefix="exo-profile-") as out:
        engine = OnnxEngine(Shard(model_dir, 0, layers, layers), quant=quant, profile_prefix=f"{out}/ort")
        prompt = np.arange(1, prompt_tokens + 1) % engine.config.vocab_size
        for r in range(rows):
            engine.forward([Step(f"r{r}", 0, prompt)])
        for k in range(steps):
            engine.forward([Step(f"r{r}", prompt_tokens + k, np.array([5])) for r in range(rows)])
        events = json.loads(Path(engine.session.end_profiling()).read_text())
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])[rows:]
    per_op, calls = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= runs[0]["ts"]:
            per_op[e["args"]["op_name"]] += e["dur"] / 1000 / len(runs)
            calls[e["args"]["op_name"]] += 1 / len(runs)
    return {"rows": rows, "quant": quant, "step_ms": statistics.median(e["dur"] / 1000 for e in runs),
            "ops": {op: {"ms": round(ms, 3), "calls": round(calls[op])} for op, ms in per_op.most_common()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--quant", default="q4")
    parser.add_argument("--rows", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    for rows in [int(r) for r in args.rows.split(",")]:
        result = profile(Path(args.model), args.quant, rows, args.steps)
        print(f"{args.quant}, {rows} row(s): {result['step_ms']:.1f} ms per decode step (median)")
        for op, figures in result["ops"].items():
            print(f"  {op:24s} {figures['ms']:8.2f} ms  {figures['calls']:4d} calls")


if __name__ == "__main__":
    main()
