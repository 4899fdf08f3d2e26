"""Divergence limits: count skipped and non-finite optimizer steps and stop the run past ``train.*`` limits.

Two kinds of bad step, counted separately (consecutive and in total, across resumes: the counts are checkpointed):

* **skipped**: DeepSpeed did not apply the update (fp16 loss-scale overflow, or a non-finite gradient norm,
  which ZeRO treats as an overflow). The LR scheduler does not advance and the mixer ignores the step's
  statistics. Routine at the start of fp16 training while the loss scale settles, so only long runs of them
  mean divergence.
* **non-finite**: the step's loss is NaN/inf, or its gradient norm is NaN/inf on a step that *was* applied (the
  weights are then no longer trustworthy).

Limits (``null`` = no limit): ``train.max_consecutive_skipped_steps`` (default 20),
``train.max_skipped_steps`` (total), ``train.max_consecutive_nonfinite_steps`` (default 3),
``train.max_nonfinite_steps`` (total). Every rank decides from the same all-reduced numbers, so every rank
stops at the same step.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["DEFAULT_LIMITS", "DivergenceError", "DivergenceGuard"]

DEFAULT_LIMITS: dict[str, int | None] = {
    "max_skipped_steps": None,
    "max_consecutive_skipped_steps": 20,
    "max_nonfinite_steps": None,
    "max_consecutive_nonfinite_steps": 3,
}


class DivergenceError(RuntimeError):
    """Training passed a divergence limit; ``record`` is what ``diverged.json`` holds."""

    def __init__(self, message: str, record: dict[str, Any]) -> None:
        super().__init__(message)
        self.record = record


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


class DivergenceGuard:
    """Counts bad steps; :meth:`update` raises :class:`DivergenceError` when a limit is passed."""

    def __init__(self, limits: dict[str, Any] | None = None) -> None:
        self.limits = {**DEFAULT_LIMITS, **(limits or {})}
        self.skipped = 0
        self.consecutive_skipped = 0
        self.nonfinite = 0
        self.consecutive_nonfinite = 0

    def update(self, step: int, applied: bool, loss: float | None, grad_norm: float | None) -> bool:
        """Account optimizer step ``step``; returns True when the step counts as skipped (mixer must ignore it).

        ``applied``: DeepSpeed updated the weights; ``loss`` / ``grad_norm``: the step's global values.
        """
        skipped = not applied
        nonfinite = not _finite(loss) or (applied and grad_norm is not None and not math.isfinite(grad_norm))
        self.skipped += skipped
        self.consecutive_skipped = self.consecutive_skipped + 1 if skipped else 0
        self.nonfinite += nonfinite
        self.consecutive_nonfinite = self.consecutive_nonfinite + 1 if nonfinite else 0
        checks = (
            ("max_consecutive_skipped_steps", self.consecutive_skipped, "consecutive skipped steps"),
            ("max_skipped_steps", self.skipped, "skipped steps in total"),
            ("max_consecutive_nonfinite_steps", self.consecutive_nonfinite, "consecutive non-finite steps"),
            ("max_nonfinite_steps", self.nonfinite, "non-finite steps in total"),
        )
        for key, count, what in checks:
            limit = self.limits.get(key)
            if limit is not None and count > limit:
                reason = (
                    f"training diverged at step {step}: {count} {what} (train.{key} = {limit}); "
                    f"last loss {loss}, grad norm {grad_norm}"
                )
                record = {
                    "diverged": True,
                    "step": step,
                    "reason": reason,
                    "limit": f"train.{key}",
                    "limit_value": limit,
                    "count": count,
                    "last_loss": loss if _finite(loss) else str(loss),
                    "last_grad_norm": grad_norm if _finite(grad_norm) else str(grad_norm),
                    **self.state_dict(),
                }
                raise DivergenceError(reason, record)
        return skipped or nonfinite

    def state_dict(self) -> dict[str, int]:
        return {
            "skipped_steps": self.skipped,
            "consecutive_skipped_steps": self.consecutive_skipped,
            "nonfinite_steps": self.nonfinite,
            "consecutive_nonfinite_steps": self.consecutive_nonfinite,
        }

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        state = state or {}
        self.skipped = int(state.get("skipped_steps", 0))
        self.consecutive_skipped = int(state.get("consecutive_skipped_steps", 0))
        self.nonfinite = int(state.get("nonfinite_steps", 0))
        self.consecutive_nonfinite = int(state.get("consecutive_nonfinite_steps", 0))
