"""Experiment trackers behind one interface: TensorBoard, Weights & Biases, MLflow (rank 0 only).

Run config section (every tracker optional; none by default, ``metrics.jsonl`` always)::

    "tracking": {"tensorboard": false,
                 "wandb": {"project": "megatron-doremi", "entity": null, "mode": null, "tags": [], "notes": null},
                 "mlflow": {"tracking_uri": null, "experiment": null, "tags": {}},
                 "group": null, "name": null}

``group`` / ``name`` name the tracker run (W&B ``group`` / ``name``; MLflow experiment (unless
``mlflow.experiment``) / run name and a ``group`` tag); ``name`` defaults to the run directory's base name. A
pipeline sets one group per pipeline and one name per step and replicate. ``wandb.mode``: ``online``,
``offline`` (files under ``output_dir/wandb``, ``wandb sync`` later) or ``disabled``; null = W&B's own default
(``WANDB_MODE``). ``mlflow.tracking_uri`` null = MLflow's default (``MLFLOW_TRACKING_URI``, else ``./mlruns``); a
local path is a file store (MLflow 3 keeps it in maintenance mode: ``MLFLOW_ALLOW_FILE_STORE`` is set for it).

Every tracker gets the records of ``metrics.jsonl`` (``train/<key>``, nested keys joined with ``/``), of
``eval.jsonl`` (``eval/<key>``) and the final summary, at the training step. A tracker that is configured but not
installed is a ConfigError when the config is validated, before anything starts. The W&B run id and the MLflow
run id are kept in ``output_dir/tracking.json``: a run resumed from a checkpoint continues the same tracker run
(W&B ``resume="allow"``; TensorBoard purges events past the checkpoint's step; steps re-run after the checkpoint are
logged again, W&B keeps the first value of a step it has already seen, MLflow keeps both).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import time
from collections.abc import Mapping
from typing import Any

from megatron_doremi.atomic_io import atomic_write_json

logger = logging.getLogger(__name__)

__all__ = ["TRACKING_FILE", "Trackers", "flatten", "validate_tracking"]

TRACKING_FILE = "tracking.json"
_BACKENDS = {
    # config key -> (importable module, pip install hint)
    "tensorboard": ("tensorboard", "pip install 'megatron-doremi[tensorboard]' (the tensorboard package)"),
    "wandb": ("wandb", "pip install 'megatron-doremi[wandb]' (the wandb package)"),
    "mlflow": ("mlflow", "pip install 'megatron-doremi[mlflow]' (mlflow or mlflow-skinny)"),
}
_WANDB_KEYS = {"project": "megatron-doremi", "entity": None, "mode": None, "tags": [], "notes": None}
_MLFLOW_KEYS = {"tracking_uri": None, "experiment": None, "tags": {}}


def _config_error(message: str) -> Exception:
    from megatron_doremi.training.config import ConfigError

    return ConfigError(message)


def _subsection(source: str, name: str, value: Any, known: dict[str, Any]) -> dict[str, Any] | None:
    if value is None or value is False:
        return None
    if value is True:
        value = {}
    if not isinstance(value, dict):
        raise _config_error(
            f"{source}: tracking.{name} must be an object (or null), got {type(value).__name__}"
        )
    for key in value:
        if key not in known:
            raise _config_error(
                f"{source}: unknown key 'tracking.{name}.{key}'; known keys: {', '.join(sorted(known))}"
            )
    return {**json.loads(json.dumps(known)), **value}


def validate_tracking(
    source: str, section: dict[str, Any], tensorboard_alias: bool = False
) -> dict[str, Any]:
    """The ``tracking`` section checked and completed; ConfigError when a configured tracker is not installed.

    ``tensorboard_alias``: the run config's top-level ``tensorboard`` (true turns TensorBoard on too).
    """
    out = dict(section)
    if not isinstance(out.get("tensorboard"), bool):
        raise _config_error(
            f"{source}: tracking.tensorboard must be true or false, got {out['tensorboard']!r}"
        )
    out["tensorboard"] = bool(out["tensorboard"] or tensorboard_alias)
    out["wandb"] = _subsection(source, "wandb", out.get("wandb"), _WANDB_KEYS)
    out["mlflow"] = _subsection(source, "mlflow", out.get("mlflow"), _MLFLOW_KEYS)
    for key in ("group", "name"):
        if out.get(key) is not None and (not isinstance(out[key], str) or not out[key]):
            raise _config_error(
                f"{source}: tracking.{key} must be a non-empty string or null, got {out[key]!r}"
            )
    wandb = out["wandb"]
    if wandb is not None and wandb["mode"] not in (None, "online", "offline", "disabled"):
        raise _config_error(
            f'{source}: tracking.wandb.mode must be "online", "offline", "disabled" or null, got {wandb["mode"]!r}'
        )
    for name, (module, hint) in _BACKENDS.items():
        if out[name] and importlib.util.find_spec(module) is None:
            raise _config_error(
                f"{source}: tracking.{name} is configured but {module} is not installed: {hint}, "
                f"or remove tracking.{name}"
            )
    return out


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Finite numbers of a nested record as ``{"prefix/a/b": x}`` (booleans, strings, None, NaN/inf left out)."""
    out: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[f"{prefix}{key}"] = float(value)
    return out


class _TensorBoard:
    def __init__(self, log_dir: str, purge_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=log_dir, purge_step=purge_step)

    def log(self, step: int, flat: dict[str, float]) -> None:
        for key, value in flat.items():
            self.writer.add_scalar(key, value, step)

    def summary(self, step: int, flat: dict[str, float]) -> None:
        self.log(step, flat)

    def close(self, stopped: str | None) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, spec: dict[str, Any], group: str | None, name: str, out_dir: str, run_id: str | None,
                 config: dict[str, Any]) -> None:  # fmt: skip
        import wandb

        self.run = wandb.init(
            project=spec["project"],
            entity=spec["entity"],
            mode=spec["mode"],
            tags=spec["tags"] or None,
            notes=spec["notes"],
            group=group,
            name=name,
            dir=out_dir,
            id=run_id,
            resume="allow" if run_id else None,
            config=config,
            settings=wandb.Settings(console="off"),  # the run's own logs stay where they were
        )
        self.id = self.run.id

    def log(self, step: int, flat: dict[str, float]) -> None:
        self.run.log(flat, step=step)

    def summary(self, step: int, flat: dict[str, float]) -> None:
        self.run.summary.update(flat)

    def close(self, stopped: str | None) -> None:
        if stopped:
            self.run.mark_preempting()  # resumable: the same id continues after the requeue
        self.run.finish()


def _mlflow_key(key: str) -> str:
    return re.sub(r"[^0-9A-Za-z_\-. /:]", "_", key)


class _MLflow:
    def __init__(self, spec: dict[str, Any], group: str | None, name: str, run_id: str | None,
                 config: dict[str, Any]) -> None:  # fmt: skip
        uri = spec["tracking_uri"]
        if uri is not None and "://" not in uri and not uri.startswith("file:"):
            uri = "file:" + os.path.abspath(uri)  # a local directory: a file store, the same for every cwd
        if uri is not None and uri.startswith("file:") and "MLFLOW_ALLOW_FILE_STORE" not in os.environ:
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # MLflow 3 refuses file stores unless told
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        if run_id is not None:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            experiment = spec["experiment"] or group or "megatron-doremi"
            found = self.client.get_experiment_by_name(experiment)
            exp_id = found.experiment_id if found is not None else self.client.create_experiment(experiment)
            tags = {
                **{str(k): str(v) for k, v in spec["tags"].items()},
                **({"group": group} if group else {}),
            }
            run = self.client.create_run(exp_id, run_name=name, tags=tags)
            self.run_id = run.info.run_id
            self.client.log_dict(self.run_id, config, "run_config.json")
        self.id = self.run_id

    def log(self, step: int, flat: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_mlflow_key(k), v, now, step) for k, v in flat.items()]
        for i in range(0, len(metrics), 1000):  # MLflow's per-batch limit
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def summary(self, step: int, flat: dict[str, float]) -> None:
        self.log(step, {f"summary/{k}": v for k, v in flat.items()})

    def close(self, stopped: str | None) -> None:
        if stopped:
            self.client.set_tag(self.run_id, "megatron_doremi.stopped", stopped)
        self.client.set_terminated(self.run_id, "KILLED" if stopped else "FINISHED")


class Trackers:
    """The configured trackers of one run (rank 0 only; on other ranks, and with none configured, every call is a
    no-op). Call order: ``log_train`` / ``log_eval`` per record, ``log_summary`` once, ``close`` once."""

    def __init__(self, backends: dict[str, Any]) -> None:
        self.backends = backends

    @classmethod
    def open(cls, tracking: dict[str, Any], out_dir: str, rank: int, resumed: bool, step: int,
             run_config: dict[str, Any]) -> Trackers:  # fmt: skip
        """Start (or, when ``resumed``, continue the ids in ``out_dir/tracking.json`` of) every configured tracker."""
        if rank != 0 or not (tracking.get("tensorboard") or tracking.get("wandb") or tracking.get("mlflow")):
            return cls({})
        path = os.path.join(out_dir, TRACKING_FILE)
        saved: dict[str, Any] = {}
        if resumed and os.path.isfile(path):
            from megatron_doremi.json_files import read_json_file

            saved = read_json_file(path, "tracker run ids", ValueError, require_object=True)
        group = tracking.get("group")
        name = tracking.get("name") or os.path.basename(os.path.normpath(os.path.abspath(out_dir)))
        backends: dict[str, Any] = {}
        if tracking.get("tensorboard"):
            backends["tensorboard"] = _TensorBoard(
                os.path.join(out_dir, "tensorboard"), step if resumed else None
            )
        if tracking.get("wandb"):
            backends["wandb"] = _Wandb(
                tracking["wandb"], group, name, out_dir, (saved.get("wandb") or {}).get("id"), run_config
            )
        if tracking.get("mlflow"):
            backends["mlflow"] = _MLflow(
                tracking["mlflow"], group, name, (saved.get("mlflow") or {}).get("run_id"), run_config
            )
        ids = {"group": group, "name": name}
        if "wandb" in backends:
            ids["wandb"] = {"id": backends["wandb"].id, "project": tracking["wandb"]["project"]}
        if "mlflow" in backends:
            ids["mlflow"] = {"run_id": backends["mlflow"].id}
        atomic_write_json(path, ids)
        logger.info(
            "tracking: %s (run %r%s)", ", ".join(backends), name, f", group {group!r}" if group else ""
        )
        return cls(backends)

    def log_train(self, step: int, record: Mapping[str, Any]) -> None:
        self._log(step, flatten({k: v for k, v in record.items() if k != "step"}, "train/"))

    def log_eval(self, step: int, result: Mapping[str, Any]) -> None:
        self._log(step, flatten({k: v for k, v in result.items() if k != "step"}, "eval/"))

    def _log(self, step: int, flat: dict[str, float]) -> None:
        for backend in self.backends.values():
            backend.log(step, flat)

    def log_summary(self, step: int, summary: Mapping[str, Any]) -> None:
        flat = flatten(summary)
        for backend in self.backends.values():
            backend.summary(step, flat)

    def close(self, stopped: str | None = None) -> None:
        """Finish every tracker run; ``stopped`` (the stop reason of a requeued run) marks it resumable."""
        for backend in self.backends.values():
            backend.close(stopped)
        self.backends = {}
