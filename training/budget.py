"""``--time-budget``: when a run must stop training so that its final evaluation ends within the budget.

The budget only decides when training stops; the LR keeps following its schedule (``training/schedule.py``),
so a budgeted run learns like an unbudgeted one up to the step where it stops. Laying the cosine over the
budget (or decaying over its last 30%) was tried once each and scored lower (``bench/RESULTS.md``, "The
default run"); with single runs that noisy, that is no proof either way.
"""
from __future__ import annotations

import time


class TimeBudget:
    """``--time-budget``: the run's wall clock, from set-up to the end of its final evaluation.

    Training gets what is left of the budget after set-up, minus a reserve for the final evaluation (1.2x the
    last evaluation's duration plus 10 s; before the first evaluation, a guess from the validation set's size
    and the training speed). ``fraction()`` is the training time so far over that window; training stops at 1.
    A resumed run counts the training seconds of the runs before it (``spent``, saved in the checkpoint):
    resumed with the same budget it trains only what the budget has left, with a larger one for longer.
    """

    def __init__(self, minutes: float, t0: float, spent: float = 0.0):
        self.seconds, self.t0, self.spent = 60.0 * minutes, t0, spent
        self.t_train: float | None = None
        self.reserve = 10.0
        self.measured = False

    def start(self) -> None:
        """Training starts now (set-up time is spent)."""
        if self.t_train is None:
            self.t_train = time.perf_counter()

    def guess_reserve(self, val_images: int, train_img_per_s: float) -> None:
        """Before any evaluation: inference takes about a third of a training step's time per image."""
        if not self.measured and train_img_per_s > 0:
            self.reserve = min(10.0 + 1.2 * val_images / (3.0 * train_img_per_s), self.seconds / 3)

    def evaluated(self, seconds: float) -> None:
        self.reserve, self.measured = min(10.0 + 1.2 * seconds, self.seconds / 3), True

    def train_seconds(self) -> float:
        """Training seconds of this run and of the runs it resumes."""
        return self.spent + (time.perf_counter() - self.t_train if self.t_train is not None else 0.0)

    def fraction(self) -> float:
        start = self.t_train if self.t_train is not None else time.perf_counter()
        window = self.seconds - (start - self.t0) - self.reserve
        if window <= 0:
            return 1.0
        return self.train_seconds() / window
