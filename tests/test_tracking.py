"""Trackers in one process, offline: W&B ``mode: offline`` and an MLflow file store get the step and eval records,
a resumed run continues the same tracker run (ids kept in ``tracking.json``), a fresh one starts a new run.

The end-to-end path (the trainer logging to both across SIGUSR1/time-limit requeues) is in tests/test_signals.py.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import struct
from pathlib import Path

import pytest

from megatron_doremi.training.tracking import TRACKING_FILE, Trackers, flatten

HAS_WANDB = importlib.util.find_spec("wandb") is not None
HAS_MLFLOW = importlib.util.find_spec("mlflow") is not None
needs_wandb = pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed (pip install '.[wandb]')")
needs_mlflow = pytest.mark.skipif(not HAS_MLFLOW, reason="mlflow is not installed (pip install '.[mlflow]')")
needs_tensorboard = pytest.mark.skipif(
    importlib.util.find_spec("tensorboard") is None,
    reason="tensorboard is not installed (pip install '.[tensorboard]')",
)


# ---- reading what the trackers wrote -------------------------------------------------------------------------------


def _leveldb_records(path: str):
    """Records of a W&B transaction log (``run-<id>.wandb``): a 7-byte W&B header, then LevelDB log blocks of 32 KiB
    made of ``crc32 (4) | length (2) | type (1) | data`` chunks (full / first / middle / last)."""
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", path
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:  # block padding
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            yield buf + chunk


def wandb_offline_runs(wandb_dir: str | os.PathLike[str], run_id: str) -> list[dict]:
    """Every offline run directory of ``run_id`` (one per process that continued it), oldest first:
    ``{"group", "name", "history": {step: {key: value}}}``."""
    from wandb.proto import wandb_internal_pb2 as pb

    out = []
    for path in sorted(glob.glob(os.path.join(wandb_dir, f"offline-run-*-{run_id}", f"run-{run_id}.wandb"))):
        run: dict = {"history": {}}
        for raw in _leveldb_records(path):
            rec = pb.Record()
            rec.ParseFromString(raw)
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                run["group"], run["name"] = rec.run.run_group, rec.run.display_name
            elif kind == "history":
                row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
                run["history"][int(row.pop("_step"))] = row
        out.append(run)
    return out


def mlflow_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return sorted((m.step, m.value) for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, key))


# ---- tests -------------------------------------------------------------------------------------------------------


def test_flatten_keeps_finite_numbers_only():
    rec = {
        "loss": 2.5,
        "domain_loss": {"a": 1.0, "b": None},
        "ok": True,
        "name": "x",
        "bad": float("nan"),
        "n": 3,
    }
    assert flatten(rec, "train/") == {"train/loss": 2.5, "train/domain_loss/a": 1.0, "train/n": 3.0}


def test_no_tracker_and_other_ranks_are_no_ops(tmp_path):
    cfg = {"tensorboard": False, "wandb": {"mode": "offline"}, "mlflow": None, "group": None, "name": None}
    tracker = Trackers.open(cfg, str(tmp_path), rank=1, resumed=False, step=0, run_config={})
    tracker.log_train(1, {"loss": 1.0})
    tracker.close()
    assert (
        tracker.backends == {}
        and not (tmp_path / TRACKING_FILE).exists()
        and not (tmp_path / "wandb").exists()
    )


def _tracking(tmp_path: Path) -> dict:
    return {
        "tensorboard": False,
        "wandb": {"project": "p", "entity": None, "mode": "offline", "tags": ["t"], "notes": None}
        if HAS_WANDB
        else None,
        "mlflow": {"tracking_uri": str(tmp_path / "mlruns"), "experiment": None, "tags": {"k": "v"}}
        if HAS_MLFLOW
        else None,
        "group": "pipeline-1",
        "name": "proxy/rep0",
    }


@pytest.mark.skipif(not (HAS_WANDB or HAS_MLFLOW), reason="neither wandb nor mlflow is installed")
def test_offline_runs_get_the_records_and_a_resume_continues_the_same_run(tmp_path):
    out = tmp_path / "run"
    cfg = _tracking(tmp_path)
    first = Trackers.open(cfg, str(out), 0, resumed=False, step=0, run_config={"seed": 1})
    for step in (1, 2):
        first.log_train(step, {"step": step, "loss": 1.0 / step, "domain_loss": {"web": 2.0 * step}})
    first.log_eval(2, {"step": 2, "domains": {"web": {"loss": 3.5, "ppl": 33.1}}, "worst": {"domain": "web"}})
    first.close(stopped="signal SIGUSR1")
    ids = json.loads((out / TRACKING_FILE).read_text())
    assert ids["group"] == "pipeline-1" and ids["name"] == "proxy/rep0"

    again = Trackers.open(cfg, str(out), 0, resumed=True, step=2, run_config={"seed": 1})
    again.log_train(3, {"step": 3, "loss": 0.25, "domain_loss": {"web": 6.0}})
    again.log_summary(3, {"steps": 3, "final_train_loss": 0.25, "health": {"mfu": None}})
    again.close()
    assert json.loads((out / TRACKING_FILE).read_text()) == ids  # same tracker runs

    if HAS_WANDB:
        runs = wandb_offline_runs(out / "wandb", ids["wandb"]["id"])
        assert len(runs) == 2 and all((r["group"], r["name"]) == ("pipeline-1", "proxy/rep0") for r in runs)
        history = {**runs[0]["history"], **runs[1]["history"]}
        assert {s: h["train/loss"] for s, h in history.items() if "train/loss" in h} == {
            1: 1.0,
            2: 0.5,
            3: 0.25,
        }
        assert history[2]["eval/domains/web/loss"] == 3.5 and history[3]["train/domain_loss/web"] == 6.0
    if HAS_MLFLOW:
        from mlflow.tracking import MlflowClient

        uri = "file:" + str(tmp_path / "mlruns")
        run_id = ids["mlflow"]["run_id"]
        assert mlflow_history(uri, run_id, "train/loss") == [(1, 1.0), (2, 0.5), (3, 0.25)]
        assert mlflow_history(uri, run_id, "eval/domains/web/ppl") == [(2, 33.1)]
        assert mlflow_history(uri, run_id, "summary/final_train_loss") == [(3, 0.25)]
        run = MlflowClient(tracking_uri=uri).get_run(run_id)
        assert run.info.status == "FINISHED" and run.info.run_name == "proxy/rep0"
        assert run.data.tags["group"] == "pipeline-1" and run.data.tags["k"] == "v"
        assert (
            run.data.tags["megatron_doremi.stopped"] == "signal SIGUSR1"
        )  # set by the first, requeued process
        experiment = MlflowClient(tracking_uri=uri).get_experiment(run.info.experiment_id)
        assert (
            experiment.name == "pipeline-1"
        )  # the pipeline's group, unless mlflow.experiment says otherwise

    fresh = Trackers.open(cfg, str(out), 0, resumed=False, step=0, run_config={})  # not resumed: a new run
    fresh.close()
    new_ids = json.loads((out / TRACKING_FILE).read_text())
    for name in ("wandb", "mlflow"):
        if name in ids:
            assert new_ids[name] != ids[name]


@needs_tensorboard
def test_tensorboard_gets_the_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = {"tensorboard": True, "wandb": None, "mlflow": None, "group": None, "name": None}
    tracker = Trackers.open(cfg, str(tmp_path), 0, resumed=False, step=0, run_config={})
    tracker.log_train(1, {"loss": 2.0})
    tracker.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 2.0)]
