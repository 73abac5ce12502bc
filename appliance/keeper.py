"""The broker keeper: on each machine that runs plain `exo`, it makes sure the cluster has one broker.

At start it browses a few seconds (DISCOVERY_S) for the cluster's advertised broker; if there is
none it starts the embedded broker on the LAN and advertises it. Then it watches:

- A machine that hosts the broker retires it when an older broker of the cluster is advertised
  (two machines started at once, or a network split healed): its clients, and everyone else's,
  move to the older one, so there are two brokers for a few seconds at most.
- When the broker is lost (our connection to it is down, or its address takes no TCP connection,
  and no other broker is advertised), the
  machines that remain elect a new host without talking: every coordinator's claim says whether
  its machine can host a broker and whether it hosts the one we were on, so each keeper orders
  the same candidates the same way (the coordinators that started first first, the old host's
  left out), and the first waits ELECT_S before it starts one, each next one STAGGER_S more.
  The first one's advert stops the others; if two start anyway, the older wins as above.
"""
from __future__ import annotations

import logging
import threading
import time

from appliance.broker import EmbeddedBroker
from appliance.config import Config
from appliance.discovery import Discovery, answers, check_every_second

log = logging.getLogger(__name__)

DISCOVERY_S = 3.0    # how long `exo` browses for its cluster's broker before it starts one
ELECT_S = 2.0        # how long the first candidate waits for a broker to answer before starting one
STAGGER_S = 5.0      # how much longer each next candidate waits: time for the one before to start and advertise
MQTT_PORT = 1883


class Keeper:
    def __init__(self, config: Config, discovery: Discovery):
        self.config, self.discovery = config, discovery
        self.broker: EmbeddedBroker | None = None
        self.advert = None
        self.cluster = None          # the coordinator's cluster view, once there is one
        self.lost_at: float | None = None
        self.candidates: list[str] = []
        self.stopping = threading.Event()
        self.lock = threading.Lock()

    def find_or_start(self) -> str:
        """At start, the broker to use: the advertised one, else one of our own. Sets config.broker."""
        advert = self.discovery.wait_for_broker(DISCOVERY_S)
        if advert:
            log.info("joining the broker of cluster %s at %s", self.config.cluster, advert.address)
            self.config.broker = advert.address
        else:
            self.start_broker()
        return self.config.broker

    def start_broker(self) -> None:
        """Start and advertise a broker. At start we go on it; later our follower moves us there."""
        with self.lock:
            self.broker = EmbeddedBroker("0.0.0.0", MQTT_PORT, config=self.config).start()
            self.advert = self.discovery.advertise(self.broker.port, time.time())
            if self.cluster is None:
                self.config.broker = self.advert.address
        print(f"exo: this machine runs the broker of cluster {self.config.cluster} on {self.advert.address}", flush=True)
        self.claim()

    def retire_broker(self) -> None:
        with self.lock:
            broker, self.broker, self.advert = self.broker, None, None
            self.discovery.withdraw()
        log.info("an older broker of the cluster is advertised: retiring ours")
        broker.stop()
        self.claim()

    def watch(self, cluster) -> "Keeper":
        """Keep watch, with the coordinator's view of the cluster (whose claims name the candidates)."""
        self.cluster = cluster
        cluster.can_host = True
        self.claim()
        threading.Thread(target=self.run, name="keeper", daemon=True).start()
        return self

    def claim(self) -> None:
        """Our coordinator's claim says whether this machine hosts the broker."""
        if self.cluster:
            self.cluster.hosts_broker = self.broker is not None
            if self.cluster.bus.connected.is_set():
                self.cluster.announce()

    def run(self) -> None:
        check_every_second(self.stopping, self.check, "keeper")

    def check(self) -> None:
        if self.broker:
            best = self.discovery.best()
            if best and best.rank < self.advert.rank:
                self.retire_broker()
            return
        if self.cluster.bus.connected.is_set() and answers(self.cluster.bus.address):
            self.lost_at = None
            self.candidates = self.order_candidates()
            return
        if self.lost_at is None:
            self.lost_at = time.monotonic()
            log.warning("lost the broker at %s: waiting for another, or for our turn to start one", self.cluster.bus.address)
        if self.discovery.best():
            return   # a broker answers (ours, still taking us back, or another): the follower sees to it
        me = self.cluster.coordinator_id
        place = self.candidates.index(me) if me in self.candidates else len(self.candidates)
        if time.monotonic() - self.lost_at >= ELECT_S + STAGGER_S * place:
            log.warning("no broker for %.0f s and this machine is candidate %d: starting one",
                        time.monotonic() - self.lost_at, place + 1)
            self.start_broker()   # the follower moves our bus to it, the only one that answers

    def order_candidates(self) -> list[str]:
        """The coordinators that may host the next broker, in the order they try: the ones that
        started first first, the current broker's host left out."""
        with self.cluster.lock:
            claims = dict(self.cluster.claims)
        ok = [c for c, claim in claims.items() if claim.get("can_host") and not claim.get("hosts_broker")]
        return sorted(ok, key=lambda c: (float(claims[c].get("started", 0)), c))

    def stop(self) -> None:
        self.stopping.set()
        if self.broker:
            self.broker.stop()
        self.discovery.stop()
