"""Finding the cluster's broker on the LAN: DNS-SD (multicast DNS) with python-zeroconf.

A machine that runs a cluster's broker advertises it as `_exo-mqtt._tcp`: its addresses and port,
the cluster's name and hash (cluster_key.cluster_hash: a stranger learns nothing else) and when
that broker started (`since`). Every process that was given no broker address browses for
adverts of its own cluster's hash and keeps its bus on the best one it can reach (`Follower`):
the oldest, so that of two brokers that find each other (two machines started at once, a
network split healed) every client ends on the same one, and the younger one's host retires it
(keeper.py). An advert whose host vanished without a goodbye stays in the cache until its TTL
runs out; it is passed over because nothing answers at its address.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from dataclasses import dataclass

import ifaddr
from zeroconf import IPVersion, ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

from appliance.cluster_key import cluster_hash
from appliance.config import Config, parse_address

log = logging.getLogger(__name__)

SERVICE = "_exo-mqtt._tcp.local."
FOLLOW_S = 1.0           # how often a follower checks it is on the best broker
REACH_TIMEOUT_S = 1.0    # an advert whose address does not take a TCP connection this fast is passed over


@dataclass(frozen=True)
class Advert:
    name: str
    cluster: str
    hash: str
    addresses: tuple[str, ...]
    port: int
    since: float          # when the broker started: the oldest of a cluster's brokers wins

    @property
    def address(self) -> str:
        return f"{self.addresses[0]}:{self.port}"

    @property
    def rank(self) -> tuple[float, str]:
        return self.since, self.name

    def reachable(self) -> bool:
        return answers(self.address)

    @classmethod
    def from_info(cls, info: ServiceInfo) -> "Advert | None":
        props = {k.decode(): (v or b"").decode() for k, v in info.properties.items()}
        addresses = tuple(info.parsed_addresses(IPVersion.V4Only))
        if not addresses or not info.port or "hash" not in props:
            return None
        return cls(info.name, props.get("cluster", ""), props["hash"], addresses, info.port,
                   float(props.get("since") or 0))


def check_every_second(stopping: threading.Event, check, who: str) -> None:
    """Run `check` every FOLLOW_S until `stopping` is set; a check that fails is logged, and the
    next one comes all the same."""
    while not stopping.wait(FOLLOW_S):
        try:
            check()
        except Exception:
            log.exception("%s: could not check the broker", who)


def answers(address: str) -> bool:
    """Whether something takes a TCP connection at HOST:PORT. A broker whose host vanished is
    found out this way within a second, long before MQTT's keepalive gives up on it."""
    host, port = parse_address(address)
    try:
        socket.create_connection((host, port), timeout=REACH_TIMEOUT_S).close()
        return True
    except OSError:
        return False


def avahi_service(config: Config, port: int) -> str:
    """The same advert as an avahi service file, for a mosquitto that exo does not run (a broker
    card of the image). `since` 0: a broker set up to stay outranks any that `exo` starts."""
    txt = "".join(f"    <txt-record>{k}={v}</txt-record>\n"
                  for k, v in {"cluster": config.cluster, "hash": cluster_hash(config), "since": 0}.items())
    return ("<?xml version=\"1.0\" standalone='no'?>\n<!DOCTYPE service-group SYSTEM \"avahi-service.dtd\">\n"
            f"<service-group>\n  <name replace-wildcards=\"yes\">exo-{config.cluster} on %h</name>\n  <service>\n"
            f"    <type>{SERVICE.removesuffix('.local.')}</type>\n    <port>{port}</port>\n{txt}"
            "  </service>\n</service-group>\n")


def lan_addresses() -> list[str]:
    """This machine's IPv4 addresses other than loopback."""
    return [ip.ip for adapter in ifaddr.get_adapters() for ip in adapter.ips
            if isinstance(ip.ip, str) and not ip.ip.startswith("127.")]


class Discovery:
    """Browse for our cluster's broker adverts, and advertise ours."""

    def __init__(self, config: Config):
        self.config = config
        self.hash = cluster_hash(config)
        self.adverts: dict[str, Advert] = {}
        self.changed = threading.Condition()
        self.mine: ServiceInfo | None = None
        self.zeroconf: Zeroconf | None = None

    def start(self) -> "Discovery":
        self.zeroconf = Zeroconf(ip_version=IPVersion.V4Only)
        self.browser = ServiceBrowser(self.zeroconf, SERVICE, handlers=[self.on_change])
        return self

    def on_change(self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        advert = None
        if state_change is not ServiceStateChange.Removed:
            info = zeroconf.get_service_info(service_type, name, timeout=2000)
            advert = info and Advert.from_info(info)
        with self.changed:
            if advert and advert.hash == self.hash:
                if self.adverts.get(name) != advert:
                    log.info("discovery: broker %s of cluster %s at %s", name, advert.cluster, advert.address)
                self.adverts[name] = advert
            else:
                self.adverts.pop(name, None)
            self.changed.notify_all()

    def best(self, exclude: str = "") -> Advert | None:
        """The oldest advertised broker of our cluster that answers (not `exclude`, an address)."""
        with self.changed:
            adverts = sorted(self.adverts.values(), key=lambda a: a.rank)
        return next((a for a in adverts if a.address != exclude and a.reachable()), None)

    def advert_at(self, address: str) -> Advert | None:
        with self.changed:
            return next((a for a in self.adverts.values() if a.address == address), None)

    def wait_for_broker(self, timeout: float | None) -> Advert | None:
        """The best broker, waiting up to `timeout` seconds (None: for ever) for one to be advertised."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            advert = self.best()
            left = None if deadline is None else deadline - time.monotonic()
            if advert or (left is not None and left <= 0):
                return advert
            with self.changed:
                self.changed.wait(FOLLOW_S if left is None else min(left, FOLLOW_S))

    def advertise(self, port: int, since: float) -> Advert:
        """Tell the LAN that this machine runs our cluster's broker on `port`."""
        tag = uuid.uuid4().hex[:8]
        addresses = lan_addresses()
        self.mine = ServiceInfo(SERVICE, f"exo-{self.config.cluster}-{tag}.{SERVICE}",
                                addresses=[socket.inet_aton(a) for a in addresses], port=port,
                                properties={"cluster": self.config.cluster, "hash": self.hash, "since": repr(since)},
                                server=f"exo-{tag}.local.")
        self.zeroconf.register_service(self.mine)
        log.info("discovery: advertising the broker of cluster %s at %s:%d", self.config.cluster, addresses[0], port)
        return Advert(self.mine.name, self.config.cluster, self.hash, tuple(addresses), port, since)

    def withdraw(self) -> None:
        if self.mine:
            self.zeroconf.unregister_service(self.mine)
            self.mine = None

    def stop(self) -> None:
        if self.zeroconf:
            self.withdraw()
            self.zeroconf.close()


class Follower:
    """Keeps a bus on the best advertised broker: moves it when its broker is gone and another is
    advertised, or when an older broker of the cluster shows up (two brokers merge into one)."""

    def __init__(self, bus, discovery: Discovery):
        self.bus, self.discovery = bus, discovery
        self.stopping = threading.Event()

    def start(self) -> "Follower":
        threading.Thread(target=self.run, name="follow-broker", daemon=True).start()
        return self

    def run(self) -> None:
        check_every_second(self.stopping, self.check, "discovery")

    def check(self) -> None:
        current = self.bus.address
        here = self.discovery.advert_at(current)
        settled = self.bus.connected.is_set() and here is not None and answers(current)
        if settled:
            with self.discovery.changed:
                if not any(a.rank < here.rank for a in self.discovery.adverts.values()):
                    return   # on the oldest broker there is, and it is there
        best = self.discovery.best()   # the oldest that answers: if ours still does, one older than ours
        log.debug("discovery: on %s (settled %s), best %s", current, settled, best and best.address)
        if best is not None and best.address != current:
            log.info("discovery: moving from the broker at %s to %s", current, best.address)
            self.bus.move_to(best.address)

    def stop(self) -> None:
        self.stopping.set()
