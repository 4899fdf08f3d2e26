"""The pipeline's ``compare`` entries (RegMix / heuristic / online-mixer main models beside DoReMi and the
baseline) and the report's method columns, with the fake trainer of test_pipeline.py (no training). The real
runs are in tests/test_quickstart.py (``--compare``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from megatron_doremi.mixers.heuristics import temperature_weights
from megatron_doremi.mixers.weights_io import write_domain_weights_json
from megatron_doremi.pipeline import PipelineError, main, read_weights_file, run_pipeline
from megatron_doremi.report import TIE_TOLERANCE, compare_methods, methods_table
from tests.conftest import write_shard
from tests.test_pipeline import LOSSES, NAMES, FakeTrainer, _cfg, _pipeline

DOCS = {"alpha": 10, "beta": 30, "gamma": 60}  # documents of 200 tokens: unequal domains for the heuristics
TRAIN_SHARE = 0.8  # _pipeline's split "80,10,10"
COMPARE_LOSSES = {"regmix": [1.5, 3.2, 1.1], "temp": [2.6, 2.9, 1.3], "odm": [2.4, 3.1, 1.2]}


def _sized_pipeline(tmp_path: Path, **extra) -> dict:
    rng = np.random.default_rng(1)
    domains = {}
    for name, docs in DOCS.items():
        prefix = write_shard(str(tmp_path / "sized" / f"{name}_text_document"),
                             [rng.integers(0, 64, 200) for _ in range(docs)])  # fmt: skip
        domains[name] = {"prefixes": [prefix], "weight": 1.0}
    path = tmp_path / "sized.json"
    path.write_text(json.dumps({"domains": domains}))
    cfg = _pipeline(tmp_path, **extra)
    cfg["base"]["data"]["mixture"] = str(path)
    return cfg


def _regmix_file(tmp_path: Path, weights=(0.7, 0.3, 0.0), names=NAMES) -> str:
    path = tmp_path / "regmix" / "domain_weights.json"
    path.parent.mkdir(exist_ok=True)
    write_domain_weights_json(path, names, weights, weights, extra={"method": "regmix"})
    return str(path)


def test_compare_entries_train_main_models_on_their_weights_and_become_report_columns(tmp_path):
    regmix = _regmix_file(tmp_path)
    compare = {
        "regmix": regmix,
        "manual": {"weights": {"alpha": 2, "beta": 1, "gamma": 1}},
        "temp": {"heuristic": "temperature", "temperature": 2},
        "unimax": {"heuristic": "unimax", "max_epochs": 1, "budget_tokens": 12000},
        "prop": {"heuristic": "proportional"},
        "odm": {"mixer": {"type": "odm", "alpha": 0.5}},
    }
    fake = FakeTrainer(losses=COMPARE_LOSSES)
    result = run_pipeline(_sized_pipeline(tmp_path, compare=compare), runner=fake, echo=False)
    out = tmp_path / "out"
    labels = list(compare)
    assert [c[0] for c in fake.calls] == ["reference", "proxy", "main", "baseline"] + [
        f"compare/{x}" for x in labels
    ]
    main_cfg = _cfg(out, "main")
    tokens = np.array([DOCS[n] * 200 for n in NAMES]) * TRAIN_SHARE
    expect = {
        "regmix": [0.7, 0.3, 0.0],  # a RegMix file may zero a domain
        "manual": [0.5, 0.25, 0.25],
        "temp": temperature_weights(tokens, 2.0).tolist(),
        "unimax": [
            1600 / 12000,
            4800 / 12000,
            5600 / 12000,
        ],  # alpha capped at 1 epoch, then beta, gamma gets the rest
        "prop": (tokens / tokens.sum()).tolist(),
    }
    for label, weights in expect.items():
        cfg = _cfg(out, f"compare/{label}")
        assert cfg["mixer"]["type"] == "static"
        assert [cfg["mixer"]["weights"][n] for n in NAMES] == pytest.approx(weights, abs=1e-12), label
        # the same main-model config as DoReMi's main run apart from mixer, output and checkpoint paths
        for key in ("model", "schedule", "eval", "data", "seed"):
            assert cfg.get(key) == main_cfg.get(key), (label, key)
        ckpt = str(out / "compare" / label / "checkpoints")
        assert cfg["checkpoint"] == {
            "save": ckpt,
            "load": ckpt,
            "export_hf": str(out / "compare" / label / "hf"),
        }
    assert _cfg(out, "compare/odm")["mixer"] == {"type": "odm", "alpha": 0.5}
    assert result["compare_weights"]["odm"] == pytest.approx({"alpha": 0.5, "beta": 0.25, "gamma": 0.25})

    doc = json.loads(Path(result["report_json"]).read_text())
    mc = doc["method_comparison"]
    assert mc["methods"] == ["baseline", "DoReMi", *labels]
    assert (
        mc["domains"]["alpha"]["regmix"] == 1.5 and mc["domains"]["beta"]["baseline"] == LOSSES["baseline"][1]
    )
    assert mc["best"] == {"alpha": "regmix", "beta": "temp", "gamma": "DoReMi"}
    assert mc["uniform"]["regmix"] == pytest.approx(sum(COMPARE_LOSSES["regmix"]) / 3)
    assert mc["vs_baseline"]["temp"]["improved"] == []  # one seed: no verdict
    assert mc["vs_baseline"]["temp"]["verdicts"]["beta"] == "not tested"
    assert mc["vs_baseline"]["regmix"]["uniform"] == pytest.approx((1.5 + 3.2 + 1.1 - 2.5 - 3.0 - 1.25) / 3)
    # manual, unimax and prop have the fake default losses (all 4.0): ties keep the column order
    assert mc["ranking"] == ["regmix", "DoReMi", "odm", "baseline", "temp", "manual", "unimax", "prop"]
    assert (
        doc["methods"]["odm"]["online"] is True and doc["methods"]["regmix"]["source"] == f"weights {regmix}"
    )
    assert doc["methods"]["unimax"]["source"] == "heuristic unimax (max_epochs=1, budget_tokens=12000)"
    assert doc["comparison"]["improved"] == [] and doc["verdict_summary"]["temp"]["not tested"] == 3

    report = Path(result["report_md"]).read_text()
    assert (
        "## Comparison of mixing methods" in report and "![validation loss by method](methods.png)" in report
    )
    assert "| alpha | 2.5000 | 2.0000 | **1.5000** | 4.0000 | 2.6000 | 4.0000 | 4.0000 | 2.4000 |" in report
    assert (out / "methods.png").stat().st_size > 1000 and (out / "weights.png").exists()
    head = result["headline"]
    assert "DoReMi improves" not in head and "temp: 1 replicate, so no significance can be claimed" in head
    row = next(line for line in head.splitlines() if line.startswith("beta ") and "*" in line)
    assert row.split()[1:] == [
        "3.0000",
        "3.5000",
        "3.2000",
        "4.0000",
        "2.9000*",
        "4.0000",
        "4.0000",
        "3.1000",
    ]
    assert "ranking by uniform average (best first): regmix," in head


def test_compare_steps_skip_when_finished_and_clash_when_their_weights_change(tmp_path, capsys):
    regmix = _regmix_file(tmp_path)
    cfg = _sized_pipeline(tmp_path, compare={"regmix": regmix, "odm": {"mixer": {"type": "odm"}}})
    with pytest.raises(PipelineError, match="step compare/odm failed"):
        run_pipeline(cfg, runner=FakeTrainer(fail={"compare/odm"}), echo=False)
    again = FakeTrainer(losses=COMPARE_LOSSES)
    run_pipeline(cfg, runner=again, echo=False)
    assert [c[0] for c in again.calls] == ["compare/odm"]
    assert "compare/odm: resuming" in capsys.readouterr().out
    _regmix_file(tmp_path, weights=(0.1, 0.2, 0.7))  # a new RegMix search result, same path
    fake = FakeTrainer()
    with pytest.raises(PipelineError, match=r"out/compare/regmix holds a compare/regmix run of a different config "
                                            r"\(mixer.weights.alpha: 0.7 -> 0.1"):  # fmt: skip
        run_pipeline(cfg, runner=fake, echo=False)
    assert fake.calls == []


def test_compare_launcher_defaults_to_main_and_can_be_set(tmp_path):
    cfg = _sized_pipeline(tmp_path, compare={"prop": {"heuristic": "proportional"}},
                          launcher={"main": "deepspeed --num_gpus 8"})  # fmt: skip
    fake = FakeTrainer()
    run_pipeline(cfg, runner=fake, echo=False)
    assert dict(fake.calls)["compare/prop"][:3] == ["deepspeed", "--num_gpus", "8"]
    cfg["launcher"] = {"default": "python", "compare": "torchrun --nproc_per_node 4"}
    cfg["output_dir"] = str(tmp_path / "out2")
    fake = FakeTrainer()
    run_pipeline(cfg, runner=fake, echo=False)
    assert dict(fake.calls)["compare/prop"][:2] == ["torchrun", "--nproc_per_node"]


@pytest.mark.parametrize(
    "compare, needle",
    [
        ({"doremi": {"heuristic": "proportional"}}, "compare.doremi: a label is"),
        ({"a b": {"heuristic": "proportional"}}, "compare.a b: a label is"),
        (
            {"x": {"weights": "uniform", "heuristic": "unimax"}},
            "give exactly one of weights, heuristic, mixer",
        ),
        ({"x": {}}, "give exactly one of weights, heuristic, mixer"),
        ({"x": 3}, "expected a weights file path or an object"),
        ({"x": {"heuristic": "zipf"}}, "compare.x.heuristic: unknown method 'zipf'; known: proportional"),
        (
            {"x": {"heuristic": "temperature", "max_epochs": 2}},
            "unknown key(s) ['max_epochs'] for a heuristic",
        ),
        (
            {"x": {"heuristic": "temperature", "temperature": -1}},
            "compare.x.temperature: must be a finite number",
        ),
        ({"x": {"mixer": {"type": "doremi"}}}, "DoReMi needs step 1's reference model"),
        ({"x": {"mixer": {"type": "odm", "alhpa": 1}}}, "compare/x: mixer: unknown key(s) ['alhpa']"),
        ({"x": {"mixer": "odm"}}, 'compare.x.mixer: expected a mixer object such as {"type": "odm"}'),
        ({"x": {"weights": [1, 2]}}, "compare.x.weights: expected 3 weights"),
        (
            {"x": {"weights": {"alpha": 1, "beta": 1, "gamma": -1}}},
            "every weight must be a finite number >= 0",
        ),
        ({"x": {"weights": [0, 0, 0]}}, "every weight must be a finite number >= 0 (not all 0)"),
        ({"x": "missing/domain_weights.json"}, "missing/domain_weights.json: cannot read"),
        ({"x": {"heuristic": "unimax", "budget_tokens": 1e9}}, "compare.x: budget_tokens 1e+09 exceeds"),
        ([1, 2], "compare: expected an object"),
    ],
)
def test_compare_config_errors_name_the_entry(tmp_path, compare, needle):
    fake = FakeTrainer()
    with pytest.raises(PipelineError) as info:
        run_pipeline(_sized_pipeline(tmp_path, compare=compare), runner=fake, echo=False)
    assert needle in str(info.value)
    assert fake.calls == []


def test_compare_needs_the_baseline_and_the_same_domains(tmp_path):
    with pytest.raises(PipelineError, match="measured against the baseline: set baseline to true"):
        run_pipeline(_sized_pipeline(tmp_path, baseline=False, compare={"p": {"heuristic": "proportional"}}),
                     runner=FakeTrainer(), echo=False)  # fmt: skip
    other = _regmix_file(tmp_path, names=["alpha", "beta", "delta"])
    with pytest.raises(PipelineError, match=r"compare.regmix.weights \(.*\): must name every domain; "
                                            r"missing \['gamma'\], unknown \['delta'\]"):  # fmt: skip
        run_pipeline(_sized_pipeline(tmp_path, compare={"regmix": other}), runner=FakeTrainer(), echo=False)


def test_weights_files_in_every_format(tmp_path):
    assert read_weights_file(_regmix_file(tmp_path)) == {"alpha": 0.7, "beta": 0.3, "gamma": 0.0}
    mixture = tmp_path / "m.json"
    mixture.write_text(json.dumps({"domains": {n: {"prefixes": [f"{n}_doc"], "weight": w}
                                               for n, w in zip(NAMES, (1, 1, 2))}}))  # fmt: skip
    assert read_weights_file(str(mixture)) == {"alpha": 0.25, "beta": 0.25, "gamma": 0.5}
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"alpha": 1, "beta": 2, "gamma": 3}))
    assert read_weights_file(str(plain)) == {"alpha": 1, "beta": 2, "gamma": 3}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"steps": [1, 2]}))
    with pytest.raises(PipelineError, match=r"bad.json: not a weights file"):
        read_weights_file(str(bad))


def test_dry_run_lists_the_compare_steps(tmp_path, capsys):
    path = tmp_path / "pipe.json"
    path.write_text(json.dumps(_sized_pipeline(tmp_path, compare={"u": {"heuristic": "unimax"}})))
    assert main(["--config", str(path), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "[5/5] compare/u: to run" in text and "heuristic unimax" in text
    assert not (tmp_path / "out").exists()


# ---- report -------------------------------------------------------------------------------------------------------


def test_compare_methods_numbers_and_ties():
    def ev(a, b, ta=300, tb=100):
        return {"domains": {"a": {"loss": a, "tokens": ta}, "b": {"loss": b, "tokens": tb}}}

    evals = {"baseline": ev(2.0, 3.0), "DoReMi": ev(1.0, 4.0), "same": ev(2.0 - TIE_TOLERANCE / 2, 3.0)}
    c = compare_methods(["a", "b"], evals)
    assert c["token_weighted"]["DoReMi"] == pytest.approx((300 * 1.0 + 100 * 4.0) / 400)
    assert c["uniform"] == pytest.approx({"baseline": 2.5, "DoReMi": 2.5, "same": 2.5}, abs=1e-6)
    assert c["worst"]["DoReMi"] == {"loss": 4.0, "domain": "b"}
    assert c["vs_baseline"]["DoReMi"]["improved"] == ["a"]
    assert c["vs_baseline"]["same"]["improved"] == []  # within the tie tolerance: not an improvement
    assert c["vs_baseline"]["DoReMi"]["worst"] == pytest.approx(1.0)
    assert c["best"] == {"a": "DoReMi", "b": "baseline"}
    table = methods_table(["a", "b"], {"baseline": {"a": 0.5, "b": 0.5}, "DoReMi": None, "same": None}, c)
    lines = table.splitlines()
    assert lines[2].split() == ["a", "0.5000", "-", "-"]
    b_row = next(line for line in lines if line.startswith("b ") and "*" in line)
    assert b_row.split()[1:] == ["3.0000*", "4.0000", "3.0000*"]  # ties are all marked best
    assert "Δ uniform vs baseline" in table and "+0.0000" in table and "-0.0000" not in table
    with pytest.raises(ValueError, match="no 'baseline'"):
        compare_methods(["a", "b"], {"DoReMi": ev(1, 1)})
    assert math.isclose(c["token_weighted"]["baseline"], 2.25)


def test_compare_entries_with_replicates(tmp_path, capsys):
    cfg = _sized_pipeline(tmp_path, compare={"regmix": _regmix_file(tmp_path)}, replicates=2)
    fake = FakeTrainer(losses=COMPARE_LOSSES)
    result = run_pipeline(cfg, runner=fake, echo=False)
    assert [c[0] for c in fake.calls][-3:] == [
        "seed1235/main",
        "seed1235/baseline",
        "seed1235/compare/regmix",
    ]
    out = tmp_path / "out"
    assert _cfg(out, "seed1235/compare/regmix")["seed"] == 1235
    assert _cfg(out, "seed1235/compare/regmix")["mixer"] == _cfg(out, "compare/regmix")["mixer"]
    doc = json.loads(Path(result["report_json"]).read_text())
    assert doc["seeds"]["regmix"]["replicates"] == 2
    assert doc["seeds"]["regmix"]["domains"]["alpha"]["verdict"] == "better"  # 1.5 vs 2.5 on both seeds
    assert doc["costs"]["search_fraction"]["regmix"] is None  # no train_flops recorded by the fake runs
    run_pipeline(cfg, runner=FakeTrainer(), echo=False, dry_run=True)
    assert "seed1235/compare/regmix: finished" in capsys.readouterr().out
