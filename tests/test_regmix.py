"""RegMix: sampling (cap, threshold, seed, dedupe), the train driver (fake trainer), fit, search, bad inputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import optimize, stats

from megatron_doremi.data.mixture import Mixture
from megatron_doremi.regmix.__main__ import main
from megatron_doremi.regmix.fit import fit_lightgbm, fit_linear, fit_runs
from megatron_doremi.regmix.runs import (
    build_command,
    collect_results,
    read_eval_summary,
    train_runs,
    visible_gpus,
)
from megatron_doremi.regmix.sample import (
    DEFAULT_CONCENTRATIONS,
    RegmixError,
    SamplingError,
    dirichlet_log_space,
    sample_mixtures,
    token_prior,
)
from megatron_doremi.regmix.search import search_candidates

C = np.array([1.0, 2.0, 0.5, 3.0, 1.5])  # the synthetic response surface: loss(w) = sum_d C_d / (w_d + 0.05)
TOKENS5 = np.array([1000.0, 2000.0, 3000.0, 4000.0, 5000.0])


def surface(w: np.ndarray) -> np.ndarray:
    return (C / (np.atleast_2d(w) + 0.05)).sum(axis=1)


def analytic_optimum(c: np.ndarray, a: float = 0.05) -> np.ndarray:
    """argmin sum c_d / (w_d + a) on the simplex: KKT gives w_d = max(0, sqrt(c_d) / s - a), s set by sum w = 1."""
    r = np.sqrt(c)
    lo, hi = 1e-9, 1e9
    for _ in range(200):
        s = np.sqrt(lo * hi)
        lo, hi = (s, hi) if np.maximum(0.0, r / s - a).sum() > 1 else (lo, s)
    w = np.maximum(0.0, r / s - a)
    return w / w.sum()


# ---- sampling -------------------------------------------------------------------------------------------------------


def test_sampling_respects_epoch_cap_and_threshold():
    tokens = np.array([500.0, 4000.0, 20000.0, 1000.0])
    planned, epochs = 10000.0, 2.0
    res = sample_mixtures(tokens, 40, seed=3, max_epochs=epochs, planned_tokens=planned, min_weight=0.05)
    w = res.weights
    assert w.shape == (40, 4)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
    assert np.all(w * planned <= epochs * tokens * (1 + 1e-9))  # the cap: domain 0 may hold at most 10%
    assert res.rejected["epoch cap"] > 0  # the cap was binding for some proposals
    assert np.all((w == 0) | (w >= 0.05))
    assert np.any(w == 0)  # the sparse end of the grid produced zeroed domains
    assert set(res.concentrations.tolist()) <= set(DEFAULT_CONCENTRATIONS)


def test_sampling_dedupe_and_binding_constraint_errors():
    res = sample_mixtures(TOKENS5, 30, seed=0, min_distance=0.15)
    d = np.abs(res.weights[:, None, :] - res.weights[None, :, :]).sum(axis=2)
    assert d[~np.eye(30, dtype=bool)].min() >= 0.15
    res = sample_mixtures(TOKENS5, 30, seed=0, min_distance=0.1, distance="linf")
    d = np.abs(res.weights[:, None, :] - res.weights[None, :, :]).max(axis=2)
    assert d[~np.eye(30, dtype=bool)].min() >= 0.1
    with pytest.raises(SamplingError, match="binding constraint: duplicate"):
        sample_mixtures(TOKENS5, 50, seed=0, min_distance=1.5, max_attempts=200)
    with pytest.raises(SamplingError, match="binding constraint: epoch cap"):
        # flat prior, near-prior draws: domain 0 would need > 1 epoch whenever its weight exceeds 0.02
        kw = {"temperature": 1e9, "concentrations": [10.0], "max_attempts": 50}
        sample_mixtures([400.0, 100000.0], 5, seed=0, max_epochs=1, planned_tokens=20000, **kw)
    with pytest.raises(SamplingError, match="infeasible"):
        sample_mixtures([100.0, 100.0], 5, max_epochs=1, planned_tokens=1000)
    with pytest.raises(RegmixError, match="concentrations"):
        sample_mixtures(TOKENS5, 5, concentrations=[0.0])


def test_prior_and_log_space_dirichlet():
    np.testing.assert_allclose(token_prior([1, 3], 1.0), [0.25, 0.75])
    np.testing.assert_allclose(token_prior([1, 3], 1e9), [0.5, 0.5], atol=1e-8)
    rng = np.random.Generator(np.random.PCG64(0))
    w = dirichlet_log_space(rng, np.full((1000, 6), 1e-4))  # plain Gamma draws underflow to 0 here
    assert np.all(np.isfinite(w)) and np.allclose(w.sum(axis=1), 1.0)
    w = dirichlet_log_space(rng, np.tile([[2.0, 0.0, 6.0]], (20000, 1)))
    assert np.all(w[:, 1] == 0)
    np.testing.assert_allclose(w.mean(axis=0), [0.25, 0.0, 0.75], atol=0.01)  # Dirichlet mean alpha / sum


@pytest.fixture
def study(tmp_path, make_shard):
    """Four domains of shards, a mixture JSON and a base run config; returns tmp_path."""
    spec = {"domains": {}}
    for name, n in {"code": 3000, "docs": 8000, "lexicon": 1500, "wiki": 20000}.items():
        prefix = make_shard(name, [np.arange(n // 4) % 97 for _ in range(4)])
        spec["domains"][name] = {"prefixes": [prefix], "weight": 1}
    (tmp_path / "mixture.json").write_text(json.dumps(spec))
    base = {
        "model": "examples/models/tiny.json",
        "data": {"mixture": "placeholder", "split": "98,1,1"},
        "schedule": {"train_iters": 10, "global_batch_size": 4, "seq_length": 128},
        "mixer": {"type": "doremi"},
        "checkpoint": {"save": "ckpt", "load": "ckpt", "export_hf": "hf"},
        "output_dir": "runs/run",
    }
    (tmp_path / "base.json").write_text(json.dumps(base))
    fake = tmp_path / "fake_train.py"
    fake.write_text(
        "import json, os, sys\n"
        "import numpy as np\n"
        "from megatron_doremi.data.mixture import Mixture\n"
        "cfg = json.load(open(sys.argv[sys.argv.index('--config') + 1]))\n"
        "out = cfg['output_dir']\n"
        "if os.path.basename(out) in os.environ.get('FAKE_FAIL', '').split(','):\n"
        "    print('boom'); sys.exit(3)\n"
        "if os.path.basename(out) in os.environ.get('FAKE_NO_SUMMARY', '').split(','):\n"
        "    sys.exit(0)\n"
        "mix = Mixture.from_json(cfg['data']['mixture'])\n"
        "loss = np.array([1.0, 2.0, 0.5, 3.0]) / (mix.weights + 0.05) / 10 + 2\n"
        "doc = {'step': 10, 'domains': {n: {'loss': float(v), 'ppl': float(np.exp(v)), 'tokens': 64}\n"
        "       for n, v in zip(mix.names, loss)}}\n"
        "json.dump(doc, open(os.path.join(out, 'eval_summary.json'), 'w'))\n"
    )
    return tmp_path


def _sample(study: Path, out: str, *extra: str) -> int:
    return main(["sample", "--mixture", str(study / "mixture.json"), "--out", str(study / out), *extra])


def test_sample_cli_seed_and_configs(study):
    assert (
        _sample(study, "a", "--num-runs", "6", "--seed", "7", "--base-config", str(study / "base.json")) == 0
    )
    assert _sample(study, "b", "--num-runs", "6", "--seed", "7") == 0
    assert _sample(study, "c", "--num-runs", "6", "--seed", "8") == 0
    for k in range(6):
        name = f"run_{k:04d}/mixture.json"
        assert (study / "a" / name).read_bytes() == (study / "b" / name).read_bytes()
    assert any(
        (study / "a" / f"run_{k:04d}/mixture.json").read_bytes()
        != (study / "c" / f"run_{k:04d}/mixture.json").read_bytes()
        for k in range(6)
    )
    man = json.loads((study / "a/manifest.json").read_text())
    assert man["planned_tokens"] == 10 * 4 * 128 and man["train_fraction"] == 0.98
    assert man["tokens"] == {"code": 3000, "docs": 8000, "lexicon": 1500, "wiki": 20000}
    np.testing.assert_allclose(list(man["prior"].values()), np.array([3000, 8000, 1500, 20000]) / 32500)
    cfg = json.loads((study / "a/run_0002/config.json").read_text())
    run_dir = study / "a" / "run_0002"
    assert cfg["data"] == {"mixture": str(run_dir / "mixture.json"), "split": "98,1,1"}
    assert cfg["output_dir"] == str(run_dir)
    assert cfg["mixer"] == {"type": "static"}  # proxies train on their fixed mixture
    assert cfg["checkpoint"] == {
        "save": str(run_dir / "checkpoints"),
        "load": str(run_dir / "checkpoints"),
        "export_hf": None,
    }
    mix = Mixture.from_json(run_dir / "mixture.json")
    np.testing.assert_allclose(mix.weights, list(man["runs"][2]["weights"].values()))
    assert not (study / "b/run_0000/config.json").exists()
    # custom dotted keys; an existing study directory is refused
    assert (
        _sample(
            study,
            "d",
            "--num-runs",
            "2",
            "--base-config",
            str(study / "base.json"),
            "--mixture-key",
            "dataset.mix",
            "--output-key",
            "io.out",
        )
        == 0
    )
    cfg = json.loads((study / "d/run_0001/config.json").read_text())
    assert cfg["dataset"]["mix"].endswith("run_0001/mixture.json") and cfg["io"]["out"].endswith("run_0001")
    assert _sample(study, "a", "--num-runs", "2") == 1


# ---- train driver ---------------------------------------------------------------------------------------------------


def test_train_driver_with_fake_trainer(study, monkeypatch, capsys):
    assert _sample(study, "runs", "--num-runs", "6", "--base-config", str(study / "base.json")) == 0
    runs = study / "runs"
    monkeypatch.chdir(study)
    cmd = f"{{python}} {study / 'fake_train.py'} --config {{config}}"
    monkeypatch.setenv("FAKE_FAIL", "run_0001")
    monkeypatch.setenv("FAKE_NO_SUMMARY", "run_0004")
    rep = train_runs(runs, parallel=2, command=cmd, echo=lambda s: None)
    assert sorted(rep.trained) == ["run_0000", "run_0002", "run_0003", "run_0005"]
    assert set(rep.failed) == {"run_0001", "run_0004"}
    assert "exit status 3" in rep.failed["run_0001"] and "no eval_summary.json" in rep.failed["run_0004"]
    # a summary left behind by a failed attempt does not make a later exit-0 attempt count
    (runs / "run_0004/eval_summary.json").write_text("{}")
    rep = train_runs(runs, only=[4], command=cmd, echo=lambda s: None)
    assert "run_0004" in rep.failed and (runs / "run_0004/eval_summary.json.stale").exists()
    assert (runs / "run_0000/done").exists() and not (runs / "run_0001/done").exists()
    assert "boom" in (runs / "run_0001/train.log").read_text()
    # the CLI exits 1 listing the failure; finished runs are skipped (resumable)
    assert main(["train", str(runs), "--command", cmd]) == 1
    assert "FAILED run_0001" in capsys.readouterr().err
    monkeypatch.setenv("FAKE_FAIL", "")
    monkeypatch.setenv("FAKE_NO_SUMMARY", "")
    rep = train_runs(runs, command=cmd, echo=lambda s: None)
    assert sorted(rep.trained) == ["run_0001", "run_0004"] and len(rep.skipped) == 4 and not rep.failed
    assert main(["train", str(runs), "--command", cmd]) == 0


def test_train_dry_run_gpu_assignment_and_launchers(study, monkeypatch):
    assert _sample(study, "runs", "--num-runs", "4", "--base-config", str(study / "base.json")) == 0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6,7")  # an allocation: ids are indices into it
    masked = train_runs(study / "runs", parallel=2, gpus_per_run=1, dry_run=True)
    assert [env["CUDA_VISIBLE_DEVICES"] for _, _, env in masked.planned] == ["6", "7", "6", "7"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    rep = train_runs(
        study / "runs", parallel=2, gpus_per_run=2, dry_run=True, launcher="torchrun", base_port=29500
    )
    envs = [env for _, _, env in rep.planned]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0,1", "2,3", "0,1", "2,3"]
    assert [e["MASTER_PORT"] for e in envs] == ["29500", "29501", "29500", "29501"]
    assert (
        "--nproc_per_node" in rep.planned[0][1]
        and rep.planned[0][1][rep.planned[0][1].index("--nproc_per_node") + 1] == "2"
    )
    free = train_runs(study / "runs", parallel=2, dry_run=True, launcher="torchrun")
    ports = [int(env["MASTER_PORT"]) for _, _, env in free.planned]
    assert all(1024 <= p < 65536 for p in ports) and len(set(ports)) > 1  # a free port per launch by default
    shared = train_runs(study / "runs", parallel=4, gpus_per_run=1, gpu_ids=[5], dry_run=True)
    assert {env["CUDA_VISIBLE_DEVICES"] for _, _, env in shared.planned} == {"5"}  # several runs per GPU
    argv, env = build_command("python", "c.json", "r", None, 29600)
    assert (
        argv == [sys.executable, "-m", "megatron_doremi.train", "--config", "c.json"]
        and "CUDA_VISIBLE_DEVICES" not in env
    )
    argv, env = build_command("deepspeed", "c.json", "r", ["3"], 29600)
    assert argv[:3] == ["deepspeed", "--master_port", "29600"] and env["CUDA_VISIBLE_DEVICES"] == "3"
    assert "--include" not in argv and "--num_gpus" not in argv  # deepspeed takes CUDA_VISIBLE_DEVICES then
    assert visible_gpus([0, 1], "4,5") == ["4", "5"] and visible_gpus([2], None) == ["2"]
    with pytest.raises(RegmixError, match="outside this process's CUDA_VISIBLE_DEVICES"):
        visible_gpus([2], "4,5")
    argv, _ = build_command(
        "python", "c.json", "r", [0], 1, "deepspeed --num_gpus {num_gpus} --module m --config {config}"
    )
    assert argv == ["deepspeed", "--num_gpus", "1", "--module", "m", "--config", "c.json"]
    with pytest.raises(RegmixError, match="placeholder"):
        build_command("python", "c.json", "r", None, 1, "run {nope}")
    only = train_runs(study / "runs", only=[2], dry_run=True)
    assert [name for name, _, _ in only.planned] == ["run_0002"]
    with pytest.raises(RegmixError, match="out of range"):
        train_runs(study / "runs", only=[9], dry_run=True)
    assert _sample(study, "nocfg", "--num-runs", "2") == 0
    with pytest.raises(RegmixError, match="no config.json"):
        train_runs(study / "nocfg", dry_run=True)


# ---- fit and search on the synthetic surface ------------------------------------------------------------------------


def test_regressors_recover_synthetic_surface():
    train = sample_mixtures(TOKENS5, 64, seed=1).weights
    test = sample_mixtures(TOKENS5, 300, seed=101, min_distance=0.0).weights
    y = surface(train)
    names = list("abcde")
    lgb_rho = stats.spearmanr(fit_lightgbm(train, y, seed=0).predict(test), surface(test)).statistic
    lin_rho = stats.spearmanr(fit_linear(train, y, names).predict(test), surface(test)).statistic
    plain_rho = stats.spearmanr(
        fit_linear(train, y, names, kind="weights").predict(test), surface(test)
    ).statistic
    assert lgb_rho > 0.9, lgb_rho  # ~0.98 measured
    assert lin_rho > 0.95, lin_rho  # ~0.999 on [w, log(w + eps)]
    assert plain_rho < lin_rho  # linear on raw weights cannot follow the convex surface (~0.2-0.4)


def test_search_finds_known_optimum():
    w_opt = analytic_optimum(C)
    numeric = optimize.minimize(
        lambda w: surface(w)[0], np.full(5, 0.2), method="SLSQP", bounds=[(0, 1)] * 5,
        constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}],
    )  # fmt: skip
    np.testing.assert_allclose(w_opt, numeric.x, atol=2e-3)
    prior, grid = token_prior(TOKENS5), np.array(DEFAULT_CONCENTRATIONS)
    exact = search_candidates(surface, prior, grid, 0.01, 100_000, 100, seed=0)["weights"]
    assert np.abs(exact - w_opt).sum() < 0.05
    train = sample_mixtures(TOKENS5, 64, seed=1).weights
    lin = fit_linear(train, surface(train), list("abcde"))
    found = search_candidates(lin.predict, prior, grid, 0.01, 100_000, 100, seed=0)["weights"]
    assert np.abs(found - w_opt).sum() < 0.1, (found, w_opt)
    # LightGBM (piecewise constant, 64 points) lands near, not on, the optimum: ~7% above the optimal loss
    lgb = fit_lightgbm(train, surface(train), seed=0)
    found = search_candidates(lgb.predict, prior, grid, 0.01, 50_000, 100, seed=0)["weights"]
    opt_loss = surface(w_opt)[0]
    assert surface(found)[0] < 1.12 * opt_loss and surface(found)[0] < surface(prior)[0]


# ---- end to end with a fake trainer, bad inputs ---------------------------------------------------------------------


def test_end_to_end_fake_trainer(study, monkeypatch, capsys):
    monkeypatch.chdir(study)
    assert (
        _sample(study, "runs", "--num-runs", "16", "--base-config", str(study / "base.json"), "--seed", "2")
        == 0
    )
    runs = study / "runs"
    assert main(["fit", str(runs)]) == 1
    assert "no finished runs" in capsys.readouterr().err
    cmd = f"{{python}} {study / 'fake_train.py'} --config {{config}}"
    assert main(["train", str(runs), "--command", cmd, "--parallel", "2"]) == 0
    assert main(["fit", str(runs), "--target", "average"]) == 0
    fit = json.loads((runs / "regmix_fit/fit.json").read_text())
    assert fit["num_runs"] == 16 and len(fit["test_runs"]) == 4
    assert fit["regressors"]["linear"]["holdout"]["spearman"] > 0.9
    for name in ("lightgbm_model.txt", "linear_model.json", "pred_vs_actual.png"):
        assert (runs / "regmix_fit" / name).stat().st_size > 0
    assert (
        main(["search", str(runs), "--regressor", "linear", "--num-candidates", "20000", "--top-k", "50"])
        == 0
    )
    doc = json.loads((runs / "domain_weights.json").read_text())
    assert doc["domain_names"] == ["code", "docs", "lexicon", "wiki"] and doc["method"] == "regmix"
    mix = Mixture.from_dict(doc["average"]["mixture"])
    w_opt = analytic_optimum(np.array([1.0, 2.0, 0.5, 3.0]))
    assert np.abs(mix.weights - w_opt).sum() < 0.15  # the fake trainer's surface, learned from 16 runs
    assert doc["final"]["weights"] == doc["average"]["weights"]
    assert Mixture.from_data_path(doc["average"]["data_path"]).names == mix.names
    report = (runs / "report.md").read_text()
    assert "| lexicon |" in report and "held-out Spearman" in report
    assert (runs / "regmix_weights.png").stat().st_size > 0
    assert main(["search", str(runs), "--num-candidates", "5000", "--out", str(study / "w/lgb.json")]) == 0
    assert json.loads((study / "w/lgb.json").read_text())["regressor"] == "lightgbm"
    # bad targets and run sets
    assert main(["fit", str(runs), "--target", "nope"]) == 1
    err = capsys.readouterr().err
    assert "'nope' is not a domain" in err and "code, docs, lexicon, wiki" in err
    other = json.loads((runs / "run_0003/mixture.json").read_text())
    other["domains"]["extra"] = dict(other["domains"]["code"])
    (runs / "run_0003/mixture.json").write_text(json.dumps(other))
    with pytest.raises(RegmixError, match="runs run_0000 and run_0003 have different domains"):
        collect_results(runs)


def test_too_few_runs_and_bad_eval_summary(study, monkeypatch):
    monkeypatch.chdir(study)
    assert _sample(study, "runs", "--num-runs", "3", "--base-config", str(study / "base.json")) == 0
    runs = study / "runs"
    rep = train_runs(
        runs, command=f"{{python}} {study / 'fake_train.py'} --config {{config}}", echo=lambda s: None
    )
    assert len(rep.trained) == 3
    with pytest.raises(RegmixError, match="only 3 finished run"):
        fit_runs(runs)
    bad = runs / "run_0001/eval_summary.json"
    bad.write_text(json.dumps({"domains": {"code": {"ppl": 3.0}}}))
    with pytest.raises(RegmixError, match=r"run_0001/eval_summary.json: missing key domains.code.loss"):
        read_eval_summary(bad)
    bad.write_text(json.dumps({"uniform_loss": 3.0}))
    with pytest.raises(RegmixError, match='missing key "domains"'):
        collect_results(runs)
    bad.write_text("{not json")
    with pytest.raises(RegmixError, match=r"eval_summary.json:1: invalid JSON"):
        collect_results(runs)
    bad.write_text(
        json.dumps({"domains": {"code": 3.0, "docs": 3.0, "lexicon": 3.0}})
    )  # bare numbers; wiki missing
    with pytest.raises(RegmixError, match=r"no loss for domain\(s\) \['wiki'\]"):
        collect_results(runs)
