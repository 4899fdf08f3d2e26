"""The README's main command on the shipped sample (smaller blend so it stays quick)."""

import json
import re
import subprocess
import sys

import numpy as np

from megatron_doremi.data.mixture import Mixture


def test_quickstart_prints_counts_and_realised_proportions(tmp_path):
    out = tmp_path / "qs"
    cmd = [sys.executable, "-m", "megatron_doremi.quickstart", "--out", str(out), "--vocab-size", "2048"]
    cmd += ["--steps", "50", "--workers", "1", "--train-iters", "4", "--quiet"]
    cmd += ["--compare", "unimax:1,odm,regmix", "--regmix-runs", "5", "--regmix-iters", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    mixture = Mixture.from_json(out / "mixture.json")
    assert mixture.names == ("code", "docs", "lexicon", "scripture")
    assert (out / "data_path.txt").read_text().split()[1].endswith("code_text_document")
    for name, weight in zip(mixture.names, mixture.weights):
        row = re.search(rf"^{name}\s+(\d\.\d+)\s+(\d\.\d+)\s+([\d,]+)", text, re.MULTILINE)
        assert row, f"no blend row for {name} in:\n{text}"
        assert abs(float(row.group(1)) - weight) < 1e-4
        assert abs(float(row.group(2)) - weight) < 2e-3  # realised share of 3,200 samples
        docs_row = re.search(rf"^{name}\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)", text, re.MULTILINE)
        assert int(docs_row.group(1).replace(",", "")) > 50  # documents
    # weights are the token shares of the shards
    tokens = np.array(
        [
            int(re.search(rf"^{n}\s+[\d,]+\s+([\d,]+)", text, re.MULTILINE).group(1).replace(",", ""))
            for n in mixture.names
        ]
    )
    np.testing.assert_allclose(mixture.weights, tokens / tokens.sum(), rtol=1e-9)
    json.loads((out / "tokenizer" / "tokenizer.json").read_text())
    # the DoReMi pipeline ran (reference, proxy, main, baseline) and printed the report's headline table
    doremi = out / "doremi"
    weights = json.loads((doremi / "proxy" / "domain_weights.json").read_text())
    avg = Mixture.from_dict(weights["average"]["mixture"])
    assert avg.names == mixture.names and abs(avg.weights.sum() - 1) < 1e-9
    assert (doremi / "report.md").exists()
    # 2 seeds; the seed-1234 baseline is the reference run (same config), so it is not trained again
    assert not (doremi / "baseline").exists()
    for run in ("reference", "proxy", "main", "seed1235/main", "seed1235/baseline"):
        summary = json.loads((doremi / run / "eval_summary.json").read_text())
        assert set(summary["domains"]) == set(mixture.names)
    main_evals = [
        json.loads((doremi / d / "eval_summary.json").read_text()) for d in ("main", "seed1235/main")
    ]
    for name, w in zip(mixture.names, avg.weights):
        row = re.search(rf"^{name}\s+0\.2500\s+(\d\.\d+)\s+(\d+\.\d+)\s+(\d+\.\d+)", text, re.MULTILINE)
        assert row, f"no headline row for {name}:\n{text[-2500:]}"
        assert abs(float(row.group(1)) - w) < 1e-4
        mean = sum(e["domains"][name]["loss"] for e in main_evals) / 2
        assert abs(float(row.group(3)) - mean) < 1e-3
    # --compare: RegMix ran on the sample, then one more main model per method, as columns of the report
    regmix = json.loads((out / "regmix" / "domain_weights.json").read_text())
    assert len(list((out / "regmix").glob("run_*/eval_summary.json"))) == 5
    odm = json.loads(
        (doremi / "compare" / "odm" / "domain_weights.json").read_text()
    )  # written by the trainer
    assert odm["mixer"] == "odm" and abs(sum(odm["average"]["weights"].values()) - 1) < 1e-9
    report = json.loads((doremi / "report.json").read_text())
    methods = report["method_comparison"]["methods"]
    assert methods == ["baseline", "DoReMi", "unimax", "odm", "regmix"]
    assert report["methods"]["regmix"]["weights"] == regmix["average"]["weights"]
    for label in ("unimax", "odm", "regmix"):
        runs = [doremi / "compare" / label, doremi / "seed1235" / "compare" / label]
        summaries = [json.loads((r / "eval_summary.json").read_text()) for r in runs]
        for name in mixture.names:
            mean = sum(x["domains"][name]["loss"] for x in summaries) / 2
            assert abs(report["method_comparison"]["domains"][name][label] - mean) < 1e-12
            assert report["seeds"][label]["domains"][name]["verdict"] in (
                "better", "worse", "no significant difference")  # fmt: skip
    assert "mean ± 95% CI over 2 seed(s)" in text and set(report["verdict_summary"]) == {
        "DoReMi",
        *methods[2:],
    }
    header = re.search(r"^validation loss\s+(.*)$", text, re.MULTILINE)
    assert header and header.group(1).split() == methods, text[-3000:]
    assert "ranking by uniform average (best first):" in text
    # a second run reuses every output
    again = subprocess.run([*cmd, "--no-train"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "shard exists" in again.stdout and "tokenizer exists" in again.stdout
