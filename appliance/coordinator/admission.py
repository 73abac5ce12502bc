"""Admission: at most as many requests run as the cluster holds at once (the smallest `requests`
capacity of the plan's nodes); more wait their turn in a bounded FIFO queue, and past its bound a
request is refused at once with 429 and a Retry-After, rather than piling work on the nodes."""
from __future__ import annotations

import collections
import contextlib
import threading
from typing import Callable, Iterator

QUEUE_WAIT_S = 60.0     # a request that waited this long for a place is refused
RETRY_AFTER_S = 2


class Busy(RuntimeError):
    """The cluster is full and so is its queue (or a place did not come in time)."""
    status = 429
    retry_after = RETRY_AFTER_S


class Admission:
    def __init__(self, queue_limit: int, capacity: Callable[[], int]):
        self.queue_limit, self.capacity = queue_limit, capacity
        self.running = 0
        self.waiting: collections.deque[object] = collections.deque()
        self.turn = threading.Condition()

    def state(self) -> dict:
        with self.turn:
            return {"running": self.running, "waiting": len(self.waiting),
                    "capacity": self.capacity(), "queue_limit": self.queue_limit}

    @contextlib.contextmanager
    def place(self) -> Iterator[None]:
        """Hold one of the cluster's places for as long as the block runs; wait in line for it."""
        with self.turn:
            if self.waiting or self.running >= self.capacity():
                self._wait_in_line()
            self.running += 1
        try:
            yield
        finally:
            with self.turn:
                self.running -= 1
                self.turn.notify_all()

    def _wait_in_line(self) -> None:
        if len(self.waiting) >= self.queue_limit:
            raise Busy(f"the cluster is full: {self.running} requests running and {len(self.waiting)} waiting")
        ticket = object()
        self.waiting.append(ticket)
        try:
            if not self.turn.wait_for(lambda: self.waiting[0] is ticket and self.running < self.capacity(),
                                      QUEUE_WAIT_S):
                raise Busy(f"no place came free within {QUEUE_WAIT_S:.0f} s")
        finally:
            self.waiting.remove(ticket)
            self.turn.notify_all()
