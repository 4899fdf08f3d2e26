"""DeepSpeed configuration: load, fill ``"auto"`` values from the run config, check before ``deepspeed.initialize``.

The run config owns the batch sizes and the learning rate; a DeepSpeed JSON may leave them as ``"auto"`` (the
shipped ``examples/ds_configs/*.json`` do) or repeat them, in which case they must agree. Checked here (errors
name the key): the batch identity ``micro x accumulation x world == global``, the ZeRO stage and the offload
options it allows, bf16/fp16 exclusivity, no DeepSpeed ``scheduler`` (the LR schedule is the run config's), and
no ``"auto"`` left anywhere.
"""

from __future__ import annotations

import copy
from typing import Any

from megatron_doremi.training.config import ConfigError, RunConfig, read_json

__all__ = ["resolve_deepspeed_config", "zero_stage"]

_DEFAULT_OPTIMIZER = {
    "type": "AdamW",
    "params": {"lr": "auto", "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1},
}


def _is_auto(value: Any) -> bool:
    return isinstance(value, str) and value.lower() == "auto"


def _find_auto(node: Any, path: str) -> str | None:
    if _is_auto(node):
        return path
    if isinstance(node, dict):
        for key, value in node.items():
            found = _find_auto(value, f"{path}.{key}")
            if found:
                return found
    if isinstance(node, list):
        for i, value in enumerate(node):
            found = _find_auto(value, f"{path}[{i}]")
            if found:
                return found
    return None


def zero_stage(ds: dict[str, Any]) -> int:
    """The ZeRO stage of a (resolved) DeepSpeed config dict (0 when absent)."""
    return int((ds.get("zero_optimization") or {}).get("stage", 0))


def _resolve_int(ds: dict[str, Any], key: str, want: int, src: str, what: str) -> None:
    value = ds.get(key, "auto")
    if value is None or _is_auto(value):
        ds[key] = want
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f'{src}: {key} must be an integer or "auto", got {value!r}')
    if value != want:
        raise ConfigError(
            f'{src}: {key} = {value} conflicts with {what} = {want}; set it to "auto" or {want}'
        )


def resolve_deepspeed_config(
    cfg: RunConfig,
    world_size: int,
    on_gpu: bool,
    hidden_size: int | None = None,
) -> dict[str, Any]:
    """The DeepSpeed config dict to pass to ``deepspeed.initialize`` for ``cfg`` on ``world_size`` ranks.

    Raises :class:`ConfigError` naming ``deepspeed_config.<key>`` (or the run config key) when something is wrong.
    """
    if isinstance(cfg.deepspeed_config, str):
        src = f"deepspeed_config {cfg.deepspeed_config}"
        ds = read_json(cfg.deepspeed_config, "DeepSpeed config")
    else:
        src = "deepspeed_config"
        ds = copy.deepcopy(cfg.deepspeed_config)
    if world_size <= 0:
        raise ConfigError(f"world size must be > 0, got {world_size}")

    # --- batch identity ---------------------------------------------------------------------------------------
    mbs, gbs = cfg.micro_batch_size, cfg.global_batch_size
    if gbs % (mbs * world_size):
        raise ConfigError(
            f"{cfg.source}: schedule.global_batch_size ({gbs}) must equal schedule.micro_batch_size ({mbs}) x "
            f"gradient accumulation steps x world size ({world_size}); {gbs} is not a multiple of {mbs * world_size}"
        )
    gas = gbs // (mbs * world_size)
    _resolve_int(ds, "train_micro_batch_size_per_gpu", mbs, src, "schedule.micro_batch_size")
    _resolve_int(
        ds, "gradient_accumulation_steps", gas, src, f"global {gbs} / (micro {mbs} x world {world_size})"
    )
    _resolve_int(ds, "train_batch_size", gbs, src, "schedule.global_batch_size")

    # --- ZeRO stage and offload ---------------------------------------------------------------------------------
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    if not isinstance(zero, dict):
        raise ConfigError(f"{src}: zero_optimization must be an object")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ConfigError(f"{src}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    offload_param = (zero.get("offload_param") or {}).get("device", "none")
    offload_opt = (zero.get("offload_optimizer") or {}).get("device", "none")
    if offload_param not in (None, "none") and stage != 3:
        raise ConfigError(f"{src}: zero_optimization.offload_param needs stage 3, got stage {stage}")
    if offload_opt not in (None, "none") and stage == 0:
        raise ConfigError(f"{src}: zero_optimization.offload_optimizer needs stage >= 1, got stage 0")
    auto_sizes = {
        "reduce_bucket_size": lambda h: h * h,
        "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
        "stage3_param_persistence_threshold": lambda h: 10 * h,
    }
    for key, fn in auto_sizes.items():
        if _is_auto(zero.get(key)):
            if hidden_size is None:
                raise ConfigError(
                    f'{src}: zero_optimization.{key} is "auto" but the model\'s hidden_size is unknown'
                )
            zero[key] = fn(int(hidden_size))

    # --- precision --------------------------------------------------------------------------------------------
    for key, default in (("bf16", on_gpu), ("fp16", False)):
        section = ds.get(key)
        if section is None:
            ds[key] = {"enabled": bool(default)}
        elif not isinstance(section, dict):
            raise ConfigError(f'{src}: {key} must be an object like {{"enabled": true}}')
        elif _is_auto(section.get("enabled", "auto")):
            section["enabled"] = bool(default)
    if ds["bf16"]["enabled"] and ds["fp16"]["enabled"]:
        raise ConfigError(f"{src}: bf16.enabled and fp16.enabled cannot both be true")

    # --- optimizer and LR -------------------------------------------------------------------------------------
    if "scheduler" in ds:
        raise ConfigError(
            f"{src}: remove the 'scheduler' section: the LR schedule comes from the run config "
            "(schedule.lr, min_lr, warmup_iters, lr_decay_style)"
        )
    opt = ds.setdefault("optimizer", copy.deepcopy(_DEFAULT_OPTIMIZER))
    if not isinstance(opt, dict) or not isinstance(opt.get("type"), str):
        raise ConfigError(f"{src}: optimizer must be an object with a string 'type' (e.g. \"AdamW\")")
    params = opt.setdefault("params", {})
    lr = params.get("lr", "auto")
    if _is_auto(lr):
        params["lr"] = cfg.schedule["lr"]
    elif not isinstance(lr, (int, float)) or float(lr) != cfg.schedule["lr"]:
        raise ConfigError(
            f"{src}: optimizer.params.lr = {lr!r} conflicts with schedule.lr = {cfg.schedule['lr']}; "
            'set it to "auto"'
        )
    if not on_gpu and opt["type"].lower() in ("adam", "adamw") and offload_opt in (None, "none"):
        # DeepSpeed's FusedAdam is a CUDA kernel; on CPU use torch's AdamW (same math) instead of a JIT build.
        params.setdefault("torch_adam", True)
    clip = ds.setdefault("gradient_clipping", 1.0)
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip < 0:
        raise ConfigError(f"{src}: gradient_clipping must be a number >= 0, got {clip!r}")
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)

    left = _find_auto(ds, "deepspeed_config")
    if left:
        raise ConfigError(f'{src}: {left} is "auto" but this trainer does not fill it in; give a value')
    return ds
