"""One exo engine alone against llama-bench, in turn: no coordinator, broker, draw or reply around
it, to tell the engine's speed from the path's. Not a test.

    python3 benchmarks/engine_alone.py MODEL_DIR [--engine ggml] [--quants q4,q8] [--llama-cpp DIR] [--rounds 3] [--streams 8]

Each round, for each quant: `llama-bench` (prefill of 128 tokens from an empty cache, then 64
tokens decoded after a 128-token prompt), then the engine, holding the whole model in this
process: the same prefill, then the same 64 steps, each a call of `forward`. With --streams N
(N > 1), then `llama-batched-bench` (N prompts of 128 tokens, then 64 steps that decode one token
of each) and the engine doing the same, each step one call of `forward` over N requests: how fast
the kernels decode a batch, with no prompt in the way. The GGUF files come from vs_llama_cpp.py
(written once, or --gguf-q4 / --gguf-q8). Figures are tokens per second, the median over the
rounds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np

from vs_llama_cpp import GEN_TOKENS, PROMPT_TOKENS, find_tool, llama_bench, model_gguf

from appliance.engines import load_engine
from appliance.engines.base import Shard, Step
from appliance.models.config import ModelConfig


def engine_rates(engine, request_id: str) -> dict:
    """Prefill and decode tokens per second of one request through `engine`."""
    prompt = np.arange(3, 3 + PROMPT_TOKENS, dtype=np.int32) % engine.config.vocab_size
    started = time.perf_counter()
    engine.forward([Step(request_id, 0, prompt)])
    prefill = PROMPT_TOKENS / (time.perf_counter() - started)
    started = time.perf_counter()
    for i in range(GEN_TOKENS):
        engine.forward([Step(request_id, PROMPT_TOKENS + i, np.array([5 + i], np.int32))])
    decode = GEN_TOKENS / (time.perf_counter() - started)
    engine.free(request_id)
    return {"prefill": prefill, "decode": decode}


def engine_streams(engine, streams: int) -> float:
    """Tokens per second of `streams` requests decoding together after a prompt each."""
    ids = [f"stream-{i}" for i in range(streams)]
    for i, request_id in enumerate(ids):
        prompt = (np.arange(PROMPT_TOKENS, dtype=np.int32) + 3 + i) % engine.config.vocab_size
        engine.forward([Step(request_id, 0, prompt)])
    started = time.perf_counter()
    for i in range(GEN_TOKENS):
        engine.forward([Step(r, PROMPT_TOKENS + i, np.array([5 + i], np.int32)) for r in ids])
    rate = streams * GEN_TOKENS / (time.perf_counter() - started)
    for request_id in ids:
        engine.free(request_id)
    return rate


def llama_batched(tool: str, gguf: Path, threads: int, streams: int) -> float:
    """llama.cpp's decode of `streams` sequences together, after a prompt each (tokens per second)."""
    text = subprocess.run([tool, "-m", str(gguf), "-c", str(streams * (PROMPT_TOKENS + GEN_TOKENS)),
                           "-npp", str(PROMPT_TOKENS), "-ntg", str(GEN_TOKENS), "-npl", str(streams),
                           "-t", str(threads), "--output-format", "jsonl"],
                          capture_output=True, text=True, check=True).stdout
    return json.loads(text.strip().splitlines()[-1])["speed_tg"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path, help="a Hugging Face model folder")
    parser.add_argument("--engine", default="ggml")
    parser.add_argument("--quants", default="q4,q8")
    parser.add_argument("--llama-cpp", help="folder holding llama-bench (default: PATH)")
    parser.add_argument("--gguf-q4", type=Path)
    parser.add_argument("--gguf-q8", type=Path)
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp's threads")
    parser.add_argument("--work", type=Path, default=Path("~/.cache/exo/vs-llama-cpp").expanduser())
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--streams", type=int, default=1, help="also decode this many requests together")
    args = parser.parse_args()
    tool = find_tool("llama-bench", args.llama_cpp)
    batched = find_tool("llama-batched-bench", args.llama_cpp) if args.streams > 1 else None
    layers = ModelConfig.load(args.model).num_layers
    for quant in [q for q in args.quants.split(",") if q]:
        gguf = getattr(args, f"gguf_{quant}") or model_gguf(args.model, quant, args.work)
        engine = load_engine(args.engine, Shard(args.model, 0, layers, layers), quant=quant)
        engine_rates(engine, "warm-up")
        theirs, ours = [], []
        for n in range(args.rounds):   # in turn, so that a slow minute falls on both sides
            theirs.append(llama_bench(tool, gguf, args.threads))
            ours.append(engine_rates(engine, f"round-{n}"))
            if batched:
                theirs[-1]["streams"] = llama_batched(batched, gguf, args.threads, args.streams)
                ours[-1]["streams"] = engine_streams(engine, args.streams)
            print(json.dumps({quant: {"llama.cpp": theirs[-1], args.engine: ours[-1]}}), flush=True)
        del engine
        for key in ["prefill", "decode"] + (["streams"] if batched else []):
            a, b = (statistics.median(f[key] for f in side) for side in (theirs, ours))
            what = f"decode of {args.streams} streams" if key == "streams" else key
            print(f"{quant} {what}: llama.cpp {a:.1f}, exo {args.engine} alone {b:.1f} tok/s ({b / a:.2f}×)")


if __name__ == "__main__":
    main()
