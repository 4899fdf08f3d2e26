"""Pre-emption and time limits on 2 CPU ranks (deepspeed launcher, ZeRO-3, a DoReMi proxy without reference).

One uninterrupted run is the reference (umask 022, HF export). One run directory is then driven through the stops a
cluster produces, each rerun resuming the last (umask 077, W&B offline + an MLflow file store when installed):

1. SIGUSR1 to rank 1 only, mid-run: every rank stops at the same step after a checkpoint of it; exit 75;
2. ``checkpoint.exit_duration_mins`` already spent: one step, checkpoint, exit 75;
3. SIGTERM to rank 0 while a checkpoint save is in progress (its tag directory exists, ``latest`` still names the
   previous one): the save completes, ``latest`` names that complete checkpoint, exit 75;
4. no signal: the run finishes.

The interrupted run's per-step losses, learning rates, DoReMi weights α and evaluations equal the reference's
bit for bit; both trackers hold one run with every step; every output honours the umask of its run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from megatron_doremi.training import exit_codes
from tests.conftest import free_port, launch_env
from tests.test_doremi_train import MODEL, write_synthetic
from tests.test_umask import assert_modes

REPO = Path(__file__).resolve().parent.parent
STEPS = 10
HAS_WANDB = importlib.util.find_spec("wandb") is not None
HAS_MLFLOW = importlib.util.find_spec("mlflow") is not None

pytestmark = pytest.mark.slow


def _config(mixture: Path, run_dir: Path, **extra) -> dict:
    cfg = {
        "model": dict(MODEL),
        "data": {"mixture": str(mixture), "split": "90,5,5"},
        "mixer": {
            "type": "doremi",
            "reference": None,
        },  # α moves with the proxy's own losses: no step 1 needed
        "schedule": {
            "seq_length": 32,
            "micro_batch_size": 4,
            "global_batch_size": 16,
            "train_iters": STEPS,
            "lr": 3e-3,
            "min_lr": 3e-4,
            "warmup_iters": 2,
        },  # fmt: skip
        "eval": {"eval_interval": 5, "eval_iters": 1},
        "checkpoint": {
            "save": str(run_dir / "ckpt"),
            "load": str(run_dir / "ckpt"),
            "save_interval": 3,
            "export_hf": str(run_dir / "hf"),
        },  # fmt: skip
        "output_dir": str(run_dir),
        "deepspeed_config": str(REPO / "examples" / "ds_configs" / "zero3.json"),
        "progress_bar": False,
    }
    for key, value in extra.items():
        section, _, name = key.partition("__")
        cfg[section] = {**cfg.get(section, {}), name: value} if name else value
    run_dir.mkdir(parents=True, exist_ok=True)
    return cfg


class Launch:
    """A 2-rank ``deepspeed`` launch under a umask, in its own process group, output in ``<run>.<n>.log``."""

    def __init__(self, cfg: dict, mask: int, tag: str) -> None:
        run_dir = Path(cfg["output_dir"])
        path = run_dir.parent / f"{run_dir.name}.{tag}.json"
        path.write_text(json.dumps(cfg, indent=1))
        self.log = run_dir.parent / f"{run_dir.name}.{tag}.log"
        cmd = (f"umask {mask:03o} && exec deepspeed --num_gpus 2 --master_port {free_port()} "
               f"--module megatron_doremi.train --config {path}")  # fmt: skip
        self.proc = subprocess.Popen(["bash", "-c", cmd], cwd=REPO, env=launch_env(), stdout=open(self.log, "w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip

    def rank_pid(self, rank: int) -> int:
        import psutil

        deadline = time.time() + 120
        while time.time() < deadline:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                try:
                    cmd = child.cmdline()
                except psutil.NoSuchProcess:
                    continue
                if "megatron_doremi.train" in cmd and f"--local_rank={rank}" in cmd:
                    return child.pid
            time.sleep(0.1)
        raise AssertionError(f"rank {rank} never started")

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def _wait_for(pred, launch: Launch, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not pred():
        assert launch.proc.poll() is None, f"the run ended first:\n{launch.output()[-4000:]}"
        assert time.time() < deadline, f"timed out:\n{launch.output()[-4000:]}"
        time.sleep(0.02)


def _rows(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    path = run_dir / name
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _alphas(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "timestamp"} for r in _rows(run_dir, "doremi_weights.jsonl")]


def _latest(run_dir: Path) -> str | None:
    path = run_dir / "ckpt" / "latest"
    return path.read_text().strip() if path.exists() else None


def _complete(tag_dir: Path) -> None:
    """Every rank's part of a ZeRO-3 checkpoint is there."""
    names = {p.name for p in tag_dir.iterdir()}
    for rank in (0, 1):
        assert (
            f"rng_state_rank{rank}.pt" in names and f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in names
        )
    assert {"trainer_state.json", "hf_config.json", "run_config.json"} <= names


def _stopped(run_dir: Path, launch: Launch, reason: str) -> int:
    rc = launch.wait()
    assert rc == exit_codes.REQUEUE, f"exit {rc}:\n{launch.output()[-4000:]}"
    summary = json.loads((run_dir / "train_summary.json").read_text())
    step = summary["stopped"]["step"]
    assert summary["stopped"]["reason"] == reason and summary["steps"] == step < STEPS
    assert _latest(run_dir) == f"global_step{step}"  # a checkpoint at the step it stopped
    _complete(run_dir / "ckpt" / f"global_step{step}")
    assert [r["step"] for r in _rows(run_dir)] == list(range(1, step + 1))
    assert f"stopped at step {step}/{STEPS} on {reason}" in launch.output()
    assert not (run_dir / "domain_weights.json").exists() and not (run_dir / "hf").exists()  # not done yet
    return step


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("signals")
    mixture = write_synthetic(root / "data", docs=120, doc_len=120)
    ref = root / "ref"
    launch = Launch(_config(mixture, ref), 0o022, "ref")
    assert launch.wait() == 0, launch.output()[-4000:]

    run = root / "interrupted"
    tracking = {"group": "pipeline-x", "name": "proxy/rep0"}
    if HAS_WANDB:
        tracking["wandb"] = {"mode": "offline", "project": "signals"}
    if HAS_MLFLOW:
        tracking["mlflow"] = {"tracking_uri": str(root / "mlruns")}
    cfg = _config(mixture, run, tracking=tracking, debug={"step_sleep_s": 0.4})
    stops = {}

    # 1. SIGUSR1 to rank 1 only, once two steps are logged
    launch = Launch(cfg, 0o077, "usr1")
    rank1 = launch.rank_pid(1)
    _wait_for(lambda: len(_rows(run)) >= 2, launch)
    os.kill(rank1, signal.SIGUSR1)
    stops["usr1"] = _stopped(run, launch, "signal SIGUSR1")
    assert "received SIGUSR1 while training" in launch.output()  # rank 1's warning (rank 0 got no signal)

    # 2. the time budget is already spent at the first step boundary
    launch = Launch({**cfg, "checkpoint": {**cfg["checkpoint"], "exit_duration_mins": 1e-4}}, 0o077, "time")
    stops["time"] = _stopped(run, launch, "time limit (exit_duration_mins=0.0001)")
    assert stops["time"] == stops["usr1"] + 1

    # 3. SIGTERM to rank 0 while the next periodic save is in progress
    launch = Launch({**cfg, "debug": {"step_sleep_s": 0.4, "save_sleep_s": 3.0}}, 0o077, "term")
    rank0 = launch.rank_pid(0)
    ckpt = run / "ckpt"

    def saving() -> bool:
        done = int((_latest(run) or "global_step0").removeprefix("global_step"))
        return any(int(p.name.removeprefix("global_step")) > done for p in ckpt.glob("global_step*"))

    _wait_for(saving, launch)
    time.sleep(1.0)  # the ranks enter the save up to a step's sleep apart: now rank 0 is in its 3 s pause too
    in_progress = _latest(run)
    os.kill(rank0, signal.SIGTERM)
    stops["term"] = _stopped(run, launch, "signal SIGTERM")
    assert stops["term"] % 3 == 0 and f"global_step{stops['term']}" != in_progress
    assert f"received SIGTERM while saving checkpoint global_step{stops['term']}" in launch.output()

    # 4. the last rerun finishes
    launch = Launch(cfg, 0o077, "final")
    assert launch.wait() == 0, launch.output()[-4000:]
    assert f"({STEPS - stops['term']} this run)" in launch.output()
    return {"root": root, "ref": ref, "run": run, "stops": stops}


def test_requeued_run_equals_the_uninterrupted_one(runs):
    ref, run = runs["ref"], runs["run"]
    a, b = _rows(ref), _rows(run)
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in b] == [r["loss"] for r in a]  # bit-identical
    assert [r["lr"] for r in b] == [r["lr"] for r in a]
    assert [r["domain_loss"] for r in b] == [r["domain_loss"] for r in a]
    assert [r["consumed_samples"] for r in b] == [r["consumed_samples"] for r in a]
    alphas = _alphas(run)
    assert alphas == _alphas(ref) and len(alphas) == STEPS + 1  # DoReMi α_0..α_10, one line per update
    assert not np.allclose(alphas[-1]["domain_weights"], 0.25)  # α did move
    strip = ("eval_time_s",)
    evals = [{k: v for k, v in e.items() if k not in strip} for e in _rows(run, "eval.jsonl")]
    assert evals == [{k: v for k, v in e.items() if k not in strip} for e in _rows(ref, "eval.jsonl")]
    assert [e["step"] for e in evals] == [5, 10]
    ref_w = json.loads((ref / "domain_weights.json").read_text())
    run_w = json.loads((run / "domain_weights.json").read_text())
    assert run_w["average"] == ref_w["average"] and run_w["final"] == ref_w["final"]
    assert json.loads((run / "train_summary.json").read_text()).get("stopped") is None


def test_health_figures_are_null_on_cpu_not_invented(runs):
    rows = _rows(runs["ref"])
    for r in rows:
        assert r["tflops_per_gpu"] is None and r["mfu"] is None and r["max_memory_allocated_gb"] is None
        assert 0.0 < r["data_wait_fraction"] < 1.0
    health = json.loads((runs["ref"] / "train_summary.json").read_text())["health"]
    assert (
        health["device"] == "cpu"
        and health["tflops_per_gpu"] is None
        and health["steps_measured"] == STEPS - 1
    )


@pytest.mark.skipif(
    not (HAS_WANDB or HAS_MLFLOW), reason="neither wandb nor mlflow is installed (.[wandb], .[mlflow])"
)
def test_trackers_hold_one_run_with_every_step(runs):
    from tests.test_tracking import mlflow_history, wandb_offline_runs

    run = runs["run"]
    losses = {r["step"]: r["loss"] for r in _rows(run)}
    ids = json.loads((run / "tracking.json").read_text())
    if HAS_WANDB:
        parts = wandb_offline_runs(run / "wandb", ids["wandb"]["id"])
        assert len(parts) == 4  # four processes, one W&B run id
        assert all((p["group"], p["name"]) == ("pipeline-x", "proxy/rep0") for p in parts)
        logged = {s: h["train/loss"] for p in parts for s, h in p["history"].items() if "train/loss" in h}
        assert logged == losses
    if HAS_MLFLOW:
        uri = "file:" + str(runs["root"] / "mlruns")
        assert mlflow_history(uri, ids["mlflow"]["run_id"], "train/loss") == sorted(losses.items())
        evals = mlflow_history(uri, ids["mlflow"]["run_id"], "eval/token_weighted/loss")
        assert [s for s, _ in evals] == [5, 10]


def test_every_output_honours_the_umask(runs):
    # third-party tracker files (wandb/) are not the project's; everything else in both run directories is
    assert assert_modes(runs["ref"], 0o022) > 40
    assert assert_modes(runs["run"], 0o077, skip=("wandb",)) > 40
    for run in (runs["ref"], runs["run"]):
        names = {p.relative_to(run).as_posix() for p in run.rglob("*")}
        for expected in ("ckpt/latest", "ckpt/global_step10", "hf/config.json", "hf/model.safetensors",
                         "metrics.jsonl", "eval.jsonl", "eval_summary.json", "train_summary.json",
                         "domain_weights.json", "domain_weights.png", "doremi_weights.jsonl"):  # fmt: skip
            assert expected in names, (run, expected)
