"""A thin wrapper over paho-mqtt 2.x: connect, subscribe a handler per topic filter, publish.

Handlers run on paho's network thread, so they must be quick (hand heavy work to a queue).
A handler that raises is logged and the message dropped: bad input never takes a process down.

A process's presence is a session, not a connection: whatever it announces (a node's info, a
coordinator's claim, the leader's plan) is registered with `on_connect` and published again on
every (re)connect. A broker that restarts has sent our Last Will and, without persistence,
forgotten every retained message; the hooks put them back.

A member of a keyed cluster logs in as itself (`user`: its node or coordinator id) with a
password derived from the cluster key. A broker of ours knows no member at first: before
connecting, and whenever the broker refuses the login (a new broker after the old one's host
left), the bus asks to join on `join/<role>/<user>` with the joiner login, and tries again.

Frames are QoS 0: a publish while disconnected is lost. `publish` says so (it returns False) and
`on_disconnect` hooks hear of a lost connection at once, so a caller can resume instead of waiting.
"""
from __future__ import annotations

import json
import logging
import socket
import threading
from typing import Callable

import paho.mqtt.client as mqtt

from appliance import cluster_key
from appliance.bus.protocol import Topics
from appliance.config import Config, parse_address

log = logging.getLogger(__name__)
Handler = Callable[[str, bytes], None]


class Bus:
    def __init__(self, config: Config, client_id: str, will: tuple[str, bytes] | None = None,
                 user: str = "", role: str = "node"):
        self.config = config
        self.topics = Topics(config.cluster)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv311)
        self.client.enable_logger(logging.getLogger("paho"))
        self.login = cluster_key.login(config, user)
        # a login of our own derived from the key: the broker must be asked to let it in
        self.joins_as = (role, user) if user and config.cluster_key and not config.broker_username else None
        if self.login:
            self.client.username_pw_set(self.login[0], self.login[1] or None)
        if config.broker_tls:
            self.client.tls_set(ca_certs=config.broker_ca_file or None)
        if will:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)   # back within seconds of the broker
        self.subscriptions: dict[str, int] = {}
        self.handlers: dict[str, list[Handler]] = {}
        self.connect_hooks: list[Callable[[], None]] = []
        self.disconnect_hooks: list[Callable[[], None]] = []
        self.connected = threading.Event()
        self.listening = threading.Event()   # connected, and the broker has taken every subscription
        self.unacknowledged: set[int] = set()   # the subscriptions sent on connect that the broker has not taken yet
        self.patient = False
        self.address = config.broker      # the broker this bus is on (HOST:PORT); move_to changes it
        self.moving = threading.Lock()    # one move at a time
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_socket_open = _no_delay

    def _on_connect(self, client, userdata, flags, reason_code, properties=None):
        if reason_code.is_failure:
            if self.joins_as:   # a broker of ours that does not know our login yet (a new one)
                log.info("the broker does not know our login yet (%s): asking to join", reason_code)
                threading.Thread(target=self.ask_to_join, name="join", daemon=True).start()
            else:
                log.error("broker refused the connection: %s", reason_code)
            return
        # subscriptions do not survive a reconnect; their acknowledgements come on this same thread, after this
        self.unacknowledged = {client.subscribe(topic, qos)[1] for topic, qos in self.subscriptions.items()}
        if not self.unacknowledged:
            self.listening.set()
        self.connected.set()
        run_hooks(self.connect_hooks, "on-connect")

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties=None):
        self.unacknowledged.discard(mid)
        if not self.unacknowledged:
            self.listening.set()

    def _on_disconnect(self, *_):
        self.connected.clear()
        self.listening.clear()
        run_hooks(self.disconnect_hooks, "on-disconnect")

    def on_disconnect(self, hook: Callable[[], None]) -> None:
        """Run `hook` whenever the connection to the broker is lost."""
        self.disconnect_hooks.append(hook)

    def on_connect(self, hook: Callable[[], None]) -> None:
        """Run `hook` (an announcement) now if connected, and again after every reconnect."""
        self.connect_hooks.append(hook)
        if self.connected.is_set():
            hook()

    def on(self, topic_filter: str, handler: Handler, qos: int = 0) -> None:
        """Call `handler` for each message on `topic_filter`; several handlers may share a filter."""
        handlers = self.handlers.setdefault(topic_filter, [])
        handlers.append(handler)
        if len(handlers) == 1:   # paho keeps one callback per filter: this one calls them all
            def dispatch_all(client, userdata, message):
                for h in list(handlers):
                    _dispatch(h, message)
            self.client.message_callback_add(topic_filter, dispatch_all)
        self.subscriptions[topic_filter] = max(qos, self.subscriptions.get(topic_filter, 0))
        if self.connected.is_set():
            self.client.subscribe(topic_filter, self.subscriptions[topic_filter])

    def publish(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False) -> bool:
        """Hand a message to the connection; False when there is none (a QoS 0 message is then lost)."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        return info.rc == mqtt.MQTT_ERR_SUCCESS and self.connected.is_set()

    def publish_json(self, topic: str, data: dict, qos: int = 0, retain: bool = False) -> bool:
        return self.publish(topic, json.dumps(data, separators=(",", ":")), qos=qos, retain=retain)

    def ask_to_join(self) -> bool:
        """Ask the broker, with the joiner login, to let our own login in. True once it took the request."""
        role, user = self.joins_as
        host, port = parse_address(self.address)
        joiner = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        joiner.username_pw_set(cluster_key.JOINER, cluster_key.password(self.config, cluster_key.JOINER))
        accepted = threading.Event()
        joiner.on_connect = lambda client, userdata, flags, reason_code, properties=None: (
            None if reason_code.is_failure else accepted.set())
        try:
            joiner.connect(host, port, keepalive=5)
            joiner.loop_start()
            if not accepted.wait(5):
                raise RuntimeError("the joiner login was refused")
            sent = joiner.publish(self.topics.join(role, user), b"", qos=1)
            sent.wait_for_publish(5)
            return sent.is_published()
        except (OSError, RuntimeError, ValueError) as e:
            log.warning("could not ask the broker at %s:%d to let us in: %s", host, port, e)
            return False
        finally:
            joiner.disconnect()
            joiner.loop_stop()

    def start(self, timeout: float = 10.0) -> "Bus":
        """Connect, waiting up to `timeout` for the broker to accept us and take our subscriptions
        (a message published after this returns reaches our handlers); a `patient` bus (one that
        follows discovery, which may move it) does not wait and keeps trying in the background."""
        self.address = self.config.broker
        host, port = parse_address(self.address)
        if self.patient:
            self.client.connect_async(host, port, keepalive=5)
            self.client.loop_start()
            return self
        try:
            if self.joins_as:
                self.ask_to_join()
            self.client.connect(host, port, keepalive=5)
        except OSError as e:
            raise ConnectionError(f"cannot reach the MQTT broker at {host}:{port}: {e}") from e
        self.client.loop_start()
        if not self.listening.wait(timeout):
            self.stop()
            raise ConnectionError(f"the MQTT broker at {host}:{port} did not accept us within {timeout:.0f} s")
        return self

    def move_to(self, address: str) -> None:
        """Leave this broker for the one at `address` (discovery found a better one): the on-disconnect
        hooks run (requests in flight resume), and the on-connect hooks announce us there."""
        with self.moving:
            if self.connected.is_set():
                self.client.disconnect()
            self.client.loop_stop()
            self.address = self.config.broker = address   # the config too: what the panel shows
            host, port = parse_address(address)
            if self.joins_as:
                self.ask_to_join()
            self.client.connect_async(host, port, keepalive=5)
            self.client.loop_start()

    def stop(self) -> None:
        # paho 2.2's network thread may run one more loop on the closed socket and log it as an
        # error; a disconnect we asked for is not one.
        self.client.disable_logger()
        self.client.disconnect()
        self.client.loop_stop()


def _dispatch(handler: Handler, message) -> None:
    try:
        handler(message.topic, message.payload)
    except (ValueError, KeyError, TypeError) as e:   # a malformed payload: one line, not a traceback
        log.warning("dropped a message on %s (%d bytes): %s: %s", message.topic, len(message.payload),
                    type(e).__name__, e)
    except Exception:
        log.exception("dropped a message on %s (%d bytes)", message.topic, len(message.payload))


def _no_delay(client, userdata, sock) -> None:
    """Send each message at once. paho leaves Nagle's algorithm on, which holds a message back while
    the one before is unacknowledged, and the broker delays its ACK of a QoS 0 publish (up to 40 ms
    on Linux): a last stage's reply, sent right after its next step's frame, waited for that."""
    if getattr(sock, "family", None) in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def run_hooks(hooks: list[Callable[[], None]], kind: str) -> None:
    for hook in hooks:
        try:
            hook()
        except Exception:
            log.exception("an %s hook failed", kind)
