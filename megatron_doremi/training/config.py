"""Run configuration: one JSON (or YAML) file per training run, ``--set key=value`` overrides, validation.

Layout (every section optional except ``model``, ``data`` and ``schedule``; defaults below)::

    {
      "model": "examples/models/tiny.json"      # HF config dict file, a local HF model dir, or an inline dict
      "tokenizer": "path/to/tokenizer",           # optional: local HF tokenizer dir or tokenizer.json (export)
      "data": {"mixture": "mixture.json" | {...} | "0.3 p1 0.7 p2", "split": "969,30,1", "seed": null,
               "blend_mode": "periodic" | "exact" (Megatron's greedy, bit for bit), "blend_period": 1048576,
               "packing": "project" | "megatron", ...Megatron options: see megatron_doremi/data/run_data.py},
      "mixer": {"type": "static", "weights": null},   # weights: null = the mixture's, a list, or {name: w}
               | {"type": "doremi", "reference": {"checkpoint": "runs/ref/checkpoints", "model": null,
                  "mode": "auto", "allow_architecture_mismatch": false} | "runs/ref/checkpoints" | null,
                  "step_size": 1.0, "smoothing": 1e-3, "reference_weights": null,
                  "sampling_weights": null (uniform), "initial_weights": null, "initial_score": 0.0,
                  "warmup_step": 0, "update_step": 1, "update_times": null, "resample": false}
               | {"type": "odm", ...}                    # see docs/doremi.md and mixers/odm.py
               | {"type": "aioli", ...}                  # needs held-out data; docs/mixers.md, mixers/aioli.py
      "schedule": {"seq_length", "micro_batch_size", "global_batch_size", "train_iters", "lr", "min_lr",
                   "warmup_iters", "lr_decay_style": "cosine"|"linear"|"constant", "lr_decay_iters": null},
      "eval": {"eval_interval": 0, "eval_iters": "all", "micro_batch_size": null},   # "all" | N (x global batch)
      "checkpoint": {"save": null, "save_interval": 0, "load": null, "export_hf": null,
                     "exit_duration_mins": null, "exit_signals": ["SIGTERM", "SIGUSR1"],
                     "keep_last": null, "restart": false},
      "train": {"max_consecutive_skipped_steps": 20, "max_skipped_steps": null,       # divergence limits
                "max_consecutive_nonfinite_steps": 3, "max_nonfinite_steps": null},  # (training/divergence.py)
      "tracking": {"tensorboard": false, "wandb": null | {...}, "mlflow": null | {...}, "group": null,
                   "name": null},
      "health": {"peak_tflops": null},        # the accelerator's dense bf16 peak; null = the built-in table
      "output_dir": "runs/run", "seed": 1234, "deepspeed_config": "examples/ds_configs/zero3.json",
      "log_interval": 1, "progress_bar": true, "tensorboard": false, "activation_checkpointing": false,
      "fused_lm_head": false,                 # lm_head GEMM + loss fused, no [B*T, V] logits (lm_head_loss.py)
      "debug": {"dump_samples": false, "dump_mixer": false, "step_sleep_s": 0, "save_sleep_s": 0,
                "overflow_steps": []}
    }

``debug`` holds test aids: per-rank sample hashes, per-rank mixer weights every step (exact hex floats), a pause
after every step, a pause at the start of every checkpoint save (its tag directory already exists), steps whose
gradient is made non-finite (DeepSpeed skips them like fp16 overflows).
``checkpoint.exit_signals`` / ``exit_duration_mins``: see :mod:`.signals`; ``tracking``: :mod:`.tracking` (the
top-level ``tensorboard`` is an alias of ``tracking.tensorboard``); ``health``: :mod:`.health`.
``checkpoint.keep_last`` keeps only the N newest complete checkpoints; ``checkpoint.restart`` starts over even
when checkpoints exist (they are moved aside; a one-off ``--set``, not a config-file setting).
A ``doremi`` mixer's keys are checked here (``mixer.step_size`` must be finite and > 0, ...); with
``check_files`` its reference checkpoint is checked too (exists, same vocabulary, architecture and domains as this
run: :func:`megatron_doremi.training.reference.check_reference`), all before any process group exists.

Relative paths are taken relative to the current working directory (like Megatron/DeepSpeed command lines),
except shard prefixes inside a mixture JSON file, which are relative to that file. A ``model`` string ending in
``.json`` is read into the config before overrides apply, so ``--set model.num_hidden_layers=4`` works.

Overrides: ``--set schedule.lr=1e-4`` (dotted key, value parsed as JSON, else taken as a string);
``--set mixer.weights=@runs/proxy/domain_weights.json`` reads the value from a JSON/YAML file (for a ``*weights``
key a ``domain_weights.json`` gives its average weights and a mixture file its domain weights).
Errors raise :class:`ConfigError` naming the file, the line of the key when it is in the file, and the dotted key.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from megatron_doremi.json_files import key_lines, read_json_file

__all__ = [
    "EVAL_ALL",
    "ConfigError",
    "RunConfig",
    "eval_enabled",
    "apply_overrides",
    "load_run_config",
    "default_value",
    "parse_override",
    "read_json",
]

LR_DECAY_STYLES = ("cosine", "linear", "constant")
#: ``eval.eval_iters`` value that evaluates every validation sample of every domain exactly once (the default)
EVAL_ALL = "all"


def eval_enabled(ev: dict[str, Any] | None) -> bool:
    """Whether an ``eval`` section evaluates at all: ``eval_iters`` is "all" (the default) or an integer >= 1."""
    value = (ev or {}).get("eval_iters", EVAL_ALL)
    return value == EVAL_ALL or (isinstance(value, int) and not isinstance(value, bool) and value > 0)


# section -> {key: default}; a key absent here is rejected (with a suggestion), except inside free-form values.
_SCHEMA: dict[str, dict[str, Any]] = {
    "data": {
        "mixture": None,
        "split": "969,30,1",
        "seed": None,
        "blend_mode": "periodic",
        "blend_period": 2**20,
        # Megatron-LM options (megatron_doremi/data/run_data.py, docs/data.md)
        "packing": "project",
        "train_path": None,
        "valid_path": None,
        "test_path": None,
        "data_cache_path": None,
        "eod_mask_loss": False,
        "reset_position_ids": False,
        "reset_attention_mask": False,
        "eod_token_id": None,
    },
    "schedule": {
        "seq_length": None,
        "micro_batch_size": None,
        "global_batch_size": None,
        "train_iters": None,
        "lr": None,
        "min_lr": 0.0,
        "warmup_iters": 0,
        "lr_decay_style": "cosine",
        "lr_decay_iters": None,
    },
    "eval": {"eval_interval": 0, "eval_iters": "all", "micro_batch_size": None},
    "checkpoint": {
        "save": None,
        "save_interval": 0,
        "load": None,
        "export_hf": None,
        "exit_duration_mins": None,
        "exit_signals": ["SIGTERM", "SIGUSR1"],
        "keep_last": None,
        "restart": False,
    },
    "train": {
        "max_consecutive_skipped_steps": 20,
        "max_skipped_steps": None,
        "max_consecutive_nonfinite_steps": 3,
        "max_nonfinite_steps": None,
    },
    "tracking": {"tensorboard": False, "wandb": None, "mlflow": None, "group": None, "name": None},
    "health": {"peak_tflops": None},
    "debug": {
        "dump_samples": False,
        "dump_mixer": False,
        "step_sleep_s": 0.0,
        "save_sleep_s": 0.0,
        "overflow_steps": [],
    },
}


def default_value(section: str, key: str) -> Any:
    """The run config's default for ``section.key`` (e.g. ``default_value("data", "split")`` -> ``"969,30,1"``)."""
    return copy.deepcopy(_SCHEMA[section][key])


_TOP_LEVEL: dict[str, Any] = {
    "model": None,
    "tokenizer": None,
    "mixer": {"type": "static"},
    "output_dir": "runs/run",
    "seed": 1234,
    "deepspeed_config": "examples/ds_configs/zero3.json",
    "log_interval": 1,
    "progress_bar": True,
    "tensorboard": False,  # alias of tracking.tensorboard
    "activation_checkpointing": False,
    "fused_lm_head": False,
    "description": "",
}


class ConfigError(ValueError):
    """An invalid run or DeepSpeed configuration; the message names the source and the key."""


# ---- JSON helpers ------------------------------------------------------------------------------------------------


def read_json(path: str | os.PathLike[str], what: str = "config") -> dict[str, Any]:
    """Parse a JSON object file; ConfigError naming the file (and line) when missing, unreadable or invalid."""
    return read_json_file(path, what, ConfigError, require_object=True)


# ---- overrides ---------------------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b.c=VALUE"`` -> (["a", "b", "c"], json.loads(VALUE) or the raw string when it is not JSON)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value (e.g. schedule.lr=1e-4)")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {text!r}: bad dotted key {key!r}")
    if raw.startswith("@"):
        return parts, _file_value(parts, raw[1:], text)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return parts, value


def _file_value(parts: list[str], path: str, text: str) -> Any:
    """The value of ``--set key=@path``: the file's JSON/YAML; for a ``*weights`` key a ``domain_weights.json``
    (its ``average.weights``) or a mixture file (``domains.<name>.weight``) becomes ``{name: weight}``."""
    if not path:
        raise ConfigError(f"--set {text!r}: '@' must be followed by a JSON or YAML file path")
    value = read_json_file(path, f"--set {'.'.join(parts)} value", ConfigError)
    if parts[-1].endswith("weights") and isinstance(value, dict):
        average = value.get("average")
        if isinstance(average, dict) and isinstance(average.get("weights"), dict):
            return dict(average["weights"])
        domains = value.get("domains")
        if isinstance(domains, dict) and all(isinstance(d, dict) and "weight" in d for d in domains.values()):
            return {name: d["weight"] for name, d in domains.items()}
    return value


def apply_overrides(config: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of ``config`` with each ``key=value`` override set (intermediate objects created as needed)."""
    out = copy.deepcopy(config)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError(f"--set {text!r}: {where} is a {type(child).__name__}, not an object")
            node = child
        node[parts[-1]] = value
    return out


# ---- the config object -------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    """A validated run configuration (see the module docstring for the meaning of every field)."""

    model: dict[str, Any] | str  # HF config dict, or a local pretrained model directory
    data: dict[str, Any]
    schedule: dict[str, Any]
    mixer: dict[str, Any] = field(default_factory=lambda: {"type": "static"})
    eval: dict[str, Any] = field(default_factory=dict)
    checkpoint: dict[str, Any] = field(default_factory=dict)
    debug: dict[str, Any] = field(default_factory=dict)
    tracking: dict[str, Any] = field(default_factory=dict)
    health: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None
    output_dir: str = "runs/run"
    seed: int = 1234
    deepspeed_config: dict[str, Any] | str = "examples/ds_configs/zero3.json"
    log_interval: int = 1
    progress_bar: bool = True
    tensorboard: bool = False
    activation_checkpointing: bool = False
    fused_lm_head: bool = False
    description: str = ""
    source: str = "config"
    raw: dict[str, Any] = field(default_factory=dict)

    # convenience accessors
    @property
    def seq_length(self) -> int:
        return int(self.schedule["seq_length"])

    @property
    def micro_batch_size(self) -> int:
        return int(self.schedule["micro_batch_size"])

    @property
    def global_batch_size(self) -> int:
        return int(self.schedule["global_batch_size"])

    @property
    def train_iters(self) -> int:
        return int(self.schedule["train_iters"])

    @property
    def data_seed(self) -> int:
        seed = self.data.get("seed")
        return int(self.seed if seed is None else seed)

    @property
    def eval_micro_batch_size(self) -> int:
        mbs = self.eval.get("micro_batch_size")
        return int(self.micro_batch_size if mbs is None else mbs)

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration as JSON-able data (written to the run directory)."""
        return {
            "model": self.model,
            "tokenizer": self.tokenizer,
            "data": self.data,
            "mixer": self.mixer,
            "schedule": self.schedule,
            "eval": self.eval,
            "checkpoint": self.checkpoint,
            "debug": self.debug,
            "tracking": self.tracking,
            "health": self.health,
            "train": self.train,
            "output_dir": self.output_dir,
            "seed": self.seed,
            "deepspeed_config": self.deepspeed_config,
            "log_interval": self.log_interval,
            "progress_bar": self.progress_bar,
            "tensorboard": self.tensorboard,
            "activation_checkpointing": self.activation_checkpointing,
            "fused_lm_head": self.fused_lm_head,
            "description": self.description,
        }


def _unknown(source: str, key: str, allowed: Mapping[str, Any]) -> ConfigError:
    close = difflib.get_close_matches(key.split(".")[-1], list(allowed), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else f"; known keys: {', '.join(sorted(allowed))}"
    return ConfigError(f"{source}: unknown key {key!r}{hint}")


def _int(source: str, key: str, value: Any, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{source}: {key} must be >= {minimum}, got {value}")
    return int(value)


def _float(source: str, key: str, value: Any, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{source}: {key} must be a number, got {value!r}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(f"{source}: {key} must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{source}: {key} must be >= {minimum}, got {value}")
    return value


def _section(source: str, raw: dict[str, Any], name: str, required: Sequence[str] = ()) -> dict[str, Any]:
    schema = _SCHEMA[name]
    given = raw.get(name, {})
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise ConfigError(f"{source}: {name} must be an object, got {type(given).__name__}")
    for key in given:
        if key not in schema:
            raise _unknown(source, f"{name}.{key}", schema)
    out = {**schema, **given}
    for key in required:
        if out.get(key) is None:
            raise ConfigError(f"{source}: {name}.{key} is required")
    return out


def _existing_path(source: str, key: str, value: Any, kind: str = "path") -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{source}: {key} must be a non-empty path string, got {value!r}")
    if not os.path.exists(value):
        raise ConfigError(f"{source}: {key}: {kind} {value!r} does not exist")
    return value


def _validate_model(source: str, model: Any) -> dict[str, Any] | str:
    if isinstance(model, dict):
        if "model_type" not in model:
            raise ConfigError(f"{source}: model: an HF config dict needs 'model_type' (e.g. \"llama\")")
        for key in ("vocab_size", "hidden_size", "num_hidden_layers"):
            if key in model:
                _int(source, f"model.{key}", model[key], 1)
        return model
    if isinstance(model, str):
        _existing_path(source, "model", model, "model directory")
        if not os.path.isdir(model):
            raise ConfigError(f"{source}: model: expected an HF config .json file or a local model directory")
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise ConfigError(
                f"{source}: model: directory {model!r} has no config.json (not an HF model directory)"
            )
        return model
    raise ConfigError(
        f"{source}: model is required: an HF config dict, a .json file or a local model directory"
    )


def _validate_mixture(source: str, mixture: Any) -> Any:
    # Mixture errors already name file and key; check here that the shards exist so a run fails before launch.
    from megatron_doremi.data.mixture import Mixture, MixtureError

    if mixture is None:
        raise ConfigError(
            f"{source}: data.mixture is required (a mixture JSON path, an object or a --data-path string)"
        )
    try:
        mix = Mixture.load(mixture)
    except MixtureError as exc:
        raise ConfigError(f"{source}: data.mixture: {exc}") from None
    for dom in mix.domains:
        for prefix in dom.prefixes:
            for suffix in (".bin", ".idx"):
                if not os.path.isfile(prefix + suffix):
                    raise ConfigError(
                        f"{source}: data.mixture: domain {dom.name!r}: shard file {prefix + suffix} does not exist"
                    )
    return mix


def _check_data_options(
    source: str, data: dict[str, Any], tokenizer: Any, check_files: bool
) -> dict[str, Any]:
    from megatron_doremi.data.run_data import check_data_options
    from megatron_doremi.data.sequences import DataError

    try:
        return check_data_options(data, tokenizer if isinstance(tokenizer, str) else None, check_files)
    except DataError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _validate_doremi(source: str, mixer: dict[str, Any]) -> dict[str, Any]:
    """Structural checks of a ``doremi`` mixer section (keys, η, ε, schedule); the reference spec normalised."""
    from megatron_doremi.mixers.base import MixerError
    from megatron_doremi.mixers.doremi import DoReMiMixer
    from megatron_doremi.training.mixer_factory import DOREMI_DEFAULTS
    from megatron_doremi.training.reference import parse_reference_spec

    known = {"type", "reference", *DOREMI_DEFAULTS}
    for key in mixer:
        if key not in known:
            raise _unknown(source, f"mixer.{key}", {k: None for k in known - {"type"}})
    if "reference" not in mixer:
        raise ConfigError(
            f"{source}: mixer.reference is required for a doremi mixer: "
            '{"checkpoint": "<step 1 checkpoint dir>"} (or a path), or null to run without a reference model '
            "(a debug mode, not DoReMi)"
        )
    out = {**mixer, "reference": parse_reference_spec(mixer["reference"], source)}
    for key, label in (("step_size", "step_size (eta)"), ("smoothing", "smoothing (epsilon)")):
        value = out.get(key, DOREMI_DEFAULTS[key])
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: mixer.{label} must be a number, got {value!r}")
    step_size = float(out.get("step_size", 1.0))
    if not math.isfinite(step_size) or step_size <= 0:
        raise ConfigError(f"{source}: mixer.step_size (eta) must be finite and > 0, got {out['step_size']!r}")
    smoothing = float(out.get("smoothing", 1e-3))
    if not 0.0 <= smoothing <= 1.0:
        raise ConfigError(f"{source}: mixer.smoothing (epsilon) must be in [0, 1], got {out['smoothing']!r}")
    kwargs = {
        k: out[k]
        for k in ("warmup_step", "update_step", "update_times", "resample", "initial_score")
        if k in out
    }
    try:
        DoReMiMixer(["a"], step_size=step_size, smoothing=smoothing, **kwargs)
    except MixerError as exc:
        raise ConfigError(f"{source}: mixer: {exc}") from None
    return out


def _check_mixer_with_data(
    source: str,
    mixer: dict[str, Any],
    mix: Any,
    model: dict[str, Any] | str,
    seq_length: int,
    tokenizer: str | None = None,
) -> None:
    """The mixer against the mixture (weights name its domains...) and a DoReMi reference against this run."""
    from megatron_doremi.mixers.base import MixerError
    from megatron_doremi.training.mixer_factory import check_mixer_spec

    try:
        check_mixer_spec(mixer, mix)
    except MixerError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    if mixer["type"] == "doremi" and mixer.get("reference") is not None:
        from megatron_doremi.training.reference import check_reference

        check_reference(
            mixer["reference"],
            model,
            mix.names,
            seq_length,
            source,
            warn=False,  # the trainer warns (once, in its log)
            tokenizer=tokenizer,
        )


def validate_run_config(raw: dict[str, Any], source: str = "config", check_files: bool = True) -> RunConfig:
    """Check every key of a raw (overridden) config dict and return a :class:`RunConfig`."""
    allowed = {**_TOP_LEVEL, **{name: None for name in _SCHEMA}}
    for key in raw:
        if key not in allowed:
            raise _unknown(source, key, allowed)
    model = _validate_model(source, raw.get("model"))

    data = _section(source, raw, "data")
    data = _check_data_options(source, data, raw.get("tokenizer"), check_files)
    mix = _validate_mixture(source, data["mixture"]) if check_files else None
    if not isinstance(data["split"], str):
        raise ConfigError(f'{source}: data.split must be a string like "98,1,1", got {data["split"]!r}')
    if data["seed"] is not None:
        _int(source, "data.seed", data["seed"], 0)
    if data["blend_mode"] not in ("periodic", "exact"):
        raise ConfigError(
            f'{source}: data.blend_mode must be "periodic" or "exact", got {data["blend_mode"]!r}'
        )
    data["blend_period"] = _int(source, "data.blend_period", data["blend_period"], 1)

    sched = _section(
        source,
        raw,
        "schedule",
        required=("seq_length", "micro_batch_size", "global_batch_size", "train_iters", "lr"),
    )
    for key in ("seq_length", "micro_batch_size", "global_batch_size"):
        sched[key] = _int(source, f"schedule.{key}", sched[key], 1)
    sched["train_iters"] = _int(source, "schedule.train_iters", sched["train_iters"], 0)
    sched["warmup_iters"] = _int(source, "schedule.warmup_iters", sched["warmup_iters"], 0)
    sched["lr"] = _float(source, "schedule.lr", sched["lr"], 0.0)
    sched["min_lr"] = _float(source, "schedule.min_lr", sched["min_lr"], 0.0)
    if sched["min_lr"] > sched["lr"]:
        raise ConfigError(
            f"{source}: schedule.min_lr ({sched['min_lr']}) must be <= schedule.lr ({sched['lr']})"
        )
    if sched["lr_decay_style"] not in LR_DECAY_STYLES:
        raise ConfigError(
            f"{source}: schedule.lr_decay_style must be one of {', '.join(LR_DECAY_STYLES)}, "
            f"got {sched['lr_decay_style']!r}"
        )
    if sched["lr_decay_iters"] is None:
        sched["lr_decay_iters"] = sched["train_iters"]
    sched["lr_decay_iters"] = _int(source, "schedule.lr_decay_iters", sched["lr_decay_iters"], 0)
    if sched["global_batch_size"] % sched["micro_batch_size"]:
        raise ConfigError(
            f"{source}: schedule.global_batch_size ({sched['global_batch_size']}) must be a multiple of "
            f"schedule.micro_batch_size ({sched['micro_batch_size']})"
        )

    ev = _section(source, raw, "eval")
    ev["eval_interval"] = _int(source, "eval.eval_interval", ev["eval_interval"], 0)
    if ev["eval_iters"] != EVAL_ALL:
        try:
            ev["eval_iters"] = _int(source, "eval.eval_iters", ev["eval_iters"], 0)
        except ConfigError:
            raise ConfigError(
                f'{source}: eval.eval_iters must be "all" (the whole validation split, once) or an integer >= 0 '
                f"(that many global batches per domain), got {ev['eval_iters']!r}"
            ) from None
    if ev["micro_batch_size"] is not None:
        ev["micro_batch_size"] = _int(source, "eval.micro_batch_size", ev["micro_batch_size"], 1)

    ckpt = _section(source, raw, "checkpoint")
    ckpt["save_interval"] = _int(source, "checkpoint.save_interval", ckpt["save_interval"], 0)
    for key in ("save", "load", "export_hf"):
        if ckpt[key] is not None and (not isinstance(ckpt[key], str) or not ckpt[key]):
            raise ConfigError(f"{source}: checkpoint.{key} must be a path string or null, got {ckpt[key]!r}")
    if ckpt["save_interval"] and not ckpt["save"]:
        raise ConfigError(
            f"{source}: checkpoint.save_interval is set but checkpoint.save (a directory) is not"
        )
    if ckpt["export_hf"] and not ckpt["save"]:
        raise ConfigError(
            f"{source}: checkpoint.export_hf exports from the final checkpoint: set checkpoint.save too"
        )
    from megatron_doremi.training.signals import validate_exit_options

    validate_exit_options(source, ckpt)
    if ckpt["keep_last"] is not None:
        ckpt["keep_last"] = _int(source, "checkpoint.keep_last", ckpt["keep_last"], 1)
    if not isinstance(ckpt["restart"], bool):
        raise ConfigError(f"{source}: checkpoint.restart must be true or false, got {ckpt['restart']!r}")

    train = _section(source, raw, "train")
    for key, value in train.items():
        if value is not None:
            train[key] = _int(source, f"train.{key}", value, 0)

    debug = _section(source, raw, "debug")
    debug["step_sleep_s"] = _float(source, "debug.step_sleep_s", debug["step_sleep_s"], 0.0)
    debug["save_sleep_s"] = _float(source, "debug.save_sleep_s", debug["save_sleep_s"], 0.0)
    if not isinstance(debug["overflow_steps"], list):
        raise ConfigError(f"{source}: debug.overflow_steps must be a list of step numbers")
    debug["overflow_steps"] = [_int(source, "debug.overflow_steps[]", s, 1) for s in debug["overflow_steps"]]
    health = _section(source, raw, "health")
    if health["peak_tflops"] is not None:
        health["peak_tflops"] = _float(source, "health.peak_tflops", health["peak_tflops"], 0.0)
        if health["peak_tflops"] <= 0:
            raise ConfigError(f"{source}: health.peak_tflops must be > 0 (TFLOP/s per device), got 0")

    mixer = raw.get("mixer", _TOP_LEVEL["mixer"])
    if not isinstance(mixer, dict) or not isinstance(mixer.get("type", "static"), str):
        raise ConfigError(
            f'{source}: mixer must be an object with a string \'type\' (e.g. {{"type": "static"}})'
        )
    mixer = {"type": "static", **mixer}
    if mixer["type"] == "doremi":
        mixer = _validate_doremi(source, mixer)
    if mixer["type"] == "aioli":  # learns from held-out losses while changing the blend
        from megatron_doremi.training.mixer_eval import check_heldout_config

        check_heldout_config(source, data, mixer)
    if mix is not None:
        _check_mixer_with_data(source, mixer, mix, model, sched["seq_length"], raw.get("tokenizer"))

    tokenizer = raw.get("tokenizer")
    if tokenizer is not None and check_files:
        _existing_path(source, "tokenizer", tokenizer, "tokenizer")

    ds_config = raw.get("deepspeed_config", _TOP_LEVEL["deepspeed_config"])
    if isinstance(ds_config, str):
        if check_files:
            _existing_path(source, "deepspeed_config", ds_config, "DeepSpeed config file")
    elif not isinstance(ds_config, dict):
        raise ConfigError(f"{source}: deepspeed_config must be a path to a DeepSpeed JSON file or an object")

    output_dir = raw.get("output_dir", _TOP_LEVEL["output_dir"])
    if not isinstance(output_dir, str) or not output_dir:
        raise ConfigError(f"{source}: output_dir must be a non-empty path string, got {output_dir!r}")
    log_interval = _int(source, "log_interval", raw.get("log_interval", 1), 1)
    seed = _int(source, "seed", raw.get("seed", _TOP_LEVEL["seed"]), 0)
    for key in ("progress_bar", "tensorboard", "activation_checkpointing", "fused_lm_head"):
        if not isinstance(raw.get(key, _TOP_LEVEL[key]), bool):
            raise ConfigError(f"{source}: {key} must be true or false, got {raw[key]!r}")
    from megatron_doremi.training.tracking import validate_tracking

    tracking = validate_tracking(source, _section(source, raw, "tracking"), raw.get("tensorboard", False))
    return RunConfig(
        model=model,
        data=data,
        schedule=sched,
        mixer=mixer,
        eval=ev,
        checkpoint=ckpt,
        debug=debug,
        tracking=tracking,
        health=health,
        train=train,
        tokenizer=tokenizer,
        output_dir=output_dir,
        seed=seed,
        deepspeed_config=ds_config,
        log_interval=log_interval,
        progress_bar=bool(raw.get("progress_bar", True)),
        tensorboard=tracking["tensorboard"],
        activation_checkpointing=bool(raw.get("activation_checkpointing", False)),
        fused_lm_head=bool(raw.get("fused_lm_head", False)),
        description=str(raw.get("description", "")),
        source=source,
        raw=raw,
    )


def load_run_config(
    path: str | os.PathLike[str] | None,
    overrides: Sequence[str] = (),
    base: dict[str, Any] | None = None,
    check_files: bool = True,
) -> RunConfig:
    """Read a run config file (JSON, or YAML for ``.yaml``/``.yml``; or start from ``base``), inline a ``model``
    .json file, apply overrides, validate. An error about a key written in the file names its line."""
    if path is not None:
        raw = read_json(path, "run config")
        source = str(path)
    else:
        raw = copy.deepcopy(base or {})
        source = "config"
    raw = _inline_model(raw, source)
    if overrides:
        raw = apply_overrides(raw, overrides)
        raw = _inline_model(raw, source)
        source = f"{source} (with --set overrides)"
    try:
        return validate_run_config(raw, source, check_files=check_files)
    except ConfigError as exc:
        if path is None:
            raise
        raise _with_line(exc, str(path), overrides) from None


def _with_line(exc: ConfigError, path: str, overrides: Sequence[str]) -> ConfigError:
    """``exc`` with ``path:LINE`` when its message names a key of the file (the first one named; not one that an
    override set)."""
    msg = str(exc)
    if not msg.startswith(path) or re.match(r":\d+:", msg[len(path) :]):  # not about the file, or has a line
        return exc
    overridden = {".".join(parse_override(o)[0]) for o in overrides}
    best: tuple[int, int, int] | None = None  # (position, -len(key), line)
    for key, line in key_lines(path).items():
        if key in overridden:
            continue
        m = re.search(rf"(?<![\w.]){re.escape(key)}(?!\w|\.\w)", msg[len(path) :])
        if m and (best is None or (m.start(), -len(key)) < best[:2]):
            best = (m.start(), -len(key), line)
    if best is None:
        return exc
    return ConfigError(f"{path}:{best[2]}{msg[len(path) :]}")


def _inline_model(raw: dict[str, Any], source: str) -> dict[str, Any]:
    model = raw.get("model")
    if isinstance(model, str) and model.endswith(".json"):
        if not os.path.isfile(model):
            raise ConfigError(f"{source}: model: HF config file {model!r} does not exist")
        raw = {**raw, "model": read_json(model, "model config")}
    return raw
