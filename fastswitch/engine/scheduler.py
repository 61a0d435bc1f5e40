"""Preemptive, policy-ranked continuous batching: every iteration, who runs, pauses, resumes or starts.

Every iteration the policy ranks all unfinished requests (running, paused, waiting). Walking that
ranking, best first, each request gets what it needs to make progress:

- a running request gets its next chunk (its tokens without KV, capped by the iteration's token
  budget): the prompt or a chunk of it, then one token per decode. Decodes are served before prefill
  chunks, so a long prompt never stalls running requests' next tokens;
- a paused request is resumed (its KV copied back; it runs in the same iteration if its KV is back
  at once, as a request readmitted after recomputation runs its first chunk at once, else once the
  copy has landed; on the tiered path its pause's own copy to the host need not have landed first),
  or, if a full block of its KV is in neither tier any more, started again as a request preempted
  by recomputation is;
- a waiting request is started after whatever prefix of it is cached.

When a request does not fit the KV memory or the sequence cap, running requests ranked below it are
preempted, lowest first, only as many as needed (even one given its decode earlier in the same
iteration), except those resumed within the last `thrash_guard` iterations and those the policy
guards (`slo`: resumed too few seconds ago); meanwhile the host keeps the history of the request
room is made for (`KVManager.holding`), so the victims' copies to the host do not evict it. A
paused or waiting request that would not fit even with every such victim paused pauses none
(`KVManager.freed_by`: their work would be thrown away for nothing), and one that does not fit
blocks everyone ranked below it from starting, so a large high-ranked request is not starved by
small ones. Preemption is by swap (KV to the host), by recomputation (KV dropped), or `auto`:
whichever is cheaper, from the measured copy bandwidth and prefill speed (`CostModel`), for what
the two would do differently (`KVManager.pause_trade`, which includes the cached history a swap's
host block would evict, priced at how often the host's evictions are wanted again). A request
whose KV is still being copied in is not preempted.

`schedule()` returns the step as plain data (`SchedulerOutput`: who computes how many tokens, with
which blocks, and the copies to make first); `update_from_output()` takes the sampled tokens back
and does everything that follows a forward: computed tokens, prefix commits, appended tokens, stop
checks by token id, finishing and releasing. The scheduler is the only writer of a request's
progress (`num_computed_tokens`, `token_ids`, `status`).
"""

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from fastswitch.engine.admission import Admission
from fastswitch.engine.costs import CostModel
from fastswitch.engine.policies import Policy
from fastswitch.interfaces import Clock, MonotonicClock
from fastswitch.kv.manager import KVManager
from fastswitch.messages import EngineCoreOutput, ModelOutput, NewRequest, ScheduledRequest, SchedulerOutput
from fastswitch.request import Request, Status

log = logging.getLogger(__name__)

PREEMPTION_MODES = ("swap", "recompute", "auto")


@dataclass
class _Plan:
    """The step being scheduled: (request, tokens to compute), and who was preempted for it."""

    scheduled: list[tuple[Request, int]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    started: int = 0  # requests without a first token admitted (admission control's rate)


class Scheduler:
    def __init__(self, kv: KVManager, max_num_seqs: int, max_num_batched_tokens: int,
                 preemption_mode: str = "recompute", policy: Policy | None = None, thrash_guard: int = 0,
                 eos_token_ids: tuple[int, ...] = (), max_model_len: int = 1 << 62, clock: Clock | None = None,
                 costs: CostModel | None = None, admission: Admission | None = None):
        if preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"invalid preemption_mode {preemption_mode!r}; choose from {', '.join(PREEMPTION_MODES)}")
        self.kv, self.preemption_mode, self.policy = kv, preemption_mode, policy or Policy()
        self.max_num_seqs, self.max_num_batched_tokens, self.thrash_guard = max_num_seqs, max_num_batched_tokens, thrash_guard
        self.eos_token_ids, self.max_model_len = frozenset(eos_token_ids), max_model_len
        self.clock = clock or MonotonicClock()
        self.costs = costs or CostModel()
        self.admission = admission
        self.requests: dict[str, Request] = {}  # every unfinished request, by id
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.swapped: list[Request] = []
        self.iteration = 0
        self._seq = 0
        self._known_to_executor: set[str] = set()
        self._sent_tables: dict[str, tuple[list[int], int]] = {}  # the block table the executor has: (list, length)
        self._finished_ids: list[str] = []  # finished since the last step: the executor may forget them
        self._refused: list[EngineCoreOutput] = []  # shed since the last update: their outputs go with it

    def add(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        request.seq, self._seq = self._seq, self._seq + 1
        request.cached_at_arrival = self.kv.cached_prefix_tokens(request)
        self.policy.on_arrival(request, self.unfinished())
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort(self, request_id: str) -> bool:
        request = self.requests.get(request_id)
        if request is not None:
            request.finish_reason = "abort"
            self.finish(request)
        return request is not None

    def unfinished(self) -> list[Request]:
        return [*self.running, *self.swapped, *self.waiting]

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def schedule(self) -> SchedulerOutput:
        self.iteration += 1
        for request in self.kv.take_lost():
            self._recompute_lost(request)
        unfinished = self.unfinished()
        self.policy.on_iteration(unfinished)
        ranked = sorted(unfinished, key=self.policy.key)
        if self.admission is not None:
            ranked = self._shed(ranked)
        rank = {id(r): i for i, r in enumerate(ranked)}
        out, taken = _Plan(), set()
        self._budget = self.max_num_batched_tokens
        decodes = [r for r in ranked if r.status == Status.RUNNING and r.num_tokens - r.num_computed_tokens == 1]
        decode_ids = {id(r) for r in decodes}
        block_size = self.kv.block_size
        blocked = False  # a higher-ranked request is waiting for room: nobody below it may start
        for request in decodes + [r for r in ranked if id(r) not in decode_ids]:
            if self._budget == 0:
                break
            status = request.status
            if status == Status.RUNNING:
                if id(request) in taken or not self.kv.ready(request):
                    continue
                n = min(request.num_tokens - request.num_computed_tokens, self._budget)
                if len(request.block_ids) * block_size < request.num_computed_tokens + n:  # needs blocks
                    if not self._make_room(request, lambda: self.kv.can_grow(request, n), rank, taken, out,
                                           growing=True):
                        continue
                    self.kv.grow(request, n)
                self._run(request, n, out, taken)
            elif request.preempted_iteration == self.iteration:  # not to be brought back in the same iteration
                continue
            elif status == Status.SWAPPED and not blocked and self.kv.resumable(request):
                if self.kv.lost_history(request):  # a full block in neither tier: it starts again, as recomputed
                    self.swapped.remove(request)
                    self._requeue(request)
                    blocked = self._start(request, rank, taken, out)
                else:
                    blocked = not self._resume(request, rank, taken, out)
            elif status == Status.WAITING and not blocked:
                blocked = self._start(request, rank, taken, out)
        if self.admission is not None:
            self.admission.observe(self.clock.now(), out.started,
                                   any(r.first_token_time is None for r in self.waiting))
        return self._output(out)

    def _shed(self, ranked: list[Request]) -> list[Request]:
        """Refuse what admission control says cannot start in time; the ranking without them."""
        refused = self.admission.shed(ranked, self.clock.now())
        for request, retry_after_s in refused:
            request.finish_reason = "rejected"
            self.finish(request)
            self.kv.stats.rejected_requests += 1
            self._refused.append(EngineCoreOutput(request.request_id, [], finish_reason="rejected",
                                                  metrics=request.metrics, retry_after_s=retry_after_s))
        return [r for r in ranked if r.status != Status.FINISHED] if refused else ranked

    def take_refused(self) -> list[EngineCoreOutput]:
        """The outputs of requests shed since the last call: finished, no token, a time to retry after."""
        refused, self._refused = self._refused, []
        return refused

    def _output(self, plan: _Plan) -> SchedulerOutput:
        now, new = self.clock.now(), []
        for request, _ in plan.scheduled:
            request.metrics.first_scheduled_time = request.metrics.first_scheduled_time or now
            if request.request_id not in self._known_to_executor:
                self._known_to_executor.add(request.request_id)
                new.append(NewRequest(request.request_id, list(request.token_ids), request.num_prompt_tokens,
                                      request.params))
        finished, self._finished_ids = self._finished_ids, []
        return SchedulerOutput(
            self.iteration,
            [self._scheduled(r, n) for r, n in plan.scheduled],
            new, finished, self.kv.take_copies(), [r.request_id for r in plan.preempted])

    def _scheduled(self, request: Request, n: int) -> ScheduledRequest:
        """The request's step, with only what changed in its block table since the executor last saw it. The KV
        manager only appends to a live table; anything else gives the request a new list."""
        table, sent = request.block_ids, self._sent_tables.get(request.request_id)
        grows = sent is not None and sent[0] is table and sent[1] <= len(table)
        self._sent_tables[request.request_id] = (table, len(table))
        return ScheduledRequest(request.request_id, request.num_computed_tokens, n,
                                table[sent[1]:] if grows else list(table), not grows)

    def update_from_output(self, step: SchedulerOutput, model: ModelOutput) -> list[EngineCoreOutput]:
        """After the forward: account the computed tokens, append the sampled ones, finish who is done."""
        sampled = {rid: (token, logprobs) for rid, token, logprobs in zip(model.request_ids, model.token_ids,
                                                                          model.logprobs)}
        outputs, stats, now = [], self.kv.stats, self.clock.now()
        for s in step.scheduled:
            request = self.requests[s.request_id]
            request.num_computed_tokens += s.num_new_tokens
            stats.computed_tokens += s.num_new_tokens
            self._charge(request, s.request_id in sampled)
            self.kv.commit(request)
            if s.request_id not in sampled:
                continue
            token, logprobs = sampled[s.request_id]
            request.token_ids.append(token)
            request.last_token_time = now
            if request.first_token_time is None:  # not `or`: a simulated clock may read 0.0
                request.first_token_time = now
            stats.generated_tokens += 1
            reason, stop = self._stop_check(request)
            if reason is not None:
                request.finish_reason, request.stop_reason = reason, stop
                self.finish(request)
            outputs.append(EngineCoreOutput(s.request_id, [token], None if logprobs is None else [logprobs], reason,
                                            stop, request.num_cached_tokens, request.metrics))
        return outputs

    def _stop_check(self, request: Request) -> tuple[str | None, int | None]:
        """Stops decided by token ids; stop strings are the frontend's, which aborts the request."""
        p, token = request.params, request.token_ids[-1]
        if request.num_output_tokens >= p.min_tokens:
            if token in p.stop_token_ids:
                return "stop", token
            if not p.ignore_eos and token in self.eos_token_ids:
                return "stop", None
        if p.max_tokens is not None and request.num_output_tokens >= p.max_tokens:
            return "length", None
        if request.num_tokens >= self.max_model_len:
            return "length", None
        return None, None

    def _start(self, request: Request, rank, taken, out) -> bool:
        """Admit a waiting request and run its first chunk; True if it does not fit (it blocks those below)."""
        admitted = self._admit(request, rank, taken, out)
        if admitted:  # 0 while its cached prefix is still being copied in from the host
            self._run(request, admitted, out, taken)
        return admitted is None

    def _admit(self, request: Request, rank, taken, out) -> int | None:
        """Start a waiting request, making room if it outranks running ones; its first chunk, or None."""
        admitted: list[tuple[int, int] | None] = [None]

        def fits() -> bool:
            if self._has_seat():
                admitted[0] = self.kv.admit(request, self._budget)
            return admitted[0] is not None

        with self.kv.holding(request):
            if not self._make_room(request, fits, rank, taken, out):
                return None
        self.waiting.remove(request)
        self._start_running(request)
        out.started += request.first_token_time is None
        reused, chunk = admitted[0]
        request.num_computed_tokens = reused
        return chunk

    def _resume(self, request: Request, rank, taken, out) -> bool:
        """Bring a paused request back, making room if it outranks running ones; False if it does not fit."""
        resumed: list[tuple[int, int] | None] = [None]

        def fits() -> bool:
            if self._has_seat():
                resumed[0] = self.kv.swap_in(request, self._budget)
            return resumed[0] is not None

        with self.kv.holding(request):
            if not self._make_room(request, fits, rank, taken, out):
                return False
        # fewer tokens than before if part of its KV was lost: they are recomputed
        request.num_computed_tokens, chunk = resumed[0]
        self._start_running(request)
        if chunk:  # its KV is back at once: it runs now, as a readmitted request runs its first chunk
            self._run(request, chunk, out, taken)
        return True

    def preempt(self, request: Request, mode: str | None = None) -> None:
        """Pause a running request: by swap (recompute if the host is full), recompute, or the cheaper."""
        mode = mode or self.preemption_mode
        if mode == "auto":
            blocks, tokens, displaced = self.kv.pause_trade(request)
            swap_s = self.costs.copy_s(blocks) + self.costs.recompute_s(displaced)
            mode = "swap" if swap_s <= self.costs.recompute_s(tokens) else "recompute"
        self.running.remove(request)
        request.metrics.num_preemptions += 1
        request.paused_at, request.preempted_iteration = self.clock.now(), self.iteration
        if mode == "swap":
            stats, fallbacks = self.kv.stats, self.kv.stats.recompute_fallbacks
            paused = self.kv.swap_out(request)  # the tiered path always pauses, keeping on the host what fits
            stats.recompute_fallbacks += not paused
            if stats.recompute_fallbacks > fallbacks == 0:  # once: a run short of host memory has thousands
                log.warning("host KV tier full: %s's KV does not all fit on the host; what does not is recomputed "
                            "(the next ones are counted, not logged: fastswitch:recompute_fallbacks_total; a larger "
                            "swap_space avoids them)", request.request_id)
            if paused:
                request.status = Status.SWAPPED
                self.swapped.append(request)
                stats.swap_preemptions += 1
                return
        self.kv.stats.recompute_preemptions += 1
        self._requeue(request)

    def _requeue(self, request: Request) -> None:
        """Give back what a request holds and queue it to be computed again over whatever prefix the caches hold."""
        self.kv.release(request)
        request.computed_at_pause, request.num_computed_tokens = request.num_computed_tokens, 0
        request.status = Status.WAITING
        self.waiting.appendleft(request)

    def _recompute_lost(self, request: Request) -> None:
        """A copy of this request's KV failed: drop what it holds (writing none of it back) and compute it
        again, from whatever prefix the caches still hold intact."""
        if request.status == Status.RUNNING:
            self.running.remove(request)
            request.paused_at = self.clock.now()
        else:
            self.swapped.remove(request)
        request.num_named_blocks = 0
        self._requeue(request)

    def _charge(self, request: Request, sampled: bool) -> None:
        """Charge an iteration's work to the request's user: its new prompt tokens, one generated if
        sampled. A prompt token counts once: recomputing it after a preemption is not charged again, so
        every turn a request gets (vtc) is new service, and requests that keep displacing each other
        progress."""
        new_prompt = max(0, min(request.num_computed_tokens, request.num_prompt_tokens) - request.prompt_tokens_served)
        request.prompt_tokens_served += new_prompt
        self.policy.on_served(request, new_prompt, int(sampled))

    def finish(self, request: Request) -> None:
        """Remove a finished or aborted request and return its blocks."""
        del self.requests[request.request_id]
        if request.request_id in self._known_to_executor:
            self._known_to_executor.discard(request.request_id)
            self._finished_ids.append(request.request_id)
            self._sent_tables.pop(request.request_id, None)
        request.metrics.finish_time = self.clock.now()
        if request.status == Status.RUNNING:
            self.running.remove(request)
        elif request.status == Status.SWAPPED:
            self.swapped.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv.release(request)
        request.status = Status.FINISHED

    def _has_seat(self) -> bool:
        return len(self.running) < self.max_num_seqs

    def _run(self, request: Request, n: int, out: _Plan, taken: set[int]) -> None:
        out.scheduled.append((request, n))
        taken.add(id(request))
        self._budget -= n

    def _start_running(self, request: Request) -> None:
        if request.status == Status.SWAPPED:
            self.swapped.remove(request)
        if request.paused_at is not None:  # coming back from a preemption
            now = self.clock.now()
            request.metrics.paused_s += now - request.paused_at
            request.paused_at, request.resumed_iteration, request.resumed_at = None, self.iteration, now
        request.status = Status.RUNNING
        self.running.append(request)

    def _make_room(self, request: Request, fits: Callable[[], bool], rank: dict[int, int], taken: set[int],
                   out: _Plan, growing: bool = False) -> bool:
        """Preempt running requests ranked below `request`, lowest first, until `fits()`; False if none is left,
        or (unless it is growing) if pausing all that are left would still not make room.

        A running request that must grow may preempt below it whatever the policy's margin says (memory
        has to come from someone, and waiting for it stalls everyone), and if it is the lowest-ranked
        itself, it yields. This stays live because `_charge` charges recomputed work only once."""
        while not fits():
            lower = [r for r in self.running if rank[id(r)] > rank[id(request)]]
            victims = [r for r in lower if self._unguarded(r, request) and self.kv.ready(r)
                       and (growing or self.policy.preempts(request, r))]
            if not growing and self._has_seat() and self.kv.freed_by(victims) < self.kv.short_by:
                return False  # pausing them all would still not make room: pause nobody for nothing
            if not victims:
                if growing and not lower and self._unguarded(request, request):
                    self._take_back(request, taken, out)
                    self.preempt(request)
                    out.preempted.append(request)
                return False
            victim = max(victims, key=lambda r: rank[id(r)])
            self._take_back(victim, taken, out)
            self.preempt(victim)
            out.preempted.append(victim)
        return True

    def _unguarded(self, request: Request, by: Request) -> bool:
        return self.iteration - request.resumed_iteration > self.thrash_guard and not self.policy.guarded(request, by)

    def _take_back(self, request: Request, taken: set[int], out: _Plan) -> None:
        """Undo scheduling `request` earlier in this iteration (a decode served before its turn)."""
        if id(request) in taken:
            n = next(n for r, n in out.scheduled if r is request)
            out.scheduled = [(r, m) for r, m in out.scheduled if r is not request]
            taken.discard(id(request))
            self._budget += n
