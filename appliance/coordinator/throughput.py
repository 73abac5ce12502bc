"""What the panel's live view draws: the cluster's tokens per second over the last minutes, and
the recent time of a decode step's round trip and of one hop in it.

The step and hop are means, not medians: replies can reach the coordinator bunched (a reply held
up, the next right behind it), which makes single round trips read near 0 and twice as long by
turns. Their sum is still the time from the first reply to the last, so the mean is the step."""
from __future__ import annotations

import collections
import statistics
import threading
import time

BUCKET_S = 5          # one point of the chart
WINDOW_S = 600        # the chart's width: the last 10 minutes
RECENT_STEPS = 200    # the step and hop times the means are taken over


class Throughput:
    def __init__(self):
        self.lock = threading.Lock()
        self.buckets: collections.deque[list] = collections.deque(maxlen=WINDOW_S // BUCKET_S)   # [start, tokens]
        self.steps: collections.deque[float] = collections.deque(maxlen=RECENT_STEPS)
        self.hops: collections.deque[float] = collections.deque(maxlen=RECENT_STEPS)

    def token(self, now: float | None = None) -> None:
        start = _bucket(time.time() if now is None else now)
        with self.lock:
            if not self.buckets or self.buckets[-1][0] != start:
                self.buckets.append([start, 0])
            self.buckets[-1][1] += 1

    def step(self, round_trip: float, hop: float) -> None:
        """A decode step's round trip, and its time outside the engines per link: below 0 for a
        reply that came bunched behind the one before, which the next step's hop makes up."""
        with self.lock:
            self.steps.append(round_trip)
            self.hops.append(hop)

    def snapshot(self, now: float | None = None) -> dict:
        """`series`: tokens/s in each BUCKET_S of the last WINDOW_S, oldest first, the current
        bucket's rate over the part of it that has passed."""
        now = time.time() if now is None else now
        current = _bucket(now)
        with self.lock:
            counts = {start: tokens for start, tokens in self.buckets}
            steps, hops = list(self.steps), list(self.hops)
        starts = [current - BUCKET_S * i for i in range(WINDOW_S // BUCKET_S - 1, -1, -1)]
        series = [round(counts.get(s, 0) / (BUCKET_S if s != current else max(1.0, now - s)), 2) for s in starts]
        return {"bucket_s": BUCKET_S, "end": current + BUCKET_S, "series": series,
                "tokens_per_s": series[-2] if counts.get(current) is None else series[-1],
                "step_s": statistics.fmean(steps) if steps else None,
                "hop_s": max(0.0, statistics.fmean(hops)) if hops else None}


def _bucket(t: float) -> int:
    return int(t // BUCKET_S * BUCKET_S)
