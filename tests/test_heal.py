"""The cluster heals itself (issue 12): a broker that restarts, gracefully or not, with or without
persistence, finds every node and the coordinator again without restarting any exo process."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from appliance.broker import find_mosquitto, free_port, wait_for_port
from tests.conftest import STORIES, STORY, LocalCluster
from tests.system import needs

pytestmark = needs("mosquitto")
BACK_WITHIN_S = 10.0


class Mosquitto:
    """A real mosquitto on a fixed port that a test can stop and start again."""

    def __init__(self, folder, persistence: bool):
        self.port, self.folder = free_port(), folder
        folder.mkdir(parents=True, exist_ok=True)
        self.conf = folder / "mosquitto.conf"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\nuser root\n"
                             f"persistence {'true' if persistence else 'false'}\npersistence_location {folder}/\n"
                             "autosave_interval 1\nlog_dest stderr\nlog_type error\n")
        self.process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "Mosquitto":
        self.process = subprocess.Popen([find_mosquitto(), "-c", str(self.conf)])
        wait_for_port("127.0.0.1", self.port, 10, self.process)
        return self

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(10)


def serves(cluster: LocalCluster) -> bool:
    try:
        text = cluster.openai(timeout=5).completions.create(
            model=str(STORIES), prompt="", max_tokens=24, temperature=0).choices[0].text
    except Exception:
        return False
    return text == STORY[:len(text)] and len(text) > 40


@pytest.mark.parametrize("persistence", [False, True], ids=["memory", "persistence"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_restarted_broker_finds_the_cluster_again(sig, persistence, tmp_path):
    broker = Mosquitto(tmp_path / "broker", persistence).start()
    cluster = LocalCluster(broker.address, tmp_path / "cluster").start(2)
    try:
        assert serves(cluster)
        broker.stop(sig)
        broker.start()
        back = time.monotonic()
        while not serves(cluster):   # each try is a real request: there is no event to wait on
            assert time.monotonic() - back < BACK_WITHIN_S, (
                f"not serving {BACK_WITHIN_S:.0f} s after the broker came back:\n" + cluster.log("panel")[-3000:])
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
