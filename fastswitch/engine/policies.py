"""Ranking policies: who is served first. Each gives every request a sort key; lower keys run first.

- `fcfs`: arrival order.
- `priority`: the request's integer priority, lower first (vLLM's convention), ties by arrival; with
  aging, a request rises one level per `aging_s` seconds since its arrival (see PriorityPolicy).
- `vtc`: per-user fair share with virtual token counters (Sheng et al., OSDI'24): a user's counter
  grows by `input_weight` per prompt token computed and `output_weight` per token generated, divided
  by the user's weight; a user who becomes active again is lifted to the smallest counter among
  active users; the user with the smallest counter goes first. Unlike the original (admission only),
  it may preempt, but only a user behind by more than VTC_PREEMPT_MARGIN. Inside a user's share, the
  request's priority orders (and may preempt) that user's own requests.
- `trace`: FastSwitch's evaluation: each request's priority is re-drawn every iteration with
  probability `update_freq`, from a seeded generator: `random` draws a new level uniformly, `markov`
  moves one level up or down.
"""

import random
from collections import defaultdict

from fastswitch.request import Request

POLICIES = ("fcfs", "priority", "vtc", "trace")
VTC_PREEMPT_MARGIN = 64.0  # service units (32 output tokens at weight 2) a user must be behind to preempt
TRACE_PATTERNS = ("random", "markov")


class Policy:
    name = "fcfs"

    def key(self, request: Request) -> tuple:
        return (request.metrics.arrival_time, request.seq)

    def on_arrival(self, request: Request, active: list[Request]) -> None:
        """A new request joins; `active` are the unfinished requests already there."""

    def on_served(self, request: Request, prompt_tokens: int, output_tokens: int) -> None:
        """The request had prompt tokens computed and/or generated tokens this iteration."""

    def on_iteration(self, requests: list[Request]) -> None:
        """Called once per scheduling iteration, before ranking."""

    def preempts(self, request: Request, victim: Request) -> bool:
        """Whether `request`, ranked above `victim`, may take its place."""
        return True


class PriorityPolicy(Policy):
    """Lower `priority` first, ties by arrival. With `aging_s` > 0 a request rises one level for every
    `aging_s` seconds since it arrived, continuously: it ranks as a request of priority 0 arriving
    `priority * aging_s` seconds after it did. That rank never changes while it waits, runs or is
    paused, so aging cannot make two requests displace each other back and forth. A request of
    priority p arriving at t is outranked, for a seat or for memory, only by requests that arrived
    before t + (p - p_min) * aging_s, where p_min is the best priority clients send: its wait is
    bounded by the time to serve those, a finite set however long an overload of better levels lasts."""

    name = "priority"

    def __init__(self, aging_s: float = 0.0):
        if not aging_s >= 0:
            raise ValueError(f"invalid priority_aging={aging_s!r}: seconds, >= 0 (0: strict priority)")
        self.aging_s = aging_s

    def key(self, request: Request) -> tuple:
        arrival = request.metrics.arrival_time
        if self.aging_s:
            return (arrival + request.priority * self.aging_s, arrival, request.seq)
        return (request.priority, arrival, request.seq)


class VTCPolicy(Policy):
    name = "vtc"

    def __init__(self, input_weight: float = 1.0, output_weight: float = 2.0, user_weights: dict[str, float] | None = None):
        self.input_weight, self.output_weight = input_weight, output_weight
        self.user_weights = user_weights or {}
        self.counters: dict[str, float] = defaultdict(float)

    def key(self, request: Request) -> tuple:
        """The user's share first; inside it, the request's priority (lower first), then arrival."""
        return (self.counters[request.user], request.priority, request.metrics.arrival_time, request.seq)

    def on_arrival(self, request: Request, active: list[Request]) -> None:
        active_users = {r.user for r in active}
        if request.user not in active_users and active_users:
            floor = min(self.counters[u] for u in active_users)
            self.counters[request.user] = max(self.counters[request.user], floor)

    def on_served(self, request: Request, prompt_tokens: int, output_tokens: int) -> None:
        cost = self.input_weight * prompt_tokens + self.output_weight * output_tokens
        self.counters[request.user] += cost / self.user_weights.get(request.user, 1.0)

    def preempts(self, request: Request, victim: Request) -> bool:
        """Only a user clearly behind takes another's place: counters move with every token served, and
        preempting over a few tokens' difference would swap requests back and forth every iteration.
        Inside one user's share, a better priority takes the place of a worse one."""
        if request.user == victim.user:
            return request.priority < victim.priority
        return self.counters[victim.user] - self.counters[request.user] > VTC_PREEMPT_MARGIN


class TracePolicy(PriorityPolicy):
    name = "trace"

    def __init__(self, pattern: str = "random", update_freq: float = 0.04, levels: int = 4, seed: int = 0):
        if pattern not in TRACE_PATTERNS:
            raise ValueError(f"invalid trace_pattern {pattern!r}; choose from {', '.join(TRACE_PATTERNS)}")
        if not 0 <= update_freq <= 1:
            raise ValueError(f"invalid trace_update_freq={update_freq!r}: a probability per iteration, in [0, 1]")
        super().__init__()
        self.pattern, self.update_freq, self.levels = pattern, update_freq, levels
        self.rng = random.Random(seed)
        self.changes: list[tuple[int, str, int]] = []  # (iteration, request id, new priority)
        self.iteration = 0

    def on_arrival(self, request: Request, active: list[Request]) -> None:
        request.priority = self.rng.randrange(self.levels)

    def on_iteration(self, requests: list[Request]) -> None:
        self.iteration += 1
        for request in sorted(requests, key=lambda r: r.seq):
            if self.rng.random() >= self.update_freq:
                continue
            if self.pattern == "random":
                request.priority = self.rng.randrange(self.levels)
            else:
                request.priority = min(self.levels - 1, max(0, request.priority + self.rng.choice((-1, 1))))
            self.changes.append((self.iteration, request.request_id, request.priority))


def make_policy(name: str, seed: int = 0, trace_pattern: str = "random", trace_update_freq: float = 0.04,
                trace_levels: int = 4, vtc_input_weight: float = 1.0, vtc_output_weight: float = 2.0,
                vtc_user_weights: dict[str, float] | None = None, priority_aging: float = 0.0) -> Policy:
    if name == "fcfs":
        return Policy()
    if name == "priority":
        return PriorityPolicy(priority_aging)
    if name == "vtc":
        return VTCPolicy(vtc_input_weight, vtc_output_weight, vtc_user_weights)
    if name == "trace":
        return TracePolicy(trace_pattern, trace_update_freq, trace_levels, seed)
    raise ValueError(f"invalid policy {name!r}; choose from {', '.join(POLICIES)}")
