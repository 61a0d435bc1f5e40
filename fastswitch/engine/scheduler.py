"""Continuous batching with preemption: every iteration picks which requests run, and how many tokens.

A request's next chunk is simply its tokens without KV yet, capped by the iteration's token budget:
the whole prompt (or a chunk of it) at first, one token per decode after, the prompt plus what it had
generated after a recomputation. Each iteration:

1. running requests get their chunks, decodes before prefill chunks so a long prompt never stalls
   them; a request whose KV is still being copied in waits. When a request needs a block and none
   is free, the most recently admitted request not yet scheduled this iteration is preempted:
   by swap (its KV goes to the host; it is paused) or by recomputation (its KV is dropped);
2. paused requests resume, oldest first, while they fit (their KV is copied back asynchronously);
3. new requests are admitted in arrival order, once nobody is paused, starting after whatever
   prefix of theirs is cached.

Nothing is resumed or admitted in an iteration that had to preempt. The ranking policy plugs in here.
"""

import logging
from collections import deque
from dataclasses import dataclass

from fastswitch.engine.request import Request, Status
from fastswitch.kv.manager import KVManager

log = logging.getLogger(__name__)

PREEMPTION_MODES = ("swap", "recompute")


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Request, int]]  # (request, tokens to compute this iteration)
    preempted: list[Request]


class Scheduler:
    def __init__(self, kv: KVManager, max_num_seqs: int, max_num_batched_tokens: int,
                 preemption_mode: str = "recompute"):
        if preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"invalid preemption_mode {preemption_mode!r}; choose from {', '.join(PREEMPTION_MODES)}")
        self.kv, self.preemption_mode = kv, preemption_mode
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.swapped: list[Request] = []  # paused, oldest arrival first

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def schedule(self) -> SchedulerOutput:
        self.kv.poll()
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Request, int]] = []
        preempted: list[Request] = []
        taken: set[int] = set()  # ids of the requests scheduled so far: not to be preempted for room
        for request in sorted(self.running, key=lambda r: r.num_tokens - r.num_computed_tokens > 1):
            if budget == 0:
                break
            if request.status != Status.RUNNING or not self.kv.ready(request):
                continue
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            if self._make_room(request, n, taken, preempted):
                self.kv.grow(request, n)
                scheduled.append((request, n))
                taken.add(id(request))
                budget -= n
        while self.swapped and not preempted and len(self.running) < self.max_num_seqs:
            if not self.kv.swap_in(self.swapped[0]):
                break
            request = self.swapped.pop(0)
            request.status = Status.RUNNING
            self.running.append(request)
        while self.waiting and not preempted and not self.swapped and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            n = self.kv.admit(request, budget)  # reuses its cached prefix, if any
            if n is None:
                break
            self.waiting.popleft()
            request.status = Status.RUNNING
            self.running.append(request)
            if n:  # 0 while its prefix is still being copied in from the host
                scheduled.append((request, n))
                budget -= n
        return SchedulerOutput(scheduled, preempted)

    def preempt(self, request: Request, mode: str | None = None) -> None:
        """Pause a running request: by swap (falling back to recomputation if the host is full) or recompute."""
        self.running.remove(request)
        request.metrics.num_preemptions += 1
        if (mode or self.preemption_mode) == "swap":
            if self.kv.swap_out(request):
                request.status = Status.SWAPPED
                self.swapped.append(request)
                self.swapped.sort(key=lambda r: r.metrics.arrival_time)
                return
            self.kv.stats.recompute_fallbacks += 1
            log.warning("host KV tier full: %s preempted by recomputation instead of swap", request.request_id)
        self.kv.release(request)
        request.num_computed_tokens = 0
        request.status = Status.WAITING
        self.waiting.appendleft(request)

    def finish(self, request: Request) -> None:
        """Remove a finished or aborted request and return its blocks."""
        if request.status == Status.RUNNING:
            self.running.remove(request)
        elif request.status == Status.SWAPPED:
            self.swapped.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv.release(request)
        request.status = Status.FINISHED

    def _make_room(self, request: Request, n: int, taken: set[int], preempted: list[Request]) -> bool:
        """Preempt until `request` can grow by n tokens; False if it had to be preempted itself."""
        while not self.kv.can_grow(request, n):
            victim = next(r for r in reversed(self.running) if id(r) not in taken)
            self.preempt(victim)
            preempted.append(victim)
            if victim is request:
                return False
        return True
