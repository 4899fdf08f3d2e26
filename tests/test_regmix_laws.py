"""Mixing laws under data constraints: the log-linear law (fit, held-out verdict) and the capped exact search."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from megatron_doremi.regmix.__main__ import main
from megatron_doremi.regmix.fit import fit_linear
from megatron_doremi.regmix.loglinear import LogLinearModel, fit_loglinear
from megatron_doremi.regmix.sample import sample_mixtures

D = 5
NAMES = ["a", "b", "c", "d", "e"]
TOKENS = np.array([1000.0, 2000.0, 3000.0, 4000.0, 5000.0])


def true_law(seed: int = 0) -> LogLinearModel:
    """A synthetic per-domain log-linear surface: each domain's loss falls with its own weight, others help a bit."""
    rng = np.random.default_rng(seed)
    t = rng.uniform(-0.6, 0.3, (D, D)) - 2.0 * np.eye(D)
    return LogLinearModel(np.log(rng.uniform(1.5, 3.0, D)), t, NAMES, NAMES, [])


def swarm(law: LogLinearModel, n: int, seed: int, noise: float = 0.003) -> tuple[np.ndarray, np.ndarray]:
    w = sample_mixtures(TOKENS, n, seed=seed, min_distance=0.0).weights
    rng = np.random.default_rng(seed + 1000)
    return w, law.predict_targets(w) + rng.normal(0.0, noise, (n, D))


# ---- the log-linear law ---------------------------------------------------------------------------------------------


def test_loglinear_recovers_synthetic_surface_from_4d_samples():
    law = true_law()
    w, y = swarm(law, 4 * D, seed=1)
    test = sample_mixtures(TOKENS, 300, seed=2, min_distance=0.0).weights
    model = fit_loglinear(w, y, NAMES, NAMES)
    rho = stats.spearmanr(model.predict(test), law.predict(test)).statistic
    assert rho > 0.95, rho  # ~0.9999 measured
    # a diverged proxy (loss +3 on every domain) barely moves the Huber fit
    y_bad = y.copy()
    y_bad[3] += 3.0
    robust = stats.spearmanr(fit_loglinear(w, y_bad, NAMES, NAMES).predict(test), law.predict(test)).statistic
    assert robust > 0.95, robust
    # ridge on [w, log(w + eps)] averages the per-domain losses; from 20 runs it follows this surface less well
    ridge = stats.spearmanr(fit_linear(w, y.mean(axis=1), NAMES).predict(test), law.predict(test)).statistic
    assert ridge < rho
    # the gradient is the objective's
    x = test[7]
    num = [(model.predict(x + h)[0] - model.predict(x - h)[0]) / 2e-6 for h in np.eye(D) * 1e-6]
    np.testing.assert_allclose(model.gradient(x), num, rtol=1e-5)
    again = LogLinearModel.from_json(json.loads(json.dumps(model.to_json())), "model")
    np.testing.assert_array_equal(again.predict(test), model.predict(test))


def test_loglinear_rejects_non_positive_targets():
    w, y = swarm(true_law(), 8, seed=3)
    y[0, 2] = 0.0
    with pytest.raises(ValueError, match="target 'c': log-linear fit: target losses must be finite and > 0"):
        fit_loglinear(w, y, NAMES, NAMES)


def write_study(root: Path, make_shard, law: LogLinearModel, num_runs: int, seed: int = 0) -> Path:
    """A sampled study (shards of TOKENS tokens) whose run dirs hold eval summaries of ``law`` (no training)."""
    spec = {"domains": {}}
    for name, n in zip(NAMES, TOKENS):
        prefix = make_shard(name, [np.arange(int(n) // 4) % 97 for _ in range(4)])
        spec["domains"][name] = {"prefixes": [prefix], "weight": 1}
    (root / "mixture.json").write_text(json.dumps(spec))
    runs = root / "runs"
    assert (
        main(["sample", "--mixture", str(root / "mixture.json"), "--num-runs", str(num_runs), "--out", str(runs),
              "--seed", str(seed), "--min-distance", "0"])
        == 0
    )  # fmt: skip
    for run in sorted(runs.glob("run_*")):
        mix = json.loads((run / "mixture.json").read_text())
        w = np.array([mix["domains"][n]["weight"] for n in NAMES])
        loss = law.predict_targets(w / w.sum())[0]
        (run / "eval_summary.json").write_text(
            json.dumps({"domains": {n: {"loss": float(v)} for n, v in zip(NAMES, loss)}})
        )
    return runs


def test_fit_cli_reports_each_regressor_and_the_favoured_one(tmp_path, make_shard, capsys):
    runs = write_study(tmp_path, make_shard, true_law(), 24)
    assert main(["fit", str(runs), "--target", "average"]) == 0
    out = capsys.readouterr().out
    fit = json.loads((runs / "regmix_fit/fit.json").read_text())
    assert set(fit["regressors"]) == {"lightgbm", "linear", "loglinear"}
    for r in fit["regressors"].values():
        assert r["holdout"]["spearman"] is not None and r["holdout"]["pearson"] is not None
        assert (runs / "regmix_fit" / r["model"]).stat().st_size > 0
    assert fit["favoured_regressor"] == "loglinear"  # the surface is log-linear
    assert fit["regressors"]["loglinear"]["holdout"]["spearman"] > 0.95
    assert "held-out numbers favour loglinear" in out and fit["verdict"] in out
    assert fit["regressors"]["loglinear"]["loss_names"] == NAMES
    # one domain's loss as the target: one law; only the named regressors are fitted
    assert main(["fit", str(runs), "--target", "c", "--regressor", "loglinear,linear"]) == 0
    fit = json.loads((runs / "regmix_fit/fit.json").read_text())
    assert set(fit["regressors"]) == {"linear", "loglinear"}
    assert json.loads((runs / "regmix_fit/loglinear_model.json").read_text())["loss_names"] == ["c"]
    assert main(["fit", str(runs), "--regressor", "lightgbm,nope"]) == 1
    assert "--regressor: expected 'all' or a comma list" in capsys.readouterr().err
