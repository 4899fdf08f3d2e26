"""What a resumed run must share with its checkpoint, and which checkpoint it resumes.

A checkpoint records its run's *identity* (``client_state["identity"]``, also in ``trainer_state.json``): the
resolved values that decide which samples are drawn and what the weights mean. A run resuming it must have the
same identity, or it stops before loading with a ConfigError naming each key with its old and new value:

* ``model.<key>``: every key of the HF model config (architecture, vocabulary, norms, rope, ...) except a few
  that do not change the model (``transformers_version``, ``use_cache``, dtype fields, private ``_*`` keys);
* ``data.mixture`` (domain names, weights and shard file names), ``data.split``, ``data.seed`` (as resolved:
  ``seed`` when null), ``data.blend_mode``, ``data.blend_period``, ``schedule.seq_length``;
* ``mixer``: type and every hyper-parameter (a resumed run continues the checkpoint's mixer state, so a changed
  value would be silently ignored), except where the DoReMi reference lives (``reference.checkpoint``,
  ``reference.mode``);
* ``deepspeed.zero_stage`` and ``deepspeed.optimizer`` (type and parameters other than ``lr``: the optimizer
  state restores them).

Everything else may change and every change is logged (``train_iters``, the LR schedule, ``global_batch_size``,
``micro_batch_size``, ``eval``, logging, ``checkpoint``, ``debug``, ``seed``, divergence limits, gradient clipping,
the world size ...). Checkpoints written before identities existed are compared through their
``run_config.json`` / ``hf_config.json``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

from megatron_doremi.training.config import ConfigError, RunConfig

logger = logging.getLogger("megatron_doremi.train")

__all__ = [
    "ResumePlan",
    "changed_settings",
    "check_identity",
    "format_value",
    "identity_of_checkpoint",
    "plan_resume",
    "run_identity",
]

#: HF config keys that do not define the model
_MODEL_IGNORED = {
    "transformers_version",
    "use_cache",
    "torch_dtype",
    "dtype",
    "architectures",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "name_or_path",
}
#: mixer keys that say where things are, not what the mixer computes
_MIXER_IGNORED = {("reference", "checkpoint"), ("reference", "mode")}


def _mixture_identity(mixture: Any) -> dict[str, Any]:
    return {
        d.name: {"weight": float(d.weight), "shards": [os.path.basename(p) for p in d.prefixes]}
        for d in mixture.domains
    }


def _mixer_identity(mixer: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(mixer))
    for section, key in _MIXER_IGNORED:
        if isinstance(out.get(section), dict):
            out[section].pop(key, None)
    return out


def _optimizer_identity(ds_config: dict[str, Any]) -> Any:
    opt = json.loads(json.dumps(ds_config.get("optimizer")))
    if isinstance(opt, dict) and isinstance(opt.get("params"), dict):
        opt["params"].pop("lr", None)
    return opt


def _model_identity(hf_config: dict[str, Any]) -> dict[str, Any]:
    return {
        f"model.{k}": v
        for k, v in sorted(hf_config.items())
        if k not in _MODEL_IGNORED and not k.startswith("_")
    }


def run_identity(
    cfg: RunConfig, mixture: Any, hf_config: dict[str, Any], ds_config: dict[str, Any]
) -> dict[str, Any]:
    """The dotted keys a resumed run must keep (module doc), as JSON-able values."""
    stage = int((ds_config.get("zero_optimization") or {}).get("stage", 0))
    return {
        **_model_identity(hf_config),
        "data.mixture": _mixture_identity(mixture),
        "data.split": cfg.data["split"],
        "data.seed": cfg.data_seed,
        "data.blend_mode": cfg.data["blend_mode"],
        "data.blend_period": int(cfg.data["blend_period"]),
        "schedule.seq_length": cfg.seq_length,
        "mixer": _mixer_identity(cfg.mixer),
        "deepspeed.zero_stage": stage,
        "deepspeed.optimizer": _optimizer_identity(ds_config),
    }


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def identity_of_checkpoint(tag_dir: str, client_state: dict[str, Any]) -> dict[str, Any]:
    """The identity a checkpoint was saved with (older checkpoints: rebuilt from their JSON files, in part)."""
    if isinstance(client_state.get("identity"), dict):
        return client_state["identity"]
    out: dict[str, Any] = {}
    hf = _read_json(os.path.join(tag_dir, "hf_config.json"))
    if hf:
        out.update(_model_identity(hf))
    run = _read_json(os.path.join(tag_dir, "run_config.json")) or {}
    data = run.get("data") or {}
    for key in ("split", "blend_mode", "blend_period"):
        if key in data:
            out[f"data.{key}"] = data[key]
    if "data" in run:
        out["data.seed"] = data.get("seed") if data.get("seed") is not None else run.get("seed", 1234)
    if "seq_length" in (run.get("schedule") or {}):
        out["schedule.seq_length"] = run["schedule"]["seq_length"]
    elif "seq_length" in client_state:
        out["schedule.seq_length"] = client_state["seq_length"]
    if isinstance(run.get("mixer"), dict):
        out["mixer"] = _mixer_identity(run["mixer"])
    ds = _read_json(os.path.join(tag_dir, "ds_config.json"))
    if ds:
        out["deepspeed.zero_stage"] = int((ds.get("zero_optimization") or {}).get("stage", 0))
        out["deepspeed.optimizer"] = _optimizer_identity(ds)
    return out


def format_value(value: Any, limit: int = 200) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_identity(saved: dict[str, Any], current: dict[str, Any], where: str) -> None:
    """ConfigError naming every key whose value differs between the checkpoint's and this run's identity.

    Keys the checkpoint does not record (older checkpoints) are not compared.
    """
    diffs = [
        f"{key}: checkpoint {format_value(saved[key])}, this run {format_value(current.get(key))}"
        for key in sorted(saved)
        if json.dumps(saved[key], sort_keys=True) != json.dumps(current.get(key), sort_keys=True)
    ]
    if diffs:
        raise ConfigError(
            f"cannot resume {where}: settings that must not change on resume differ:\n  "
            + "\n  ".join(diffs)
            + "\n(start a new run in another output_dir / checkpoint.save, or set checkpoint.restart=true to "
            "start over here)"
        )


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: obj}


def changed_settings(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(dotted key, old, new)`` for every leaf that differs between two config dicts (e.g. run_config.json)."""
    old, new = _flatten(saved), _flatten(current)
    return [
        (key, old.get(key), new.get(key))
        for key in sorted(set(old) | set(new))
        if json.dumps(old.get(key), sort_keys=True) != json.dumps(new.get(key), sort_keys=True)
    ]


@dataclass(frozen=True)
class ResumePlan:
    """Which checkpoint a training run resumes (decided before the engine is built)."""

    load_dir: str
    tag: str
    saved_world_size: int | None
    world_size: int
    zero_stage: int

    @property
    def tag_dir(self) -> str:
        return os.path.join(self.load_dir, self.tag)

    @property
    def reshard(self) -> bool:
        """True when ZeRO partitions must be re-cut for another world size (universal checkpoint)."""
        return (
            self.zero_stage > 0
            and self.saved_world_size is not None
            and self.saved_world_size != self.world_size
        )


def plan_resume(cfg: RunConfig, rank: int, world_size: int) -> ResumePlan | None:
    """Collective: clean up, then pick the checkpoint to resume (None: start from scratch).

    ``checkpoint.restart`` moves the save directory's checkpoints aside first. Rank 0 removes leftovers of killed
    saves. Every rank reads the same files, so every rank raises the same CheckpointError when it must refuse.
    """
    from megatron_doremi.training import dist
    from megatron_doremi.training.checkpoint import (
        checkpoint_world_size,
        find_resume_tag,
        move_aside,
        remove_stale_files,
    )

    ckpt = cfg.checkpoint
    load_dir, save_dir = ckpt.get("load"), ckpt.get("save")
    if ckpt.get("restart"):
        if rank == 0 and save_dir:
            move_aside(save_dir)
        dist.barrier()
        if load_dir and os.path.normpath(load_dir) != os.path.normpath(save_dir or ""):
            logger.info("checkpoint.restart: not loading %s; starting from scratch", load_dir)
        if save_dir and rank == 0:
            remove_stale_files(save_dir, None)
        dist.barrier()
        return None
    tag = find_resume_tag(load_dir) if load_dir else None
    dist.barrier()
    if save_dir and rank == 0:
        same = load_dir and os.path.normpath(load_dir) == os.path.normpath(save_dir)
        remove_stale_files(save_dir, tag if same else None)
    dist.barrier()
    if tag is None:
        if load_dir:
            logger.info("checkpoint: nothing to resume in %s; starting from scratch", load_dir)
        return None
    tag_dir = os.path.join(load_dir, tag)
    ds = _read_json(os.path.join(tag_dir, "ds_config.json")) or {}
    stage = int((ds.get("zero_optimization") or {}).get("stage", 0))
    return ResumePlan(load_dir, tag, checkpoint_world_size(tag_dir), world_size, stage)
