"""benchmarks/gpu_acceptance.py runs end to end in its CPU self-check mode (tiny sizes), writing its outputs.

The GPU run itself cannot happen here; this keeps the script's logic, its checks and its report format tested.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_cpu_selfcheck_passes_and_writes_json_and_markdown(tmp_path):
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "gpu_acceptance.py"),
        "--cpu-selfcheck",
        "--out",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu_acceptance.json").read_text())
    names = [c["name"] for c in summary["checks"]]
    for required in ("layout-sweep", "non-finite-rows", "elements>2^32", "deterministic-5-runs",
                     "fused-linear-vs-unfused", "bench_domain_loss", "llama-125m-train-step"):  # fmt: skip
        assert required in names
    assert summary["failed"] == 0 and summary["passed"] >= 10
    skipped = {c["name"] for c in summary["checks"] if c["status"] == "skip"}
    assert skipped <= {"build", "pytest-cuda-cases", "non-default-stream", "llama-125m-train-step"}
    table = (tmp_path / "gpu_acceptance.md").read_text()
    assert "| layout-sweep | pass |" in table
    assert (tmp_path / "bench_domain_loss.txt").is_file()


def test_a_failing_check_is_reported_not_raised(tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_acceptance", REPO / "benchmarks" / "gpu_acceptance.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def broken(ctx):
        raise RuntimeError("boom")

    monkeypatch.setattr(
        mod, "CHECKS", [("broken", broken)] + [c for c in mod.CHECKS if c[0] == "non-finite-rows"]
    )
    assert mod.main(["--cpu-selfcheck", "--out", str(tmp_path)]) == 1
    summary = json.loads((tmp_path / "gpu_acceptance.json").read_text())
    assert [c["status"] for c in summary["checks"]] == ["fail", "pass"]
    assert "boom" in summary["checks"][0]["detail"]
