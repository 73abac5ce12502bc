"""Decode speed of an engine on a whole model: single stream and several streams batched.

    python -m appliance.engines.speed MODEL_DIR --engine onnxruntime --quant q4 --streams 1 8

Each stream is prefilled with a short prompt, then every step sends one decode step per stream in
ONE engine call (greedy tokens fed back). Reports aggregate decode tokens per second.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from appliance.engines import Shard, Step, load_engine
from appliance.models.config import ModelConfig


def decode_speed(engine, streams: int, steps: int = 16, prompt: int = 8, warmup: int = 2) -> float:
    rng = np.random.default_rng(0)
    vocab = engine.config.vocab_size
    ids = [f"speed-{streams}-{i}" for i in range(streams)]
    tokens = {}
    for rid in ids:
        logits = engine.forward([Step(rid, 0, rng.integers(0, vocab, prompt).astype(np.int32))])[0]
        tokens[rid] = int(np.argmax(logits))
    pos = prompt
    for n in range(warmup + steps):
        if n == warmup:
            start = time.perf_counter()
        out = engine.forward([Step(rid, pos, np.array([tokens[rid]], np.int32)) for rid in ids])
        tokens = {rid: int(np.argmax(logits)) for rid, logits in zip(ids, out)}
        pos += 1
    elapsed = time.perf_counter() - start
    for rid in ids:
        engine.free(rid)
    return streams * steps / elapsed


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--engine", default="onnxruntime")
    ap.add_argument("--quant", default=None, help="q4|q8|f16|f32 (numpy: always f32)")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (numpy: OPENBLAS_NUM_THREADS)")
    args = ap.parse_args(argv)
    layers = ModelConfig.load(args.model_dir).num_layers
    options = {} if args.quant is None else {"quant": args.quant}
    if args.threads is not None and args.engine == "onnxruntime":
        options["threads"] = args.threads
    start = time.perf_counter()
    engine = load_engine(args.engine, Shard(args.model_dir, 0, layers, layers), **options)
    print(f"{args.engine} {args.quant or ''}: loaded in {time.perf_counter() - start:.1f} s")
    for streams in args.streams:
        rate = decode_speed(engine, streams, args.steps)
        print(f"{args.engine} {args.quant or ''} streams={streams}: {rate:.2f} tok/s aggregate, "
              f"{rate / streams:.2f} tok/s per stream")


if __name__ == "__main__":
    main()
