"""One writer per run and runs that stop instead of lying, end to end (CPU, DeepSpeed / torchrun, gloo ranks).

A second run on a live run's directory is refused (exit LOCKED, naming host and pid); after ``kill -9`` of a
torchrun launcher its worker ranks exit by themselves and a rerun takes over their stale lock and resumes; lr 1e4
stops with the divergence error (exit DIVERGED, ``diverged.json``) and the DoReMi mixer ignores the skipped
steps; validation token ids above the vocabulary stop the run before training; a full disk during a 2-rank
checkpoint save is one clear error on every rank.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from megatron_doremi.training import exit_codes
from tests.conftest import REPO, free_port, launch_env, run_checked
from tests.test_run_integrity_resume import config, make_data, metrics, train_cmd

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("data"))


def _wait_for(cond, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not cond():
        assert proc is None or proc.poll() is None, "the run ended early"
        time.sleep(0.1)
    assert cond(), "timed out"


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_a_second_run_on_a_live_run_directory_is_refused(data, tmp_path):
    run_dir = tmp_path / "run"
    cfg = config(data, run_dir, debug={"step_sleep_s": 4.0})  # long enough for the second run to start
    first = subprocess.Popen(train_cmd(cfg, 1), cwd=REPO, env=launch_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        _wait_for(lambda: _lines(run_dir / "metrics.jsonl") >= 1, 180, first)
        second = run_checked(train_cmd(cfg, 1), 180, ok=False)
        assert second.returncode == exit_codes.LOCKED, second.stderr[-2000:]
        assert f"is in use by another run: host {socket.gethostname()}, pid {first.pid}" in second.stderr
        assert first.poll() is None  # refused while the first was training
        assert first.wait(timeout=240) == 0, first.stderr.read()[-3000:]
    finally:
        first.kill()
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, 9))  # one writer: no duplicated steps


def test_orphaned_ranks_exit_and_a_rerun_takes_over_their_lock(data, tmp_path):
    import psutil

    run_dir = tmp_path / "orphans"
    cfg = config(data, run_dir, debug={"step_sleep_s": 1.0})
    cmd = ["torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "megatron_doremi.train",
           "--config", str(cfg)]  # fmt: skip
    launcher = subprocess.Popen(cmd, cwd=REPO, env=launch_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    workers = []
    try:
        _wait_for(lambda: _lines(run_dir / "metrics.jsonl") >= 3, 240, launcher)
        workers = psutil.Process(launcher.pid).children()
        assert len(workers) == 2
        # the launcher only: torchrun's workers have sessions of their own
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        gone, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive, f"orphaned workers still running: {[p.pid for p in alive]}"
    finally:
        for p in workers:
            if p.is_running():
                p.kill()
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    lock = json.loads((run_dir / ".megatron_doremi.lock").read_text())
    assert lock["pid"] in {p.pid for p in workers}  # rank 0 held it and died holding it
    rerun = run_checked(train_cmd(cfg, 2, "debug.step_sleep_s=0"), 400)
    assert f"taking over the stale lock of {run_dir}" in rerun.stderr
    assert f"pid {lock['pid']}, but process {lock['pid']} is not running" in rerun.stderr
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, 9))


def test_a_diverging_doremi_proxy_stops_and_its_mixer_ignores_skipped_steps(data, tmp_path):
    run_dir = tmp_path / "diverged"
    cfg = config(
        data,
        run_dir,
        schedule__lr=1e4,
        schedule__train_iters=40,
        schedule__lr_decay_iters=40,
        mixer={"type": "doremi", "reference": None},
        train={"max_consecutive_skipped_steps": 4},
        debug={},
    )
    proc = run_checked(train_cmd(cfg, 1), 300, ok=False)
    assert proc.returncode == exit_codes.DIVERGED, proc.stderr[-3000:]
    assert "training diverged at step" in proc.stderr and str(run_dir / "diverged.json") in proc.stderr
    record = json.loads((run_dir / "diverged.json").read_text())
    rows = metrics(run_dir)
    assert record["diverged"] is True and record["limit"] == "train.max_consecutive_skipped_steps"
    assert record["count"] == 5 and record["step"] == rows[-1]["step"] < 40
    assert record["last_checkpoint"] is not None and record["reason"] in proc.stderr
    assert [r["skipped"] for r in rows[-5:]] == [True] * 5
    assert not (run_dir / "train_summary.json").exists() and not (run_dir / "domain_weights.json").exists()
    skipped = {r["step"] for r in rows if r["skipped"]}
    updates = [json.loads(line)["step"] for line in open(run_dir / "doremi_weights.jsonl")]
    assert updates and not skipped & set(updates), (sorted(skipped), updates)
    # a rerun with sane settings clears the old verdict
    proc = run_checked(train_cmd(cfg, 1, "checkpoint.restart=true", "schedule.lr=3e-3",
                                 "schedule.train_iters=2"), 300)  # fmt: skip
    assert not (run_dir / "diverged.json").exists()
    assert json.loads((run_dir / "train_summary.json").read_text())["diverged"] is False


def test_validation_token_ids_above_the_vocabulary_stop_before_training(data, tmp_path):
    run_dir = tmp_path / "vocab"
    cfg = config(data, run_dir, debug={})
    proc = run_checked(train_cmd(cfg, 1, "model.vocab_size=300"), 300, ok=False)
    assert proc.returncode == exit_codes.FAILED and "Traceback" not in proc.stderr
    assert "the valid split has token ids >= the model's vocab_size 300" in proc.stderr
    assert _lines(run_dir / "metrics.jsonl") == 0


def test_full_disk_during_a_two_rank_save_is_one_clear_error(data, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2500k", "tmpfs", str(mnt)]).returncode
    ):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        run_dir = tmp_path / "full"
        cfg = config(data, run_dir, checkpoint={"save": str(mnt / "ckpt"), "save_interval": 2}, debug={})
        proc = run_checked(train_cmd(cfg, 2), 400, ok=False)
        assert proc.returncode != 0 and f"no space left on {mnt / 'ckpt'}" in proc.stderr, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
        assert (mnt / "ckpt" / "latest").read_text() == "global_step2"
        assert sorted(p.name for p in (mnt / "ckpt").glob("global_step*")) == ["global_step2"]
    finally:
        subprocess.run(["umount", str(mnt)])
