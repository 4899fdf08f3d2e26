"""RegMix end to end on the real trainer: 8 tiny proxies on synthetic domains, fit, search, report (CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_doremi.data.mixture import Mixture
from tests.conftest import launch_env, write_shard

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _regmix(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_doremi.regmix", *args],
        cwd=cwd,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"regmix {args}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_regmix_end_to_end_with_eight_tiny_proxies(tmp_path):
    rng = np.random.default_rng(0)
    vocab = 256
    domains = {
        "noise": [rng.integers(0, vocab, size=int(rng.integers(50, 200))) for _ in range(200)],
        "repeat": [np.tile(np.arange(8) + 10, 20) for _ in range(200)],
        "counting": [(np.arange(150) * (i % 5 + 1)) % vocab for i in range(200)],
    }
    spec = {"domains": {}}
    for name, docs in domains.items():
        prefix = write_shard(str(tmp_path / f"{name}_text_document"), docs)
        spec["domains"][name] = {"prefixes": [prefix], "weight": 1.0}
    (tmp_path / "mixture.json").write_text(json.dumps(spec))
    model = json.loads((REPO / "examples" / "models" / "tiny.json").read_text())
    model.update(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2
    )
    base = {
        "model": model,
        "data": {"mixture": str(tmp_path / "mixture.json"), "split": "90,10,0"},
        "mixer": {"type": "static"},
        "schedule": {
            "seq_length": 32,
            "micro_batch_size": 8,
            "global_batch_size": 8,
            "train_iters": 4,
            "lr": 3e-3,
        },
        "eval": {"eval_interval": 0, "eval_iters": 1},
        "checkpoint": {"save": str(tmp_path / "unused"), "save_interval": 0},
        "output_dir": str(tmp_path / "unused"),
        "deepspeed_config": str(REPO / "examples" / "ds_configs" / "zero3.json"),
        "progress_bar": False,
    }
    (tmp_path / "base.json").write_text(json.dumps(base))
    runs = tmp_path / "runs"
    _regmix(
        "sample",
        "--mixture",
        "mixture.json",
        "--num-runs",
        "8",
        "--out",
        "runs",
        "--base-config",
        "base.json",
        cwd=tmp_path,
    )
    assert len(list(runs.glob("run_*/config.json"))) == 8
    trained = _regmix("train", "runs", "--parallel", "2", cwd=tmp_path)
    assert len(list(runs.glob("run_*/done"))) == 8, trained.stdout[-2000:]
    for summary in runs.glob("run_*/eval_summary.json"):
        assert set(json.loads(summary.read_text())["domains"]) == {"counting", "noise", "repeat"}
    _regmix("fit", "runs", "--target", "average", cwd=tmp_path)
    fit = json.loads((runs / "regmix_fit" / "fit.json").read_text())
    assert fit  # the fit report exists and parses
    out = runs / "domain_weights.json"
    _regmix(
        "search",
        "runs",
        "--regressor",
        "linear",
        "--num-candidates",
        "20000",
        "--top-k",
        "20",
        "--out",
        str(out),
        cwd=tmp_path,
    )
    weights = json.loads(out.read_text())
    chosen = Mixture.from_dict(weights["average"]["mixture"])
    assert chosen.names == ("counting", "noise", "repeat")
    assert abs(chosen.weights.sum() - 1) < 1e-9
    assert (out.parent / "report.md").exists()
    # a second `train` skips every finished run
    again = _regmix("train", "runs", cwd=tmp_path)
    assert "skip" in (again.stdout + again.stderr).lower()
