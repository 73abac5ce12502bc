"""One matrix product as the ggml engine holds it, timed by the matrix's rows: does a width whose
product rows lie a multiple of 2 KiB apart cost more than one padded to `padded_rows`?

    python3 benchmarks/product_rows.py [--quant q4] [--prompt-rows 1,8,55,128] [--threads 2]

For each of TinyLlama's widths (its q/k/v, o and down products: 2,560 and 2,048 rows; gate/up:
11,264) and the padded one, prints the median time of a product of a prompt's rows, and the time
per matrix row. On ggml's AMX kernels a prompt of 128 rows took each of TinyLlama's products 1.5 to
2.2 times as long as the padded width did (docs/performance.md, "An Intel VM with AMX"); the repack
kernels showed no such difference. Not part of the test suite.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance.engines import ggml_engine  # noqa: E402

ggml = ggml_engine.ggml
WIDTHS = ((2560, 2048), (2048, 2048), (11264, 2048), (2048, 5632))   # (matrix rows, columns)


def time_product(rows: int, cols: int, prompt_rows: int, kind: int, backend, repeats: int = 15) -> float:
    """The median seconds of [prompt_rows, cols] x [rows, cols]^T, the matrix in ggml's buffer of
    choice and the product in a buffer of ggml's allocator, as the engine's are."""
    rng = np.random.default_rng(0)
    blocks = ggml_engine.quantize(rng.standard_normal((rows, cols)).astype(np.float32), kind)
    held = ggml_engine.Tensors({"w": blocks}, {"w": kind}, ["w"], ggml_engine.weight_buffer_type(backend, [blocks]))
    ctx = ggml.ggml_init(ggml.ggml_init_params(mem_size=8 * ggml.ggml_tensor_overhead() + ggml.ggml_graph_overhead(),
                                               mem_buffer=None, no_alloc=True))
    allocator = ggml.ggml_gallocr_new(ggml.ggml_backend_get_default_buffer_type(backend))
    try:
        x = ggml.ggml_new_tensor_2d(ctx, ggml_engine.F32, cols, prompt_rows)
        ggml.ggml_set_input(x)
        graph = ggml.ggml_new_graph(ctx)
        ggml.ggml_build_forward_expand(graph, ggml.ggml_mul_mat(ctx, held["w"], x))
        if not ggml.ggml_gallocr_alloc_graph(allocator, graph):
            raise MemoryError("ggml could not allocate the product")
        values = rng.standard_normal((prompt_rows, cols)).astype(np.float32)
        ctypes.memmove(ggml.ggml_get_data(x), values.ctypes.data, values.nbytes)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            ggml.ggml_backend_graph_compute(backend, graph)
            times.append(time.perf_counter() - started)
        return statistics.median(times)
    finally:
        ggml.ggml_gallocr_free(allocator)
        ggml.ggml_free(ctx)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quant", choices=["q4", "q8"], default="q4")
    parser.add_argument("--prompt-rows", default="1,8,55,128")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    backend = ggml.ggml_backend_cpu_init()
    ggml.ggml_backend_cpu_set_n_threads(backend, args.threads)
    kind = ggml_engine.MATRIX_TYPES[args.quant]
    probe = ggml_engine.quantize(np.zeros((32, 32), np.float32), kind)
    print(f"matrices held in {ggml.ggml_backend_buft_name(ggml_engine.weight_buffer_type(backend, [probe])).decode()}, "
          f"{args.quant}, {args.threads} threads")
    print(f"{'prompt rows':>11} {'columns':>7} {'rows':>6} {'ms':>8} {'padded rows':>11} {'ms':>8} {'padded/own':>10}")
    for prompt_rows in (int(n) for n in args.prompt_rows.split(",")):
        for rows, cols in WIDTHS:
            padded = ggml_engine.padded_rows(rows)
            own = time_product(rows, cols, prompt_rows, kind, backend)
            whole = time_product(padded, cols, prompt_rows, kind, backend)
            print(f"{prompt_rows:>11} {cols:>7} {rows:>6} {own * 1e3:8.3f} {padded:>11} {whole * 1e3:8.3f} "
                  f"{whole / own:10.2f}", flush=True)
    ggml.ggml_backend_free(backend)


if __name__ == "__main__":
    main()
