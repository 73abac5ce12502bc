"""The hijack attempts of issue 14, run on a lab host against a keyed cluster's broker. Prints one
JSON line saying what the broker let through.

    python -m tests.lab_intruder BROKER CLUSTER KEY NODE LAST_NODE SECONDS

- a client without the key, and one with another cluster's key: refused (so they read no prompt);
- NODE's own login (a member, but not the plan's last node) reads the cluster's replies and, for
  SECONDS, answers each with a token of its own, once as itself and once as LAST_NODE; and it
  publishes, retained, a leader's claim that started at 0 and a plan of its own.
"""
import json
import sys
import threading
import time

import paho.mqtt.client as mqtt

from appliance import cluster_key
from appliance.bus.protocol import Topics
from appliance.config import Config


def connect(address: str, login) -> tuple[mqtt.Client, bool]:
    answered, accepted = threading.Event(), []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    if login:
        client.username_pw_set(*login)

    def on_connect(c, userdata, flags, reason_code, properties=None):
        accepted.append(not reason_code.is_failure)
        answered.set()
    client.on_connect = on_connect
    host, port = address.rsplit(":", 1)
    client.connect(host, int(port))
    client.loop_start()
    answered.wait(10)
    return client, bool(accepted and accepted[0])


def main(broker: str, cluster: str, key: str, node: str, last: str, seconds: float) -> None:
    config = Config(cluster=cluster, cluster_key=key)
    topics = Topics(cluster)
    result = {}
    for what, login in {"anonymous": None, "other_key": cluster_key.login(
            Config(cluster=cluster, cluster_key=cluster_key.new_key()), node)}.items():
        client, accepted = connect(broker, login)
        result[f"{what}_accepted"] = accepted
        client.loop_stop()
    client, accepted = connect(broker, cluster_key.login(config, node))
    result["node_accepted"] = accepted
    injected = []

    def on_reply(c, userdata, message):
        reply = json.loads(message.payload)
        if "token" not in reply or message.topic.endswith(f"/{node}"):
            return
        coordinator = topics.coord_id_of(message.topic)
        fake = {**reply, "step": reply["step"] + 1, "token": 0, "logprob": 0.0, "top": []}
        for sender in (node, last):
            c.publish(topics.coord_out(coordinator, sender), json.dumps(fake))
        injected.append(reply["request_id"])
    client.message_callback_add(topics.coord_out("+", "+"), on_reply)
    client.subscribe(topics.coord_out("+", "+"))
    fake_leader = "f" * 32
    client.publish(topics.coord_info(fake_leader), json.dumps({"id": fake_leader, "online": True, "started": 0}),
                   qos=1, retain=True).wait_for_publish(5)
    client.publish(topics.plan, json.dumps({"plan_id": 2**32 - 1, "model": "x", "num_layers": 1, "coordinator": fake_leader,
                   "shards": [{"node": node, "start": 0, "end": 1}]}), qos=1, retain=True).wait_for_publish(5)
    print(json.dumps({"ready": True}), flush=True)
    time.sleep(seconds)   # the attack lasts this long
    result["replies_answered_with_fakes"] = len(injected)
    client.loop_stop()
    print(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:6], float(sys.argv[6]))
