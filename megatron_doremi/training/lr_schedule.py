"""Learning-rate schedule: linear warmup, then cosine / linear decay to ``min_lr`` (or constant).

``lr_at(s)`` is the learning rate of optimizer step ``s + 1`` (``s`` = steps already taken), so the first step
uses ``lr / warmup_iters`` rather than 0. Wrapped in a ``LambdaLR`` that DeepSpeed steps after every optimizer
step and saves/restores with the checkpoint. DeepSpeed does not step it on a skipped (overflow) step, so the
scheduler's own count, not the trainer's step, says where the schedule is: after a resume
:func:`restore_lr` recomputes the optimizer's learning rate from the restored scheduler exactly as the scheduler
itself computes it (``base * fn(count) / base``; no 1-ulp difference to an uninterrupted run).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["lr_at", "make_lr_scheduler", "restore_lr"]


def lr_at(step: int, lr: float, min_lr: float, warmup_iters: int, decay_iters: int, style: str) -> float:
    """Learning rate for the optimizer step after ``step`` completed steps."""
    if warmup_iters > 0 and step < warmup_iters:
        return lr * (step + 1) / warmup_iters
    if style == "constant":
        return lr
    span = decay_iters - warmup_iters
    if span <= 0 or step >= decay_iters:
        return min_lr
    ratio = (step - warmup_iters) / span
    if style == "linear":
        coeff = 1.0 - ratio
    elif style == "cosine":
        coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
    else:
        raise ValueError(f"unknown lr_decay_style {style!r}")
    return min_lr + coeff * (lr - min_lr)


def schedule_fn(schedule: dict[str, Any]) -> Callable[[int], float]:
    """``step -> lr`` for a validated run-config ``schedule`` section."""
    return lambda step: lr_at(
        step,
        schedule["lr"],
        schedule["min_lr"],
        schedule["warmup_iters"],
        schedule["lr_decay_iters"],
        schedule["lr_decay_style"],
    )


def make_lr_scheduler(
    schedule: dict[str, Any],
) -> Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LambdaLR]:
    """A callable DeepSpeed turns into the engine's LR scheduler (``deepspeed.initialize(lr_scheduler=...)``)."""
    fn = schedule_fn(schedule)
    base = schedule["lr"]

    def build(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        for group in optimizer.param_groups:
            group["initial_lr"] = base
            group["lr"] = base
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: fn(s) / base if base > 0 else 0.0)

    return build


def restore_lr(scheduler: torch.optim.lr_scheduler.LambdaLR, schedule: dict[str, Any]) -> list[float]:
    """After ``scheduler.load_state_dict``: set every optimizer group's ``lr`` to what ``scheduler.step()`` set
    in the uninterrupted run at the restored count (``last_epoch`` = optimizer steps actually applied).

    The schedule is this run's (``schedule`` may change on resume: lr, min_lr, warmup, decay); the restored
    ``base_lrs`` are replaced by this run's ``lr``. Returns the learning rates set.
    """
    base = schedule["lr"]
    scheduler.base_lrs = [base for _ in scheduler.base_lrs]
    lrs = [b * fn(scheduler.last_epoch) for b, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
        group["initial_lr"] = base
    scheduler._last_lr = list(lrs)
    return lrs
