"""A keyed cluster's broker (issue 14, points 4 and 5), with a real mosquitto: a client without the
key is refused, and a member's login writes only as itself. MQTT 3.1.1 drops a denied publish
silently, so denials are checked by non-arrival: a marker sent after them must arrive, they not."""
from __future__ import annotations

import threading
import uuid

import paho.mqtt.client as mqtt
import pytest

from appliance import cluster_key
from appliance.broker import EmbeddedBroker, free_port
from appliance.bus.client import Bus
from appliance.bus.protocol import Topics, new_id
from appliance.config import Config
from tests.conftest import wait_for
from tests.system import needs

pytestmark = needs("mosquitto")


@pytest.fixture
def keyed():
    config = Config(cluster="k" + uuid.uuid4().hex[:8], cluster_key=cluster_key.new_key())
    broker = EmbeddedBroker(port=free_port(), config=config).start()
    config.broker = broker.address
    yield config
    broker.stop()


class Client:
    """A plain paho client that records what it receives."""

    def __init__(self, config: Config, login: tuple[str, str] | None, subscribe: str | None = None):
        self.messages: list[tuple[str, bytes]] = []
        self.arrived = threading.Condition()
        self.refused = threading.Event()
        self.ready = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        if login:
            self.client.username_pw_set(*login)
        self.client.on_connect = lambda c, u, f, rc, p=None: self._connected(rc, subscribe)
        self.client.on_subscribe = lambda *_: self.ready.set()
        self.client.on_message = self._message
        host, port = config.broker_address
        self.client.connect(host, port)
        self.client.loop_start()

    def _connected(self, rc, subscribe):
        if rc.is_failure:
            self.refused.set()
            self.client.disconnect()
        elif subscribe:
            self.client.subscribe(subscribe, 1)
        else:
            self.ready.set()

    def _message(self, client, userdata, message):
        with self.arrived:
            self.messages.append((message.topic, message.payload))
            self.arrived.notify_all()

    def wait_for(self, topic: str, timeout: float = 10) -> None:
        with self.arrived:
            assert self.arrived.wait_for(lambda: any(t == topic for t, _ in self.messages), timeout), f"no {topic}"

    def publish(self, topic: str, payload: bytes = b"x", retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def member(config: Config, user: str, role: str) -> tuple[str, str]:
    """Ask the broker to let `user` in, as a member's bus does, and return its derived login once
    the broker takes it (the registrar has mosquitto reload its files a moment later)."""
    bus = Bus(config, client_id=f"test-{user}", user=user, role=role)
    assert bus.ask_to_join()

    def accepted() -> bool:
        probe = Client(config, bus.login)
        try:
            return wait_for(lambda: probe.ready.is_set() or probe.refused.is_set(), 5, "an answer") and probe.ready.is_set()
        finally:
            probe.close()
    wait_for(accepted, 10, f"the broker to let {user} in")
    return bus.login


def test_a_client_without_the_key_is_refused(keyed):
    topics = Topics(keyed.cluster)
    coordinator = new_id()
    watcher = Client(keyed, member(keyed, coordinator, "coord"), subscribe=f"{topics.root}/#")
    assert watcher.ready.wait(10)
    strangers = {"anonymous": None, "a wrong password": (coordinator, "guess"),
                 "another cluster's key": cluster_key.login(Config(cluster=keyed.cluster, cluster_key="exo1-other"), coordinator),
                 "the joiner": (cluster_key.JOINER, cluster_key.password(keyed, cluster_key.JOINER))}
    for what, login in strangers.items():
        stranger = Client(keyed, login, subscribe=f"{topics.root}/#")
        try:
            if what == "the joiner":   # it is let in, to ask to join, and may do nothing else
                assert stranger.ready.wait(10)
                stranger.publish(topics.plan, b'{"plan_id": 1}', retain=True)
                stranger.publish(topics.node_inbox("a" * 12, "b" * 12))
            else:
                assert stranger.refused.wait(10), f"{what} was let in"
            watcher.publish(topics.ctl("marker"))
            watcher.wait_for(topics.ctl("marker"))
            assert not [t for t, _ in stranger.messages], f"{what} read the cluster"
        finally:
            stranger.close()
    assert [t for t, _ in watcher.messages] == [topics.ctl("marker")] * len(strangers), watcher.messages


def test_a_members_login_writes_only_as_itself(keyed):
    topics = Topics(keyed.cluster)
    me, other, last = "a1" * 6, "b2" * 6, "c3" * 6
    coordinator = new_id()
    logins = {u: member(keyed, u, "node") for u in (me, other, last)}
    watch_login = member(keyed, coordinator, "coord")
    node = Client(keyed, logins[me])
    watcher = Client(keyed, watch_login, subscribe=f"{topics.root}/#")
    assert node.ready.wait(10) and watcher.ready.wait(10)
    try:
        denied = [topics.node_inbox(other, other),          # frames as another node
                  topics.coord_out(coordinator, last),       # tokens as the plan's last node
                  topics.plan,                               # a plan
                  topics.coord_info(me),                     # a leader's claim, under its own name
                  topics.coord_info(coordinator),            # or the coordinator's
                  topics.ctl("free"),                        # a command
                  topics.node_info(other)]                   # another node's info
        for topic in denied:
            node.publish(topic, b'{"online": true, "started": 0}', retain=True)
        allowed = [topics.node_inbox(other, me), topics.coord_out(coordinator, me), topics.node_status(me)]
        for topic in allowed:
            node.publish(topic)
        watcher.wait_for(topics.node_status(me))
        arrived = {t for t, _ in watcher.messages}
        assert set(allowed) <= arrived
        assert not arrived & set(denied), arrived & set(denied)
    finally:
        node.close()
        watcher.close()
