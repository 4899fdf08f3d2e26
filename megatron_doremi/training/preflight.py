"""Checks before training starts, so a run fails in seconds with a clear message instead of hours later.

* :func:`check_output_paths` (no process group yet): every output path (``output_dir``, ``checkpoint.save``,
  ``checkpoint.export_hf``) can be a directory: no existing part of it is a file.
* :func:`check_split_vocab` (collective): the token ids of the samples evaluation will read are below the model's
  vocabulary (training batches are checked as they are drawn; evaluation would otherwise fail only at the first
  eval, or at the end of the run).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from megatron_doremi.training.config import ConfigError, RunConfig

__all__ = ["check_output_paths", "check_split_vocab"]


def _file_in_path(path: str) -> str | None:
    """The first existing part of ``path`` that is not a directory, or None."""
    current = os.path.abspath(path)
    parts = []
    while True:
        parts.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    for part in reversed(parts):
        if os.path.exists(part) and not os.path.isdir(part):
            return part
    return None


def check_output_paths(cfg: RunConfig) -> None:
    """ConfigError naming the key when an output directory path runs through (or is) an existing file."""
    keys = {"output_dir": cfg.output_dir}
    for key in ("save", "export_hf"):
        if cfg.checkpoint.get(key):
            keys[f"checkpoint.{key}"] = cfg.checkpoint[key]
    for key, path in keys.items():
        blocker = _file_in_path(path)
        if blocker is not None:
            raise ConfigError(
                f"{cfg.source}: {key}: {path!r} cannot be a directory: {blocker!r} is a file, not a directory"
            )


def check_split_vocab(
    datasets: Sequence[Any],
    names: Sequence[str],
    split: str,
    num_samples: int,
    vocab_size: int,
    rank: int,
    world_size: int,
    device: torch.device,
    chunk: int = 256,
) -> None:
    """Collective: ConfigError naming the domain when one of the first ``num_samples`` samples of its
    ``split`` dataset has a token id >= ``vocab_size``. Rank ``r`` reads chunks ``r, r+W, ...``; the per-domain
    maxima are all-reduced (MAX), so every rank raises the same error."""
    top = torch.full((len(datasets),), -1, dtype=torch.int64)
    for d, ds in enumerate(datasets):
        total = min(int(num_samples), len(ds))
        for start in range(rank * chunk, total, world_size * chunk):
            ks = np.arange(start, min(start + chunk, total), dtype=np.int64)
            top[d] = max(int(top[d]), int(ds.get_batch(ks).max()))
    top = top.to(device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(top, op=torch.distributed.ReduceOp.MAX)
    bad = [(n, int(t)) for n, t in zip(names, top.tolist()) if t >= vocab_size]
    if bad:
        found = ", ".join(f"{n}: token id {t}" for n, t in bad)
        raise ConfigError(
            f"the {split} split has token ids >= the model's vocab_size {vocab_size} ({found}); the shards were "
            "made with a different tokenizer, or model.vocab_size is too small"
        )
