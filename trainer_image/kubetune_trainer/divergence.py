"""Divergence detector: the training loss staying far above its best value.

A single bad batch is noise; a loss that stays above `factor` x its running minimum for `patience` optimizer
steps in a row is a run that has diverged (too high a learning rate, fp16 overflow, bad data). The minimum is
taken over a bias-corrected exponential moving average of the loss, so one easy batch does not set an
unreachable minimum; the steps are counted on the loss itself, so a few bad batches do not add up.
Non-finite losses are caught separately (NonFiniteLoss) before they reach the detector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SMOOTHING = 0.9  # EMA weight of the past; about the last 10 steps count


# Every divergence message starts with this: the worker finds a warn-mode divergence among the run's warnings
# by it and reports it in the summary's `divergence` field (docs/contracts.md §5).
MESSAGE_PREFIX = "training loss diverged:"


@dataclass
class DivergenceDetector:
    """Feed it every optimizer step's loss (the same value on every rank); it says when the run diverged."""

    factor: float
    patience: int
    smoothing: float = SMOOTHING
    _ema: float = 0.0
    _seen: int = 0
    best: float = math.inf
    best_step: int = 0
    above: int = 0
    smoothed: float = math.nan
    reported: bool = False

    def update(self, step: int, loss: float) -> str:
        """Add step `step`'s loss; returns the divergence message the first time the rule holds, else ''."""
        if not math.isfinite(loss):
            return ""
        self._seen += 1
        self._ema = self.smoothing * self._ema + (1.0 - self.smoothing) * loss
        self.smoothed = self._ema / (1.0 - self.smoothing ** self._seen)
        if self.smoothed < self.best:
            self.best, self.best_step = self.smoothed, step
        if self.best > 0 and loss > self.factor * self.best:
            self.above += 1
        else:
            self.above = 0
        if self.above >= self.patience and not self.reported:
            self.reported = True  # once per run: a warn-only run is not flooded with the same news
            return (f"{MESSAGE_PREFIX} the loss has stayed above {self.factor:g} x its best smoothed value "
                    f"{self.best:.4g} (step {self.best_step}) for {self.patience} steps, up to {loss:.4g} at step "
                    f"{step} (smoothed {self.smoothed:.4g})")
        return ""

    def replay(self, history: list[dict]) -> None:
        """Rebuild the state from a resumed run's per-step history (no message: that run did not stop)."""
        for entry in history:
            loss = entry.get("loss")
            if loss is not None:
                self.update(int(entry["step"]), float(loss))
