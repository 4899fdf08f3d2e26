"""``regmix train``: a proxy that exits 75 (stopped after a checkpoint on a signal / time limit) is resumable, not
failed; no further proxy starts in that invocation, and the CLI exits 75 so the array task is requeued."""

from __future__ import annotations

import json
from pathlib import Path

from megatron_doremi.regmix.__main__ import main
from megatron_doremi.regmix.runs import train_runs
from megatron_doremi.training import exit_codes

FAKE = """import json, os, sys
run = os.path.dirname(sys.argv[sys.argv.index("--config") + 1])
name = os.path.basename(run)
with open(os.path.join(os.path.dirname(run), "order.txt"), "a") as fh:
    fh.write(name + "\\n")
if name in os.environ.get("FAKE_REQUEUE", "").split(","):
    sys.exit(75)
json.dump({"domains": {"a": {"loss": 1.0}}}, open(os.path.join(run, "eval_summary.json"), "w"))
"""


def _study(tmp_path: Path, n: int) -> tuple[Path, str]:
    runs = tmp_path / "runs"
    for k in range(n):
        d = runs / f"run_{k:04d}"
        d.mkdir(parents=True)
        (d / "mixture.json").write_text(json.dumps({"domains": {"a": {"prefixes": ["x"], "weight": 1.0}}}))
        (d / "config.json").write_text("{}")
    (tmp_path / "fake.py").write_text(FAKE)
    return runs, f"{{python}} {tmp_path / 'fake.py'} --config {{config}}"


def test_a_requeued_proxy_is_resumable_and_stops_the_queue(tmp_path, monkeypatch, capsys):
    runs, cmd = _study(tmp_path, 4)
    monkeypatch.setenv("FAKE_REQUEUE", "run_0001")
    rep = train_runs(runs, parallel=1, command=cmd, echo=lambda s: None, poll_s=0.01)
    assert rep.trained == ["run_0000"] and rep.requeued == ["run_0001"] and not rep.failed
    assert rep.pending == ["run_0002", "run_0003"]  # the allocation is ending: nothing new starts
    assert (runs / "order.txt").read_text().split() == ["run_0000", "run_0001"]
    assert not (runs / "run_0001" / "done").exists() and rep.exit_status() == exit_codes.REQUEUE
    # the requeued task: the stopped proxy resumes, the others train; nothing failed
    monkeypatch.setenv("FAKE_REQUEUE", "")
    assert main(["train", str(runs), "--command", cmd]) == exit_codes.OK
    assert all((runs / f"run_{k:04d}" / "done").exists() for k in range(4))
    out = capsys.readouterr().out
    assert "3 trained, 1 skipped (done), 0 failed" in out


def test_the_cli_exits_75_and_a_failure_still_wins(tmp_path, monkeypatch, capsys):
    runs, cmd = _study(tmp_path, 2)
    monkeypatch.setenv("FAKE_REQUEUE", "run_0000")
    assert main(["train", str(runs), "--command", cmd]) == exit_codes.REQUEUE
    assert "to resume (rerun)" in capsys.readouterr().out
    rep = train_runs(runs, command=cmd, echo=lambda s: None, poll_s=0.01)  # run_0000 stops again
    assert rep.requeued == ["run_0000"] and rep.exit_status() == exit_codes.REQUEUE
    rep.failed["run_0001"] = "exit status 1"
    assert rep.exit_status() == exit_codes.FAILED
