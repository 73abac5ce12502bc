"""Zero-config discovery (issue 14), with real processes on real hosts: each host a network
namespace on one bridge (multicast flooded), with its own machine id and state dir, running plain
`exo --model M` with the cluster's key and no broker address.

The tests run in order on one lab: three hosts form one cluster; the broker's host dies and the
two left serve again with a stream resuming; a host of another key stays apart; strangers and a
member's login fail to hijack it. Needs root for the namespaces (CI runs as root); `-m "not faults"`
leaves them out locally. Each prints what it measured.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from appliance import cluster_key
from tests.conftest import STORIES, STORY
from tests.faults import Lab, Stream, can_make_namespaces
from tests.system import needs

pytestmark = [needs("mosquitto", "ip"), pytest.mark.faults,
              pytest.mark.skipif(os.geteuid() != 0 or not can_make_namespaces(), reason="needs root for namespaces")]
FORM_WITHIN_S = 30.0
RECOVER_WITHIN_S = 30.0
TOKENS = 300
PORT = 52415
KEY = cluster_key.new_key()


class Hosts:
    """The lab and the `exo` running on each of its hosts."""

    def __init__(self, tmp):
        self.tmp, self.lab, self.exo, self.started = tmp, Lab(), {}, {}
        (tmp / "none.yaml").write_text("{}\n")

    def start(self, name: str, key: str = KEY, argv: list[str] | None = None, env: dict | None = None) -> None:
        """Plain `exo --model M` (or `argv`) on a host of its own, with `key` and no broker address."""
        host = self.lab.hosts.get(name) or self.lab.add_host(name)
        env = {**os.environ, "EXO_STATE_DIR": str(self.tmp / name), "EXO_CONFIG": str(self.tmp / "none.yaml"),
               "EXO_CLUSTER_KEY": key, "EXO_HOST": "0.0.0.0", **(env or {})}
        argv = argv or ["--model", str(STORIES), "--engine", "numpy"]
        log = open(self.tmp / f"{name}.log", "wb")
        self.exo[name] = host.popen([sys.executable, "-m", "appliance", *argv],
                                    stdout=log, stderr=subprocess.STDOUT, env=env)
        self.started[name] = time.time()   # the probes on the lab's hosts say when they were served on this clock

    def url(self, name: str) -> str:
        return f"http://{self.lab.hosts[name].address}:{PORT}"

    def probe(self, names: list[str], nodes: int, timeout: float) -> dict[str, dict]:
        """Wait on each host at once until its API serves `nodes` nodes; what each probe saw."""
        return self.probe_wait(self.probe_start(names, nodes, timeout))

    def probe_start(self, names: list[str], nodes: int, timeout: float) -> dict[str, subprocess.Popen]:
        argv = [sys.executable, "-m", "tests.lab_probe"]
        return {n: self.lab.hosts[n].popen([*argv, self.url(n), str(STORIES), str(nodes), str(timeout)],
                                           stdout=subprocess.PIPE, text=True) for n in names}

    @staticmethod
    def probe_wait(probes: dict[str, subprocess.Popen]) -> dict[str, dict]:
        return {n: json.loads(p.communicate()[0]) for n, p in probes.items()}

    def host_at(self, address: str) -> str:
        ip = address.rsplit(":", 1)[0]
        return next(n for n, h in self.lab.hosts.items() if h.address == ip)

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def close(self) -> None:
        for p in self.exo.values():
            if p.poll() is None:
                p.terminate()
        for p in self.exo.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        self.lab.close()


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    hosts = Hosts(tmp_path_factory.mktemp("discovery"))
    yield hosts
    hosts.close()


def served(results: dict[str, dict], what: str) -> None:
    for name, r in results.items():
        assert r["ok"], f"{name} did not serve {what}: {r}"
        assert r["text"] == STORY[:len(r["text"])] and len(r["text"]) > 40, r["text"]


def test_three_hosts_running_plain_exo_form_one_cluster(hosts):
    names = ["h0", "h1", "h2"]
    for name in names:
        hosts.lab.add_host(name)
    probes = hosts.probe_start(names, 3, FORM_WITHIN_S + 10)   # up and asking before exo starts: their time is exo's
    for name in names:   # at once: each finds no broker, starts one, and two of them retire theirs
        hosts.start(name)
    last = max(hosts.started.values())
    results = hosts.probe_wait(probes)
    served(results, "a cluster of 3")
    after = max(r["at"] for r in results.values()) - last
    assert after < FORM_WITHIN_S
    probes = ", ".join(f"{n} {r['at'] - last:.1f} s" for n, r in results.items())
    brokers = {r["health"]["broker"] for r in results.values()}
    assert len(brokers) == 1, brokers
    print(f"\n3 hosts: every host's API served the 3-node cluster {after:.1f} s after the last `exo` started "
          f"(each host: {probes}); broker on "
          f"{hosts.host_at(brokers.pop())}")


def test_the_broker_host_dies_and_the_others_serve_again(hosts):
    state = hosts.probe(["h0"], 3, 10)["h0"]
    assert state["ok"], state
    victim = hosts.host_at(state["health"]["broker"])
    survivors = [n for n in ("h0", "h1", "h2") if n != victim]
    url, host = hosts.url(survivors[0]), hosts.lab.hosts[survivors[0]]
    undisturbed = Stream.start(url, str(STORIES), "", TOKENS, host=host).read()
    assert undisturbed.end == {"finish_reason": "length"}, undisturbed.end
    stream = Stream.start(url, str(STORIES), "", TOKENS, host=host).read(tokens=5)

    hosts.lab.hosts[victim].kill()
    killed = time.time()
    results = hosts.probe(survivors, 2, RECOVER_WITHIN_S)
    served(results, "a cluster of the 2 left")
    recovered = max(r["at"] for r in results.values()) - killed
    assert recovered < RECOVER_WITHIN_S
    stream.read()
    assert stream.end == {"finish_reason": "length"}, stream.end
    assert stream.text == undisturbed.text
    new_broker = hosts.host_at(results[survivors[0]]["health"]["broker"])
    assert new_broker in survivors
    print(f"\nbroker host {victim} killed: {' and '.join(survivors)} served again {recovered:.1f} s later on a broker "
          f"on {new_broker}; the stream in flight resumed (longest gap {stream.longest_gap:.1f} s) with the same text")


def test_a_cluster_of_another_key_stays_apart(hosts):
    hosts.start("other", key=cluster_key.new_key())
    results = hosts.probe(["other"], 1, FORM_WITHIN_S)
    served(results, "a cluster of its own")
    ours = alive(hosts)
    mine = hosts.probe(ours[:1], 2, 10)
    served(mine, "the 2 of our key still")
    assert results["other"]["health"]["broker"] != mine[ours[0]]["health"]["broker"]
    print(f"\nanother key on the same bridge: its own broker on {hosts.host_at(results['other']['health']['broker'])}, "
          f"ours stayed at 2 nodes")


def test_strangers_and_a_members_login_cannot_hijack_the_cluster(hosts):
    state = hosts.probe(alive(hosts)[:1], 2, 10)
    name, seen = next(iter(state.items()))
    assert seen["ok"], seen
    plan = seen["health"]["plan"]
    nodes = [s["node"] for s in plan["shards"]]
    url, host = hosts.url(name), hosts.lab.hosts[name]
    undisturbed = Stream.start(url, str(STORIES), "", TOKENS, host=host).read()

    intruder = host.popen([sys.executable, "-m", "tests.lab_intruder", seen["health"]["broker"], "default", KEY,
                           nodes[0], nodes[-1], "8"], stdout=subprocess.PIPE, text=True)
    assert json.loads(intruder.stdout.readline()) == {"ready": True}   # connected, its claim and plan sent
    stream = Stream.start(url, str(STORIES), "", TOKENS, host=host).read()
    attack = json.loads(intruder.communicate(timeout=60)[0])
    after = hosts.probe([name], 2, 10)[name]

    assert attack == {**attack, "anonymous_accepted": False, "other_key_accepted": False, "node_accepted": True}
    assert attack["replies_answered_with_fakes"] > 0           # it tried
    assert stream.end == {"finish_reason": "length"} and stream.text == undisturbed.text   # and changed nothing
    assert after["ok"] and after["health"]["coordinator"]["id"] == seen["health"]["coordinator"]["id"]
    assert after["health"]["plan"]["coordinator"] != "f" * 32 and after["health"]["plan"]["model"] == str(STORIES)
    print(f"\nhijack: anonymous refused, another key refused; a member's login answered "
          f"{attack['replies_answered_with_fakes']} replies with fake tokens (as itself and as the last node) and "
          "published a retained leader claim and plan: the stream's text was unchanged and the plan is the leader's")


def test_nodes_with_no_broker_address_find_an_advertised_broker(hosts):
    """As on Pis: one host runs `exo broker` on the LAN (which advertises it), the others `exo node`
    and `exo panel` with the key and no broker line."""
    key, env = cluster_key.new_key(), {"EXO_CLUSTER": "pis"}
    hosts.start("pi-broker", key=key, argv=["broker", "--host", "0.0.0.0"], env=env)
    hosts.start("pi-a", key=key, argv=["node", "--engine", "numpy", "--name", "a"], env=env)
    hosts.start("pi-b", key=key, argv=["node", "--engine", "numpy", "--name", "b"], env=env)
    hosts.start("pi-panel", key=key, argv=["panel", "--model", str(STORIES)], env=env)
    results = hosts.probe(["pi-panel"], 2, FORM_WITHIN_S)
    served(results, "its 2 nodes")
    assert hosts.host_at(results["pi-panel"]["health"]["broker"]) == "pi-broker"
    print(f"\n`exo broker`, 2 `exo node` and `exo panel` with no broker address: served "
          f"{results['pi-panel']['at'] - hosts.started['pi-panel']:.1f} s after the panel started")


def alive(hosts) -> list[str]:
    return [n for n in ("h0", "h1", "h2") if hosts.exo[n].poll() is None]
