"""Resume integrity end to end (CPU, DeepSpeed ZeRO-3, 1 and 2 gloo ranks, tiny Llama on random tokens).

Every run here has two simulated fp16 overflows (``debug.overflow_steps``: steps 2 and 3 are skipped by
DeepSpeed), so the LR scheduler is two steps behind the step counter. References: an uninterrupted 1-rank and an
uninterrupted 2-rank run. Compared with them: a run stopped at step 4 and resumed without ``latest`` (bit for
bit), the same 1-rank checkpoint resumed on 2 ranks and a 2-rank checkpoint resumed on 1 rank (resharded through
DeepSpeed's universal checkpoint; within fp32 reduction-order noise), and resumes that must be refused.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_doremi.training import exit_codes
from tests.conftest import REPO, free_port, random_documents, run_checked, write_shard

STEPS = 8
pytestmark = pytest.mark.slow


def make_data(out: Path) -> Path:
    """Three domains of random tokens (vocabulary 384) and their mixture.json in ``out``."""
    rng = np.random.default_rng(0)
    domains = {}
    for name, weight in (("web", 2.0), ("code", 1.0), ("books", 1.0)):
        prefix = write_shard(str(out / f"{name}_text_document"), random_documents(rng, 60, 40, 400, 384))
        domains[name] = {"prefixes": [prefix], "weight": weight}
    (out / "mixture.json").write_text(json.dumps({"domains": domains}))
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("data"))


def config(data: Path, run_dir: Path, **extra) -> Path:
    """A run config file next to ``run_dir``; ``extra``: ``section__key=value`` or ``key=value``."""
    cfg = {
        "model": {"model_type": "llama", "vocab_size": 384, "hidden_size": 64, "intermediate_size": 128,
                  "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
                  "max_position_embeddings": 128},
        "data": {"mixture": str(data / "mixture.json"), "split": "80,10,10"},
        "schedule": {"seq_length": 64, "micro_batch_size": 4, "global_batch_size": 16, "train_iters": STEPS,
                     "lr": 3e-3, "min_lr": 3e-4, "warmup_iters": 2, "lr_decay_iters": STEPS},
        "eval": {"eval_interval": 0, "eval_iters": 1},
        "checkpoint": {"save": str(run_dir / "ckpt"), "save_interval": 2, "load": str(run_dir / "ckpt")},
        "output_dir": str(run_dir),
        "deepspeed_config": str(REPO / "examples" / "ds_configs" / "zero3.json"),
        "debug": {"overflow_steps": [2, 3]},
        "progress_bar": False,
        "tensorboard": False,
    }  # fmt: skip
    for key, value in extra.items():
        section, _, name = key.partition("__")
        if name:
            cfg[section][name] = value
        else:
            cfg[section] = value
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir.parent / f"{run_dir.name}.json"
    path.write_text(json.dumps(cfg, indent=1))
    return path


def train_cmd(cfg: Path, world: int, *overrides: str) -> list[str]:
    args = ["--config", str(cfg), *(x for o in overrides for x in ("--set", o))]
    if world == 1:
        return [sys.executable, "-m", "megatron_doremi.train", *args]
    return ["deepspeed", "--num_gpus", str(world), "--master_port", str(free_port()), "--module",
            "megatron_doremi.train", *args]  # fmt: skip


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "ckpt").glob("global_step*"))


@pytest.fixture(scope="module")
def one_rank(data, tmp_path_factory) -> Path:
    """Uninterrupted, 1 rank, keeping the 2 newest checkpoints."""
    run_dir = tmp_path_factory.mktemp("runs") / "one"
    run_checked(train_cmd(config(data, run_dir, checkpoint__keep_last=2), 1), 300)
    return run_dir


@pytest.fixture(scope="module")
def two_rank(data, tmp_path_factory) -> Path:
    """Uninterrupted, 2 ranks, every checkpoint kept."""
    run_dir = tmp_path_factory.mktemp("runs") / "two"
    run_checked(train_cmd(config(data, run_dir), 2), 400)
    return run_dir


@pytest.fixture(scope="module")
def half(data, tmp_path_factory) -> Path:
    """1 rank stopped after step 4 (complete checkpoints global_step2 and global_step4)."""
    run_dir = tmp_path_factory.mktemp("runs") / "half"
    run_checked(train_cmd(config(data, run_dir), 1, "schedule.train_iters=4"), 300)
    return run_dir


def copy_run(src: Path, dst: Path, data: Path, **extra) -> Path:
    shutil.copytree(src, dst)
    for lock in dst.glob(".megatron_doremi.lock*"):
        lock.unlink()
    return config(data, dst, **extra)


def test_skipped_steps_are_recorded_hold_the_lr_and_retention_keeps_two(one_rank, two_rank):
    from megatron_doremi.training.lr_schedule import lr_at

    for run_dir in (one_rank, two_rank):
        rows = metrics(run_dir)
        assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
        assert [r["skipped"] for r in rows] == [s in (2, 3) for s in range(1, STEPS + 1)]
        applied_before = [0, 1, 1, 1, 2, 3, 4, 5]  # the scheduler does not advance on skipped steps
        expected = [lr_at(n, 3e-3, 3e-4, 2, STEPS, "cosine") for n in applied_before]
        assert [r["lr"] for r in rows] == pytest.approx(expected, rel=1e-12)
        summary = json.loads((run_dir / "train_summary.json").read_text())
        assert summary["skipped_steps"] == 2 and summary["diverged"] is False
        assert not (run_dir / "diverged.json").exists() and not (run_dir / ".megatron_doremi.lock").exists()
    assert checkpoints(one_rank) == ["global_step6", "global_step8"]
    assert checkpoints(two_rank) == ["global_step2", "global_step4", "global_step6", "global_step8"]
    marker = json.loads((two_rank / "ckpt" / "global_step8" / "complete.json").read_text())
    assert marker["world_size"] == 2 and marker["step"] == 8
    np.testing.assert_allclose(
        [r["loss"] for r in metrics(one_rank)], [r["loss"] for r in metrics(two_rank)], rtol=1e-8
    )


def test_resume_without_latest_takes_the_newest_complete_checkpoint_and_is_bit_identical(
    half, one_rank, data, tmp_path
):
    run_dir = tmp_path / "resumed"
    cfg = copy_run(half, run_dir, data, log_interval=2)
    ckpt = run_dir / "ckpt"
    (ckpt / "latest").unlink()
    shutil.copytree(ckpt / "global_step4", ckpt / "global_step6")  # a save killed before its marker
    (ckpt / "global_step6" / "complete.json").unlink()
    (ckpt / ".latest.x1y2.tmp").write_text("global_step6")  # a killed atomic write
    proc = run_checked(train_cmd(cfg, 1), 300)
    assert "no 'latest'; resuming from the newest complete checkpoint global_step4" in proc.stderr
    assert "removed leftovers of interrupted saves" in proc.stderr and ".latest.x1y2.tmp" in proc.stderr
    assert "log_interval: 1 -> 2" in proc.stderr  # an allowed change, listed
    assert "(4 this run)" in proc.stdout
    resumed, ref = metrics(run_dir), metrics(one_rank)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in ref]  # bit-identical
    assert [r["lr"] for r in resumed] == [
        r["lr"] for r in ref
    ]  # the LR of the first step after the resume too
    assert [r["skipped"] for r in resumed] == [r["skipped"] for r in ref]
    assert json.loads((run_dir / "train_summary.json").read_text())["skipped_steps"] == 2


def test_one_rank_checkpoint_resumes_on_two_ranks(half, one_rank, data, tmp_path):
    run_dir = tmp_path / "to2"
    cfg = copy_run(half, run_dir, data)
    proc = run_checked(train_cmd(cfg, 2), 400)
    assert "was saved by 1 ranks, this run has 2: resharding" in proc.stderr
    assert (run_dir / "ckpt" / "global_step4" / "universal" / "zero" / "optimizer_state.pt").is_file()
    resumed, ref = metrics(run_dir), metrics(one_rank)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    assert [r["lr"] for r in resumed] == [r["lr"] for r in ref]
    # the same-world-size resume is bit-identical to one_rank (previous test); 1 vs 2 ranks differ only in
    # fp32 reduction order (~1e-10 here); a wrong optimizer state would show at 1e-5 and above
    np.testing.assert_allclose([r["loss"] for r in resumed], [r["loss"] for r in ref], rtol=1e-7)
    np.testing.assert_allclose(
        [r["grad_norm"] for r in resumed[4:]], [r["grad_norm"] for r in ref[4:]], rtol=1e-6
    )
    marker = json.loads((run_dir / "ckpt" / "global_step8" / "complete.json").read_text())
    assert marker["world_size"] == 2


def test_two_rank_checkpoint_resumes_on_one_rank(two_rank, data, tmp_path):
    run_dir = tmp_path / "to1"
    cfg = copy_run(two_rank, run_dir, data)
    for tag in ("global_step6", "global_step8"):
        shutil.rmtree(run_dir / "ckpt" / tag)
    (run_dir / "ckpt" / "latest").write_text("global_step4")
    proc = run_checked(train_cmd(cfg, 1), 300)
    assert "was saved by 2 ranks, this run has 1: resharding" in proc.stderr
    resumed, ref = metrics(run_dir), metrics(two_rank)
    assert [r["lr"] for r in resumed] == [r["lr"] for r in ref]
    np.testing.assert_allclose([r["loss"] for r in resumed], [r["loss"] for r in ref], rtol=1e-7)
    assert json.loads((run_dir / "train_summary.json").read_text())["skipped_steps"] == 2


def test_changed_immutable_settings_are_refused_naming_each_key(one_rank, data, tmp_path):
    run_dir = tmp_path / "changed"
    cfg = copy_run(one_rank, run_dir, data)
    before = (run_dir / "metrics.jsonl").read_text()
    changes = ["schedule.seq_length=32", 'data.split="70,20,10"', "data.seed=5", "model.num_attention_heads=2",
               "model.hidden_size=128", "mixer.weights=[1, 1, 1]"]  # fmt: skip
    proc = run_checked(train_cmd(cfg, 1, *changes), 300, ok=False)
    assert proc.returncode == exit_codes.FAILED and "Traceback" not in proc.stderr
    for needle in ("schedule.seq_length: checkpoint 64, this run 32", 'data.split: checkpoint "80,10,10", this '
                   'run "70,20,10"', "data.seed: checkpoint 1234, this run 5",
                   "model.num_attention_heads: checkpoint 4, this run 2", "model.hidden_size: checkpoint 64, "
                   "this run 128", "mixer: checkpoint"):  # fmt: skip
        assert needle in proc.stderr, needle
    assert (run_dir / "metrics.jsonl").read_text() == before  # nothing was touched


def test_train_iters_below_the_checkpoint_warns_and_does_not_resave(one_rank, data, tmp_path):
    run_dir = tmp_path / "shorter"
    cfg = copy_run(one_rank, run_dir, data)
    stamp = os.path.getmtime(run_dir / "ckpt" / "global_step8" / "complete.json")
    proc = run_checked(train_cmd(cfg, 1, "schedule.train_iters=6", "schedule.lr_decay_iters=8"), 300)
    assert "schedule.train_iters (6) is below the checkpoint's step (8): nothing to train" in proc.stderr
    assert os.path.getmtime(run_dir / "ckpt" / "global_step8" / "complete.json") == stamp
    assert checkpoints(run_dir) == ["global_step6", "global_step8"]


def test_truncated_checkpoint_file_is_named_and_restart_moves_checkpoints_aside(one_rank, data, tmp_path):
    run_dir = tmp_path / "broken"
    cfg = copy_run(one_rank, run_dir, data)
    shard = run_dir / "ckpt" / "global_step8" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    with open(shard, "r+b") as fh:
        fh.truncate(1000)
    proc = run_checked(train_cmd(cfg, 1), 300, ok=False)
    assert proc.returncode == exit_codes.FAILED and "Traceback" not in proc.stderr
    assert f"checkpoint file {shard} is truncated or changed: 1000 bytes" in proc.stderr
    (run_dir / "ckpt" / "latest").write_text("not a tag\n")
    proc = run_checked(train_cmd(cfg, 1), 300, ok=False)
    assert (
        proc.returncode == exit_codes.FAILED and f"{run_dir / 'ckpt' / 'latest'} does not name" in proc.stderr
    )
    proc = run_checked(train_cmd(cfg, 1, "checkpoint.restart=true", "schedule.train_iters=2"), 300)
    assert "checkpoint.restart: moved" in proc.stderr
    assert [r["step"] for r in metrics(run_dir)] == [1, 2] and checkpoints(run_dir) == ["global_step2"]
    (aside,) = (run_dir / "ckpt").glob("replaced-*")
    assert sorted(p.name for p in aside.iterdir()) == ["global_step6", "global_step8", "latest"]
