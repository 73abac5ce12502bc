"""`exo bench` runs end to end and reports every figure (speed itself is not asserted here)."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest

from tests.conftest import STORIES


def test_bench_reports_each_case_as_json():
    out = subprocess.run([sys.executable, "-m", "appliance", "bench", "--model", str(STORIES), "--nodes", "1,2",
                          "--concurrency", "1,3", "--prompt-tokens", "8", "--gen-tokens", "32", "--repeat", "2", "--json"],
                         capture_output=True, text=True, timeout=240, check=True).stdout
    results = json.loads(out)
    assert [(r["nodes"], r["concurrency"]) for r in results] == [(1, 1), (1, 3), (2, 1), (2, 3)]
    for r in results:
        assert r["decode_tok_s_total"] > 0 and r["ttft_s"] > 0 and r["hop_ms"] > 0 and r["repeats"] == 2
        assert r["step_ms"] > 0 and 0 <= r["hop_in_run_ms"] < r["step_ms"]   # as the coordinator timed the run
        if r["concurrency"] == 1:   # one stream: its steps come one by one, each with time outside the engines
            # (32 tokens: over a handful, a first reply held up on its way can outweigh that time)
            assert r["hop_in_run_ms"] > 0
        assert len(r["decode_tok_s_rounds"]) == 2   # a run a round; the figure is their median
        assert r["decode_tok_s_total"] == pytest.approx(statistics.median(r["decode_tok_s_rounds"]), abs=0.01)
        assert len(r["peak_rss_mb"]) == r["nodes"] and all(m > 10 for m in r["peak_rss_mb"])
        assert len(r["idle_rss_mb"]) == r["nodes"] and all(10 < i <= p for i, p in zip(r["idle_rss_mb"], r["peak_rss_mb"]))
        spans = [tuple(map(int, span.split("-"))) for span in r["layers"]]   # the pipeline's order
        assert len(spans) == r["nodes"] and spans[0][0] == 0 and spans[-1][1] == 5
        assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(spans, spans[1:]))


def test_a_case_that_fails_is_one_line_and_the_others_still_run():
    """stories260K holds 512 positions: a 600-token prompt fails in the engine, in every case."""
    run = subprocess.run([sys.executable, "-m", "appliance", "bench", "--model", str(STORIES),
                          "--engines", "onnxruntime", "--quants", "f32", "--concurrency", "1,2",
                          "--prompt-tokens", "600", "--gen-tokens", "4", "--json"], capture_output=True, text=True,
                         timeout=240)
    assert run.returncode == 1
    assert json.loads(run.stdout) == []
    failed = [line for line in run.stderr.splitlines() if line.startswith("  failed: ")]
    assert [line.split(":")[1].strip() for line in failed] == ["onnxruntime f32 nodes=1 streams=1",
                                                               "onnxruntime f32 nodes=1 streams=2"]
    assert all("past the capacity of 512 positions" in line for line in failed)
    assert "Exception in thread" not in run.stderr and "exo bench: 2 case(s) failed" in run.stderr


def test_repeat_runs_the_cases_in_rounds():
    """Each round runs every case once, so a slow minute falls on all of them alike."""
    out = subprocess.run([sys.executable, "-m", "appliance", "bench", "--model", str(STORIES), "--nodes", "1,2",
                          "--prompt-tokens", "8", "--gen-tokens", "4", "--repeat", "2"],
                         capture_output=True, text=True, timeout=240, check=True).stdout
    runs = [line.split(":")[0].split()[-2] for line in out.splitlines() if line.startswith("  numpy f32 ")]
    assert runs == ["nodes=1", "nodes=2", "nodes=1", "nodes=2"]
    assert out.count("| numpy | f32 |") == 2   # then one row a case: the medians


def test_a_bench_cluster_is_planned_once_all_its_nodes_have_announced(broker, monkeypatch):
    """The coordinator starts once every node process has announced itself: its first plan
    covers them all, even where one node comes up well after the other. A plan of the first node
    alone would have it load the whole model first, and its peak count it."""
    import time

    from appliance import bench, cli
    from appliance.coordinator import cluster

    spawn, planned = cli.spawn_node, []

    def spawn_late(config, name, discover=False):
        if name != "bench-0":
            time.sleep(2)   # past the coordinator's debounce of a burst of arrivals
        return spawn(config, name, discover)

    def split_layers(capacities, *args, **kwargs):
        planned.append(len(capacities))
        return split(capacities, *args, **kwargs)

    split = cluster.split_layers
    monkeypatch.setattr(cli, "spawn_node", spawn_late)
    monkeypatch.setattr(cluster, "split_layers", split_layers)
    c = bench.BenchCluster(broker, STORIES, "onnxruntime", "f32", 2)
    try:
        c.wait_ready(2, timeout=120)
        assert planned and planned[0] == 2, planned
    finally:
        c.close()
