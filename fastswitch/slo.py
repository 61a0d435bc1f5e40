"""Latency targets per priority level: time to first token (TTFT) and mean time between tokens (TBT).

Written `level=seconds,...` (`0=0.5,1=1,2=2,3=4`), or one number for every level. A level without a
target of its own takes that of the nearest level given above it in rank (the next smaller number),
and a level better than every level given takes the best one's. The `slo` policy schedules toward
them; `/metrics` and `fastswitch bench run` count which requests met them.
"""

import bisect
from dataclasses import dataclass

DEFAULT_TTFT = "0=0.5,1=1,2=2,3=4"
DEFAULT_TBT = "0=0.1,1=0.2,2=0.4,3=0.8"
DEFAULT_SHED = "2=2"  # the slo policy's: levels 2 and worse, after 2 TTFT targets


@dataclass(frozen=True)
class LevelTargets:
    levels: tuple[int, ...]  # ascending
    seconds: tuple[float, ...]

    @classmethod
    def parse(cls, text: str, name: str) -> "LevelTargets":
        targets = {}
        for item in filter(None, (part.strip() for part in str(text).split(","))):
            level, _, value = item.rpartition("=")
            try:
                targets[int(level) if level else 0] = seconds = float(value)
            except ValueError:
                raise ValueError(f"invalid {name} entry {item!r}: expected level=seconds, e.g. 0=0.5") from None
            if not seconds > 0:
                raise ValueError(f"invalid {name} entry {item!r}: a target must be > 0 seconds")
        if not targets:
            raise ValueError(f"invalid {name}={text!r}: give at least one target, e.g. 0=0.5,1=1")
        levels = tuple(sorted(targets))
        return cls(levels, tuple(targets[level] for level in levels))

    def __call__(self, priority: int) -> float:
        return self.seconds[max(bisect.bisect_right(self.levels, priority) - 1, 0)]


@dataclass(frozen=True)
class SLO:
    ttft: LevelTargets
    tbt: LevelTargets

    @classmethod
    def parse(cls, ttft: str = DEFAULT_TTFT, tbt: str = DEFAULT_TBT) -> "SLO":
        return cls(LevelTargets.parse(ttft, "slo_ttft"), LevelTargets.parse(tbt, "slo_tbt"))

    def met(self, priority: int, ttft_s: float, token_gaps_s: list[float]) -> tuple[bool, bool]:
        """Whether a request of this level met its TTFT target, and its TBT target (on the mean gap)."""
        mean_gap = sum(token_gaps_s) / len(token_gaps_s) if token_gaps_s else 0.0
        return ttft_s <= self.ttft(priority), mean_gap <= self.tbt(priority)


def parse_shed_bounds(text: str) -> dict[int, float]:
    """`level=bound,...` in TTFT targets; '' or 'off': no level is shed (admission control, `engine/admission.py`)."""
    bounds = {}
    for item in filter(None, (part.strip() for part in str(text).split(","))):
        if item == "off":
            continue
        level, _, value = item.partition("=")
        try:
            bounds[int(level)] = bound = float(value)
        except ValueError:
            raise ValueError(f"invalid shed entry {item!r}: expected level=bound (in TTFT targets), e.g. 2=2") from None
        if not bound > 0:
            raise ValueError(f"invalid shed entry {item!r}: a bound must be > 0 TTFT targets")
    return bounds
