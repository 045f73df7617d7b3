"""A training time budget that is only an upper bound.

Training runs a fixed number of epochs (steps); its learning-rate schedule follows the steps alone,
so the same seed gives the same model on a fast or a busy machine. A time budget, when given, only
stops a run that would take longer: reaching it is a warning, and the bundle records it, because the
model then depends on how fast the machine was.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Budget:
    """Wall-clock upper bound of one training run (``seconds`` None: no bound)."""

    def __init__(self, seconds: float | None, what: str = "training", clock: Callable[[], float] = time.monotonic):
        self.seconds = float(seconds) if seconds else None
        self.what = what
        self._clock = clock
        self._t0 = clock()
        self.reached_at_epoch: int | None = None

    def elapsed(self) -> float:
        return self._clock() - self._t0

    def exceeded(self) -> bool:
        return self.seconds is not None and self.elapsed() > self.seconds

    def stop(self, epoch: int, epochs: int, log: Callable[[str], None]) -> bool:
        """True when the budget is spent: the run stops after ``epoch`` (1-based) of ``epochs``, with a warning."""
        if not self.exceeded():
            return False
        self.reached_at_epoch = epoch
        log(f"  WARNING: the {self.what} time budget of {self.seconds:.0f} s was reached after epoch {epoch} of "
            f"{epochs}: this model depends on the machine's speed and load. For a reproducible model, train "
            "without --budget or with a larger one.")
        return True

    def record(self, epochs: int) -> dict:
        """What the bundle keeps: the planned epochs, the bound, and whether (and where) it cut the run."""
        return {"epochs_planned": int(epochs), "budget_s": self.seconds,
                "budget_reached": self.reached_at_epoch is not None, "stopped_at_epoch": self.reached_at_epoch}
