"""`fastswitch sim`, counting what each preemption was made for: `python trace_sim.py sim --out OUT ...`.

Wraps `Scheduler._make_room` (the one place that preempts to make room) and writes OUT/trace.json:
per kind of request the room was made for (a running request growing in decode or prefill, a paused
request resumed by swap or readmitted after recomputation, a new one) and whether room was made, the
preemptions made ("kind|ok") and the calls ("kind|ok|calls"); and of the failed resumes that preempted,
the calls that left none ranked below running ("resume|False|none-left"), the tokens the resumed request
had computed and the device blocks free at the end, summed ("...|computed-tokens", "...|free-blocks")."""

import collections
import json
import sys

from fastswitch.cli import main
from fastswitch.engine import scheduler
from fastswitch.request import Status

counts = collections.Counter()
make_room = scheduler.Scheduler._make_room


def kind(request, growing: bool) -> str:
    if growing:
        return "grow-prefill" if request.num_tokens - request.num_computed_tokens > 1 else "grow-decode"
    if request.status == Status.SWAPPED or request.metrics.num_preemptions > 0:
        return "resume"  # by swap, or readmitted after recomputation
    return "new"


def counted(self, request, fits, rank, taken, out, growing=False):
    what, before = kind(request, growing), len(out.preempted)
    ok = make_room(self, request, fits, rank, taken, out, growing)
    counts[f"{what}|{ok}"] += len(out.preempted) - before
    counts[f"{what}|{ok}|calls"] += 1
    if what == "resume" and not ok and len(out.preempted) > before:
        counts["resume|False|preempting-calls"] += 1
        counts["resume|False|none-left"] += not any(rank[id(r)] > rank[id(request)] for r in self.running)
        computed = request.num_computed_tokens if request.status == Status.SWAPPED else request.computed_at_pause
        counts["resume|False|computed-tokens"] += computed
        counts["resume|False|free-blocks"] += self.kv.device.num_available
    return ok


scheduler.Scheduler._make_room = counted
rc = main(sys.argv[1:])
with open(sys.argv[sys.argv.index("--out") + 1] + "/trace.json", "w") as f:
    json.dump(dict(sorted(counts.items())), f, indent=0)
sys.exit(rc)
