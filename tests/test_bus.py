"""The bus wrapper against a real mosquitto."""
from __future__ import annotations

import threading

import paho.mqtt.client as mqtt

from appliance.bus.client import Bus
from appliance.config import Config, parse_address
from tests.system import needs

pytestmark = needs("mosquitto")


def test_a_started_bus_hears_what_is_published_right_after(broker):
    """start() returns once the broker has taken the bus's subscriptions, not only its login: the
    broker's registrar, started this way, must hear a join request sent the moment after."""
    heard = threading.Event()
    bus = Bus(Config(broker=broker, cluster="busstart"), client_id="test-bus-start")
    filters = [f"exo/busstart/t/{i}" for i in range(300)]
    for topic in filters:
        bus.on(topic, lambda topic, payload: heard.set(), qos=1)
    sender = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    sender.connect(*parse_address(broker))
    sender.loop_start()
    try:
        bus.start()
        sender.publish(filters[-1], b"x", qos=1).wait_for_publish(5)
        assert heard.wait(5)
    finally:
        sender.loop_stop()
        sender.disconnect()
        bus.stop()
