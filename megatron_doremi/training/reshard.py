"""Resume a ZeRO checkpoint with another data-parallel world size through DeepSpeed's universal checkpoint.

ZeRO partitions the fp32 master weights and the Adam moments by rank, so a checkpoint saved by W ranks cannot be
loaded by W' != W ranks as it is. DeepSpeed's ``ds_to_universal`` rewrites it as one file per parameter and
state (``fp32``, ``exp_avg``, ``exp_avg_sq``, unpartitioned); an engine built with
``{"checkpoint": {"load_universal": true}}`` then loads its own slice of every parameter. The universal form is
written once per checkpoint, by rank 0, into ``{tag_dir}/universal/`` (atomically: a temp directory renamed), and
is deleted with the checkpoint.

DeepSpeed 0.19.8's ZeRO-3 universal loader has two faults that :func:`fix_universal_load` repairs after loading:
it copies the hyper-parameters of the first optimizer group to all groups (the no-weight-decay group of norms
would get weight decay), and it gives every group's Adam state the *same* ``step`` tensor, which the optimizer
increments in place once per group, so from the second group on the bias correction runs ahead (measured: the
norm weights moved 1e-4 away from a same-world-size resume after one step).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import shutil
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = ["UNIVERSAL_DIR", "convert_to_universal", "fix_universal_load", "universal_ds_config"]

UNIVERSAL_DIR = "universal"


def universal_ds_config(ds_config: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``ds_config`` whose engine loads universal checkpoints."""
    out = dict(ds_config)
    out["checkpoint"] = {**dict(ds_config.get("checkpoint") or {}), "load_universal": True}
    return out


def convert_to_universal(tag_dir: str) -> str:
    """Write ``{tag_dir}/universal`` (if not there yet) from the ZeRO files of ``tag_dir``; returns its path.

    One process, no worker pool; DeepSpeed's console output is kept out of the run's log.
    """
    out = os.path.join(tag_dir, UNIVERSAL_DIR)
    if os.path.isfile(os.path.join(out, "zero", "optimizer_state.pt")):
        return out
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    tmp = os.path.join(tag_dir, f".universal.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=tag_dir,
        output_folder=tmp,
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            ds_to_universal(args)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        logger.error(
            "universal conversion of %s failed; DeepSpeed said:\n%s", tag_dir, sink.getvalue()[-3000:]
        )
        raise
    finally:
        # ds_to_universal also writes {parent of output}/latest_universal, which nothing here reads
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(tag_dir, "latest_universal"))
    os.replace(tmp, out)
    return out


def fix_universal_load(optimizer: Any, universal_dir: str) -> None:
    """After a universal load: every optimizer group gets back its own saved hyper-parameters (weight decay,
    betas, eps), not group 0's, and every parameter state its own ``step`` tensor.

    ``optimizer``: the engine's optimizer (a ZeRO wrapper with ``.optimizer``, or a torch optimizer).
    """
    path = os.path.join(universal_dir, "zero", "optimizer_state.pt")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    groups = saved.get("param_groups") or saved.get("optimizer_state_dict", {}).get("param_groups")
    target = getattr(optimizer, "optimizer", optimizer)
    if not groups or len(groups) != len(target.param_groups):
        raise ValueError(
            f"{path}: {len(groups or [])} saved optimizer groups, the engine has {len(target.param_groups)}"
        )
    for group, old in zip(target.param_groups, groups):
        for key, value in old.items():
            if key not in ("params", "lr", "initial_lr"):
                group[key] = value
    for state in target.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()
