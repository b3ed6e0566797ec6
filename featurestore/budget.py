"""A wall-clock budget (`--time-limit`): what is left, and the one exception a budgeted step raises when it stops.

The budget is checked at unit boundaries, never inside a unit: a learner between folds, the stack between
candidates. A unit in flight finishes, so a run can overrun by about one unit; the schedulers above
(pipeline.schedule, stacking.study) stop early enough to keep that within the limit's slack.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


class OverBudget(Exception):  # noqa: N818  (a decision, not an error: the caller records it and goes on)
    """A budgeted step stopped because its projected end passed the deadline; `reason` says by how much."""

    def __init__(self, reason: str, projected: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.projected = projected  # seconds the whole step would have taken at its pace so far, when known


@dataclass
class Budget:
    """`seconds` of wall clock from the moment it is made (time.monotonic: immune to clock changes)."""

    seconds: float
    started: float = field(default_factory=time.monotonic)

    @property
    def deadline(self) -> float:
        return self.started + self.seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def until(self, reserve: float) -> Budget:
        """The part of this budget that ends `reserve` seconds before its deadline (a later step's share)."""
        return Budget(max(0.0, self.seconds - reserve), self.started)

    def check_projection(self, what: str, done: int, total: int, spent: float) -> None:
        """After `done` of `total` equal units took `spent` seconds: OverBudget when the rest, at the same pace,
        would end past the deadline."""
        if done >= total or done <= 0:
            return
        rest = spent / done * (total - done)
        if rest > self.left():
            raise OverBudget(f"{what}: stopped after {done} of {total} units ({spent:.0f} s); the other "
                             f"{total - done} would take about {rest:.0f} s and {max(0.0, self.left()):.0f} s "
                             "were left", projected=spent + rest)
