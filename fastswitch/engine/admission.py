"""Admission control past capacity: a request that cannot start in time is refused at once (HTTP 429
with `Retry-After`) instead of waiting toward a client's timeout.

Each sheddable level has a bound, in its TTFT targets: a request of that level that has no first
token yet is shed when it has waited past `arrival + bound x target`, or when the engine predicts it
cannot start by then. The prediction is the queue ahead of it (requests ranked before it that have
not started) over the rate at which the engine starts requests while some are left waiting, measured
over the last WINDOW_S seconds of such backlog. Under capacity there is no lasting backlog, hence no
prediction, and nothing is shed that has not already waited past its bound. The lowest level goes
first: when a request is shed, so is every request of a worse level still waiting to start behind it
(under `slo` it would start later still, past its own target). Streams that have begun are never shed.

The bounds are written `level=bound,...` (`fastswitch/slo.py`'s `parse_shed_bounds`): `2=2` sheds
levels 2 and worse (a level takes the bound of the nearest level given above it) after 2 targets, and
never levels 0 and 1.
"""

import bisect
import math
from collections import deque

from fastswitch.request import Request, Status
from fastswitch.slo import SLO

WINDOW_S = 10.0  # backlog the start rate is measured over
MIN_EVIDENCE_S = 1.0  # backlog needed before the rate is trusted
MAX_RETRY_AFTER_S = 60


class Admission:
    def __init__(self, slo: SLO, bounds: dict[int, float]):
        self.slo = slo
        self.levels, self.bounds = sorted(bounds), [bounds[level] for level in sorted(bounds)]
        self.backlog: deque[tuple[float, float, int]] = deque()  # (time, seconds of backlog, requests started)
        self.backlog_s, self.started = 0.0, 0  # their sums, over the window
        self.last_time: float | None = None
        self.was_backlogged = False

    def bound_s(self, priority: int) -> float | None:
        """How long a request of this level may wait for its start, or None if it is never shed."""
        i = bisect.bisect_right(self.levels, priority) - 1
        return None if i < 0 else self.bounds[i] * self.slo.ttft(priority)

    def start_rate(self) -> float | None:
        """Requests started per second of backlog, once there is enough backlog to tell."""
        if self.backlog_s < MIN_EVIDENCE_S or not self.started:
            return None
        return self.started / self.backlog_s

    def shed(self, ranked: list[Request], now: float) -> list[tuple[Request, float]]:
        """The requests to refuse now, each with the seconds after which a retry may find room."""
        rate, ahead, refused, shed_from = self.start_rate(), 0, [], None
        for request in ranked:
            if request.status == Status.RUNNING or request.first_token_time is not None:
                continue
            bound = self.bound_s(request.priority)
            wait = (ahead + 1) / rate if rate else 0.0  # until it could start
            worse = shed_from is not None and request.priority > shed_from  # the lowest level goes first
            if bound is not None and (worse or now + wait > request.metrics.arrival_time + bound):
                refused.append((request, float(min(MAX_RETRY_AFTER_S, max(1, math.ceil(wait))))))
                shed_from = request.priority if shed_from is None else min(shed_from, request.priority)
            else:
                ahead += 1
        return refused

    def observe(self, now: float, started: int, backlogged: bool) -> None:
        """After an iteration's plan: how many requests it started, and whether any is left waiting."""
        if self.last_time is not None and self.was_backlogged:
            self.backlog.append((now, now - self.last_time, started))
            self.backlog_s, self.started = self.backlog_s + now - self.last_time, self.started + started
        while self.backlog and self.backlog[0][0] < now - WINDOW_S:
            _, seconds, starts = self.backlog.popleft()
            self.backlog_s, self.started = self.backlog_s - seconds, self.started - starts
        self.last_time, self.was_backlogged = now, backlogged
