"""Stop cleanly on a signal or before a wall-clock budget runs out: finish the step, save, exit REQUEUE.

A cluster ends a job with a signal (SLURM: ``--signal=B:USR1@300`` forwarded by the sbatch templates 300 s before
the time limit, SIGTERM on pre-emption or at the limit) or by the job's time limit. With ``checkpoint.save`` set,
the trainer installs a handler for each of ``checkpoint.exit_signals`` (default SIGTERM and SIGUSR1). The handler
only records the signal; the loop then calls :meth:`ExitGuard.should_stop` once per optimizer step, on every rank
at the same point, which all-reduces (MAX) ``[signal number, budget exceeded]`` over the ranks, so one rank that got
the signal is enough and every rank takes the same decision at the same step (same collective sequence). The
trainer then saves a complete checkpoint of that step (``latest`` is written after every rank saved) and the process
exits with :data:`exit_codes.REQUEUE`; rerunning the command resumes exactly from it.

``checkpoint.exit_duration_mins`` (Megatron's ``--exit-duration-in-mins``) stops the same way at the first step
boundary after that many minutes since the process started; leave room for one step plus a save before the job's
limit.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from megatron_doremi.training import dist

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_EXIT_SIGNALS", "ExitGuard", "parse_signal", "process_start_time", "validate_exit_options"]

DEFAULT_EXIT_SIGNALS = ("SIGTERM", "SIGUSR1")
_UNCATCHABLE = {signal.SIGKILL, signal.SIGSTOP}


def parse_signal(name: Any) -> signal.Signals:
    """``"SIGUSR1"``, ``"USR1"`` or ``10`` -> ``signal.SIGUSR1``; ValueError for unknown or uncatchable ones."""
    try:
        if isinstance(name, int) and not isinstance(name, bool):
            sig = signal.Signals(name)
        elif isinstance(name, str):
            text = name.strip().upper()
            sig = signal.Signals[text if text.startswith("SIG") else f"SIG{text}"]
        else:
            raise KeyError(name)
    except (KeyError, ValueError):
        raise ValueError(f"unknown signal {name!r} (e.g. SIGTERM, SIGUSR1, SIGUSR2, SIGINT)") from None
    if sig in _UNCATCHABLE:
        raise ValueError(f"{sig.name} cannot be caught")
    return sig


def validate_exit_options(source: str, ckpt: dict[str, Any]) -> None:
    """Check ``checkpoint.exit_signals`` / ``exit_duration_mins`` in place (names normalised to ``SIGxxx``)."""
    from megatron_doremi.training.config import ConfigError

    names = ckpt.get("exit_signals")
    if names is None:
        names = []
    if not isinstance(names, list):
        raise ConfigError(
            f'{source}: checkpoint.exit_signals must be a list of signal names, e.g. ["SIGTERM", "SIGUSR1"]'
        )
    parsed = []
    for i, name in enumerate(names):
        try:
            parsed.append(parse_signal(name).name)
        except ValueError as exc:
            raise ConfigError(f"{source}: checkpoint.exit_signals[{i}]: {exc}") from None
    ckpt["exit_signals"] = list(dict.fromkeys(parsed))
    mins = ckpt.get("exit_duration_mins")
    if mins is not None:
        if (
            isinstance(mins, bool)
            or not isinstance(mins, (int, float))
            or not math.isfinite(mins)
            or mins <= 0
        ):
            raise ConfigError(
                f"{source}: checkpoint.exit_duration_mins must be a number > 0 (minutes), got {mins!r}"
            )
        if not ckpt.get("save"):
            raise ConfigError(
                f"{source}: checkpoint.exit_duration_mins stops the run after a checkpoint: set checkpoint.save too"
            )
        ckpt["exit_duration_mins"] = float(mins)


def process_start_time() -> float:
    """Wall-clock time (s since the epoch) at which this process started; ``time.time()`` if unknown."""
    try:
        import psutil

        return float(psutil.Process().create_time())
    except Exception:  # noqa: BLE001 - psutil comes with DeepSpeed; without it the budget starts now
        return time.time()


class ExitGuard:
    """Signal handlers plus the per-step stop decision (collective: :meth:`should_stop`).

    Args:
        signals: signals to catch (empty: none; the process keeps the default actions).
        exit_duration_mins: wall-clock budget from ``start_time``, or None.
        device: where the decision tensor lives (the process group's device: cuda for NCCL).
        start_time: budget origin (default: the process start).
    """

    def __init__(
        self,
        signals: Sequence[str | int],
        exit_duration_mins: float | None,
        device: torch.device,
        start_time: float | None = None,
    ) -> None:
        self.signals = [parse_signal(s) for s in signals]
        self.exit_duration_mins = exit_duration_mins
        self.device = device
        self.start_time = process_start_time() if start_time is None else start_time
        self.received: signal.Signals | None = None
        self.received_during: str | None = None
        self.activity = "training"  # what the trainer does now (see doing()), for the log line
        self._previous: dict[signal.Signals, Any] = {}

    @classmethod
    def from_config(cls, checkpoint: dict[str, Any], device: torch.device) -> ExitGuard:
        """The guard for a run config's ``checkpoint`` section: no handlers without ``checkpoint.save`` (a stop
        could not be resumed)."""
        names = (checkpoint.get("exit_signals") or []) if checkpoint.get("save") else []
        return cls(names, checkpoint.get("exit_duration_mins"), device)

    @property
    def active(self) -> bool:
        """Whether :meth:`should_stop` can ever say stop (the same on every rank: it depends on the config only)."""
        return bool(self.signals) or self.exit_duration_mins is not None

    @contextlib.contextmanager
    def doing(self, what: str) -> Iterator[None]:
        """Label what the trainer is doing (``"saving a checkpoint"``) for the log line of a signal received then."""
        before, self.activity = self.activity, what
        try:
            yield
        finally:
            self.activity = before

    def install(self) -> None:
        """Install the handlers (main thread only; elsewhere Python cannot, and the defaults stay)."""
        if threading.current_thread() is not threading.main_thread():
            logger.warning("exit signals not handled: the trainer does not run in the main thread")
            return
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        """Put the previous handlers back."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        # Only record: the step, a save or an evaluation in progress finishes; the loop decides at the boundary.
        if self.received is None:
            self.received = signal.Signals(signum)
            self.received_during = self.activity

    def budget_exceeded(self, now: float | None = None) -> bool:
        if self.exit_duration_mins is None:
            return False
        return ((time.time() if now is None else now) - self.start_time) / 60.0 >= self.exit_duration_mins

    def should_stop(self) -> str | None:
        """Collective, once per step on every rank: the agreed reason to stop now, or None.

        The reason is ``"signal SIGUSR1"`` (the largest signal number any rank received) or ``"time limit
        (exit_duration_mins=M)"``; identical on every rank.
        """
        local = torch.tensor(
            [float(self.received or 0), 1.0 if self.budget_exceeded() else 0.0],
            dtype=torch.float64,
            device=self.device,
        )
        signum, over_budget = (int(v) for v in dist.all_reduce_max(local).tolist())
        if signum:
            if self.received is not None:
                logger.warning("received %s while %s", self.received.name, self.received_during)
            return f"signal {signal.Signals(signum).name}"
        if over_budget:
            return f"time limit (exit_duration_mins={self.exit_duration_mins:g})"
        return None
