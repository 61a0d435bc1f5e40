"""Continuous batching: every iteration picks which requests run and how many tokens each computes.

A request's next chunk is simply its tokens without KV yet, capped by the iteration's token budget:
the whole prompt (or a chunk of it) at first, one token per decode after, the prompt plus what it had
generated after a preemption. Decodes are scheduled before prefill chunks so a long prompt never
stalls running requests. When a running request needs a KV block and none is free, the most recently
admitted request that has not been scheduled this iteration is preempted by recomputation: its blocks
are freed and it waits at the head of the queue. The ranking policy plugs in here later.
"""

import logging
from collections import deque
from dataclasses import dataclass

from fastswitch.engine.request import Request, Status
from fastswitch.kv.allocator import BlockAllocator

log = logging.getLogger(__name__)

GROWTH_HORIZON = 256  # output tokens a request's block group is sized for, at most


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Request, int]]  # (request, tokens to compute this iteration)
    preempted: list[Request]


class Scheduler:
    def __init__(self, allocator: BlockAllocator, block_size: int, max_num_seqs: int, max_num_batched_tokens: int):
        self.allocator, self.block_size = allocator, block_size
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Request, int]] = []
        preempted: list[Request] = []
        for request in sorted(self.running, key=lambda r: r.num_tokens - r.num_computed_tokens > 1):
            if budget == 0:
                break
            if request.status != Status.RUNNING:  # preempted earlier in this loop
                continue
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            if self._make_room(request, n, scheduled, preempted):
                self._grow(request, n)
                scheduled.append((request, n))
                budget -= n
        while self.waiting and not preempted and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            need = self._blocks_needed(request, n)
            if not self.allocator.can_allocate(need):
                break
            self.waiting.popleft()
            self._grow(request, n)
            request.status = Status.RUNNING
            self.running.append(request)
            scheduled.append((request, n))
            budget -= n
        return SchedulerOutput(scheduled, preempted)

    def finish(self, request: Request) -> None:
        """Remove a finished or aborted request and return its blocks."""
        if request.status == Status.RUNNING:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self._release_blocks(request)
        request.status = Status.FINISHED

    def _grow(self, request: Request, n: int) -> None:
        """Blocks for n more tokens, in a group sized to what the request will likely need soon."""
        to_come = request.num_tokens - request.num_computed_tokens - n
        to_come += min(GROWTH_HORIZON, (request.params.max_tokens or GROWTH_HORIZON) - request.num_output_tokens)
        request.block_ids += self.allocator.allocate(
            self._blocks_needed(request, n), owner=request.request_id,
            after=request.block_ids[-1] if request.block_ids else None, expected=-(-to_come // self.block_size))

    def _release_blocks(self, request: Request) -> None:
        self.allocator.drop_reserve(request.request_id)
        self.allocator.free(request.block_ids)
        request.block_ids = []

    def _blocks_needed(self, request: Request, n: int) -> int:
        tokens = request.num_computed_tokens + n
        return -(-tokens // self.block_size) - len(request.block_ids)

    def _make_room(self, request: Request, n: int, scheduled, preempted) -> bool:
        """Preempt until `request` can grow by n tokens; False if it had to be preempted itself."""
        taken = {id(r) for r, _ in scheduled}
        while not self.allocator.can_allocate(self._blocks_needed(request, n)):
            victim = next(r for r in reversed(self.running) if id(r) not in taken)
            self._preempt(victim)
            preempted.append(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self._release_blocks(request)
        request.num_computed_tokens = 0
        request.status = Status.WAITING
        request.metrics.num_preemptions += 1
        self.waiting.appendleft(request)
        log.debug("preempted %s by recomputation (%d tokens)", request.request_id, request.num_tokens)
