"""Exit statuses of ``python -m megatron_doremi.train`` (and the tools that launch it), one place for all.

Launchers (the pipeline, ``regmix train``, sbatch templates) compare against these names, never literals.
"""

from __future__ import annotations

__all__ = ["CONFIG_ERROR", "DIVERGED", "FAILED", "LOCKED", "OK", "REQUEUE", "describe"]

OK = 0
#: a runtime error (the message is on stderr)
FAILED = 1
#: the run config or the command line is invalid; nothing was started
CONFIG_ERROR = 2
#: training stopped because it diverged (too many skipped / non-finite steps); the last good checkpoint is kept
DIVERGED = 3
#: the run directory is held by another live run (its host and pid are in the message)
LOCKED = 4
#: stopped on a signal (SIGTERM / SIGUSR1) or a wall-clock limit after saving a complete checkpoint: rerun the same
#: command (or let SLURM requeue the job) and it resumes exactly. 75 is sysexits' EX_TEMPFAIL.
REQUEUE = 75

_MEANING = {
    OK: "finished",
    FAILED: "failed",
    CONFIG_ERROR: "invalid configuration",
    DIVERGED: "diverged",
    LOCKED: "run directory locked by another run",
    REQUEUE: "stopped after a checkpoint (signal or time limit); rerun to resume",
}


def describe(status: int) -> str:
    """A few words for an exit status (``"exit status 9"`` for unknown ones; negative = killed by a signal)."""
    if status < 0:
        return f"killed by signal {-status}"
    return _MEANING.get(status, f"exit status {status}")
