"""Outputs honour the process umask: 0644/0755 under 022 (teammates can read), 0600/0700 under 077.

Here: the atomic writers every report, summary, ``latest`` and weights file goes through, and the temp directory
of the HF export. The whole run directory of real 2-rank runs (checkpoint dirs and files, ``latest``, the HF export,
metrics/eval logs, summaries, DoReMi weights and plot) is checked with :func:`assert_modes` in tests/test_signals.py,
under umask 022 for the reference run and 077 for the interrupted one.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from megatron_doremi.atomic_io import (
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    current_umask,
    make_temp_dir,
    umask_tree,
)
from megatron_doremi.mixers.weights_io import write_domain_weights_json
from megatron_doremi.training.metrics import JsonlLog

UMASKS = [0o022, 0o077]


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def assert_modes(root: Path, mask: int, skip: tuple[str, ...] = ()) -> int:
    """Every file and directory under ``root`` (names in ``skip`` left out, with what is below them) has no
    permission bit that ``mask`` forbids, and every read bit (directories: read and search) it allows; returns how
    many paths were checked."""
    checked = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            mode = stat.S_IMODE(path.lstat().st_mode)
            wanted = (0o555 if path.is_dir() else 0o444) & ~mask
            assert mode & mask == 0, f"{path}: mode {mode:o} has bits umask {mask:03o} forbids"
            assert mode & wanted == wanted, f"{path}: mode {mode:o} lacks {wanted:o} (umask {mask:03o})"
            checked += 1
    return checked


def test_current_umask_reads_without_changing():
    with umask(0o027):
        assert current_umask() == 0o027
        assert current_umask() == 0o027


@pytest.mark.parametrize("mask", UMASKS)
def test_atomic_writers_and_temp_dirs_honour_the_umask(tmp_path, mask):
    with umask(mask):
        atomic_write_text(tmp_path / "a" / "latest", "global_step4")
        atomic_write_json(tmp_path / "summary.json", {"x": 1})
        atomic_write(tmp_path / "plot.png", lambda fh: fh.write(b"\x89PNG"), mode="wb")
        write_domain_weights_json(tmp_path / "domain_weights.json", ["a", "b"], [0.5, 0.5], [0.4, 0.6])
        log = JsonlLog(str(tmp_path / "logs" / "metrics.jsonl"))
        log.write({"step": 1})
        log.write({"step": 2})
        log.truncate_after(1)
        tmp = make_temp_dir(str(tmp_path), ".export_tmp_")
    assert stat.S_IMODE(os.stat(tmp).st_mode) == 0o777 & ~mask
    assert stat.S_IMODE(os.stat(tmp_path / "a" / "latest").st_mode) == 0o666 & ~mask
    assert assert_modes(tmp_path, mask) == 8


def test_an_existing_file_gets_the_umask_mode_too(tmp_path):
    path = tmp_path / "f.json"
    path.write_text("{}")
    path.chmod(0o600)
    with umask(0o022):
        atomic_write_json(path, {"y": 2})
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


@pytest.mark.parametrize("mask", UMASKS)
def test_umask_tree_fixes_a_library_written_tree(tmp_path, mask):
    # what the HF export does after save_pretrained: safetensors writes its file 0600
    (tmp_path / "sub").mkdir(mode=0o700)
    (tmp_path / "sub" / "model.safetensors").write_bytes(b"x")
    (tmp_path / "sub" / "model.safetensors").chmod(0o600)
    (tmp_path / "run.sh").write_text("#!/bin/sh\n")
    (tmp_path / "run.sh").chmod(0o700)
    with umask(mask):
        umask_tree(tmp_path)
    assert stat.S_IMODE((tmp_path / "sub" / "model.safetensors").stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE((tmp_path / "run.sh").stat().st_mode) == 0o777 & ~mask
    assert assert_modes(tmp_path, mask) == 3
