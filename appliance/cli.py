"""`exo`: the whole cluster on this machine; `exo node`, `exo panel`, `exo broker` one part each."""
from __future__ import annotations

import argparse
import logging
import signal
import socket
import subprocess
import os
import sys
import threading
import time

from appliance import __version__
from appliance.config import Config, load_config
from appliance.processes import child_process

log = logging.getLogger("exo")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (default /etc/exo/config.yaml when present)")
    p.add_argument("--broker", help="MQTT broker HOST:PORT")
    p.add_argument("--cluster", help="cluster name (topic prefix exo/<cluster>/)")
    p.add_argument("--log-level", dest="log_level", help="DEBUG, INFO, WARNING, ...")


def _membership(p: argparse.ArgumentParser) -> None:
    p.add_argument("--join", dest="cluster_key", metavar="KEY",
                   help="the cluster key another machine's `exo` printed (or EXO_CLUSTER_KEY)")
    p.add_argument("--open", action="store_true", default=None,
                   help="no key: an anonymous broker any machine on the network may use (a trusted LAN only)")


def _serving(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="a local Hugging Face model folder or a catalog id")
    p.add_argument("--host", help="address the API listens on (default 0.0.0.0)")
    p.add_argument("--port", type=int, help="API and panel port (default 52415)")
    p.add_argument("--max-body-bytes", dest="max_body_bytes", type=int,
                   help="larger request bodies get 413 before they are read (default 4 MiB)")
    p.add_argument("--queue-limit", dest="queue_limit", type=int,
                   help="requests that may wait when the cluster is full; more get 429 (default 64)")


def _capacity(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-context", dest="max_context", type=int, help="positions one request may hold (default 2048)")
    p.add_argument("--max-requests", dest="max_requests", type=int,
                   help="requests a node holds at once (default 0: as many full KV caches as a quarter of "
                        "its memory left after loading holds, at most 32)")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="exo", description="Run one language model across many small machines.")
    top.add_argument("--version", action="version", version=f"exo appliance {__version__}")
    _common(top)
    _membership(top)
    _serving(top)
    top.add_argument("--local-nodes", dest="local_nodes", type=int, help="node processes to start here (default 1)")
    top.add_argument("--engine", help="engine of the local nodes")
    top.add_argument("--quant", help="weights of the local nodes: q4, q8, f16 or f32")
    _capacity(top)
    sub = top.add_subparsers(dest="command")

    node = sub.add_parser("node", help="one node agent (what a Pi runs)")
    _common(node)
    _membership(node)
    node.add_argument("--name", help="node name; several nodes on one host need different names")
    node.add_argument("--engine", help="engine for this node's shard")
    node.add_argument("--quant", help="weights: q4, q8, f16 or f32 (default: the engine's)")
    _capacity(node)

    panel = sub.add_parser("panel", help="the coordinator, API and panel, without local nodes")
    _common(panel)
    _membership(panel)
    _serving(panel)

    models = sub.add_parser("models", help="list the catalog, download a model, or make a synthetic one")
    models.add_argument("action", choices=["list", "download", "synth"])
    models.add_argument("model", nargs="?", help="hub id to download (e.g. HuggingFaceTB/SmolLM2-135M-Instruct)")
    models.add_argument("--shape", help="synth: a real model's shape from models/synth.py, e.g. tinyllama-1.1b, "
                                        "qwen3-0.6b, qwen3-30b-a3b (a mixture of experts), mixtral-8x7b")
    models.add_argument("--out", help="synth: the folder to write")
    models.add_argument("--layers", type=int, help="synth: fewer layers than the real model")
    models.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="synth: how the weights are stored (Hub checkpoints are mostly bfloat16)")
    _common(models)
    bench = sub.add_parser("bench", help="measure engines, quants, node counts and concurrency on this machine")
    what = bench.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="a local Hugging Face model folder")
    what.add_argument("--shape", help="a synthetic model of a real shape from models/synth.py, e.g. "
                                      "tinyllama-1.1b, qwen3-0.6b, qwen3-30b-a3b")
    bench.add_argument("--layers", type=int, help="with --shape: fewer layers than the real model")
    bench.add_argument("--engines", default="numpy", help="comma-separated, e.g. numpy,onnxruntime,ggml")
    bench.add_argument("--quants", default="f32", help="comma-separated, e.g. f32,q8,q4")
    bench.add_argument("--nodes", default="1", help="comma-separated node counts, e.g. 1,2")
    bench.add_argument("--concurrency", default="1", help="comma-separated stream counts, e.g. 1,8")
    bench.add_argument("--prompt-tokens", dest="prompt_tokens", type=int, default=64)
    bench.add_argument("--gen-tokens", dest="gen_tokens", type=int, default=32)
    bench.add_argument("--repeat", type=int, default=1, help="run the cases in N rounds, each case once a round, and report the medians")
    bench.add_argument("--broker", help="use this broker instead of an embedded one")
    bench.add_argument("--max-context", dest="max_context", type=int, default=2048,
                       help="positions each node's engine holds per request")
    bench.add_argument("--max-requests", dest="max_requests", type=int, default=0,
                       help="requests each node holds at once (0: as its memory allows)")
    bench.add_argument("--json", action="store_true", help="print JSON instead of a table")

    broker = sub.add_parser("broker", help="the embedded MQTT broker alone")
    broker.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for the LAN)")
    broker.add_argument("--port", type=int, default=1883)
    broker.add_argument("--config", help="YAML config file (default /etc/exo/config.yaml when present)")
    broker.add_argument("--cluster", help="cluster name (topic prefix exo/<cluster>/)")
    _membership(broker)
    return top


def config_from(args: argparse.Namespace) -> Config:
    skip = {"command", "config"} | ({"host", "port"} if args.command == "broker" else set())  # the broker's own
    flags = {k: v for k, v in vars(args).items() if k not in skip}
    return load_config(getattr(args, "config", None), **flags)


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    command = args.command or "all"
    if command == "bench":
        from appliance.bench import main as bench_main
        logging.basicConfig(level="WARNING")
        return bench_main(args)
    try:
        config = config_from(args)
    except (ValueError, OSError) as e:   # a usage error: one line, exit status 2 as argparse's
        print(f"exo: bad configuration: {e}", file=sys.stderr)
        sys.exit(2)
    level = config.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, _stop)
    try:
        {"all": run_all, "node": run_node, "panel": run_panel, "broker": lambda c: run_broker(c, args),
         "models": lambda c: run_models(c, args)}[command](config)
    except KeyboardInterrupt as e:
        if getattr(e, "signum", signal.SIGINT) == signal.SIGINT:   # Ctrl-C: one line, exit status 0
            after_echo = "\n" if sys.stderr.isatty() else ""   # the terminal has echoed ^C
            print(f"{after_echo}exo{'' if command == 'all' else ' ' + command}: stopped", file=sys.stderr, flush=True)
    except (FileNotFoundError, ConnectionError, ValueError) as e:
        sys.exit(f"exo: {e}")


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)   # Ctrl-C, a service stop, a closed terminal


class Stopped(KeyboardInterrupt):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop(signum, frame) -> None:
    """End through the `finally` blocks that stop what we started. Further signals are ignored
    from here on, so a second Ctrl-C cannot cut that clean-up short."""
    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, signal.SIG_IGN)
    raise Stopped(signum)


def run_node(config: Config) -> None:
    from appliance.node.agent import NodeAgent

    require_a_way_to_the_broker(config, "node")
    discovery = discover_broker(config)
    if discovery is None:   # a broker given by address: it may not be up yet
        wait_for_broker(config)
    agent = NodeAgent(config)
    follower = discovery and follow(agent.bus, discovery)
    agent.start()
    log.info("node %s (%s) on broker %s, cluster %s", agent.id, config.name or "-", config.broker, config.cluster)
    try:
        agent.serve_forever()
    finally:
        for part in (follower, agent, discovery):
            if part:
                part.stop()


def run_panel(config: Config) -> None:
    from appliance.coordinator.coordinator import Coordinator
    from appliance.panel.server import serve

    require_a_way_to_the_broker(config, "panel")
    check_port_free(config)
    discovery = discover_broker(config)
    check_broker_reachable(config)   # one clear line, not the MQTT client's traceback
    print_admin_token(config)
    coordinator = Coordinator(config)
    follower = discovery and follow(coordinator.bus, discovery)
    coordinator.start()
    try:
        serve(config, coordinator)
    finally:
        for part in (follower, coordinator, discovery):
            if part:
                part.stop()


def discover_broker(config: Config):
    """A node or a panel with no broker address finds its cluster's advertised broker (waiting
    for one as long as it takes) and returns the Discovery to follow it with; None when given one
    (zeroconf is then not imported: 3.7 MiB of a node's memory)."""
    if config.broker:
        return None
    from appliance.discovery import Discovery

    discovery = Discovery(config).start()
    print(f"exo: looking for the broker of cluster {config.cluster} on the network", flush=True)
    config.broker = discovery.wait_for_broker(None).address
    return discovery


def require_a_way_to_the_broker(config: Config, command: str) -> None:
    """A usage error, said before anything touches the network."""
    if not (config.broker or config.cluster_key or config.open or config.broker_username):
        sys.exit(f"exo {command}: no broker given and no cluster key to find one with: pass --join KEY "
                 "(or EXO_CLUSTER_KEY), --open for an open cluster, or --broker HOST:PORT")


def follow(bus, discovery):
    """Keep `bus` on the cluster's advertised broker, wherever it moves (the bus does not wait for
    its first connection: the broker found may retire before it answers)."""
    from appliance.discovery import Follower

    bus.patient = True
    return Follower(bus, discovery).start()


def check_port_free(config: Config) -> None:
    from appliance.broker import port_is_free

    if not port_is_free(config.host, config.port):
        raise ConnectionError(f"port {config.port} on {config.host} is already in use: stop what holds it "
                              "or pass --port")


BROKER_RETRY_S = (1, 2, 4, 8, 15)   # waits between tries; the last repeats


def wait_for_broker(config: Config) -> None:
    """A node may start before its broker (at boot, or a Pi that is up first): try again, with one
    log line per try, until the broker answers."""
    host, port = config.broker_address
    for attempt in range(1, 1 << 30):
        try:
            socket.create_connection((host, port), timeout=5).close()
            if attempt > 1:
                log.info("the broker at %s:%d answers", host, port)
            return
        except OSError as e:
            wait = BROKER_RETRY_S[min(attempt, len(BROKER_RETRY_S)) - 1]
            log.warning("waiting for the broker at %s:%d (%s): try %d again in %d s",
                        host, port, e.strerror or e, attempt + 1, wait)
            time.sleep(wait)   # nothing to wait on but the clock: the broker is not there to tell us


def check_broker_reachable(config: Config) -> None:
    host, port = config.broker_address
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as e:
        raise ConnectionError(f"cannot reach the MQTT broker at {host}:{port}: {e}") from e


def print_admin_token(config: Config) -> None:
    from appliance.panel.auth import ADMIN_TOKEN_FILE, admin_token

    token = admin_token(config)
    where = "the config" if config.admin_token else os.path.join(config.state_dir, ADMIN_TOKEN_FILE)
    sys.stdout.write(f"exo: admin token {token} (kept in {where})\n")
    sys.stdout.flush()


def run_models(config: Config, args: argparse.Namespace) -> None:
    """`exo models list`: the catalog and what is on disk; `exo models download ID`: fetch it all
    (HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE apply), with a progress bar on a terminal;
    `exo models synth --shape S --out DIR`: random weights of a real shape, for benchmarks."""
    from appliance.models.catalog import CATALOG
    from appliance.models.store import cached_snapshot, models_dir

    if args.action == "synth":
        from appliance.models.synth import SHAPES, synthesize
        if args.shape not in SHAPES or not args.out:
            sys.exit(f"exo models synth: give --shape ({', '.join(SHAPES)}) and --out DIR")
        synthesize(args.shape, args.out, layers=args.layers, dtype=args.dtype)
        print(f"wrote a random-weight {args.shape} ({args.dtype}) to {args.out}", flush=True)
        return
    cache = models_dir(config.models_dir)
    if args.action == "list":
        for m in CATALOG:
            mark = "cached" if cached_snapshot(m.id, cache) else "-"
            print(f"{m.id:40} {m.layers:3d} layers {m.bytes / 1e9:6.2f} GB  {mark}")
        return
    if not args.model:
        sys.exit("exo models download: name the model, e.g. exo models download HuggingFaceTB/SmolLM2-135M-Instruct")
    from appliance.models.download import fetch_all

    print(fetch_all(args.model, cache=cache), flush=True)


def run_broker(config: Config, args: argparse.Namespace) -> None:
    from appliance.broker import EmbeddedBroker

    announce_key(config)
    broker = EmbeddedBroker(args.host, args.port, config=config).start()
    print(f"broker listening on {broker.address}", flush=True)
    discovery = None
    if not args.host.startswith("127."):   # on the LAN: tell the cluster's machines where it is
        from appliance.discovery import Discovery
        discovery = Discovery(config).start()
        discovery.advertise(broker.port, time.time())
    try:
        broker.wait()
    finally:
        if discovery:
            discovery.stop()
        broker.stop()


def run_all(config: Config) -> None:
    """A broker (the configured one, the cluster's advertised one, or our own), N node processes,
    and a coordinator with the API here."""
    from appliance.coordinator.coordinator import Coordinator
    from appliance.panel.server import serve

    check_port_free(config)
    announce_key(config)
    started: list = []
    try:
        keeper = find_or_start_broker(config, started)
        for i in range(config.local_nodes):
            started.append(spawn_node(config, f"local-{i + 1}", discover=keeper is not None))
        coordinator = Coordinator(config)
        if keeper:
            started.append(follow(coordinator.bus, keeper.discovery))
        coordinator.start()
        started.append(coordinator)
        if keeper:
            keeper.watch(coordinator.cluster)
        print_admin_token(config)
        log_downloads(coordinator)
        serve(config, coordinator, watch=[p for p in started if isinstance(p, subprocess.Popen)],
              listening=lambda: announce_when_ready(config, coordinator))
    finally:
        for part in reversed(started):
            stop_part(part)


def find_or_start_broker(config: Config, started: list):
    """With no broker given: on the LAN, the keeper finds the cluster's broker or starts one (and
    is returned); with the API on loopback only (--host 127.0.0.1), a private broker of our own."""
    from appliance.broker import EmbeddedBroker

    if config.broker:
        return None
    if config.host.startswith("127.") or config.host in ("localhost", "::1"):
        broker = EmbeddedBroker(config=config).start()
        started.append(broker)
        config.broker = broker.address
        return None
    from appliance.discovery import Discovery
    from appliance.keeper import Keeper

    keeper = Keeper(config, Discovery(config).start())
    started.append(keeper)
    print(f"exo: looking for the broker of cluster {config.cluster} on the network", flush=True)
    keeper.find_or_start()
    return keeper


def announce_key(config: Config) -> None:
    """A closed cluster gets its key (created on first start) and says how to join it."""
    from appliance.cluster_key import KEY_FILE, ensure_key

    if config.open:
        print("exo: open cluster: any machine on this network may join it, read its prompts and answer them "
              "(--open is for a trusted LAN only)", flush=True)
        return
    origin = ensure_key(config)
    if origin != "given":
        origin = f"{origin}, in {os.path.join(config.state_dir, KEY_FILE)}"
    print(f"exo: cluster key {config.cluster_key} ({origin})", flush=True)
    print(f"exo: to add a machine, run on it: exo --join {config.cluster_key}   (or set EXO_CLUSTER_KEY)", flush=True)


ALL_LOCAL_NODES_S = 30.0   # how long "ready" waits for every local node to be in the plan (one too small never is)


def announce_when_ready(config: Config, coordinator) -> threading.Thread:
    """Print where the API is once it can answer: every node of the plan has loaded its layers (at
    once when no model is configured: the panel is then where one is loaded). Until then /healthz
    says 503 and why."""

    def wait() -> None:
        import psutil

        if config.model:
            cluster = coordinator.cluster

            def planned(nodes: int) -> bool:
                plan = cluster.ready_plan()
                return plan is not None and len(plan.nodes) >= nodes

            with cluster.changed:   # all local nodes in, if they come soon: no re-plan right after "ready"
                layers = coordinator.model.config.num_layers if coordinator.model else config.local_nodes
                cluster.changed.wait_for(lambda: planned(min(config.local_nodes, layers)), timeout=ALL_LOCAL_NODES_S)
                cluster.changed.wait_for(lambda: planned(1))
        where = " and ".join(panel_urls(config))
        took = time.time() - psutil.Process().create_time()
        # one write, so that no log line of another thread lands inside it
        sys.stdout.write(f"exo: ready in {took:.1f} s: API and panel on {where} (broker {config.broker}, "
                         f"{config.local_nodes} local node(s)); Ctrl-C stops\n")
        sys.stdout.flush()
    thread = threading.Thread(target=wait, name="announce", daemon=True)
    thread.start()
    return thread


DOWNLOAD_LOG_S = 5.0   # a node's download progress is logged this often at most


def log_downloads(coordinator) -> None:
    """The local nodes' downloads in the terminal, a line per node every few seconds (their own
    progress bars would draw over each other), and the end of each."""
    from appliance.bus.protocol import parse_json

    said: dict[str, tuple[str, float]] = {}

    def on_progress(topic: str, payload: bytes) -> None:
        if not payload:
            return
        node, p = coordinator.topics.node_id_of(topic), parse_json(payload)
        state, now = p.get("state"), time.monotonic()
        last_state, last_at = said.get(node, ("", 0.0))
        if state == last_state and (state != "downloading" or now - last_at < DOWNLOAD_LOG_S):
            return
        said[node] = (state, now)
        name = coordinator.cluster.name_of(node)
        if state == "downloading":
            log.info("%s: downloading %s, %.0f of %.0f MB at %.1f MB/s", name, p.get("model"),
                     (p.get("bytes") or 0) / 1e6, (p.get("total") or 0) / 1e6, (p.get("speed") or 0) / 1e6)
        elif state == "error":
            log.error("%s: cannot download %s: %s", name, p.get("model"), p.get("error"))
        elif state == "done":
            log.info("%s: has the files of its layers of %s (%.0f MB)", name, p.get("model"), (p.get("total") or 0) / 1e6)
    coordinator.bus.on(coordinator.topics.node_download(), on_progress, qos=1)


def panel_urls(config: Config) -> list[str]:
    """http://localhost:PORT, and the LAN address too when the API listens beyond this machine."""
    urls = [f"http://localhost:{config.port}"]
    if config.host in ("0.0.0.0", "::", ""):
        lan = lan_address()
        urls += [f"http://{lan}:{config.port}"] if lan else []
    elif config.host not in ("127.0.0.1", "localhost", "::1"):
        urls = [f"http://{config.host}:{config.port}"]
    return urls


def lan_address() -> str | None:
    """The address this machine's default route leaves from (a UDP socket sends nothing to connect)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))   # TEST-NET-1: never reached, only routed
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def spawn_node(config: Config, name: str, discover: bool = False) -> subprocess.Popen:
    """A local node: on our broker, or (`discover`) on whichever broker the cluster advertises."""
    where = [] if discover else ["--broker", config.broker]
    command = [sys.executable, "-m", "appliance", "node", *where, "--cluster", config.cluster,
               "--name", name, "--engine", config.engine, "--log-level", config.log_level,
               "--max-context", str(config.max_context), "--max-requests", str(config.max_requests)]
    if config.quant:
        command += ["--quant", config.quant]
    env = {**os.environ, "EXO_STATE_DIR": config.state_dir, "EXO_MODELS_DIR": config.models_dir,
           "EXO_CLUSTER_KEY": config.cluster_key, "EXO_OPEN": "1" if config.open else "",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1"}   # several nodes' bars would draw over each other: log_downloads
    return subprocess.Popen(command, env=env, **child_process())


def stop_part(part) -> None:
    if isinstance(part, subprocess.Popen):
        if part.poll() is None:
            part.terminate()
            try:
                part.wait(5)
            except subprocess.TimeoutExpired:
                part.kill()
                part.wait()
    else:
        part.stop()

