"""A RegMix answer as a pipeline compare entry: fit-if-needed, capped search into the step dir, swarm compute."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_doremi.regmix.compare import check_regmix_spec, regmix_compare_weights
from megatron_doremi.regmix.runs import RegmixError
from tests.test_regmix_laws import NAMES, true_law, write_study


def test_regmix_entry_fits_searches_and_counts_the_swarm(tmp_path, make_shard):
    runs = write_study(tmp_path, make_shard, true_law(), 20)
    for i, run in enumerate(sorted(runs.glob("run_*"))):
        (run / "train_summary.json").write_text(json.dumps({"steps": 5, "train_flops": 1e9 + i}))
    opts = check_regmix_spec({"runs": str(runs), "regressor": "loglinear"}, "compare.rl")
    assert opts["optimizer"] == "exact" and opts["budget_tokens"] == "main"
    w, info = regmix_compare_weights(opts, NAMES, str(tmp_path / "step"), main_budget_tokens=None)
    assert abs(sum(w.values()) - 1) < 1e-9 and list(w) == NAMES
    assert info["swarm_runs"] == 20 and info["swarm_flops"] == pytest.approx(20e9 + sum(range(20)))
    doc = json.loads((tmp_path / "step/domain_weights.json").read_text())
    assert doc["optimizer"] == "exact" and doc["regressor"] == "loglinear"
    assert "loglinear" in json.loads((runs / "regmix_fit/fit.json").read_text())["regressors"]
    again, _ = regmix_compare_weights(opts, NAMES, str(tmp_path / "step2"), main_budget_tokens=None)
    assert again == w  # deterministic
    # a main-run budget that needs more than one epoch of the small domains: their caps bind, never exceeded
    man = json.loads((runs / "manifest.json").read_text())
    tokens = np.array([man["cap_tokens"][n] for n in NAMES])
    budget = 1.2 * tokens.sum() / 1.0 * 0.8
    capped, info = regmix_compare_weights(opts, NAMES, str(tmp_path / "capped"), main_budget_tokens=budget)
    assert all(capped[n] * budget <= t * (1 + 1e-9) for n, t in zip(NAMES, tokens))
    assert info["binding_caps"], info
    # no train_flops recorded: compute unknown, not invented
    (sorted(runs.glob("run_*"))[0] / "train_summary.json").write_text(json.dumps({"steps": 5}))
    assert regmix_compare_weights(opts, NAMES, str(tmp_path / "s3"), None)[1]["swarm_flops"] is None
    with pytest.raises(RegmixError, match="differ from the pipeline's"):
        regmix_compare_weights(opts, NAMES[::-1], str(tmp_path / "s4"), None)


@pytest.mark.parametrize(
    "spec, needle",
    [
        ({}, "runs: the RegMix swarm directory"),
        ({"runs": "r", "regressor": "trees"}, "regressor: expected one of"),
        ({"runs": "r", "optimizer": "exact"}, "exact needs a smooth regressor"),
        ({"runs": "r", "budget_tokens": -1}, "budget_tokens"),
        ({"runs": "r", "max_epochs": 0}, "max_epochs"),
        ({"runs": "r", "regresor": "linear"}, "unknown key(s) ['regresor']"),
    ],
)
def test_bad_regmix_entries_name_the_key(spec, needle):
    with pytest.raises(ValueError, match=None) as err:
        check_regmix_spec(spec, "compare.x")
    assert needle in str(err.value) and "compare.x" in str(err.value)


def test_pipeline_compare_entry_regmix_trains_a_column_on_the_searched_weights(tmp_path):
    from megatron_doremi.pipeline import PipelineError, run_pipeline
    from megatron_doremi.regmix.__main__ import main as regmix_main
    from tests.test_pipeline import NAMES as PNAMES
    from tests.test_pipeline import FakeTrainer, _pipeline

    cfg = _pipeline(tmp_path)
    runs = tmp_path / "swarm"
    assert regmix_main(["sample", "--mixture", cfg["base"]["data"]["mixture"], "--num-runs", "12", "--out",
                        str(runs), "--min-distance", "0"]) == 0  # fmt: skip
    for run in sorted(runs.glob("run_*")):  # a convex law: gamma helps most
        mix = json.loads((run / "mixture.json").read_text())
        w = np.array([mix["domains"][n]["weight"] for n in PNAMES])
        w = w / w.sum()
        loss = [2.0 + 0.3 / (w[0] + 0.1), 2.0 + 0.2 / (w[1] + 0.1), 2.0 + 0.9 / (w[2] + 0.1)]
        (run / "eval_summary.json").write_text(
            json.dumps({"domains": {n: {"loss": v} for n, v in zip(PNAMES, loss)}})
        )
        (run / "train_summary.json").write_text(json.dumps({"steps": 5, "train_flops": 1e6}))
    cfg["compare"] = {"rl": {"regmix": {"runs": str(runs), "regressor": "linear", "budget_tokens": None}}}
    fake = FakeTrainer()
    result = run_pipeline(cfg, runner=fake, echo=False)
    assert [c[0] for c in fake.calls][-1] == "compare/rl"
    step_cfg = json.loads((tmp_path / "out/compare/rl/pipeline_config.json").read_text())
    searched = json.loads((tmp_path / "out/compare/rl/regmix_search/domain_weights.json").read_text())
    assert step_cfg["mixer"]["weights"] == pytest.approx(searched["average"]["weights"], abs=1e-12)
    assert max(searched["average"]["weights"], key=searched["average"]["weights"].get) == "gamma"
    assert result["compare_weights"]["rl"] == pytest.approx(searched["average"]["weights"], abs=1e-12)
    report = json.loads((tmp_path / "out/report.json").read_text())
    assert "rl" in json.dumps(report["methods"])
    cfg["compare"] = {"rl": {"regmix": {"runs": str(tmp_path / "nope")}}}
    with pytest.raises(PipelineError, match="compare.rl.regmix"):
        run_pipeline(cfg, runner=FakeTrainer(), echo=False, dry_run=True)
