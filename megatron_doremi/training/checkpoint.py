"""Checkpoints: DeepSpeed engine state under ``{save}/global_step{N}/`` plus loader/mixer/RNG state.

Layout of one tag directory (besides DeepSpeed's own files):

* ``client_state`` inside DeepSpeed's model-states file: ``{"step", "loader", "mixer", "domain_names", ...}``
* ``trainer_state.json``: the same client state, readable (rank 0)
* ``rng_state_rank{r}.pt``: python/numpy/torch(/cuda) RNG state of rank ``r``
* ``hf_config.json``: the model's HF config (what ``tools/export_hf.py`` needs), ``run_config.json``
* ``complete.json``: the completeness marker, written by rank 0 after every rank has finished writing: the step,
  the world size and the size of every file of the checkpoint (a truncated or missing file is named on load)
* ``universal/``: DeepSpeed's universal form of the checkpoint, made when a run resumes it with another
  data-parallel world size (:mod:`.reshard`)

``{save}/latest`` names the newest complete checkpoint: DeepSpeed's own ``latest`` is disabled and the file is
written atomically by rank 0 right after the marker, so a job killed during a save resumes from the previous
checkpoint. Without ``latest`` a run resumes from the newest complete ``global_step*`` (:func:`find_resume_tag`).
A failed save (no space left, ...) is agreed on by all ranks and raised as one :class:`CheckpointError`; the
incomplete directory is removed and ``latest`` still names the previous checkpoint.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
import time
import zipfile
from typing import Any

import numpy as np
import torch

from megatron_doremi.atomic_io import atomic_write_text
from megatron_doremi.training.dist import all_reduce_sum, barrier

logger = logging.getLogger(__name__)

__all__ = [
    "COMPLETE_MARKER",
    "CheckpointError",
    "agree_failures",
    "apply_retention",
    "atomic_write_text",
    "checkpoint_world_size",
    "find_resume_tag",
    "list_checkpoints",
    "load_checkpoint",
    "move_aside",
    "read_latest",
    "remove_stale_files",
    "resolve_checkpoint",
    "save_checkpoint",
    "step_tag",
    "verify_checkpoint_files",
]

COMPLETE_MARKER = "complete.json"
UNIVERSAL_DIR = "universal"
_TAG_RE = re.compile(r"global_step(\d+)")
#: below this many free bytes after a failed write, the failure is reported as "no space left"
_LOW_SPACE_BYTES = 64 << 20


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be used, or a save that failed; the message names the path."""


def step_tag(step: int) -> str:
    return f"global_step{step}"


def _tag_step(tag: str) -> int | None:
    m = _TAG_RE.fullmatch(tag)
    return int(m.group(1)) if m else None


def is_complete(tag_dir: str) -> bool:
    return os.path.isfile(os.path.join(tag_dir, COMPLETE_MARKER))


def list_checkpoints(save_dir: str) -> list[tuple[int, str, bool]]:
    """``(step, tag, complete)`` of every ``global_step<N>`` directory in ``save_dir``, oldest first."""
    if not os.path.isdir(save_dir):
        return []
    out = []
    for name in os.listdir(save_dir):
        step = _tag_step(name)
        if step is not None and os.path.isdir(os.path.join(save_dir, name)):
            out.append((step, name, is_complete(os.path.join(save_dir, name))))
    return sorted(out)


def _describe(checkpoints: list[tuple[int, str, bool]]) -> str:
    return ", ".join(f"{tag} ({'complete' if done else 'incomplete'})" for _, tag, done in checkpoints)


def read_latest(load_dir: str) -> str | None:
    """The tag named by ``{load_dir}/latest``, or None when there is no such file.

    CheckpointError naming the path when the file is not a tag (garbage), or names a missing directory.
    """
    path = os.path.join(load_dir, "latest")
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as fh:
        raw = fh.read(4096)
    try:
        tag = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        tag = "\ufffd"  # not text: reported as garbage below
    if not tag:
        raise CheckpointError(
            f"{path} is empty: expected the name of a checkpoint directory like global_step<N>"
        )
    if _tag_step(tag) is None:
        raise CheckpointError(
            f"{path} does not name a checkpoint: expected global_step<N>, got {raw[:60]!r}; "
            "remove it to resume from the newest complete checkpoint"
        )
    tag_dir = os.path.join(load_dir, tag)
    if not os.path.isdir(tag_dir):
        raise CheckpointError(
            f"{path} names {tag!r} but {tag_dir} does not exist; "
            f"checkpoints present: {_describe(list_checkpoints(load_dir)) or 'none'}"
        )
    return tag


def find_resume_tag(load_dir: str) -> str | None:
    """The checkpoint a run resumes from: ``latest``, else the newest complete ``global_step<N>``; None if none.

    CheckpointError listing the directories when there are checkpoints but none is complete (never start over
    silently: ``checkpoint.restart=true`` does that).
    """
    tag = read_latest(load_dir)
    if tag is not None:
        return tag
    found = list_checkpoints(load_dir)
    complete = [tag for _, tag, done in found if done]
    if complete:
        logger.warning(
            "checkpoint: %s has no 'latest'; resuming from the newest complete checkpoint %s (found: %s)",
            load_dir,
            complete[-1],
            _describe(found),
        )
        return complete[-1]
    if found:
        raise CheckpointError(
            f"{load_dir} has no 'latest' and no complete checkpoint (one with {COMPLETE_MARKER}): {_describe(found)}; "
            "set checkpoint.restart=true to start over (the old checkpoints are moved aside)"
        )
    return None


def resolve_checkpoint(path: str) -> tuple[str, str]:
    """``(load_dir, tag)`` from a checkpoint directory holding ``latest`` or from a tag directory itself."""
    path = os.path.normpath(path)
    if os.path.isfile(os.path.join(path, "latest")):
        tag = read_latest(path)
        assert tag is not None
        return path, tag
    if os.path.isdir(path) and _tag_step(os.path.basename(path)) is not None:
        return os.path.dirname(path) or ".", os.path.basename(path)
    raise CheckpointError(
        f"{path}: neither a checkpoint directory with a 'latest' file nor a global_step<N> directory"
    )


def read_marker(tag_dir: str) -> dict[str, Any] | None:
    """The completeness marker of ``tag_dir`` (None for a checkpoint saved before markers existed)."""
    path = os.path.join(tag_dir, COMPLETE_MARKER)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as fh:
            marker = json.load(fh)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable completeness marker ({exc})") from None
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), dict):
        raise CheckpointError(f"{path}: not a completeness marker (expected an object with 'files')")
    return marker


def checkpoint_world_size(tag_dir: str) -> int | None:
    """The data-parallel world size a checkpoint was saved with (marker, else DeepSpeed's per-rank file names)."""
    marker = read_marker(tag_dir)
    if marker is not None and marker.get("world_size"):
        return int(marker["world_size"])
    ranks = set()
    for name in os.listdir(tag_dir):
        m = re.match(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$", name)
        if m:
            ranks.add(int(m.group(1)))
    return len(ranks) or None


def _tag_files(tag_dir: str) -> dict[str, int]:
    files = {}
    for root, dirs, names in os.walk(tag_dir):
        rel_root = os.path.relpath(root, tag_dir)
        if rel_root == ".":
            dirs[:] = [d for d in dirs if d != UNIVERSAL_DIR and not d.startswith(".")]
        for name in names:
            if name == COMPLETE_MARKER or name.startswith("."):
                continue
            rel = name if rel_root == "." else os.path.join(rel_root, name)
            files[rel] = os.path.getsize(os.path.join(root, name))
    return files


def verify_checkpoint_files(tag_dir: str) -> None:
    """CheckpointError naming the file when a file of ``tag_dir`` is missing, truncated or not a torch file.

    With a marker, every file must have the size the save wrote; without one (older checkpoints), every ``.pt``
    file must end with an intact zip directory (what ``torch.save`` writes; truncation cuts it off).
    """
    if not os.listdir(tag_dir):
        raise CheckpointError(
            f"checkpoint directory {tag_dir} is empty (its files were deleted, or the save never wrote them)"
        )
    marker = read_marker(tag_dir)
    if marker is not None:
        for rel, size in sorted(marker["files"].items()):
            path = os.path.join(tag_dir, rel)
            if not os.path.isfile(path):
                raise CheckpointError(f"checkpoint file {path} is missing (the save wrote {size} bytes)")
            actual = os.path.getsize(path)
            if actual != size:
                raise CheckpointError(
                    f"checkpoint file {path} is truncated or changed: {actual} bytes, the save wrote {size}"
                )
        return
    for name in sorted(os.listdir(tag_dir)):
        if name.endswith(".pt"):
            path = os.path.join(tag_dir, name)
            try:
                with zipfile.ZipFile(path):
                    pass
            except (zipfile.BadZipFile, OSError) as exc:
                raise CheckpointError(
                    f"checkpoint file {path} is truncated or not a torch file ({exc})"
                ) from None


# ---- RNG ---------------------------------------------------------------------------------------------------------


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


# ---- save --------------------------------------------------------------------------------------------------------


def _no_space(exc: BaseException, path: str) -> bool:
    """Whether ``exc`` (or its cause) is a full disk / quota (torch's writer reports it without an errno)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left" in str(seen) or "Disk quota exceeded" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return False
    return usage.free < _LOW_SPACE_BYTES


def agree_failures(failure: str | None, device: torch.device | None) -> list[str]:
    """Collective: every rank's failure message (empty when all succeeded), the same list on every rank."""
    flag = torch.tensor([0.0 if failure is None else 1.0], dtype=torch.float64, device=device)
    if float(all_reduce_sum(flag).item()) == 0.0:
        return []
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        gathered: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, failure)
        return [f for f in gathered if f is not None]
    return [failure] if failure is not None else []


def _describe_failure(exc: BaseException, path: str, rank: int) -> str:
    if _no_space(exc, path):
        return f"no space left on {path} (rank {rank}: {type(exc).__name__}: {exc})"
    return f"rank {rank}: {type(exc).__name__}: {exc}"


def save_checkpoint(
    engine: Any,
    save_dir: str,
    step: int,
    client_state: dict[str, Any],
    rank: int,
    extra_json: dict[str, Any] | None = None,
    world_size: int = 1,
    device: torch.device | None = None,
    keep_last: int | None = None,
) -> str:
    """Collective: save ``engine`` + ``client_state`` as ``global_step{step}``; rank 0 then marks it complete,
    updates ``latest`` and applies ``keep_last`` retention.

    ``extra_json`` maps file names to JSON-able objects written into the tag directory by rank 0. Returns the
    tag directory. Any rank's failure (e.g. no space left) raises the same CheckpointError on every rank, after
    the incomplete directory is removed; ``latest`` keeps naming the previous complete checkpoint.
    """
    tag = step_tag(step)
    tag_dir = os.path.join(save_dir, tag)
    failure: str | None = None
    marker_path = os.path.join(tag_dir, COMPLETE_MARKER)
    try:
        if rank == 0 and os.path.exists(marker_path):
            os.unlink(marker_path)  # re-saving a step: never an old marker over new files
        os.makedirs(tag_dir, exist_ok=True)
        torch.save(rng_state(), os.path.join(tag_dir, f"rng_state_rank{rank}.pt"))
        if rank == 0:
            for name, obj in {"trainer_state.json": client_state, **(extra_json or {})}.items():
                atomic_write_text(os.path.join(tag_dir, name), json.dumps(obj, indent=1) + "\n")
    except Exception as exc:  # noqa: BLE001 - agreed on by all ranks below
        failure = _describe_failure(exc, tag_dir, rank)
    failures = agree_failures(failure, device)
    if not failures:
        try:
            engine.save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=False)
        except Exception as exc:  # noqa: BLE001 - the other ranks wait in DeepSpeed's final barrier
            failure = _describe_failure(exc, tag_dir, rank)
            barrier()
        failures = agree_failures(failure, device)
    if not failures:
        if rank == 0:
            try:
                marker = {"tag": tag, "step": step, "world_size": world_size, "time": time.time()}
                marker["files"] = _tag_files(tag_dir)
                atomic_write_text(marker_path, json.dumps(marker, indent=1) + "\n")
                atomic_write_text(os.path.join(save_dir, "latest"), tag)
            except Exception as exc:  # noqa: BLE001
                failure = _describe_failure(exc, save_dir, rank)
        failures = agree_failures(failure, device)
    if failures:
        try:
            previous = read_latest(save_dir)
        except CheckpointError:
            previous = None
        if rank == 0 and previous != tag:
            shutil.rmtree(tag_dir, ignore_errors=True)
        barrier()
        kept = f"latest still names {previous}" if previous else "there is no earlier complete checkpoint"
        raise CheckpointError(
            f"saving checkpoint {tag_dir} failed: {'; '.join(failures)}; the incomplete directory was removed "
            f"and {kept}"
        )
    if rank == 0 and keep_last:
        apply_retention(save_dir, keep_last)
    barrier()
    return tag_dir


def apply_retention(save_dir: str, keep_last: int) -> list[str]:
    """Delete complete checkpoints older than the ``keep_last`` newest; never the one ``latest`` names.

    Returns the removed tags. Incomplete directories are left to :func:`remove_stale_files`.
    """
    try:
        protected = read_latest(save_dir)
    except CheckpointError:
        return []  # do not delete anything while 'latest' is unreadable
    complete = [tag for _, tag, done in list_checkpoints(save_dir) if done]
    removed = []
    for tag in complete[: max(len(complete) - int(keep_last), 0)]:
        if tag == protected:
            continue
        shutil.rmtree(os.path.join(save_dir, tag), ignore_errors=True)
        removed.append(tag)
    if removed:
        logger.info("checkpoint: keep_last=%d removed %s", keep_last, ", ".join(removed))
    return removed


def remove_stale_files(save_dir: str, resume_tag: str | None) -> list[str]:
    """Rank 0, at start: remove leftovers of killed saves (temp files, half-made universal conversions, and
    incomplete ``global_step<N>`` directories newer than ``resume_tag``, the checkpoint being resumed, or all of
    them when there is none). Returns the removed paths."""
    removed: list[str] = []
    if not os.path.isdir(save_dir):
        return removed
    checkpoints = list_checkpoints(save_dir)
    for d in [save_dir] + [os.path.join(save_dir, tag) for _, tag, _ in checkpoints]:
        for name in os.listdir(d):
            path = os.path.join(d, name)
            if name.startswith(".") and (name.endswith(".tmp") or name.startswith(".universal.tmp")):
                shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
                removed.append(path)
    resume_step = None if resume_tag is None else _tag_step(resume_tag)
    for step, tag, done in checkpoints:
        if not done and tag != resume_tag and (resume_step is None or step > resume_step):
            shutil.rmtree(os.path.join(save_dir, tag), ignore_errors=True)
            removed.append(os.path.join(save_dir, tag))
    if removed:
        logger.warning("checkpoint: removed leftovers of interrupted saves: %s", ", ".join(removed))
    return removed


def move_aside(save_dir: str) -> str | None:
    """Rank 0, ``checkpoint.restart``: move ``latest`` and every ``global_step<N>`` into
    ``{save_dir}/replaced-<time>/`` (nothing is deleted). Returns that directory, or None if there was nothing."""
    if not os.path.isdir(save_dir):
        return None
    names = [tag for _, tag, _ in list_checkpoints(save_dir)]
    if os.path.exists(os.path.join(save_dir, "latest")):
        names.append("latest")
    if not names:
        return None
    dest = os.path.join(save_dir, time.strftime("replaced-%Y%m%d-%H%M%S"))
    suffix = 0
    while os.path.exists(dest + (f"-{suffix}" if suffix else "")):
        suffix += 1
    dest += f"-{suffix}" if suffix else ""
    os.makedirs(dest)
    for name in names:
        os.rename(os.path.join(save_dir, name), os.path.join(dest, name))
    logger.warning(
        "checkpoint.restart: moved %s from %s to %s; starting from scratch", ", ".join(names), save_dir, dest
    )
    return dest


# ---- load --------------------------------------------------------------------------------------------------------


def load_checkpoint(
    engine: Any,
    load_dir: str,
    tag: str | None,
    rank: int,
    module_only: bool = False,
    engine_tag: str | None = None,
) -> dict[str, Any] | None:
    """Collective: load ``tag`` (default: ``latest``) into ``engine``; returns the client state, or None when
    ``load_dir`` has no ``latest`` (a fresh run). Restores this rank's RNG state when the file exists.

    ``engine_tag`` is what DeepSpeed reads (e.g. ``global_step8/universal`` after a world-size change); the RNG
    files are always read from ``tag``. Files are verified first, so a truncated file is named on every rank.
    """
    if tag is None:
        tag = read_latest(load_dir)
        if tag is None:
            return None
    tag_dir = os.path.join(load_dir, tag)
    verify_checkpoint_files(tag_dir)
    try:
        load_path, client_state = engine.load_checkpoint(
            load_dir,
            tag=engine_tag or tag,
            load_optimizer_states=not module_only,
            load_lr_scheduler_states=not module_only,
            load_module_only=module_only,
        )
    except Exception as exc:  # noqa: BLE001 - DeepSpeed raises anything from AssertionError to pickle errors
        raise CheckpointError(
            f"{tag_dir}: DeepSpeed could not load this checkpoint ({type(exc).__name__}: {exc})"
        ) from exc
    if load_path is None:
        raise CheckpointError(f"{tag_dir}: DeepSpeed could not load this checkpoint")
    rng_file = os.path.join(tag_dir, f"rng_state_rank{rank}.pt")
    if not module_only:
        if os.path.isfile(rng_file):
            set_rng_state(torch.load(rng_file, weights_only=False))
        else:
            logger.warning("%s missing (different world size?): RNG state not restored", rng_file)
    return dict(client_state or {}, tag=tag)
