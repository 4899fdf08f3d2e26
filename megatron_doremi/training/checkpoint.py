"""Checkpoints: DeepSpeed engine state under ``{save}/global_step{N}/`` plus loader/mixer/RNG state.

Layout of one tag directory (besides DeepSpeed's own files):

* ``client_state`` inside DeepSpeed's model-states file: ``{"step", "loader", "mixer", "domain_names", ...}``
* ``trainer_state.json``: the same client state, readable (rank 0)
* ``rng_state_rank{r}.pt``: python/numpy/torch(/cuda) RNG state of rank ``r``
* ``hf_config.json``: the model's HF config (what ``tools/export_hf.py`` needs), ``run_config.json``

``{save}/latest`` names the newest *complete* checkpoint: DeepSpeed's own ``latest`` is disabled and the file is
written atomically (temp name, fsync, rename) by rank 0 only after every rank has finished writing, so a job
killed during a save resumes from the previous checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from typing import Any

import numpy as np
import torch

from megatron_doremi.atomic_io import atomic_write_text
from megatron_doremi.training.dist import barrier

logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "atomic_write_text",
    "load_checkpoint",
    "read_latest",
    "resolve_checkpoint",
    "save_checkpoint",
    "step_tag",
]


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be used; the message names the path."""


def step_tag(step: int) -> str:
    return f"global_step{step}"


def read_latest(load_dir: str) -> str | None:
    """The tag named by ``{load_dir}/latest``, or None when there is no such file."""
    path = os.path.join(load_dir, "latest")
    if not os.path.isfile(path):
        return None
    tag = open(path).read().strip()
    if not tag:
        raise CheckpointError(f"{path} is empty")
    if not os.path.isdir(os.path.join(load_dir, tag)):
        raise CheckpointError(f"{path} names {tag!r} but {os.path.join(load_dir, tag)} does not exist")
    return tag


def resolve_checkpoint(path: str) -> tuple[str, str]:
    """``(load_dir, tag)`` from a checkpoint directory holding ``latest`` or from a tag directory itself."""
    path = os.path.normpath(path)
    if os.path.isfile(os.path.join(path, "latest")):
        tag = read_latest(path)
        assert tag is not None
        return path, tag
    if os.path.isdir(path) and re.fullmatch(r"global_step\d+", os.path.basename(path)):
        return os.path.dirname(path) or ".", os.path.basename(path)
    raise CheckpointError(
        f"{path}: neither a checkpoint directory with a 'latest' file nor a global_step<N> directory"
    )


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    engine: Any,
    save_dir: str,
    step: int,
    client_state: dict[str, Any],
    rank: int,
    extra_json: dict[str, Any] | None = None,
) -> str:
    """Collective: save ``engine`` + ``client_state`` as ``global_step{step}``; rank 0 then updates ``latest``.

    ``extra_json`` maps file names to JSON-able objects written into the tag directory by rank 0.
    Returns the tag directory.
    """
    tag = step_tag(step)
    tag_dir = os.path.join(save_dir, tag)
    os.makedirs(tag_dir, exist_ok=True)
    torch.save(rng_state(), os.path.join(tag_dir, f"rng_state_rank{rank}.pt"))
    if rank == 0:
        for name, obj in {"trainer_state.json": client_state, **(extra_json or {})}.items():
            atomic_write_text(os.path.join(tag_dir, name), json.dumps(obj, indent=1) + "\n")
    engine.save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=False)
    barrier()  # every rank's shards are on disk
    if rank == 0:
        atomic_write_text(os.path.join(save_dir, "latest"), tag)
    barrier()
    return tag_dir


def load_checkpoint(
    engine: Any,
    load_dir: str,
    tag: str | None,
    rank: int,
    module_only: bool = False,
) -> dict[str, Any] | None:
    """Collective: load ``tag`` (default: ``latest``) into ``engine``; returns the client state, or None when
    ``load_dir`` has no ``latest`` (a fresh run). Restores this rank's RNG state when the file exists."""
    if tag is None:
        tag = read_latest(load_dir)
        if tag is None:
            return None
    load_path, client_state = engine.load_checkpoint(
        load_dir,
        tag=tag,
        load_optimizer_states=not module_only,
        load_lr_scheduler_states=not module_only,
        load_module_only=module_only,
    )
    if load_path is None:
        raise CheckpointError(f"{os.path.join(load_dir, tag)}: DeepSpeed could not load this checkpoint")
    rng_file = os.path.join(load_dir, tag, f"rng_state_rank{rank}.pt")
    if not module_only:
        if os.path.isfile(rng_file):
            set_rng_state(torch.load(rng_file, weights_only=False))
        else:
            logger.warning("%s missing (different world size?): RNG state not restored", rng_file)
    return dict(client_state or {}, tag=tag)
