"""Shared fixtures: small token shards written with the project's own writer."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from megatron_doremi.data.indexed import IndexedDatasetWriter

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a launcher's master port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env() -> dict[str, str]:
    """This environment for a child launcher: no inherited rank variables, the repo importable, 1 OMP thread."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_checked(cmd: list[str], timeout: int, ok: bool = True) -> subprocess.CompletedProcess:
    """Run ``cmd`` in the repo with :func:`launch_env`; with ``ok``, assert it exited 0 (showing its output)."""
    proc = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=timeout)
    if ok:
        assert proc.returncode == 0, (
            f"{' '.join(cmd)}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}"
        )
    return proc


def sigkill_when(
    cmd: list[str], ready: Callable[[], bool], timeout: float, cwd: str | os.PathLike[str]
) -> None:
    """Start ``cmd`` in its own process group, SIGKILL the whole group as soon as ``ready()`` holds (polled every
    50 ms); fails if the run ends first or ``ready`` never holds within ``timeout`` seconds."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=launch_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None and not ready():
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def write_shard(prefix: str, documents: list[np.ndarray], dtype: np.dtype = np.uint16) -> str:
    """Write ``documents`` (1-D int arrays) as a Megatron shard at ``prefix``; returns the prefix."""
    with IndexedDatasetWriter(prefix, np.dtype(dtype)) as writer:
        for doc in documents:
            writer.add_document(np.asarray(doc))
    return prefix


def random_documents(
    rng: np.random.Generator, n: int, low: int, high: int, vocab: int = 1000
) -> list[np.ndarray]:
    """``n`` documents of random lengths in [low, high) with random token ids < vocab."""
    return [rng.integers(0, vocab, size=int(rng.integers(low, high))) for _ in range(n)]


@pytest.fixture
def make_shard(tmp_path):
    """Factory: make_shard(name, documents, dtype=uint16) -> prefix inside tmp_path."""

    def _make(name: str, documents: list[np.ndarray], dtype: np.dtype = np.uint16) -> str:
        return write_shard(str(tmp_path / f"{name}_text_document"), documents, dtype)

    return _make
