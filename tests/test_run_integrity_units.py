"""Run integrity, in-process: run lock, launcher watchdog, divergence limits, checkpoint markers / discovery /
retention / failed saves, resume identity checks, LR restore, pre-flight checks (no DeepSpeed engine)."""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from megatron_doremi.training import checkpoint as ck
from megatron_doremi.training.config import ConfigError, load_run_config
from megatron_doremi.training.divergence import DivergenceError, DivergenceGuard
from megatron_doremi.training.lr_schedule import make_lr_scheduler, restore_lr
from megatron_doremi.training.preflight import check_output_paths, check_split_vocab
from megatron_doremi.training.resume_checks import changed_settings, check_identity, run_identity
from megatron_doremi.training.run_lock import LOCK_NAME, RunLock, RunLockedError, read_lock, run_lock_dirs
from megatron_doremi.training.watchdog import LauncherWatchdog, _Proc, is_launcher, launcher_ancestors
from tests.conftest import REPO, launch_env, random_documents, write_shard

# ---- run lock ----------------------------------------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_second_holder_is_refused_with_host_and_pid_and_release_removes_the_lock(tmp_path):
    with RunLock(str(tmp_path), what="run") as lock:
        info = read_lock(str(tmp_path))
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname() and info["what"] == "run"
        with pytest.raises(RunLockedError) as err:
            RunLock(str(tmp_path), what="pipeline").acquire()
        msg = str(err.value)
        assert f"host {socket.gethostname()}, pid {os.getpid()}" in msg and str(tmp_path) in msg
        assert lock.token == info["token"]
    assert read_lock(str(tmp_path)) is None


def test_lock_held_by_another_process_then_taken_over_when_it_dies(tmp_path, caplog):
    code = (
        "import sys, time; from megatron_doremi.training.run_lock import RunLock; "
        f"RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, env=launch_env(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=f"pid {holder.pid}"):
            RunLock(str(tmp_path)).acquire()
        holder.kill()
        holder.wait()
        with caplog.at_level(logging.WARNING, logger="megatron_doremi.training.run_lock"):
            lock = RunLock(str(tmp_path)).acquire()
        assert f"pid {holder.pid}" in caplog.text and "not running" in caplog.text
        assert read_lock(str(tmp_path))["pid"] == os.getpid()
        lock.release()
    finally:
        holder.kill()


def _write_lock(directory, **fields) -> None:
    info = {
        "what": "run",
        "host": "othernode",
        "pid": 12345,
        "started": time.time(),
        "heartbeat": time.time(),
    }
    info.update(fields)
    (directory / LOCK_NAME).write_text(json.dumps(info))


def test_stale_locks_are_taken_over_and_live_remote_ones_are_not(tmp_path, caplog):
    # another machine, fresh heartbeat: alive
    _write_lock(tmp_path)
    with pytest.raises(RunLockedError, match="host othernode, pid 12345"):
        RunLock(str(tmp_path)).acquire()
    # another machine, heartbeat older than stale_after_s: taken over
    _write_lock(tmp_path, heartbeat=time.time() - 1000)
    with caplog.at_level(logging.WARNING):
        RunLock(str(tmp_path), stale_after_s=300).acquire().release()
    assert "heartbeat is 1000 s old" in caplog.text
    # this machine, dead pid: taken over at once
    me = read_lock(str(tmp_path)) or {}
    with RunLock(str(tmp_path)):
        me = read_lock(str(tmp_path))
    _write_lock(
        tmp_path, host=me["host"], boot_id=me["boot_id"], pid_namespace=me["pid_namespace"], pid=_dead_pid()
    )
    RunLock(str(tmp_path)).acquire().release()
    # this machine, live pid but started at another time (a reused pid): taken over
    _write_lock(tmp_path, host=me["host"], boot_id=me["boot_id"], pid_namespace=me["pid_namespace"],
                pid=os.getpid(), pid_start_time=1.0)  # fmt: skip
    RunLock(str(tmp_path)).acquire().release()
    # garbage: taken over
    (tmp_path / LOCK_NAME).write_text("{not json")
    RunLock(str(tmp_path)).acquire().release()
    assert read_lock(str(tmp_path)) is None


def test_heartbeat_is_rewritten_and_a_lost_lock_is_noticed(tmp_path):
    lock = RunLock(str(tmp_path), heartbeat_s=0.05).acquire()
    first = read_lock(str(tmp_path))["heartbeat"]
    time.sleep(0.3)
    assert read_lock(str(tmp_path))["heartbeat"] > first
    _write_lock(tmp_path, token="someone-else")
    time.sleep(0.3)
    assert lock.lost
    lock.release()
    assert read_lock(str(tmp_path))["token"] == "someone-else"  # not ours: left alone


def test_run_lock_dirs_adds_the_checkpoint_dir_only_outside_the_run_dir(tmp_path):
    run = str(tmp_path / "run")
    assert run_lock_dirs(run, str(tmp_path / "run" / "ckpt")) == [run]
    assert run_lock_dirs(run, str(tmp_path / "ckpts")) == [run, str(tmp_path / "ckpts")]
    assert run_lock_dirs(run, None) == [run]


# ---- launcher watchdog -------------------------------------------------------------------------------------------


def test_launcher_command_lines():
    assert is_launcher(["/venv/bin/python3", "/venv/bin/torchrun", "--nproc_per_node", "2"])
    assert is_launcher(["python", "-u", "-m", "deepspeed.launcher.launch", "--world_info=x"])
    assert is_launcher(["/venv/bin/python", "/venv/bin/deepspeed", "--num_gpus", "2"])
    assert is_launcher(["python", "-m", "torch.distributed.run", "x.py"])
    assert not is_launcher(["python", "-m", "pytest", "tests/test_deepspeed.py"])
    assert not is_launcher(["bash", "-c", "deepspeed_env=1 python train.py"])
    assert launcher_ancestors() == []  # pytest is no launcher: nothing to watch


def test_watchdog_reports_a_dead_launcher():
    import psutil

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        p = _Proc(proc.pid, psutil.Process(proc.pid).create_time(), "fake launcher")
        dog = LauncherWatchdog([p])
        assert dog.dead() is None
        proc.kill()
        proc.wait()
        assert dog.dead() == p
        reused = LauncherWatchdog([_Proc(os.getpid(), 1.0, "reused pid")])
        assert reused.dead() is not None
    finally:
        proc.kill()


# ---- divergence limits -------------------------------------------------------------------------------------------


def test_divergence_guard_counts_consecutive_and_total_and_survives_a_resume():
    g = DivergenceGuard({"max_consecutive_skipped_steps": 2, "max_skipped_steps": 3})
    assert g.update(1, applied=False, loss=5.0, grad_norm=float("inf"))  # skipped: the mixer ignores it
    assert not g.update(2, applied=True, loss=5.0, grad_norm=1.0)
    assert g.update(3, applied=False, loss=5.0, grad_norm=float("inf"))
    assert g.update(4, applied=False, loss=5.0, grad_norm=float("inf"))
    state = g.state_dict()
    assert state == {"skipped_steps": 3, "consecutive_skipped_steps": 2, "nonfinite_steps": 0,
                     "consecutive_nonfinite_steps": 0}  # fmt: skip
    resumed = DivergenceGuard({"max_consecutive_skipped_steps": 2, "max_skipped_steps": 3})
    resumed.load_state_dict(state)
    with pytest.raises(DivergenceError, match="train.max_consecutive_skipped_steps = 2") as err:
        resumed.update(5, applied=False, loss=5.0, grad_norm=float("inf"))
    rec = err.value.record
    assert rec["diverged"] and rec["step"] == 5 and rec["limit"] == "train.max_consecutive_skipped_steps"
    assert rec["count"] == 3 and rec["last_grad_norm"] == "inf" and json.dumps(rec)


def test_divergence_guard_non_finite_loss_and_applied_non_finite_grad():
    g = DivergenceGuard({"max_consecutive_nonfinite_steps": 1, "max_nonfinite_steps": None})
    assert g.update(1, applied=True, loss=float("nan"), grad_norm=1.0)
    assert g.update(2, applied=False, loss=3.0, grad_norm=float("inf")) and g.consecutive_nonfinite == 0
    assert g.update(3, applied=True, loss=3.0, grad_norm=float("nan"))
    with pytest.raises(DivergenceError, match="2 consecutive non-finite steps"):
        g.update(4, applied=True, loss=float("inf"), grad_norm=1.0)
    unlimited = DivergenceGuard({k: None for k in g.limits})
    for s in range(100):
        unlimited.update(s + 1, applied=False, loss=float("nan"), grad_norm=None)


# ---- checkpoint discovery, verification, retention, failed saves -------------------------------------------------


class FakeEngine:
    """Writes one torch file per save like DeepSpeed's per-rank shards (or raises ``fail``)."""

    def __init__(self, fail: BaseException | None = None, size: int = 1000) -> None:
        self.fail, self.size = fail, size

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        if self.fail is not None:
            raise self.fail
        torch.save(
            {"w": torch.zeros(self.size)}, os.path.join(save_dir, tag, "zero_pp_rank_0_optim_states.pt")
        )


def _save(save_dir, step, **kw) -> str:
    keep_last = kw.pop("keep_last", None)
    return ck.save_checkpoint(
        FakeEngine(**kw), str(save_dir), step, {"step": step}, rank=0, keep_last=keep_last
    )


def test_marker_lists_every_file_and_latest_follows(tmp_path):
    tag_dir = _save(tmp_path, 2)
    marker = json.loads(open(os.path.join(tag_dir, ck.COMPLETE_MARKER)).read())
    assert marker["step"] == 2 and marker["world_size"] == 1
    assert set(marker["files"]) == {
        "rng_state_rank0.pt",
        "trainer_state.json",
        "zero_pp_rank_0_optim_states.pt",
    }
    assert (tmp_path / "latest").read_text() == "global_step2"
    assert ck.checkpoint_world_size(tag_dir) == 1
    ck.verify_checkpoint_files(tag_dir)


def test_missing_latest_resumes_the_newest_complete_checkpoint(tmp_path, caplog):
    _save(tmp_path, 2)
    _save(tmp_path, 4)
    os.makedirs(tmp_path / "global_step6")  # a save killed before its marker
    (tmp_path / "global_step6" / "zero_pp_rank_0_optim_states.pt").write_bytes(b"half")
    os.unlink(tmp_path / "latest")
    with caplog.at_level(logging.WARNING):
        assert ck.find_resume_tag(str(tmp_path)) == "global_step4"
    assert "no 'latest'" in caplog.text and "global_step6 (incomplete)" in caplog.text
    for tag in ("global_step2", "global_step4"):
        os.unlink(tmp_path / tag / ck.COMPLETE_MARKER)
    with pytest.raises(ck.CheckpointError, match="no complete checkpoint") as err:
        ck.find_resume_tag(str(tmp_path))
    assert "global_step2 (incomplete), global_step4 (incomplete), global_step6 (incomplete)" in str(err.value)
    assert "checkpoint.restart=true" in str(err.value)
    assert ck.find_resume_tag(str(tmp_path / "empty")) is None


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"", "is empty"),
        (b"\x00\xff\x13garbage", "does not name a checkpoint"),
        (b"global_step9", "does not exist"),
    ],
)
def test_bad_latest_is_named(tmp_path, content, needle):
    _save(tmp_path, 2)
    (tmp_path / "latest").write_bytes(content)
    with pytest.raises(ck.CheckpointError, match=needle) as err:
        ck.find_resume_tag(str(tmp_path))
    assert str(tmp_path / "latest") in str(err.value)


def test_truncated_missing_and_empty_checkpoints_are_named(tmp_path):
    tag_dir = _save(tmp_path, 2)
    shard = os.path.join(tag_dir, "zero_pp_rank_0_optim_states.pt")
    with open(shard, "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(ck.CheckpointError, match=f"{shard} is truncated or changed: 100 bytes"):
        ck.verify_checkpoint_files(tag_dir)
    os.unlink(shard)
    with pytest.raises(ck.CheckpointError, match=f"{shard} is missing"):
        ck.verify_checkpoint_files(tag_dir)
    # a checkpoint from before markers: the zip directory at the end of each .pt file is checked
    legacy = _save(tmp_path, 4)
    os.unlink(os.path.join(legacy, ck.COMPLETE_MARKER))
    ck.verify_checkpoint_files(legacy)
    legacy_shard = os.path.join(legacy, "zero_pp_rank_0_optim_states.pt")
    with open(legacy_shard, "r+b") as fh:
        fh.truncate(os.path.getsize(legacy_shard) - 10)
    with pytest.raises(ck.CheckpointError, match=f"{legacy_shard} is truncated or not a torch file"):
        ck.verify_checkpoint_files(legacy)
    os.makedirs(tmp_path / "global_step6")
    with pytest.raises(ck.CheckpointError, match="global_step6 is empty"):
        ck.verify_checkpoint_files(str(tmp_path / "global_step6"))


def test_keep_last_never_deletes_what_latest_names(tmp_path):
    for step in (2, 4, 6):
        _save(tmp_path, step, keep_last=2)
    assert [t for _, t, _ in ck.list_checkpoints(str(tmp_path))] == ["global_step4", "global_step6"]
    (tmp_path / "latest").write_text("global_step4")  # e.g. a run resumed from an older checkpoint
    _save(tmp_path, 8)
    (tmp_path / "latest").write_text("global_step4")
    assert ck.apply_retention(str(tmp_path), 1) == ["global_step6"]
    assert [t for _, t, _ in ck.list_checkpoints(str(tmp_path))] == ["global_step4", "global_step8"]
    (tmp_path / "latest").write_text("garbage")
    assert ck.apply_retention(str(tmp_path), 1) == []  # an unreadable latest: delete nothing


def test_stale_files_of_killed_saves_are_removed(tmp_path):
    _save(tmp_path, 2)
    _save(tmp_path, 4)
    for junk in (
        ".latest.abc123.tmp",
        "global_step4/.trainer_state.json.x.tmp",
        "global_step4/.universal.tmp-99/a",
    ):
        os.makedirs(os.path.dirname(tmp_path / junk), exist_ok=True)
        (tmp_path / junk).write_text("x")
    os.makedirs(tmp_path / "global_step6")
    os.makedirs(tmp_path / "global_step1")  # older than the resume point and incomplete: kept
    removed = ck.remove_stale_files(str(tmp_path), "global_step4")
    assert sorted(os.path.relpath(p, tmp_path) for p in removed) == [
        ".latest.abc123.tmp",
        "global_step4/.trainer_state.json.x.tmp",
        "global_step4/.universal.tmp-99",
        "global_step6",
    ]
    assert ck.find_resume_tag(str(tmp_path)) == "global_step4" and (tmp_path / "global_step1").is_dir()


def test_restart_moves_the_old_checkpoints_aside(tmp_path):
    _save(tmp_path, 2)
    dest = ck.move_aside(str(tmp_path))
    assert sorted(os.listdir(dest)) == ["global_step2", "latest"]
    assert ck.find_resume_tag(str(tmp_path)) is None and ck.move_aside(str(tmp_path)) is None


def test_no_space_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    _save(tmp_path, 2)
    full = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(ck.CheckpointError) as err:
        _save(tmp_path, 4, fail=full)
    msg = str(err.value)
    assert f"no space left on {tmp_path / 'global_step4'}" in msg and "latest still names global_step2" in msg
    assert not (tmp_path / "global_step4").exists() and (tmp_path / "latest").read_text() == "global_step2"
    with pytest.raises(ck.CheckpointError, match="rank 0: RuntimeError: boom"):
        _save(tmp_path, 6, fail=RuntimeError("boom"))


def test_torch_writer_failure_on_a_full_filesystem_says_no_space(tmp_path):
    """A real full disk: torch's writer raises a RuntimeError without errno ('unexpected pos ...')."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)]).returncode
    ):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        _save(mnt, 2, size=1000)
        with pytest.raises(ck.CheckpointError, match=f"no space left on {mnt / 'global_step4'}"):
            _save(mnt, 4, size=200_000)  # 800 kB > 256 kB
        assert (mnt / "latest").read_text() == "global_step2" and not (mnt / "global_step4").exists()
    finally:
        subprocess.run(["umount", str(mnt)])


# ---- resume identity ----------------------------------------------------------------------------------------------


@pytest.fixture
def small_config(tmp_path):
    rng = np.random.default_rng(0)
    mixture = {}
    for name in ("a", "b"):
        prefix = write_shard(str(tmp_path / f"{name}_text_document"), random_documents(rng, 30, 50, 200, 300))
        mixture[name] = {"prefixes": [prefix], "weight": 1.0}
    (tmp_path / "mixture.json").write_text(json.dumps({"domains": mixture}))
    base = {
        "model": str(REPO / "examples" / "models" / "tiny.json"),
        "data": {"mixture": str(tmp_path / "mixture.json"), "split": "80,10,10"},
        "schedule": {"seq_length": 32, "micro_batch_size": 2, "global_batch_size": 4, "train_iters": 4, "lr": 1e-3},
        "output_dir": str(tmp_path / "run"),
        "deepspeed_config": str(REPO / "examples" / "ds_configs" / "zero3.json"),
    }  # fmt: skip
    return base


def _identity(base, *overrides):
    from megatron_doremi.data.mixture import Mixture
    from megatron_doremi.training.model import hf_config

    cfg = load_run_config(None, list(overrides), base=base)
    ds = {
        "zero_optimization": {"stage": 3},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.95]}},
    }
    return cfg, run_identity(cfg, Mixture.load(cfg.data["mixture"]), hf_config(cfg.model).to_dict(), ds)


@pytest.mark.parametrize(
    "override, key",
    [
        ("schedule.seq_length=16", "schedule.seq_length"),
        ('data.split="90,5,5"', "data.split"),
        ("data.seed=7", "data.seed"),
        ("seed=7", "data.seed"),  # data.seed null follows seed
        ("model.num_attention_heads=2", "model.num_attention_heads"),
        ("model.hidden_size=128", "model.hidden_size"),
        ("model.num_hidden_layers=3", "model.num_hidden_layers"),
        ("mixer.weights=[3, 1]", "mixer"),
        ('data.blend_mode="exact"', "data.blend_mode"),
    ],
)
def test_each_immutable_key_change_is_refused_naming_old_and_new(small_config, override, key):
    _, saved = _identity(small_config)
    _, now = _identity(small_config, override)
    with pytest.raises(ConfigError) as err:
        check_identity(saved, now, "ckpt/global_step4")
    msg = str(err.value)
    assert f"{key}: checkpoint {json.dumps(saved[key], sort_keys=True)[:50]}" in msg
    assert "cannot resume ckpt/global_step4" in msg


def test_allowed_changes_pass_and_are_listed(small_config):
    cfg, saved = _identity(small_config)
    cfg2, now = _identity(small_config, "schedule.train_iters=9", "schedule.lr=5e-4", "schedule.global_batch_size=8",
                          "eval.eval_iters=3", "log_interval=5", "checkpoint.keep_last=2")  # fmt: skip
    check_identity(saved, now, "x")
    keys = [k for k, _, _ in changed_settings(cfg.to_dict(), cfg2.to_dict())]
    assert keys == ["checkpoint.keep_last", "eval.eval_iters", "log_interval", "schedule.global_batch_size",
                    "schedule.lr", "schedule.lr_decay_iters", "schedule.train_iters"]  # fmt: skip


def test_moved_shards_keep_the_identity_but_other_files_do_not(small_config, tmp_path):
    import shutil

    _, saved = _identity(small_config)
    moved = tmp_path / "moved"
    moved.mkdir()
    mix = json.loads(open(small_config["data"]["mixture"]).read())
    for dom in mix["domains"].values():
        for suffix in (".bin", ".idx"):
            shutil.copy(dom["prefixes"][0] + suffix, moved)
        dom["prefixes"] = [str(moved / os.path.basename(dom["prefixes"][0]))]
    (moved / "mixture.json").write_text(json.dumps(mix))
    _, now = _identity(
        {**small_config, "data": {**small_config["data"], "mixture": str(moved / "mixture.json")}}
    )
    check_identity(saved, now, "x")
    mix["domains"]["a"]["weight"] = 2.0
    (moved / "mixture.json").write_text(json.dumps(mix))
    _, now = _identity(
        {**small_config, "data": {**small_config["data"], "mixture": str(moved / "mixture.json")}}
    )
    with pytest.raises(ConfigError, match="data.mixture"):
        check_identity(saved, now, "x")


# ---- LR after a resume --------------------------------------------------------------------------------------------


def test_restored_lr_follows_the_scheduler_count_bit_for_bit_with_skipped_steps():
    schedule = {
        "lr": 3e-3,
        "min_lr": 3e-4,
        "warmup_iters": 3,
        "lr_decay_iters": 20,
        "lr_decay_style": "cosine",
    }
    skipped = {2, 3, 7}

    def run(steps, start=None):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = make_lr_scheduler(schedule)(opt)
        if start is not None:
            sched.load_state_dict(start)
            restore_lr(sched, schedule)
        lrs = []
        for s in steps:
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            if s not in skipped:  # DeepSpeed does not step the scheduler on a skipped step
                sched.step()
        return lrs, sched.state_dict()

    full, _ = run(range(1, 13))
    first, state = run(range(1, 7))
    second, _ = run(range(7, 13), start=state)
    assert first + second == full  # exact, including the first step after the resume
    assert state["last_epoch"] == 4  # 6 steps, 2 of them skipped


def test_restored_lr_uses_this_runs_schedule():
    old = {"lr": 3e-3, "min_lr": 0.0, "warmup_iters": 0, "lr_decay_iters": 10, "lr_decay_style": "linear"}
    new = {**old, "lr": 1e-3, "lr_decay_iters": 20}
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_lr_scheduler(old)(opt)
    for _ in range(5):
        opt.step()
        sched.step()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = make_lr_scheduler(new)(opt2)
    sched2.load_state_dict(sched.state_dict())
    assert restore_lr(sched2, new) == [1e-3 * ((1.0 - 5 / 20) * 1e-3 / 1e-3)]
    assert opt2.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.75)


# ---- pre-flight ---------------------------------------------------------------------------------------------------


def test_output_path_through_a_file_is_a_config_error_naming_the_key(small_config, tmp_path):
    (tmp_path / "afile").write_text("x")
    for key, value in (
        ("output_dir", str(tmp_path / "afile" / "run")),
        ("output_dir", str(tmp_path / "afile")),
    ):
        cfg = load_run_config(None, [f"{key}={value}"], base=small_config)
        with pytest.raises(ConfigError, match=f"output_dir: .* {str(tmp_path / 'afile')!r} is a file"):
            check_output_paths(cfg)
    cfg = load_run_config(None, [f"checkpoint.save={tmp_path / 'afile' / 'ckpt'}"], base=small_config)
    with pytest.raises(ConfigError, match="checkpoint.save"):
        check_output_paths(cfg)


def test_train_cli_reports_a_parent_file_without_a_traceback(small_config, tmp_path):
    (tmp_path / "afile").write_text("x")
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({**small_config, "output_dir": str(tmp_path / "afile" / "run")}))
    proc = subprocess.run([sys.executable, "-m", "megatron_doremi.train", "--config", str(cfg)], cwd=REPO,
                          env=launch_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert (
        proc.returncode == 2
        and "is a file, not a directory" in proc.stderr
        and "Traceback" not in proc.stderr
    )


def test_validation_token_ids_above_the_vocabulary_are_named(tmp_path):
    from megatron_doremi.data.loader import build_domain_datasets
    from megatron_doremi.data.mixture import Mixture

    rng = np.random.default_rng(1)
    ok = write_shard(str(tmp_path / "ok_text_document"), random_documents(rng, 20, 50, 100, 100))
    docs = random_documents(rng, 20, 50, 100, 100)
    docs[-1][5] = 250  # the last documents are the validation split
    bad = write_shard(str(tmp_path / "bad_text_document"), docs)
    mixture = Mixture.from_dict(
        {"domains": {"ok": {"prefixes": [ok], "weight": 1}, "bad": {"prefixes": [bad], "weight": 1}}}
    )
    valid = build_domain_datasets(mixture, 16, "50,50,0", 1)["valid"]
    with pytest.raises(
        ConfigError, match=r"valid split has token ids >= the model's vocab_size 200 \(bad: token id 250\)"
    ):
        check_split_vocab(valid, mixture.names, "valid", 10**6, 200, 0, 1, torch.device("cpu"), chunk=3)
    check_split_vocab(valid, mixture.names, "valid", 10**6, 251, 0, 1, torch.device("cpu"))


def test_new_config_keys_are_validated(small_config):
    cfg = load_run_config(None, ["train.max_skipped_steps=5", "checkpoint.keep_last=2", "debug.overflow_steps=[2]"],
                          base=small_config)  # fmt: skip
    assert cfg.train["max_skipped_steps"] == 5 and cfg.train["max_consecutive_skipped_steps"] == 20
    assert cfg.checkpoint["keep_last"] == 2 and cfg.checkpoint["restart"] is False
    assert cfg.to_dict()["train"] == cfg.train
    for bad, needle in (
        ("train.max_skipped_steps=-1", "train.max_skipped_steps must be >= 0"),
        ("train.max_skiped_steps=1", "did you mean 'max_skipped_steps'"),
        ("checkpoint.keep_last=0", "checkpoint.keep_last must be >= 1"),
        ("checkpoint.restart=1", "checkpoint.restart must be true or false"),
        ('debug.overflow_steps="2"', "debug.overflow_steps must be a list"),
    ):
        with pytest.raises(ConfigError, match=needle):
            load_run_config(None, [bad], base=small_config)
