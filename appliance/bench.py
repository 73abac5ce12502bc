"""`exo bench`: measure a real cluster on this machine.

For each combination of engine, quant, node count and concurrency it starts that many node
processes on a broker, plans the model over them, and drives the coordinator directly (no HTTP)
with `concurrency` streams at once. Reported per case: prefill tok/s, decode tok/s (per stream
and in aggregate), time to first token, the MQTT hop latency for a decode-sized message on the
idle broker, a decode step's time and its hop as the coordinator timed them in the run (what the
panel shows: the step's time outside the nodes' engines, per link), and, node by node in the
pipeline's order, the layers it holds and the RSS of its process once loaded and warmed up (idle)
and its peak. With `repeat` > 1 the cases run in rounds,
each case once a round, and each figure is the median over the rounds: a shared machine's
neighbours move single runs by a fifth or more, for minutes at a time.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import paho.mqtt.client as mqtt
import psutil

from appliance.broker import EmbeddedBroker
from appliance.bus.client import Bus
from appliance.bus.protocol import WIRE_ACTIVATIONS, Sampling, Topics, new_id, parse_json
from appliance.config import Config
from appliance.coordinator.coordinator import Coordinator, GenerationError
from appliance.coordinator.throughput import Throughput
from appliance.engines.footprint import QUANTS

ENGINE_QUANTS = {"numpy": ["f32"], "onnxruntime": list(QUANTS), "ggml": list(QUANTS), "tinygrad": ["f32", "f16"]}


@dataclass
class CaseResult:
    engine: str
    quant: str
    nodes: int
    concurrency: int
    prompt_tokens: int
    gen_tokens: int
    ttft_s: float
    prefill_tok_s: float
    decode_tok_s_per_stream: float
    decode_tok_s_total: float
    hop_ms: float           # a decode-sized message through the idle broker and back
    step_ms: float          # in the run: a request's time from one token to the next, at the coordinator
    hop_in_run_ms: float    # in the run: a step's time outside the nodes' engines, per link of its ring
    idle_rss_mb: list[float]
    peak_rss_mb: list[float]
    repeats: int = 1
    decode_tok_s_rounds: list[float] = field(default_factory=list)   # the total of each round, in order
    layers: list[str] = field(default_factory=list)   # each node's layers, "start-end"; the lists per node
                                                      # (RSS) are in this order, the pipeline's


def peak_rss_mb(pid: int) -> float:
    """The process's high-water mark of resident memory (Linux VmHWM), else its RSS now."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return psutil.Process(pid).memory_info().rss / 2**20


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def hop_latency_ms(broker: str, payload_bytes: int, rounds: int = 200) -> float:
    """Median time for one decode-sized message to go client -> broker -> client: one pipeline hop."""
    host, port = broker.rsplit(":", 1)
    arrived, subscribed = threading.Event(), threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.on_message = lambda *_: arrived.set()
    client.on_subscribe = lambda *_: subscribed.set()
    client.connect(host, int(port))
    client.loop_start()
    topic = Topics("bench").bench_hop(str(time.monotonic_ns()))
    client.subscribe(topic)
    payload, times = b"\0" * payload_bytes, []
    try:
        if not subscribed.wait(5):
            raise TimeoutError("the broker did not confirm a subscription within 5 s")
        for _ in range(rounds):
            arrived.clear()
            started = time.perf_counter()
            client.publish(topic, payload)
            if not arrived.wait(5):
                raise TimeoutError("the broker did not echo a message within 5 s")
            times.append(time.perf_counter() - started)
    finally:
        client.loop_stop()
        client.disconnect()
    return statistics.median(times) * 1000


def wait_for_announcements(config: Config, processes: list[subprocess.Popen], timeout: float = 120) -> None:
    """Until the node processes have announced themselves (their retained info), so that the
    coordinator, started then, plans them all at once. Started before, it could plan the
    first alone, and that node's peak would count a whole model it loaded and let go (a 3B
    model's first half peaked at 1.6 GB instead of 0.9)."""
    topics, seen = Topics(config.cluster), set()
    arrived = threading.Event()

    def on_info(topic: str, payload: bytes) -> None:
        """As the coordinator reads a node's info (Cluster.on_info): the id from the topic, and an
        empty or offline info one that has gone."""
        node_id = topics.node_id_of(topic)
        if payload and parse_json(payload).get("online"):
            seen.add(node_id)
        else:
            seen.discard(node_id)
        if len(seen) >= len(processes):
            arrived.set()

    bus = Bus(config, client_id=f"bench-{new_id()[:8]}")
    bus.on(topics.node_info(), on_info, qos=1)
    bus.start()
    deadline = time.monotonic() + timeout
    try:
        while not arrived.wait(0.5):
            if any(p.poll() is not None for p in processes):
                raise RuntimeError("a node process exited before it announced itself")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(seen)} of {len(processes)} node(s) announced themselves within {timeout:.0f} s")
    finally:
        bus.stop()


class BenchCluster:
    """`nodes` node processes of one engine and quant, and a coordinator in this process."""

    def __init__(self, broker: str, model_dir: Path, engine: str, quant: str, nodes: int, **limits: int):
        from appliance.cli import spawn_node, stop_part

        self.stop_part = stop_part
        self.config = Config(broker=broker, cluster=f"bench{time.monotonic_ns()}", engine=engine, quant=quant,
                             model=str(model_dir), log_level="WARNING", **limits)
        self.names = [f"bench-{i}" for i in range(nodes)]
        self.processes = [spawn_node(self.config, name) for name in self.names]
        try:
            wait_for_announcements(self.config, self.processes)
        except BaseException:
            for p in self.processes:
                stop_part(p)
            raise
        self.coordinator = Coordinator(self.config).start()

    def stages(self) -> list[tuple[subprocess.Popen, str]]:
        """Each node process with its layers ("start-end"), in the plan's order: the first stage first."""
        cluster = self.coordinator.cluster
        by_name = dict(zip(self.names, self.processes))
        return [(by_name[cluster.nodes[s.node]["name"]], f"{s.start}-{s.end}") for s in cluster.plan.shards]

    def wait_ready(self, nodes: int, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        cluster = self.coordinator.cluster
        while time.monotonic() < deadline:
            plan = cluster.wait_ready(min(5.0, deadline - time.monotonic()))
            if plan and len(plan.nodes) == nodes:
                return
            if cluster.load_errors():
                raise RuntimeError("; ".join(cluster.load_errors()))
        raise TimeoutError(f"{nodes} node(s) did not load the model within {timeout:.0f} s")

    def close(self) -> None:
        self.coordinator.stop()
        for p in self.processes:
            self.stop_part(p)


class CaseFailed(RuntimeError):
    """A case that could not be measured: its nodes did not load, or a stream failed."""


def run_streams(coordinator: Coordinator, concurrency: int, prompt_tokens: int, gen_tokens: int, vocab: int):
    """Run `concurrency` streams at once; return (ttfts, per-stream decode tok/s, total decode tok/s,
    step s, hop s). The total counts the tokens made while every stream was decoding (after the last
    prefill, before the first stream ended), so prefills queued behind each other do not count as
    decode. The step and the hop are the coordinator's own means over this run's decode steps."""
    coordinator.throughput = Throughput()   # this run's steps only
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, vocab, prompt_tokens).tolist() for _ in range(concurrency)]
    started_at: list[float] = [0.0] * concurrency
    stamps: list[list[float]] = [[] for _ in range(concurrency)]
    errors: list[GenerationError] = []
    barrier = threading.Barrier(concurrency)

    def stream(i: int) -> None:
        barrier.wait()
        started_at[i] = time.perf_counter()
        try:
            tokens = coordinator.generate(prompts[i], gen_tokens, Sampling(1.0, seed=i))
            stamps[i] = [time.perf_counter() for _ in tokens]
        except GenerationError as e:
            errors.append(e)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise CaseFailed(f"{len(errors)} of {concurrency} streams failed, the first with: {errors[0]}")
    ttfts = [s[0] - t for s, t in zip(stamps, started_at)]
    per_stream = [(len(s) - 1) / (s[-1] - s[0]) for s in stamps if len(s) > 1 and s[-1] > s[0]]
    window_start, window_end = max(s[0] for s in stamps), min(s[-1] for s in stamps)
    if window_end <= window_start:   # too few tokens for the streams to overlap: the whole span
        window_start, window_end = min(s[0] for s in stamps), max(s[-1] for s in stamps)
    made = sum(window_start < t <= window_end for s in stamps for t in s)
    steps = coordinator.throughput.snapshot()
    total = made / max(window_end - window_start, 1e-9)
    return ttfts, per_stream, total, steps["step_s"] or 0.0, steps["hop_s"] or 0.0


class Case(NamedTuple):
    engine: str
    quant: str
    nodes: int
    concurrency: int

    def __str__(self) -> str:
        return f"{self.engine} {self.quant} nodes={self.nodes} streams={self.concurrency}"


@dataclass
class Run:
    """One case, once: what `run_streams` measured, and its nodes' memory."""
    ttfts: list[float]
    per_stream: list[float]
    total: float
    step_s: float
    hop_s: float
    idle_rss_mb: list[float]
    peak_rss_mb: list[float]
    layers: list[str]


def bench(model_dir: Path, engines: list[str], quants: list[str], node_counts: list[int],
          concurrencies: list[int], prompt_tokens: int, gen_tokens: int, broker: str = "",
          report=print, repeat: int = 1, failed=print, **limits: int) -> list[CaseResult]:
    """Measure every case and return each one's figures. `report` gets each run as it ends, `failed`
    one line for each case that failed (the other cases still run). `limits` (max_context,
    max_requests) go to every node.

    With `repeat` > 1 the cases run in rounds, every case once a round (its cluster started
    afresh), and each figure is the median over the rounds: a slow minute of a shared machine then
    falls on all the cases alike, not on the few that happened to run in it."""
    from appliance.models.config import ModelConfig

    config = ModelConfig.load(model_dir)
    own_broker = None if broker else EmbeddedBroker(port=0).start()
    broker = broker or own_broker.address
    hop = hop_latency_ms(broker, config.hidden_size * WIRE_ACTIVATIONS.itemsize + 100)   # a decode step's frame
    runs: dict[Case, list[Run]] = {}   # a run each round
    broken: set[Case] = set()          # the cases that failed: not run again, nor reported

    def result(case: Case, case_runs: list[Run]) -> CaseResult:
        return summary(case, prompt_tokens, gen_tokens, hop, case_runs)

    def run_cluster(engine: str, quant: str, nodes: int, cases: list[Case]) -> None:
        cluster = None
        try:
            cluster = BenchCluster(broker, model_dir, engine, quant, nodes, **limits)
            cluster.wait_ready(nodes)
            # warm-up (JIT, caches, pages) with the cases' prompt length, as llama-bench warms up with
            # its test: the first prompt longer than any before grows the engine's buffers. One the
            # nodes cannot take fails each case in turn, and each says so.
            with contextlib.suppress(CaseFailed):
                run_streams(cluster.coordinator, 1, prompt_tokens, 4, config.vocab_size)
            stages = cluster.stages()
            processes, layers = [p for p, _ in stages], [span for _, span in stages]
            idle = [round(rss_mb(p.pid), 1) for p in processes]
            for case in cases:
                try:
                    measured = run_streams(cluster.coordinator, case.concurrency, prompt_tokens, gen_tokens,
                                           config.vocab_size)
                except CaseFailed as e:
                    failed(f"{case}: {e}")
                    broken.add(case)
                    continue
                run = Run(*measured, idle, [round(peak_rss_mb(p.pid), 1) for p in processes], layers)
                runs.setdefault(case, []).append(run)
                report(result(case, [run]))
        except (RuntimeError, TimeoutError) as e:   # a node did not come up or load, or the warm-up failed
            failed(f"{engine} {quant} nodes={nodes}: {e}")
            broken.update(cases)
        finally:
            if cluster:
                cluster.close()

    try:
        for _ in range(repeat):
            for engine, quant, nodes in itertools.product(engines, quants, node_counts):
                cases = [Case(engine, quant, nodes, c) for c in concurrencies]
                cases = [case for case in cases if case not in broken]
                if quant in ENGINE_QUANTS.get(engine, []) and cases:   # a cluster only for cases left to run
                    run_cluster(engine, quant, nodes, cases)
    finally:
        if own_broker:
            own_broker.stop()
    return [result(case, case_runs) for case, case_runs in runs.items() if case not in broken]


def summary(case: Case, prompt_tokens: int, gen_tokens: int, hop: float, runs: list[Run]) -> CaseResult:
    """A case's figures: the median over its runs (each node's memory too)."""
    median = statistics.median
    ttft = median(median(r.ttfts) for r in runs)
    idle = [round(median(r.idle_rss_mb[i] for r in runs), 1) for i in range(case.nodes)]
    peak = [round(median(r.peak_rss_mb[i] for r in runs), 1) for i in range(case.nodes)]
    return CaseResult(*case, prompt_tokens, gen_tokens, round(ttft, 4),
                      round(prompt_tokens / ttft, 1), round(median(median(r.per_stream) for r in runs), 2),
                      round(median(r.total for r in runs), 2), round(hop, 3),
                      round(median(r.step_s for r in runs) * 1000, 3), round(median(r.hop_s for r in runs) * 1000, 3),
                      idle, peak, len(runs),
                      [round(r.total, 2) for r in runs], runs[0].layers)


def table(results: list[CaseResult]) -> str:
    head = ("engine", "quant", "nodes", "streams", "TTFT s", "prefill tok/s", "decode tok/s/stream",
            "decode tok/s total", "hop ms idle", "step ms", "hop ms in run", "layers per node",
            "idle RSS MB per node", "peak RSS MB per node")
    rows = [(r.engine, r.quant, r.nodes, r.concurrency, r.ttft_s, r.prefill_tok_s, r.decode_tok_s_per_stream,
             r.decode_tok_s_total, r.hop_ms, r.step_ms, r.hop_in_run_ms, " ".join(r.layers),
             " ".join(f"{m:.0f}" for m in r.idle_rss_mb), " ".join(f"{m:.0f}" for m in r.peak_rss_mb)) for r in results]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main(args) -> None:
    model_dir = Path(args.model) if args.model else None
    if model_dir is None:
        from appliance.models.synth import synthesize
        model_dir = Path(tempfile.mkdtemp(prefix=f"exo-bench-{args.shape}-"))
        synthesize(args.shape, model_dir, layers=args.layers)
    split = lambda text: [s for s in text.split(",") if s]  # noqa: E731
    failures: list[str] = []

    def failed(line: str) -> None:
        failures.append(line)
        print(f"  failed: {line}", file=sys.stderr, flush=True)

    def progress(r: CaseResult) -> None:
        if not args.json:
            print(f"  {r.engine} {r.quant} nodes={r.nodes} streams={r.concurrency}: {r.decode_tok_s_total} tok/s",
                  flush=True)

    results = bench(model_dir, split(args.engines), split(args.quants), [int(n) for n in split(args.nodes)],
                    [int(c) for c in split(args.concurrency)], args.prompt_tokens, args.gen_tokens, args.broker or "",
                    repeat=args.repeat, report=progress, failed=failed,
                    max_context=args.max_context, max_requests=args.max_requests)
    print(json.dumps([asdict(r) for r in results], indent=2) if args.json else table(results))
    if failures:
        sys.exit(f"exo bench: {len(failures)} case(s) failed")
