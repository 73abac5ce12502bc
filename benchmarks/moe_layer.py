"""Decode time of one mixture-of-experts layer against a dense layer of the same active size.

A Qwen3-30B-A3B layer holds 128 experts of 768 and runs 8 a token: 8 x 768 = 6144, which is the
`intermediate_size` of a dense Qwen3 layer with the same attention (the dense twin). If only the
chosen experts are read, a decode step through the sparse layer costs about what the dense twin
costs, not 16 times more. Both models are written with random weights at the real shapes
(`synth`: what `exo models synth --shape qwen3-30b-a3b --layers N` writes, and the twin beside
it), and the middle layers run as a stage of their own (hidden states in and out: no embedding,
no head), with 1 row a step and with several requests batched into one step.

Not part of the test suite: run it by hand,

    python -m benchmarks.moe_layer --dir /var/tmp/exo-bench/moe --layers 4 --quants q4,q8 --rows 1,8

(about 6 GB of bfloat16 weights for the two models; minutes to write and quantize once).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from appliance.engines.base import Shard, Step
from appliance.engines.footprint import footprint
from appliance.engines.onnx_engine import OnnxEngine
from appliance.models.config import ModelConfig
from appliance.models.synth import SHAPES, synthesize, write_random_weights

SHAPE = "qwen3-30b-a3b"
MOE_KEYS = ("moe_intermediate_size", "num_experts", "num_experts_per_tok", "norm_topk_prob", "decoder_sparse_step",
            "mlp_only_layers")


def dense_twin(moe: dict) -> dict:
    """The same layer with one dense MLP as wide as the experts a token runs."""
    dense = {k: v for k, v in moe.items() if k not in MOE_KEYS}
    dense.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"],
                 intermediate_size=moe["num_experts_per_tok"] * moe["moe_intermediate_size"])
    return dense


def models(root: Path, layers: int) -> dict[str, Path]:
    """The MoE model and its dense twin, written once (bfloat16, as Hub checkpoints are)."""
    out = {"moe": root / f"{SHAPE}-{layers}", "dense": root / f"{SHAPE}-dense-twin-{layers}"}
    if not (out["moe"] / "model.safetensors").exists():
        synthesize(SHAPE, out["moe"], layers=layers, dtype="bfloat16")
    if not (out["dense"] / "model.safetensors").exists():
        config = dense_twin({**SHAPES[SHAPE], "num_hidden_layers": layers, "torch_dtype": "bfloat16"})
        out["dense"].mkdir(parents=True, exist_ok=True)
        (out["dense"] / "config.json").write_text(json.dumps(config, indent=2))
        write_random_weights(config, out["dense"] / "model.safetensors", seed=0, dtype="bfloat16")
    return out


def prefill(engine: OnnxEngine, rows: int, same: bool, rng, context: int = 32) -> None:
    hidden = engine.config.hidden_size
    prompt = rng.standard_normal((context, hidden)).astype(np.float32)
    for r in range(rows):
        engine.forward([Step(f"r{r}", 0, prompt if same else rng.standard_normal((context, hidden)).astype(np.float32))])


def step_ms(engine: OnnxEngine, rows: int, same: bool, pos: int, rng) -> float:
    """One decode step of `rows` requests batched; `same`: every row gets the same hidden state,
    so all rows choose the same k experts."""
    hidden = engine.config.hidden_size
    x = rng.standard_normal((1, hidden)).astype(np.float32)
    batch = [Step(f"r{r}", pos, x if same else rng.standard_normal((1, hidden)).astype(np.float32))
             for r in range(rows)]
    start = time.perf_counter()
    engine.forward(batch)
    return 1000 * (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="/var/tmp/exo-bench/moe", help="where the two models and the quant cache go")
    parser.add_argument("--layers", type=int, default=4, help="layers of each model; the middle ones are timed")
    parser.add_argument("--quants", default="q4,q8")
    parser.add_argument("--rows", default="1,8,8same",
                        help="requests batched into one decode step (NNsame: all rows choose the same experts)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (0: all cores)")
    args = parser.parse_args()
    root = Path(args.dir)
    paths = models(root, args.layers)
    timed = args.layers - 2
    print("| layer | quant | rows a step | ms a step per layer | ms a token per layer | MB read a token per layer "
          "| MB held per layer | GB/s at 1 row |")
    print("|---|---|---|---|---|---|---|---|")
    for quant in args.quants.split(","):
        # Both layers loaded at once and stepped in turn, so a busy moment on a shared machine
        # slows both alike.
        engines = {kind: OnnxEngine(Shard(path, 1, args.layers - 1, args.layers), quant=quant,
                                    cache_dir=root / "cache", threads=args.threads) for kind, path in paths.items()}
        held = {kind: footprint(e.config, "onnxruntime", quant) for kind, e in engines.items()}
        for spec in args.rows.split(","):
            rows, same = int(spec.removesuffix("same")), spec.endswith("same")
            rng = np.random.default_rng(0)
            for engine in engines.values():
                prefill(engine, rows, same, rng)
            times = {kind: [] for kind in engines}
            for i in range(args.steps):
                for kind, engine in engines.items():
                    times[kind].append(step_ms(engine, rows, same, 32 + i, rng))
            for kind, engine in engines.items():
                for r in range(rows):
                    engine.free(f"r{r}")
                step = float(np.median(times[kind])) / timed
                active = held[kind].active_layer or held[kind].layer
                rate = f"{active / step / 1e6:.1f}" if rows == 1 else ""
                label = f"{rows}, same experts" if same else str(rows)
                print(f"| {kind} | {quant} | {label} | {step:.2f} | {step / rows:.2f} | {active / 1e6:.1f} "
                      f"| {held[kind].layer / 1e6:.1f} | {rate} |", flush=True)
        del engines


if __name__ == "__main__":
    main()
