"""The least a hop through the broker costs on this machine, with nothing of exo around it. Not a test.

    python3 benchmarks/hop_floor.py [--broker HOST:PORT] [--busy-ms 0,25] [--rounds 300] [--bytes 4200]

Two processes pass a decode-sized message back and forth through MQTT. Before each answer the
answering side is busy for --busy-ms (a loop on the CPU), as a pipeline stage is for its step, while
the other waits. Each round trip less both sides' busy time is two hops. Two ways to drive paho are
taken in turn, for each busy time:

- network thread: paho's thread reads and writes the socket and hands each message to the waiting
  thread through a queue. This is what a node does (appliance/bus/client.py).
- caller's loop: the waiting thread drives paho's loop itself, and a publish writes the socket at
  once. This is what a network loop of our own would do: no thread switch at either end of a hop.

Prints the median and 90th percentile of one hop (ms) for each. Without --broker it starts a local
one (mosquitto if installed). Two hosts: run this with --broker HOST:PORT --remote, then
`--echo HOST:PORT` on the other host with the same --busy-ms, --rounds and --bytes.
"""
from __future__ import annotations

import argparse
import queue
import socket
import statistics
import struct
import subprocess
import sys
import time

import paho.mqtt.client as mqtt

MODES = ("network thread", "caller's loop")
BUSY = struct.Struct("<d")   # the answering side's busy time, ahead of the message's filler
WARMUP = 20
READY = b"ready"


class Peer:
    """One end: a paho client that waits for the next message in one of the two MODES."""

    def __init__(self, broker: str, mode: str, me: str, other: str):
        host, port = broker.rsplit(":", 1)
        self.mode, self.other = mode, other
        self.inbox: queue.Queue = queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        self.client.on_socket_open = lambda client, userdata, sock: sock.setsockopt(
            socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client.on_message = lambda client, userdata, message: self.inbox.put(message.payload)
        subscribed = []
        self.client.on_subscribe = lambda *_: subscribed.append(True)
        self.client.connect(host, int(port), keepalive=30)
        self.client.subscribe(f"hop-floor/{me}")
        if mode == MODES[0]:
            self.client.loop_start()
        deadline = time.monotonic() + 10
        while not subscribed:   # the broker has our subscription before anyone is told we are here
            if time.monotonic() > deadline:
                raise TimeoutError(f"the broker at {broker} did not take a subscription within 10 s")
            self.client.loop(timeout=0.1) if mode == MODES[1] else time.sleep(0.01)

    def send(self, payload: bytes) -> None:
        self.client.publish(f"hop-floor/{self.other}", payload)

    def receive(self, timeout: float | None = 10) -> bytes:
        if self.mode == MODES[0]:
            return self.inbox.get(timeout=timeout)
        deadline = time.monotonic() + (timeout or float("inf"))
        while self.inbox.empty():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no message within {timeout} s")
            self.client.loop(timeout=1.0)
        return self.inbox.get_nowait()

    def close(self) -> None:
        self.client.disconnect()
        if self.mode == MODES[0]:
            self.client.loop_stop()


def busy(seconds: float) -> float:
    """Keep this core busy for `seconds`, as a step's kernels do; the time it took."""
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        pass
    return time.perf_counter() - started


def echo(broker: str, mode: str, busy_s: float, rounds: int, size: int) -> None:
    """The answering end: for each message, be busy, then answer with how long that took."""
    peer = Peer(broker, mode, "echo", "ping")
    try:
        filler = bytes(size - BUSY.size)
        for i in range(WARMUP + rounds):
            peer.receive() if i else say_ready(peer)
            peer.send(BUSY.pack(busy(busy_s)) + filler)
        peer.client.loop(timeout=0.1) if mode == MODES[1] else time.sleep(0.1)   # the last answer out
    finally:
        peer.close()


def say_ready(peer: Peer) -> None:
    """Tell the ping end that we are here until its first message comes (it may subscribe later)."""
    while True:
        peer.send(READY)
        try:
            return peer.receive(timeout=0.5)
        except (queue.Empty, TimeoutError):
            pass


def ping(peer: Peer, busy_s: float, rounds: int, size: int) -> list[float]:
    """The asking end, once the echo end is ready: one hop's time in each round, in seconds."""
    filler = bytes(size)
    hops = []
    for _ in range(WARMUP + rounds):
        started = time.perf_counter()
        own = busy(busy_s)
        peer.send(filler)
        answer = peer.receive()
        while answer == READY:   # one more said before our first message came
            answer = peer.receive()
        theirs = BUSY.unpack_from(answer)[0]
        hops.append((time.perf_counter() - started - own - theirs) / 2)
    return hops[WARMUP:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--broker", help="HOST:PORT of a broker (default: start a local one)")
    parser.add_argument("--busy-ms", default="0,25", help="each side's busy time before it answers, ms")
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--bytes", type=int, default=4200, help="a message's size (TinyLlama's decode frame)")
    parser.add_argument("--remote", action="store_true", help="the echo end runs on another host (--echo there)")
    parser.add_argument("--echo", metavar="HOST:PORT", help="be the echo end, on this broker")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    busy_times = [float(ms) / 1000 for ms in args.busy_ms.split(",")]
    if args.echo:
        modes = [args.mode] if args.mode else MODES
        for busy_s in busy_times:
            for mode in modes:
                echo(args.echo, mode, busy_s, args.rounds, args.bytes)
        return

    own_broker = None
    if not args.broker:
        from appliance.broker import EmbeddedBroker   # here: the echo end needs only paho
        own_broker = EmbeddedBroker(port=0).start()
    broker = args.broker or own_broker.address
    print(f"broker {broker}, {args.bytes}-byte messages, {args.rounds} rounds; one hop in ms, median (p90)")
    try:
        for busy_s in busy_times:
            for mode in MODES:
                peer = Peer(broker, mode, "ping", "echo")   # subscribed before the echo end says it is ready
                echo_end = None if args.remote else subprocess.Popen(
                    [sys.executable, __file__, "--echo", broker, "--mode", mode, "--busy-ms", str(busy_s * 1000),
                     "--rounds", str(args.rounds), "--bytes", str(args.bytes)])
                if args.remote and busy_s == busy_times[0] and mode == MODES[0]:
                    print("waiting for `--echo` on the other host", flush=True)
                try:
                    while peer.receive(timeout=None if args.remote else 30) != READY:
                        pass
                    hops = sorted(ping(peer, busy_s, args.rounds, args.bytes))
                finally:
                    peer.close()
                if echo_end:
                    echo_end.wait(timeout=30)
                print(f"busy {busy_s * 1000:5.1f} ms  {mode:15s}  {statistics.median(hops) * 1000:6.3f}"
                      f"  ({hops[int(len(hops) * 0.9)] * 1000:.3f})", flush=True)
    finally:
        if own_broker:
            own_broker.stop()


if __name__ == "__main__":
    main()
