"""An exclusive lock on a directory (a run's output directory, a pipeline's), with a heartbeat.

``with RunLock(directory, what="run"):`` holds ``{directory}/.megatron_doremi.lock`` (JSON: host, pid, process
start time, boot id, start and heartbeat times, command line) for the duration. A second holder is refused with
:class:`RunLockedError` naming the holder's host and pid. A *stale* lock is taken over with a warning:

* holder on this machine (same host name, boot id and pid namespace): stale as soon as its process is gone
  (pid not running, or running but started at another time: a reused pid);
* holder elsewhere (another node of a shared filesystem): stale when its heartbeat is older than
  ``stale_after_s`` (default 300 s; the holder rewrites it every ``heartbeat_s``, default 30 s).

Acquisition (check, then create or take over) runs under a POSIX record lock on ``.megatron_doremi.lock.mutex``
in the same directory, so two starters cannot both take the same stale lock (``fcntl`` locks also work on NFS).
The lock file is replaced atomically, so a reader never sees half of it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any

from megatron_doremi.atomic_io import atomic_write_text

logger = logging.getLogger(__name__)

__all__ = [
    "LOCK_NAME",
    "RunLock",
    "RunLockedError",
    "lock_run_dirs",
    "read_lock",
    "release_all",
    "run_lock_dirs",
]

LOCK_NAME = ".megatron_doremi.lock"
_HELD: list[RunLock] = []  # this process's locks, for release_all() on an error path


class RunLockedError(RuntimeError):
    """The directory is held by another live process; the message names its host and pid."""


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return None


def _pid_namespace() -> int | None:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _start_time(pid: int) -> float | None:
    try:
        import psutil

        return float(psutil.Process(pid).create_time())
    except Exception:  # noqa: BLE001 - psutil.NoSuchProcess, AccessDenied, ImportError
        return None


def read_lock(directory: str) -> dict[str, Any] | None:
    """The holder record of ``directory``'s lock, None when there is no lock file, ``{}`` when unreadable."""
    path = os.path.join(directory, LOCK_NAME)
    try:
        with open(path) as fh:
            info = json.load(fh)
    except FileNotFoundError:
        return None
    except PermissionError:
        raise
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


class RunLock:
    """Exclusive lock on ``directory`` (created if needed) for one process; see the module doc.

    Args:
        directory: the directory to lock.
        what: what holds it, for messages ("run", "pipeline").
        heartbeat_s: how often the holder rewrites its heartbeat.
        stale_after_s: heartbeat age after which a holder on another machine counts as dead.
    """

    def __init__(
        self, directory: str, what: str = "run", heartbeat_s: float = 30.0, stale_after_s: float = 300.0
    ) -> None:
        self.directory = os.path.abspath(directory)
        self.path = os.path.join(self.directory, LOCK_NAME)
        self.what = what
        self.heartbeat_s = float(heartbeat_s)
        self.stale_after_s = float(stale_after_s)
        self.token: str | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- holder records --------------------------------------------------------------------------------------

    def _record(self, started: float) -> dict[str, Any]:
        return {
            "what": self.what,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_start_time": _start_time(os.getpid()),
            "boot_id": _boot_id(),
            "pid_namespace": _pid_namespace(),
            "user": os.environ.get("USER") or os.environ.get("LOGNAME"),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "argv": sys.argv,
            "started": started,
            "heartbeat": time.time(),
            "token": self.token,
        }

    def _holder_alive(self, info: dict[str, Any]) -> tuple[bool, str]:
        """(alive, why) for a holder record."""
        pid = info.get("pid")
        same_machine = (
            info.get("host") == socket.gethostname()
            and info.get("boot_id") is not None
            and info.get("boot_id") == _boot_id()
            and info.get("pid_namespace") == _pid_namespace()
        )
        if same_machine and isinstance(pid, int):
            started = _start_time(pid)
            if started is None:
                return False, f"process {pid} is not running"
            recorded = info.get("pid_start_time")
            if recorded is not None and abs(started - float(recorded)) > 1.0:
                return False, f"pid {pid} now belongs to another process"
            return True, f"process {pid} is running"
        age = time.time() - float(info.get("heartbeat") or 0.0)
        if age > self.stale_after_s:
            return False, f"its heartbeat is {age:.0f} s old (stale after {self.stale_after_s:.0f} s)"
        return True, f"its heartbeat is {age:.0f} s old"

    def _refusal(self, info: dict[str, Any], why: str) -> RunLockedError:
        started = info.get("started")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
        job = f", SLURM job {info['slurm_job_id']}" if info.get("slurm_job_id") else ""
        return RunLockedError(
            f"{self.directory} is in use by another {info.get('what', 'run')}: host {info.get('host')}, pid "
            f"{info.get('pid')}{job}, since {since} ({why}); lock file {self.path}. Stop that process first, or "
            f"use another directory; a lock whose holder died is taken over automatically"
        )

    # ---- acquire / release -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _mutex(self):
        fd = os.open(self.path + ".mutex", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.lockf(fd, fcntl.LOCK_UN)
            os.close(fd)

    def acquire(self) -> RunLock:
        """Take the lock (RunLockedError if a live process holds it) and start the heartbeat thread."""
        if self.token is not None:
            return self
        os.makedirs(self.directory, exist_ok=True)
        token = uuid.uuid4().hex
        with self._mutex():
            try:
                info = read_lock(self.directory)
            except PermissionError as exc:
                raise RunLockedError(
                    f"{self.directory} is locked by another user (lock file {self.path} is not readable: {exc})"
                ) from None
            if info is not None:
                if info:
                    alive, why = self._holder_alive(info)
                    if alive:
                        raise self._refusal(info, why)
                    logger.warning(
                        "taking over the stale lock of %s: it was held by host %s pid %s, but %s",
                        self.directory,
                        info.get("host"),
                        info.get("pid"),
                        why,
                    )
                else:
                    logger.warning("taking over the unreadable lock file %s", self.path)
            self.token = token
            atomic_write_text(self.path, json.dumps(self._record(time.time()), indent=1) + "\n")
        self._started = time.time()
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._heartbeat, name=f"lock-heartbeat:{self.directory}", daemon=True
        )
        self._thread.start()
        _HELD.append(self)
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                info = read_lock(self.directory)
                if not info or info.get("token") != self.token:
                    self.lost = True
                    logger.error(
                        "lost the lock on %s: it was taken over by host %s pid %s",
                        self.directory,
                        (info or {}).get("host"),
                        (info or {}).get("pid"),
                    )
                    return
                atomic_write_text(self.path, json.dumps(self._record(self._started), indent=1) + "\n")
            except OSError as exc:  # a full disk must not kill the run; the next beat retries
                logger.warning("lock heartbeat on %s failed: %s", self.path, exc)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if this process still holds it."""
        if self.token is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            with self._mutex():
                info = read_lock(self.directory)
                if info and info.get("token") == self.token:
                    os.unlink(self.path)
        except OSError as exc:
            logger.warning("could not remove the lock file %s: %s", self.path, exc)
        self.token = None
        if self in _HELD:
            _HELD.remove(self)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def release_all() -> None:
    """Release every lock this process holds (an error path that exits without the normal teardown)."""
    for lock in list(_HELD):
        lock.release()


def run_lock_dirs(output_dir: str, checkpoint_save: str | None) -> list[str]:
    """The directories a training run locks: its output directory, and its checkpoint directory when that is
    not inside the output directory."""
    dirs = [os.path.abspath(output_dir)]
    if checkpoint_save:
        save = os.path.abspath(checkpoint_save)
        if os.path.commonpath([save, dirs[0]]) != dirs[0]:
            dirs.append(save)
    return dirs


def lock_run_dirs(directories: list[str], rank: int, what: str = "run") -> list[RunLock]:
    """Collective: rank 0 locks every directory; all ranks raise the same RunLockedError when one is held.

    Returns rank 0's locks (empty elsewhere); release them with :meth:`RunLock.release`.
    """
    import torch

    locks: list[RunLock] = []
    failure: tuple[str, str] | None = None
    if rank == 0:
        try:
            for d in directories:
                locks.append(RunLock(d, what).acquire())
        except Exception as exc:  # noqa: BLE001 - every rank must learn about it
            for lock in locks:
                lock.release()
            locks = []
            failure = (type(exc).__name__, str(exc))
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        box = [failure]
        torch.distributed.broadcast_object_list(box, src=0)
        failure = box[0]
    if failure is not None:
        kind, message = failure
        if kind == "RunLockedError":
            raise RunLockedError(message)
        raise OSError(f"cannot lock {', '.join(directories)}: {kind}: {message}")
    return locks
