"""The cluster heals itself (issue 12): a broker that restarts, gracefully or not, with or without
persistence, idle or mid-stream, finds every node and the coordinator again without restarting
any exo process, and a stream caught by the restart goes on with the same greedy text."""
from __future__ import annotations

import os
import signal
import time

import pytest

from tests.conftest import STORIES, STORY, LocalCluster
from tests.faults import Mosquitto, Stream
from tests.system import needs

pytestmark = needs("mosquitto")
BACK_WITHIN_S = 10.0
TOKENS = 300


def serves(cluster: LocalCluster) -> bool:
    try:
        text = cluster.openai(timeout=5).completions.create(
            model=str(STORIES), prompt="", max_tokens=24, temperature=0).choices[0].text
    except Exception:
        return False
    return text == STORY[:len(text)] and len(text) > 40


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "mid-stream"])
@pytest.mark.parametrize("persistence", [False, True], ids=["memory", "persistence"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_restarted_broker_finds_the_cluster_again(sig, persistence, busy, tmp_path):
    broker = Mosquitto(tmp_path / "broker", persistence).start()
    cluster = LocalCluster(broker.address, tmp_path / "cluster").start(2)
    try:
        assert serves(cluster)
        if busy:
            undisturbed = Stream.start(cluster.url, str(STORIES), "", TOKENS).read()
            stream = Stream.start(cluster.url, str(STORIES), "", TOKENS).read(tokens=5)
        broker.stop(sig)
        broker.start()
        back = time.monotonic()
        while not serves(cluster):   # each try is a real request: there is no event to wait on
            assert time.monotonic() - back < BACK_WITHIN_S, (
                f"not serving {BACK_WITHIN_S:.0f} s after the broker came back:\n" + cluster.log("panel")[-3000:])
        recovered = time.monotonic() - back
        if busy:   # the stream caught by the restart resumed and ended as an undisturbed one
            stream.read()
            assert stream.end == {"finish_reason": "length"} and stream.text == undisturbed.text
        print(f"\nbroker {signal.Signals(sig).name}, persistence {persistence}, {'mid-stream' if busy else 'idle'}: "
              f"serving {recovered:.1f} s after the broker was back"
              + (f", the stream's longest gap {stream.longest_gap:.1f} s" if busy else ""))
        assert all(p.poll() is None for p in [*cluster.nodes.values(), cluster.panel])   # nobody restarted
    finally:
        cluster.stop()
        broker.stop()


def test_after_a_broker_restart_there_is_still_exactly_one_leader(tmp_path):
    """The leader's claim is made again on reconnect, so a coordinator started after the restart
    finds it and stands by (it used to find no claim and lead too)."""
    from appliance.config import Config
    from appliance.coordinator.coordinator import Coordinator
    from tests.conftest import wait_for

    broker = Mosquitto(tmp_path / "broker", persistence=False).start()
    config = Config(broker=broker.address, cluster="heal" + os.urandom(4).hex())
    first = Coordinator(config).start()
    coordinators = [first]
    try:
        wait_for(lambda: first.cluster.is_leader, 10, "the first coordinator to lead")
        broker.stop()
        broker.start()
        wait_for(lambda: first.bus.connected.is_set() and first.id in first.cluster.coordinators, 10,
                 "the first coordinator to reconnect and see its own claim")
        second = Coordinator(config).start()
        coordinators.append(second)
        wait_for(lambda: len(second.cluster.coordinators) == 2, 10, "the second coordinator to see both claims")
        assert [c.cluster.is_leader for c in coordinators] == [True, False]
    finally:
        for c in coordinators:
            c.stop()
        broker.stop()


def test_a_retained_info_of_a_node_that_never_speaks_expires(tmp_path):
    """A node that died while the broker was down leaves a retained `online` info behind, and no
    Will; without a heartbeat for 3 intervals it is planned out, and back in when it speaks."""
    import json

    import paho.mqtt.client as mqtt

    from appliance.bus.protocol import HEARTBEAT_S, MISSED_HEARTBEATS, Topics
    from appliance.config import Config
    from appliance.coordinator.coordinator import Coordinator
    from tests.conftest import wait_for

    broker = Mosquitto(tmp_path / "broker", persistence=False).start()
    config = Config(broker=broker.address, cluster="ghost" + os.urandom(4).hex())
    topics = Topics(config.cluster)
    ghost = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    ghost.connect("127.0.0.1", broker.port)
    ghost.loop_start()
    ghost.publish(topics.node_info("ghost"), json.dumps({"id": "ghost", "name": "ghost", "online": True,
                  "memory_available": 8 * 2**30}), qos=1, retain=True).wait_for_publish(5)
    coordinator = Coordinator(config).start()
    try:
        wait_for(lambda: "ghost" in coordinator.cluster.nodes, 5, "the retained info to arrive")
        seen = time.monotonic()
        wait_for(lambda: "ghost" not in coordinator.cluster.nodes, 3 * MISSED_HEARTBEATS * HEARTBEAT_S,
                 "the silent node to be planned out")
        assert time.monotonic() - seen >= (MISSED_HEARTBEATS - 1) * HEARTBEAT_S   # not before its time
        ghost.publish(topics.node_status("ghost"), json.dumps({"id": "ghost"})).wait_for_publish(5)
        wait_for(lambda: "ghost" in coordinator.cluster.nodes, 5, "the node to be back once it speaks")
    finally:
        coordinator.stop()
        ghost.loop_stop()
        broker.stop()
