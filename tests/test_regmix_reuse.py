"""``regmix reuse``: unchanged domains keep their ratios exactly, changed ones are re-mixed by a smaller swarm."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from megatron_doremi.data.mixture import Mixture
from megatron_doremi.mixers.weights_io import write_domain_weights_json
from megatron_doremi.regmix.__main__ import main
from megatron_doremi.regmix.fingerprint import data_fingerprint
from megatron_doremi.regmix.loglinear import LogLinearModel
from megatron_doremi.regmix.optimize import minimize_on_simplex
from megatron_doremi.regmix.reuse import plan_reuse
from tests.conftest import write_shard

OLD = {"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.4}


def docs(n: int, k: int = 4) -> list[np.ndarray]:
    return [np.arange(n // k) % 97 for _ in range(k)]


def mixture_file(path: Path, prefixes: dict[str, str]) -> Path:
    path.write_text(json.dumps({"domains": {n: {"prefixes": [p], "weight": 1} for n, p in prefixes.items()}}))
    return path


@pytest.fixture
def setup(tmp_path):
    """Old data a..d with previous weights OLD (fingerprinted); new data: a, b as before, c revised, d removed,
    e added. Returns (tmp_path, old weights path, new mixture path)."""
    old = {n: write_shard(str(tmp_path / "old" / f"{n}_text_document"), docs(t)) for n, t in
           zip(OLD, (3000, 4000, 5000, 6000))}  # fmt: skip
    old_mix = Mixture.from_json(mixture_file(tmp_path / "old_mixture.json", old))
    prev = tmp_path / "previous/domain_weights.json"
    prev.parent.mkdir()
    write_domain_weights_json(
        prev, list(OLD), list(OLD.values()), list(OLD.values()), prefixes={n: [p] for n, p in old.items()},
        extra={"method": "regmix", "data_fingerprint": data_fingerprint(old_mix)},
    )  # fmt: skip
    new = {"a": old["a"], "b": old["b"]}
    new["c"] = write_shard(str(tmp_path / "new" / "c_text_document"), docs(5000) + [np.arange(300) % 97])
    new["e"] = write_shard(str(tmp_path / "new" / "e_text_document"), docs(2000))
    return tmp_path, prev, mixture_file(tmp_path / "new_mixture.json", new)


NEW = ["a", "b", "c", "e"]
# the true per-domain law over the real (new) domains: each domain's loss falls with its own weight
LAW = LogLinearModel(
    np.log([2.0, 2.5, 1.8, 3.0]),
    np.array([[-2.2, 0.1, -0.2, 0.0], [0.0, -1.8, 0.1, -0.3], [-0.1, 0.2, -2.5, 0.1], [0.1, -0.2, 0.0, -2.0]]),
    NEW, NEW, [],
)  # fmt: skip


def test_reuse_keeps_unchanged_ratios_and_remixes_the_rest(setup, capsys):
    tmp, prev, new = setup
    runs, out = tmp / "swarm", tmp / "reuse/domain_weights.json"
    cmd = ["reuse", "--previous", str(prev), "--mixture", str(new), "--runs", str(runs), "--out", str(out)]
    assert main(cmd) == 1  # d vanished without --removed
    assert "previous weights name domain(s) ['d']" in capsys.readouterr().err
    cmd += ["--removed", "d", "--planned-tokens", "2000"]
    assert main(cmd) == 0  # phase 1: plan and sample
    text = capsys.readouterr().out
    assert "revised    c (shard contents differ" in text and "added      e" in text and "removed    d" in text
    man = json.loads((runs / "manifest.json").read_text())
    assert man["domain_names"] == ["__reused__", "c", "e"] and len(man["runs"]) == 12  # 4 x 3 coordinates
    assert man["reuse"]["ratios"] == {"a": pytest.approx(1 / 3), "b": pytest.approx(2 / 3)}
    # the virtual domain's cap: min over members of tokens / ratio (a: 3000 / (1/3), b: 4000 / (2/3))
    assert man["cap_tokens"]["__reused__"] == pytest.approx(min(3000 * 3, 4000 * 1.5))
    for run in sorted(runs.glob("run_*")):
        mix = Mixture.from_json(run / "mixture.json")
        w = dict(zip(mix.names, mix.weights))
        assert w["b"] == pytest.approx(2 * w["a"], rel=1e-12, abs=1e-15)  # every proxy keeps a:b = 1:2
        real = np.array([w[n] for n in NEW])
        loss = LAW.predict_targets(real)[0]
        (run / "eval_summary.json").write_text(json.dumps({"domains": dict(zip(NEW, map(float, loss)))}))
    assert main(cmd) == 0  # phase 2: fit, search, expand
    doc = json.loads(out.read_text())
    w = doc["average"]["weights"]
    assert doc["method"] == "regmix-reuse" and doc["domain_names"] == NEW
    assert w["b"] == pytest.approx(2 * w["a"], rel=1e-12)  # the unchanged ratio, exactly
    assert (
        list(Mixture.from_dict(doc["average"]["mixture"]).names) == NEW
    )  # a mixture JSON over the new domains
    # the changed domains land where the true law wants them within the reuse subspace
    coords = doc["reuse"]["coordinates"]
    r = np.array([doc["reuse"]["ratios"]["a"], doc["reuse"]["ratios"]["b"]])

    def expand(v: np.ndarray) -> np.ndarray:
        return np.array([v[0] * r[0], v[0] * r[1], v[1], v[2]])

    def f(v: np.ndarray) -> float:
        return float(LAW.predict(expand(v)[None])[0])

    def g(v: np.ndarray) -> np.ndarray:
        gw = LAW.gradient(expand(v))
        return np.array([gw[0] * r[0] + gw[1] * r[1], gw[2], gw[3]])

    best = minimize_on_simplex(f, g, np.ones(3), starts=4)["weights"]
    got = np.array([doc["virtual_weights"][c] for c in coords])
    assert np.abs(got - best).sum() < 0.05, (got, best)
    assert doc["favoured_regressor"] == "loglinear" and doc["compute"]["proxy_runs"] == 12
    assert doc["data_fingerprint"]["e"]["tokens"] == 2000  # the next reuse can detect changes against this
    # the swarm is tied to its plan: another plan refuses it
    assert main([*cmd, "--changed", "a"]) == 1
    assert "sampled for a different reuse" in capsys.readouterr().err


def test_reuse_bad_inputs_and_removal_only(setup, capsys):
    tmp, prev, new = setup
    base = ["reuse", "--previous", str(prev), "--runs", str(tmp / "swarm")]
    assert main([*base, "--mixture", str(new), "--removed", "d", "--changed", "zz"]) == 1
    assert "--changed zz: not domains of the new mixture" in capsys.readouterr().err
    assert main([*base, "--mixture", str(new), "--removed", "d,a"]) == 1
    assert "--removed a: not a domain of" in capsys.readouterr().err
    (tmp / "w.json").write_text(json.dumps({"a": 1}))
    assert (
        main(["reuse", "--previous", str(tmp / "w.json"), "--mixture", str(new), "--runs", str(tmp / "s")])
        == 1
    )
    assert "not a domain_weights.json" in capsys.readouterr().err
    # only a removal: no swarm, the previous ratios renormalised exactly
    old_only = json.loads(Path(new).read_text())
    old_c = json.loads(prev.read_text())["average"]["mixture"]["domains"]["c"]["prefixes"]
    old_only["domains"] = {n: old_only["domains"][n] for n in ("a", "b")} | {
        "c": {"prefixes": old_c, "weight": 1}
    }
    mix = tmp / "removal.json"
    mix.write_text(json.dumps(old_only))
    out = tmp / "removal/domain_weights.json"
    assert main([*base, "--mixture", str(mix), "--removed", "d", "--out", str(out)]) == 0
    w = json.loads(out.read_text())["average"]["weights"]
    assert w == pytest.approx({"a": 1 / 6, "b": 2 / 6, "c": 3 / 6}, rel=1e-12)
    assert not (tmp / "swarm").exists()
    # weights that record nothing to detect changes with: --changed is required ('none': only added domains)
    bare = tmp / "bare.json"
    write_domain_weights_json(bare, list(OLD), list(OLD.values()), list(OLD.values()))
    plan_args = (str(bare), Mixture.from_json(new))
    with pytest.raises(ValueError, match="records no data fingerprint, shard prefixes or token counts"):
        plan_reuse(*plan_args, removed="d")
    plan = plan_reuse(*plan_args, changed="none", removed="d")
    assert plan.unchanged == ["a", "b", "c"] and plan.added == ["e"] and plan.revised == []
    plan = plan_reuse(*plan_args, changed="c", removed="d")
    assert plan.revised == ["c"] and plan.reasons == {"c": "listed with --changed"}
    # shard prefixes alone (no hashes recorded): c's new prefix counts as revised
    doc = json.loads(prev.read_text())
    del doc["data_fingerprint"]
    prefixes_only = tmp / "prefixes_only.json"
    prefixes_only.write_text(json.dumps(doc))
    plan = plan_reuse(str(prefixes_only), Mixture.from_json(new), removed="d")
    assert plan.revised == ["c"] and plan.reasons["c"] == "shard prefixes differ"


def test_reuse_detects_changes_from_a_previous_manifest(setup):
    tmp, prev, new = setup
    doc = json.loads(prev.read_text())
    fingerprint = doc.pop("data_fingerprint")
    del doc["average"]["mixture"], doc["average"]["data_path"]
    bare = tmp / "bare_weights.json"
    bare.write_text(json.dumps(doc))
    man = tmp / "manifest.json"
    man.write_text(json.dumps({"fingerprint": fingerprint}))
    plan = plan_reuse(str(bare), Mixture.from_json(new), removed="d", previous_manifest=str(man))
    assert plan.revised == ["c"] and plan.unchanged == ["a", "b"] and "manifest.json" in plan.detection
    # an older manifest: token counts and prefixes only; c's token count changed (5000 -> 5300)
    tokens = {n: fp["tokens"] for n, fp in fingerprint.items()}
    prefixes = {n: [s["prefix"] for s in fp["shards"]] for n, fp in fingerprint.items()}
    man.write_text(json.dumps({"tokens": tokens, "prefixes": prefixes}))
    plan = plan_reuse(str(bare), Mixture.from_json(new), removed="d", previous_manifest=str(man))
    assert plan.revised == ["c"] and plan.reasons["c"] == "token count 5000 -> 5300"
    # the same shard content at another path is no change
    moved = tmp / "moved"
    moved.mkdir()
    for ext in (".bin", ".idx"):
        (moved / f"a_text_document{ext}").write_bytes(Path(prefixes["a"][0] + ext).read_bytes())
    spec = json.loads(Path(new).read_text())
    spec["domains"]["a"]["prefixes"] = [str(moved / "a_text_document")]
    moved_mix = mixture_file(tmp / "moved.json", {n: d["prefixes"][0] for n, d in spec["domains"].items()})
    plan = plan_reuse(str(prev), Mixture.from_json(moved_mix), removed="d")
    assert plan.unchanged == ["a", "b"]
