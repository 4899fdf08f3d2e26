"""Worker ranks exit when their launcher dies.

``torchrun`` starts its workers in sessions of their own, and ``deepspeed`` runs a per-node launcher
(``deepspeed.launcher.launch``) under its runner; after ``kill -9`` of the launcher the workers would keep
training, and a rerun would train beside them. :func:`watch_launcher` records the chain of launcher processes
above this one (the parent and its parents, as long as they are ``torchrun`` / ``torch.distributed.run`` /
``deepspeed`` launcher processes) and polls them from a daemon thread; when one is gone (or the parent changed:
this process was re-parented) the worker logs why and exits at once with ``exit_codes.FAILED``.

Not armed for processes whose parent is not a launcher (a plain ``python -m megatron_doremi.train``, ``srun``
tasks), so ``nohup`` runs outlive their shell as usual. A polling thread rather than ``PR_SET_PDEATHSIG``:
the signal fires when the parent *thread* that forked us exits, which launchers do not promise to keep alive.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from dataclasses import dataclass

from megatron_doremi.training import exit_codes

logger = logging.getLogger(__name__)

__all__ = ["LauncherWatchdog", "is_launcher", "launcher_ancestors", "watch_launcher"]

_LAUNCHER_EXECUTABLES = {"torchrun", "deepspeed"}
_LAUNCHER_MODULES = {
    "torch.distributed.run",
    "torch.distributed.launch",
    "deepspeed.launcher.launch",
    "deepspeed.launcher.runner",
}
_LAUNCHER_SCRIPTS = (
    "torch/distributed/run.py",
    "deepspeed/launcher/launch.py",
    "deepspeed/launcher/runner.py",
)


def is_launcher(cmdline: list[str]) -> bool:
    """Whether a process command line is a torchrun / deepspeed launcher (its interpreter and first arguments)."""
    head = cmdline[:4]
    for i, arg in enumerate(head):
        if os.path.basename(arg) in _LAUNCHER_EXECUTABLES or arg.endswith(_LAUNCHER_SCRIPTS):
            return True
        if arg == "-m" and i + 1 < len(head) and head[i + 1] in _LAUNCHER_MODULES:
            return True
    return False


@dataclass(frozen=True)
class _Proc:
    pid: int
    start_time: float
    cmd: str


def launcher_ancestors() -> list[_Proc]:
    """The launcher processes directly above this one, nearest first (empty when the parent is no launcher)."""
    import psutil

    out: list[_Proc] = []
    try:
        proc = psutil.Process(os.getpid()).parent()
        while proc is not None and proc.pid > 1 and is_launcher(proc.cmdline()):
            out.append(_Proc(proc.pid, proc.create_time(), " ".join(proc.cmdline()[:4])))
            proc = proc.parent()
    except (psutil.Error, OSError):
        pass
    return out


class LauncherWatchdog:
    """Polls ``watched`` every ``interval_s`` from a daemon thread; exits the process when one is gone."""

    def __init__(self, watched: list[_Proc], interval_s: float = 1.0) -> None:
        self.watched = watched
        self.interval_s = interval_s
        self.parent = os.getppid()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="launcher-watchdog", daemon=True)

    def start(self) -> LauncherWatchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def dead(self) -> _Proc | None:
        """The first watched launcher that is gone (None while all run)."""
        import psutil

        if os.getppid() != self.parent:
            return self.watched[0]
        for p in self.watched:
            try:
                if abs(psutil.Process(p.pid).create_time() - p.start_time) > 1.0:
                    return p
            except psutil.NoSuchProcess:
                return p
            except psutil.Error:
                continue
        return None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            gone = self.dead()
            if gone is not None:
                msg = (
                    f"launcher process {gone.pid} ({gone.cmd}) is gone: this worker (pid {os.getpid()}) exits"
                )
                logger.error(msg)
                print(f"error: {msg}", file=sys.stderr, flush=True)
                os._exit(exit_codes.FAILED)


def watch_launcher(interval_s: float = 1.0) -> LauncherWatchdog | None:
    """Start watching this process's launcher chain; None when it was not started by a launcher."""
    watched = launcher_ancestors()
    if not watched:
        return None
    logger.debug("watching launcher processes %s", [p.pid for p in watched])
    return LauncherWatchdog(watched, interval_s).start()
