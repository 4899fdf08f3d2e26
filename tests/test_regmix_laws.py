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


# ---- the exact search under repetition caps -------------------------------------------------------------------------

CC = np.array([1.0, 2.0, 0.5, 3.0, 1.5])
A = 0.05


def capped_optimum(c: np.ndarray, upper: np.ndarray, a: float = A) -> np.ndarray:
    """argmin sum c_d / (w_d + a) s.t. sum w = 1, 0 <= w <= u: KKT gives w_d = clip(sqrt(c_d) / s - a, 0, u_d)."""
    lo, hi = 1e-9, 1e9
    for _ in range(300):
        s = np.sqrt(lo * hi)
        lo, hi = (s, hi) if np.clip(np.sqrt(c) / s - a, 0.0, upper).sum() > 1 else (lo, s)
    return np.clip(np.sqrt(c) / s - a, 0.0, upper)


def test_exact_search_hits_the_analytic_optimum_and_respects_caps():
    from megatron_doremi.regmix.optimize import binding_caps, minimize_on_simplex, repetition_caps

    f = lambda w: float(np.sum(CC / (w + A)))  # noqa: E731
    g = lambda w: -CC / (w + A) ** 2  # noqa: E731
    free = minimize_on_simplex(f, g, np.ones(D), starts=4)
    w_free = capped_optimum(CC, np.ones(D))
    assert np.abs(free["weights"] - w_free).sum() < 0.02 and free["converged"] == 4
    # caps from token counts: domain d holds tokens[d]; a budget of 5000 tokens at 1 epoch caps d (w_free[d] ~0.31)
    tokens = np.array([3000.0, 1000.0, 3000.0, 1200.0, 3000.0])
    upper = repetition_caps(tokens, 5000.0, 1.0, NAMES)
    np.testing.assert_allclose(upper, [0.6, 0.2, 0.6, 0.24, 0.6])
    res = minimize_on_simplex(f, g, upper, prior=TOKENS / TOKENS.sum(), seed=3)
    w_cap = capped_optimum(CC, upper)
    assert np.abs(res["weights"] - w_cap).sum() < 0.02, (res["weights"], w_cap)
    assert np.all(res["weights"] <= upper * (1 + 1e-12)) and abs(res["weights"].sum() - 1) < 1e-9
    assert binding_caps(res["weights"], upper, NAMES) == ["b", "d"]  # the two domains the caps hold back
    assert binding_caps(w_cap, upper, NAMES) == ["b", "d"]
    assert res["objective"] > f(w_free)  # the caps cost something
    with pytest.raises(
        ValueError, match="repetition caps infeasible: a budget of 12000 tokens needs more than"
    ):
        repetition_caps(tokens, 12000.0, 1.0, NAMES)  # 11200 tokens of data, 1 epoch


def test_kl_penalty_has_its_closed_form():
    from megatron_doremi.regmix.optimize import minimize_on_simplex

    grad = np.array(
        [0.3, -0.2, 0.1, 0.0, 0.4]
    )  # objective g . w: with lam * KL(w || q), w* is q * exp(-g / lam)
    q = np.array([0.1, 0.2, 0.3, 0.25, 0.15])
    for lam in (0.1, 1.0):
        res = minimize_on_simplex(
            lambda w: float(grad @ w), lambda w: grad, np.ones(D), kl_prior=q, kl_weight=lam
        )
        want = q * np.exp(-grad / lam)
        np.testing.assert_allclose(res["weights"], want / want.sum(), atol=2e-4)
    with pytest.raises(ValueError, match="needs --kl-prior"):
        minimize_on_simplex(lambda w: 0.0, lambda w: np.zeros(D), np.ones(D), kl_weight=1.0)


def test_search_cli_exact_and_sample_under_main_run_caps(tmp_path, make_shard, capsys):
    from megatron_doremi.regmix.optimize import minimize_on_simplex, repetition_caps

    law = true_law()
    runs = write_study(tmp_path, make_shard, law, 4 * D)
    assert main(["fit", str(runs), "--regressor", "loglinear,linear,lightgbm"]) == 0
    man = json.loads((runs / "manifest.json").read_text())
    cap_tokens = np.array([man["cap_tokens"][n] for n in NAMES])
    budget = (
        3.0 * cap_tokens.sum() / 2.0
    )  # 2 epochs of everything would fit exactly 1.5x less data: caps bind
    upper = repetition_caps(cap_tokens, budget, 2.0, NAMES)
    truth = minimize_on_simplex(lambda w: float(law.predict(w[None])[0]), law.gradient, upper, starts=6)[
        "weights"
    ]  # the optimum of the true law under the same caps
    out = tmp_path / "exact/domain_weights.json"
    args = ["search", str(runs), "--regressor", "loglinear", "--optimizer", "exact", "--out", str(out)]
    assert main([*args, "--budget-tokens", str(budget), "--max-epochs", "2"]) == 0
    doc = json.loads(out.read_text())
    w = np.array([doc["average"]["weights"][n] for n in NAMES])
    assert np.all(w * budget <= 2.0 * cap_tokens * (1 + 1e-9))
    assert np.abs(w - truth).sum() < 0.05, (w, truth)  # fitted from 20 runs
    caps = doc["caps"]
    assert (
        caps["source"] == "--budget-tokens" and caps["max_epochs"] == 2.0 and caps["budget_tokens"] == budget
    )
    assert caps["binding"] and set(caps["binding"]) == {
        n for n, x, u in zip(NAMES, truth, upper) if x >= u - 1e-6
    }
    assert doc["optimizer"] == "exact" and doc["favoured_regressor"] == "loglinear"
    assert "binding: **" in (out.parent / "report.md").read_text()
    assert "binding: " + ", ".join(caps["binding"]) in capsys.readouterr().out
    # the sampled-candidate search rejects candidates over a cap: under caps this tight it runs out of candidates
    sample = ["search", str(runs), "--regressor", "loglinear", "--num-candidates", "20000", "--top-k", "50"]
    assert main([*sample, "--budget-tokens", str(budget), "--max-epochs", "2"]) == 1
    assert "binding constraint: the repetition caps" in capsys.readouterr().err
    # under looser caps (2 epochs of a budget of 0.8x the data) it stays within them too, and exact does better
    loose = 0.8 * cap_tokens.sum()
    sout, eout = tmp_path / "sample/domain_weights.json", tmp_path / "exact_loose/domain_weights.json"
    assert main([*sample, "--budget-tokens", str(loose), "--max-epochs", "2", "--out", str(sout)]) == 0
    assert main([*args[:-1], str(eout), "--budget-tokens", str(loose), "--max-epochs", "2"]) == 0
    ws = np.array([json.loads(sout.read_text())["average"]["weights"][n] for n in NAMES])
    we = np.array([json.loads(eout.read_text())["average"]["weights"][n] for n in NAMES])
    assert np.all(ws * loose <= 2.0 * cap_tokens * (1 + 1e-9)) and np.all(
        we * loose <= 2.0 * cap_tokens * (1 + 1e-9)
    )
    assert law.predict(we[None])[0] <= law.predict(ws[None])[0] + 1e-4
    # a KL penalty to the prior (mixture.json: uniform) pulls the uncapped answer toward it
    fout, kout = tmp_path / "free/domain_weights.json", tmp_path / "kl/domain_weights.json"
    assert main([*args[:-1], str(fout)]) == 0
    assert (
        main([*args[:-1], str(kout), "--kl-prior", str(tmp_path / "mixture.json"), "--kl-weight", "0.1"]) == 0
    )
    kdoc = json.loads(kout.read_text())
    free = np.array([json.loads(fout.read_text())["average"]["weights"][n] for n in NAMES])
    uniform = np.full(D, 1.0 / D)
    kl_free = float(np.sum(free * np.log(np.maximum(free, 1e-300) / uniform)))
    assert kdoc["kl"]["weight"] == 0.1 and kdoc["kl"]["kl_to_prior"] < 0.5 * kl_free
    capsys.readouterr()
    # the ridge law is smooth too: exact search with its gradient, within the caps
    lout = tmp_path / "linear/domain_weights.json"
    lin = ["search", str(runs), "--regressor", "linear", "--optimizer", "exact", "--out", str(lout)]
    assert main([*lin, "--budget-tokens", str(budget), "--max-epochs", "2"]) == 0
    wl = np.array([json.loads(lout.read_text())["average"]["weights"][n] for n in NAMES])
    assert np.all(wl * budget <= 2.0 * cap_tokens * (1 + 1e-9)) and abs(wl.sum() - 1) < 1e-9
    capsys.readouterr()
    # bad inputs
    assert main([*args, "--budget-tokens", str(3 * cap_tokens.sum()), "--max-epochs", "2"]) == 1
    assert "repetition caps infeasible" in capsys.readouterr().err
    assert main(["search", str(runs), "--optimizer", "exact"]) == 1  # lightgbm by default
    assert "needs a smooth regressor" in capsys.readouterr().err
    bad = tmp_path / "bad_prior.json"
    bad.write_text(json.dumps({"a": 1, "b": 1, "zz": 1}))
    assert main([*args, "--kl-prior", str(bad), "--kl-weight", "1"]) == 1
    err = capsys.readouterr().err
    assert "bad_prior.json: --kl-prior must name exactly the domains" in err and "unknown ['zz']" in err
