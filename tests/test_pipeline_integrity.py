"""The pipeline's run-integrity rules with the fake trainer: one pipeline per output_dir, a signalled step exits
75 (resumable), a diverged proxy's weights are refused, a deleted reference checkpoint is named, tracker runs
are grouped per pipeline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from megatron_doremi.pipeline import PipelineError, StepFailed, StepRequeued, main, run_pipeline
from megatron_doremi.training import exit_codes
from megatron_doremi.training.run_lock import RunLock, RunLockedError
from tests.test_pipeline import FakeTrainer, _pipeline


class StatusTrainer(FakeTrainer):
    """FakeTrainer whose step ``name`` exits with ``status`` (after its first checkpoint), once."""

    def __init__(self, name: str, status: int, diverged: bool = False) -> None:
        super().__init__()
        self.name, self.status, self.diverged = name, status, diverged

    def __call__(self, name, cmd, log_path, env):
        rc = super().__call__(name, cmd, log_path, env)
        if name == self.name and self.status is not None:
            status, self.status = self.status, None
            out = Path(json.loads(Path(cmd[cmd.index("--config") + 1]).read_text())["output_dir"])
            (out / "train_summary.json").unlink()
            if self.diverged:
                (out / "diverged.json").write_text(json.dumps({"reason": "8 consecutive skipped steps"}))
            return status
        return rc


def test_a_second_pipeline_on_the_same_output_dir_is_refused(tmp_path):
    cfg = _pipeline(tmp_path)
    out = Path(cfg["output_dir"])
    out.mkdir()
    fake = FakeTrainer()
    with RunLock(str(out), what="pipeline"):
        with pytest.raises(RunLockedError, match="pid"):
            run_pipeline(cfg, runner=fake, echo=False)
    assert fake.calls == []
    run_pipeline(cfg, runner=fake, echo=False)  # released: runs
    assert [c[0] for c in fake.calls] == ["reference", "proxy", "main", "baseline"]


def test_a_requeued_step_stops_the_pipeline_with_75_and_the_rerun_resumes_it(tmp_path, capsys):
    cfg = _pipeline(tmp_path)
    fake = StatusTrainer("main", exit_codes.REQUEUE)
    with pytest.raises(StepRequeued, match="rerun the same command"):
        run_pipeline(cfg, runner=fake, echo=False)
    assert [c[0] for c in fake.calls] == ["reference", "proxy", "main"]
    path = tmp_path / "pipe.json"
    path.write_text(json.dumps(cfg))
    fake2 = StatusTrainer("baseline", exit_codes.REQUEUE)
    import megatron_doremi.pipeline as pipeline_mod

    orig = pipeline_mod._subprocess_runner
    pipeline_mod._subprocess_runner = lambda echo: fake2
    try:
        assert main(["--config", str(path), "--quiet"]) == exit_codes.REQUEUE
        assert [c[0] for c in fake2.calls] == ["main", "baseline"]  # main resumed, the finished steps skipped
        assert main(["--config", str(path), "--quiet"]) == 0
    finally:
        pipeline_mod._subprocess_runner = orig
    assert "stopped: step baseline stopped after a checkpoint" in capsys.readouterr().err


def test_a_diverged_proxy_is_refused_and_says_why(tmp_path):
    cfg = _pipeline(tmp_path)
    with pytest.raises(StepFailed, match=r"diverged.*diverged\.json; its weights are not used"):
        run_pipeline(cfg, runner=StatusTrainer("proxy", exit_codes.DIVERGED, diverged=True), echo=False)
    # a proxy that left diverged.json but "finished" (e.g. an older version) is refused, not used
    proxy = Path(cfg["output_dir"]) / "proxy"
    (proxy / "diverged.json").unlink()  # what the trainer does when a resumed attempt starts
    fake = FakeTrainer()
    run_pipeline(cfg, runner=fake, echo=False)
    (proxy / "diverged.json").write_text(json.dumps({"reason": "non-finite loss"}))
    with pytest.raises(StepFailed, match="proxy diverged .non-finite loss"):
        run_pipeline(cfg, runner=FakeTrainer(), echo=False)


def test_a_deleted_reference_checkpoint_is_named_not_skipped(tmp_path):
    cfg = _pipeline(tmp_path)
    fake = StatusTrainer("proxy", 1)
    with pytest.raises(StepFailed):
        run_pipeline(cfg, runner=fake, echo=False)
    ref = Path(cfg["output_dir"]) / "reference"
    shutil.rmtree(ref / "checkpoints")
    with pytest.raises(
        PipelineError, match="reference run in .* finished, but its checkpoint .* was deleted"
    ):
        run_pipeline(cfg, runner=FakeTrainer(), echo=False)


def test_tracker_runs_get_one_group_per_pipeline_and_one_name_per_step(tmp_path):
    cfg = _pipeline(tmp_path)
    cfg["base"]["tracking"] = {"wandb": {"mode": "offline"}}
    run_pipeline(cfg, runner=FakeTrainer(), echo=False, dry_run=True)  # validation accepts the section
    cfg["output_dir"] = str(tmp_path / "exp7")
    fake = FakeTrainer()
    run_pipeline(cfg, runner=fake, echo=False)
    seen = {}
    for name, cmd in fake.calls:
        step_cfg = json.loads(Path(cmd[cmd.index("--config") + 1]).read_text())
        seen[name] = (step_cfg["tracking"]["group"], step_cfg["tracking"]["name"])
    assert seen == {s: ("exp7", s) for s in ("reference", "proxy", "main", "baseline")}
