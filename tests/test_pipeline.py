"""The DoReMi pipeline's bookkeeping with a fake trainer (no training): order, weights handed between steps,
skip/resume, clashes, config errors, launchers, and the report's content. The real end-to-end run is in
tests/test_doremi_train.py."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_doremi.mixers.weights_io import write_domain_weights_json
from megatron_doremi.pipeline import PipelineError, StepFailed, build_command, main, run_pipeline
from megatron_doremi.report import compare_evals, write_report
from tests.conftest import write_shard

REPO = Path(__file__).resolve().parent.parent
NAMES = ["alpha", "beta", "gamma"]
TINY = {"model_type": "llama", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 2}  # fmt: skip
# what the fake proxy "learns" in round r: ᾱ = normalised (r, 2r, 3) (deterministic, differs by round)
LEARNED = {r: np.array([r, 2.0 * r, 3.0]) / (3.0 * r + 3.0) for r in (1, 2, 3)}
# fake per-domain validation losses: the DoReMi main model is better on alpha and gamma
LOSSES = {"main": [2.0, 3.5, 1.0], "baseline": [2.5, 3.0, 1.25]}


def _mixture(tmp_path: Path, names=NAMES, file="mixture.json") -> Path:
    rng = np.random.default_rng(0)
    domains = {}
    for n in names:
        prefix = tmp_path / "data" / f"{n}_text_document"
        if not prefix.with_suffix(".bin").exists():
            prefix.parent.mkdir(exist_ok=True)
            write_shard(str(prefix), [rng.integers(0, 64, 200) for _ in range(10)])
        domains[n] = {"prefixes": [str(prefix)], "weight": 1.0 + len(n)}
    path = tmp_path / file
    path.write_text(json.dumps({"domains": domains}))
    return path


def _pipeline(tmp_path: Path, **extra) -> dict:
    cfg = {
        "output_dir": str(tmp_path / "out"),
        "base": {
            "model": TINY,
            "data": {"mixture": str(_mixture(tmp_path)), "split": "80,10,10"},
            "schedule": {
                "seq_length": 16,
                "micro_batch_size": 2,
                "global_batch_size": 4,
                "train_iters": 5,
                "lr": 1e-3,
            },  # fmt: skip
            "eval": {"eval_iters": 1},
            "deepspeed_config": str(REPO / "examples" / "ds_configs" / "zero3.json"),
        },
        "proxy": {"mixer": {"step_size": 0.5}},
        "main": {"schedule": {"train_iters": 7}},
    }
    cfg.update(extra)
    return cfg


class FakeTrainer:
    """A runner that 'trains' by writing the outputs a finished run leaves; records every call."""

    def __init__(
        self, fail: set[str] = frozenset(), no_summary: set[str] = frozenset(), losses: dict | None = None
    ) -> None:
        self.calls: list[tuple[str, list[str]]] = []
        self.fail, self.no_summary = set(fail), set(no_summary)
        self.losses = {**LOSSES, **(losses or {})}  # run kind or compare label -> per-domain losses

    def __call__(self, name: str, cmd: list[str], log_path: str, env: dict) -> int:
        self.calls.append((name, cmd))
        cfg = json.loads(Path(cmd[cmd.index("--config") + 1]).read_text())
        out = Path(cfg["output_dir"])
        with open(log_path, "a") as fh:
            fh.write(f"fake training of {name}\n")
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        (out / "checkpoints" / "latest").write_text("global_step1")
        if name in self.fail:  # crashed after its first checkpoint
            with open(log_path, "a") as fh:
                fh.write("Traceback: boom\n")
            return 1
        kind = name.split("/")[-1]
        if kind == "proxy":
            r = int(name.split("/")[0].removeprefix("round")) if name.startswith("round") else 1
            write_domain_weights_json(out / "domain_weights.json", NAMES, LEARNED[r], LEARNED[r][::-1])
        elif cfg["mixer"]["type"] not in ("static", "doremi"):  # an online mixer: its average weights
            write_domain_weights_json(out / "domain_weights.json", NAMES, [0.5, 0.25, 0.25], [0.6, 0.2, 0.2])
        losses = self.losses.get(kind, [4.0, 4.0, 4.0])
        summary = {
            "step": cfg["schedule"]["train_iters"],
            "domains": {n: {"loss": v, "tokens": 100} for n, v in zip(NAMES, losses)},
        }
        (out / "eval_summary.json").write_text(json.dumps(summary))
        if name in self.no_summary:  # killed mid-run: a checkpoint, no summary
            return -9
        (out / "train_summary.json").write_text(json.dumps({"steps": cfg["schedule"]["train_iters"]}))
        return 0


def _cfg(out: Path, step: str) -> dict:
    return json.loads((out / step / "pipeline_config.json").read_text())


def test_runs_the_steps_in_order_and_hands_the_weights_on(tmp_path):
    fake = FakeTrainer()
    result = run_pipeline(_pipeline(tmp_path), runner=fake, echo=False)
    out = tmp_path / "out"
    assert [c[0] for c in fake.calls] == ["reference", "proxy", "main", "baseline"]
    assert fake.calls[0][1] == [sys.executable, "-m", "megatron_doremi.train", "--config",
                                str(out / "reference" / "pipeline_config.json")]  # fmt: skip
    uniform = {n: 1 / 3 for n in NAMES}
    learned = dict(zip(NAMES, LEARNED[1].tolist()))
    ref, proxy, main_cfg, base = (_cfg(out, s) for s in ("reference", "proxy", "main", "baseline"))
    assert ref["mixer"] == {"type": "static", "weights": uniform}
    assert proxy["mixer"] == {"type": "doremi", "reference_weights": uniform, "step_size": 0.5,
                              "reference": {"checkpoint": str(out / "reference" / "checkpoints")}}  # fmt: skip
    assert (
        main_cfg["mixer"] == {"type": "static", "weights": learned}
        and main_cfg["schedule"]["train_iters"] == 7
    )
    assert base["mixer"]["weights"] == uniform and base["schedule"] == main_cfg["schedule"]
    ckpt = str(out / "main" / "checkpoints")
    assert main_cfg["checkpoint"] == {"save": ckpt, "load": ckpt, "export_hf": str(out / "main" / "hf")}
    assert ref["output_dir"] == str(out / "reference") and "export_hf" not in ref["checkpoint"]
    assert result["doremi_weights"] == learned and result["reference_weights"] == uniform
    assert result["ran"] == ["reference", "proxy", "main", "baseline"] and result["skipped"] == []
    assert Path(result["report_md"]).exists() and "alpha" in result["headline"]


def test_skips_finished_steps_and_resumes_unfinished_ones(tmp_path, capsys):
    cfg = _pipeline(tmp_path)
    with pytest.raises(StepFailed, match="step main failed"):  # main killed (SIGKILL) with a checkpoint
        run_pipeline(cfg, runner=FakeTrainer(no_summary={"main"}), echo=False)
    again = FakeTrainer()
    result = run_pipeline(cfg, runner=again, echo=False)
    assert [c[0] for c in again.calls] == ["main", "baseline"]  # reference and proxy were finished
    assert result["skipped"] == ["reference", "proxy"] and result["ran"] == ["main", "baseline"]
    out = capsys.readouterr().out
    assert "[1/4] reference: finished earlier, skipped" in out and "[3/4] main: resuming" in out
    third = FakeTrainer()
    assert run_pipeline(cfg, runner=third, echo=False)["ran"] == [] and third.calls == []


def test_a_step_that_exits_0_without_its_outputs_is_an_error(tmp_path):
    def lazy(name, cmd, log_path, env):
        return 0

    with pytest.raises(StepFailed, match=r"step reference exited 0 but its outputs are incomplete"):
        run_pipeline(_pipeline(tmp_path), runner=lazy, echo=False)


def test_failed_step_stops_the_pipeline_and_a_rerun_continues(tmp_path, capsys):
    cfg = _pipeline(tmp_path)
    with pytest.raises(StepFailed, match=r"(?s)step proxy failed \(exit status 1\).*Traceback: boom"):
        run_pipeline(cfg, runner=FakeTrainer(fail={"proxy"}), echo=False)
    assert not (tmp_path / "out" / "main").exists()
    rerun = FakeTrainer()
    run_pipeline(cfg, runner=rerun, echo=False)
    assert [c[0] for c in rerun.calls] == ["proxy", "main", "baseline"]
    assert "proxy: resuming" in capsys.readouterr().out


def test_a_finished_step_with_another_config_is_an_error(tmp_path):
    cfg = _pipeline(tmp_path)
    run_pipeline(cfg, runner=FakeTrainer(), echo=False)
    cfg["base"]["schedule"]["lr"] = 2e-3
    fake = FakeTrainer()
    with pytest.raises(PipelineError, match=r"out/reference holds a reference run of a different config "
                                            r"\(schedule.lr: 0.001 -> 0.002\); delete"):  # fmt: skip
        run_pipeline(cfg, runner=fake, echo=False)
    assert fake.calls == []


def test_iterated_doremi_rounds(tmp_path):
    fake = FakeTrainer()
    result = run_pipeline(_pipeline(tmp_path, rounds=3, baseline=False), runner=fake, echo=False)
    out = tmp_path / "out"
    order = [
        "reference",
        "proxy",
        "round2/reference",
        "round2/proxy",
        "round3/reference",
        "round3/proxy",
        "main",
    ]
    assert [c[0] for c in fake.calls] == order
    a1, a2, a3 = (dict(zip(NAMES, LEARNED[r].tolist())) for r in (1, 2, 3))
    assert (
        _cfg(out, "round2/reference")["mixer"]["weights"] == a1
    )  # round r+1's reference trains on round r's ᾱ
    assert _cfg(out, "round2/proxy")["mixer"]["reference_weights"] == a1
    assert _cfg(out, "round3/proxy")["mixer"]["reference_weights"] == a2
    assert _cfg(out, "round3/proxy")["mixer"]["reference"]["checkpoint"] == str(
        out / "round3/reference/checkpoints"
    )
    assert _cfg(out, "main")["mixer"]["weights"] == a3 == result["doremi_weights"]
    report = Path(result["report_md"]).read_text()
    assert "DoReMi ᾱ (round 3)" in report and "baseline" not in report.split("## Headline")[1]


def test_mixtures_with_different_domains_are_an_error_before_any_step(tmp_path):
    other = _mixture(tmp_path, names=["alpha", "beta", "delta"], file="other.json")
    cfg = _pipeline(tmp_path, main={"data": {"mixture": str(other)}})
    fake = FakeTrainer()
    with pytest.raises(PipelineError, match=r"the main step's mixture has domains .* \(missing \['gamma'\], "
                                            r"extra \['delta'\]\)"):  # fmt: skip
        run_pipeline(cfg, runner=fake, echo=False)
    assert fake.calls == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"rounds": 0}, "rounds must be an integer >= 1"),
        ({"rond": 2}, "unknown key(s) 'rond' (did you mean 'rounds'?)"),
        ({"reference": {"mixer": {"weights": [1, 1, 1]}}}, "reference.mixer: the pipeline sets the mixers"),
        ({"proxy": {"mixer": {"reference_weights": [1, 1, 1]}}}, "proxy.mixer: key(s) ['reference_weights']"),
        ({"main": {"checkpoint": {"save": "x"}}}, "main.checkpoint.save: the pipeline sets it"),
        ({"reference_weights": [1, 2]}, "reference_weights: expected 3 weights"),
        ({"reference_weights": {"alpha": 1}}, "missing ['beta', 'gamma']"),
        ({"launcher": {"proxyy": "python"}}, "launcher: unknown key(s) ['proxyy']"),
        ({"proxy": {"mixer": {"smoothing": 2.0}}}, "proxy: mixer.smoothing (epsilon) must be in [0, 1]"),
        ({"main": {"eval": {"eval_iters": 0}}}, "main: the report compares validation losses"),
    ],
)
def test_config_errors_name_the_key(tmp_path, change, needle):
    fake = FakeTrainer()
    with pytest.raises(PipelineError) as info:
        run_pipeline(_pipeline(tmp_path, **change), runner=fake, echo=False)
    assert needle in str(info.value)
    assert fake.calls == []


def test_reference_weights_from_the_mixture_and_per_step_launchers(tmp_path):
    fake = FakeTrainer()
    launcher = {"default": "torchrun --nproc_per_node 2", "main": "deepspeed --num_gpus 8"}
    run_pipeline(_pipeline(tmp_path, reference_weights="mixture", launcher=launcher), runner=fake, echo=False)
    out = tmp_path / "out"
    raw = np.array([1.0 + len(n) for n in NAMES])
    expect = dict(zip(NAMES, (raw / raw.sum()).tolist()))
    assert _cfg(out, "reference")["mixer"]["weights"] == pytest.approx(expect, abs=1e-15)
    cmds = dict(fake.calls)
    assert cmds["reference"][:4] == ["torchrun", "--nproc_per_node", "2", "-m"]
    assert cmds["main"][:5] == ["deepspeed", "--num_gpus", "8", "--module", "megatron_doremi.train"]
    assert cmds["baseline"][0] == "deepspeed"  # the baseline is launched like the main model


def test_build_command_forms():
    assert build_command("python", "c.json") == [
        sys.executable,
        "-m",
        "megatron_doremi.train",
        "--config",
        "c.json",
    ]
    assert build_command("/opt/py/bin/python3.11 -X dev", "c.json")[:3] == [
        "/opt/py/bin/python3.11",
        "-X",
        "dev",
    ]
    assert build_command("srun --ntasks 8", "c.json")[:4] == ["srun", "--ntasks", "8", sys.executable]
    assert build_command("srun -N 2 torchrun --nproc_per_node 8", "c.json")[5:8] == [
        "8",
        "-m",
        "megatron_doremi.train",
    ]
    assert build_command("srun -n 8 python -u", "c.json")[3:6] == [sys.executable, "-u", "-m"]
    with pytest.raises(PipelineError):
        build_command("", "c.json")


def test_cli_errors_and_dry_run(tmp_path, capsys):
    path = tmp_path / "pipe.json"
    path.write_text(json.dumps(_pipeline(tmp_path)))
    assert main(["--config", str(path), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "[1/4] reference: to run" in text and "[4/4] baseline: to run" in text
    assert main(["--config", str(path), "--set", "rounds=0"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert main(["--config", str(tmp_path / "missing.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_replicates_train_every_main_model_per_seed_and_report_verdicts(tmp_path):
    fake = FakeTrainer()
    cfg = _pipeline(
        tmp_path, replicates=2, proxy_replicates=2, base={**_pipeline(tmp_path)["base"], "seed": 7}
    )
    result = run_pipeline(cfg, runner=fake, echo=False)
    out = tmp_path / "out"
    assert [c[0] for c in fake.calls] == ["reference", "proxy", "seed8/proxy", "main", "baseline", "seed8/main",
                                          "seed8/baseline"]  # fmt: skip
    assert _cfg(out, "proxy")["seed"] == 7 and _cfg(out, "seed8/proxy")["seed"] == 8
    assert _cfg(out, "seed8/proxy")["mixer"]["reference"] == _cfg(out, "proxy")["mixer"]["reference"]
    assert _cfg(out, "main")["seed"] == 7 and _cfg(out, "seed8/main")["seed"] == 8
    assert _cfg(out, "seed8/main")["mixer"] == _cfg(out, "main")["mixer"]  # both on the mean ᾱ
    assert _cfg(out, "seed8/main")["output_dir"] == str(out / "seed8" / "main")
    doc = json.loads(Path(result["report_json"]).read_text())
    assert doc["rounds"][0]["average"] == pytest.approx(dict(zip(NAMES, LEARNED[1].tolist())))
    assert len(doc["rounds"][0]["proxy_averages"]) == 2
    d = doc["seeds"]["DoReMi"]["domains"]
    assert (
        d["alpha"]["loss"]["values"] == [2.0, 2.0] and d["alpha"]["verdict"] == "better"
    )  # -0.5 on both seeds
    assert d["beta"]["verdict"] == "worse" and doc["verdict_summary"]["DoReMi"]["better"] == 2
    assert "±" in result["headline"]


def test_a_half_done_replicate_pipeline_resumes(tmp_path, capsys):
    cfg = _pipeline(tmp_path, replicates=2)
    with pytest.raises(StepFailed, match="step seed1235/main failed"):
        run_pipeline(cfg, runner=FakeTrainer(no_summary={"seed1235/main"}), echo=False)
    again = FakeTrainer()
    result = run_pipeline(cfg, runner=again, echo=False)
    assert [c[0] for c in again.calls] == ["seed1235/main", "seed1235/baseline"]
    assert result["skipped"] == ["reference", "proxy", "main", "baseline"]
    assert "seed1235/main: resuming" in capsys.readouterr().out
    assert json.loads(Path(result["report_json"]).read_text())["seeds"]["DoReMi"]["replicates"] == 2


def test_a_baseline_that_is_the_reference_run_reuses_it(tmp_path, capsys):
    cfg = _pipeline(tmp_path, replicates=2, main={}, export_hf=False)
    fake = FakeTrainer(losses={"reference": [2.5, 3.0, 1.25]})
    result = run_pipeline(cfg, runner=fake, echo=False)
    # replicate 0's baseline = the reference (same model, data, weights, seed, steps); seed 1235's is trained
    assert [c[0] for c in fake.calls] == ["reference", "proxy", "main", "seed1235/main", "seed1235/baseline"]
    assert result["reused"] == ["baseline"] and result["steps"]["baseline"] == str(
        tmp_path / "out" / "reference"
    )
    assert "baseline: the same run as the reference" in capsys.readouterr().out


def test_proxy_sampling_weights_default_uniform_leaves_the_key_out(tmp_path):
    run_pipeline(_pipeline(tmp_path, reference_weights="mixture"), runner=FakeTrainer(), echo=False)
    proxy = _cfg(tmp_path / "out", "proxy")["mixer"]
    assert "sampling_weights" not in proxy  # the trainer's default is uniform
    assert proxy["reference_weights"] != {n: 1 / 3 for n in NAMES}


def test_proxy_sampling_weights_are_their_own_setting(tmp_path):
    from megatron_doremi.training.mixer_factory import DOREMI_DEFAULTS

    if "sampling_weights" not in DOREMI_DEFAULTS:
        pytest.skip("this trainer has no mixer.sampling_weights yet")
    fake = FakeTrainer()
    cfg = _pipeline(tmp_path, rounds=2, baseline=False, reference_weights="mixture")
    cfg["proxy"]["mixer"]["sampling_weights"] = [1, 1, 2]
    run_pipeline(cfg, runner=fake, echo=False)
    out = tmp_path / "out"
    raw = np.array([1.0 + len(n) for n in NAMES])
    for step in ("proxy", "round2/proxy"):  # rounds >= 2 keep the proxy's sampling weights
        assert _cfg(out, step)["mixer"]["sampling_weights"] == {"alpha": 0.25, "beta": 0.25, "gamma": 0.5}
    assert _cfg(out, "proxy")["mixer"]["reference_weights"] == pytest.approx(
        dict(zip(NAMES, raw / raw.sum()))
    )
    assert _cfg(out, "reference")["mixer"]["weights"] == _cfg(out, "proxy")["mixer"]["reference_weights"]


# ---- report -------------------------------------------------------------------------------------------------------


def test_compare_evals_numbers():
    main_eval = {"domains": {"a": {"loss": 1.0, "tokens": 300}, "b": {"loss": 4.0, "tokens": 100}}}
    base_eval = {"domains": {"a": {"loss": 2.0, "tokens": 300}, "b": {"loss": 3.0, "tokens": 100}}}
    c = compare_evals(["a", "b"], main_eval, base_eval)
    assert c["improved"] == ["a"] and c["worse"] == ["b"]
    assert c["domains"]["a"] == {"baseline": 2.0, "doremi": 1.0, "delta": -1.0, "improved": True}
    assert c["uniform"] == {"baseline": 2.5, "doremi": 2.5, "delta": 0.0}
    assert c["token_weighted"]["doremi"] == pytest.approx((300 * 1.0 + 100 * 4.0) / 400)
    assert c["token_weighted"]["baseline"] == pytest.approx((300 * 2.0 + 100 * 3.0) / 400)
    assert c["worst"] == {
        "baseline": 3.0,
        "doremi": 4.0,
        "delta": 1.0,
        "baseline_domain": "b",
        "doremi_domain": "b",
    }


def test_report_content(tmp_path):
    from megatron_doremi.report import RoundWeights

    ref = {n: 1 / 3 for n in NAMES}
    avg = dict(zip(NAMES, LEARNED[1].tolist()))
    evals = {
        k: {"domains": {n: {"loss": v, "tokens": 100} for n, v in zip(NAMES, LOSSES[k])}} for k in LOSSES
    }
    result = write_report(str(tmp_path), NAMES, ref, [RoundWeights(1, avg, avg)], evals["main"], evals["baseline"],
                          runs={"main": str(tmp_path / "main")})  # fmt: skip
    md = Path(result.report_md).read_text()
    assert f"| alpha | 0.3333 | {avg['alpha']:.4f} |" in md
    assert "| alpha | 100 | 2.5000 | 2.0000 | -0.5000 | n/a | n/a | not tested |" in md
    assert "| beta | 100 | 3.0000 | 3.5000 | +0.5000 | n/a | n/a | not tested |" in md
    uniform_b, uniform_d = sum(LOSSES["baseline"]) / 3, sum(LOSSES["main"]) / 3
    assert (
        f"| **uniform average** |  | {uniform_b:.4f} | {uniform_d:.4f} | {uniform_d - uniform_b:+.4f} |" in md
    )
    assert "| **worst case** |  | 3.0000 | 3.5000 | +0.5000 |" in md
    assert (
        "1 replicate, so no significance can be claimed" in md and "better" not in md.split("## Headline")[1]
    )
    assert "DoReMi up-weights gamma and down-weights alpha; beta within 1% of the reference." in md
    assert "![validation loss](loss.png)" in md and (tmp_path / "loss.png").stat().st_size > 1000
    doc = json.loads(Path(result.report_json).read_text())
    assert doc["comparison"]["improved"] == [] and doc["doremi_weights"] == avg  # one seed: nothing claimed
    assert math.isclose(doc["comparison"]["uniform"]["delta"], uniform_d - uniform_b)
    assert doc["verdict_summary"]["DoReMi"]["not tested"] == 3
    assert "DoReMi improves" not in result.headline and "no significance can be claimed" in result.headline


def test_report_with_replicates_has_intervals_and_verdicts(tmp_path):
    from megatron_doremi.report import RoundWeights

    ref = {n: 1 / 3 for n in NAMES}
    avg = dict(zip(NAMES, LEARNED[1].tolist()))
    jitter = ([0.0, 0.01, -0.01], [0.02, -0.03, 0.0], [-0.01, 0.02, 0.01])

    def ev(losses, j, bpb=True):
        return {"domains": {n: {"loss": v + d, "tokens": 100 + i, **({"bpb": (v + d) / 3} if bpb else {})}
                            for i, (n, v, d) in enumerate(zip(NAMES, losses, j))}}  # fmt: skip

    base = [ev([2.5, 3.0, 1.25], j) for j in jitter]
    # alpha: 0.5 lower on every seed (better); beta: +/- noise (no difference); gamma: 0.3 higher (worse)
    main_ = [ev([2.0, 3.0 + e, 1.55], j) for e, j in zip((0.05, -0.04, 0.0), jitter)]
    result = write_report(str(tmp_path), NAMES, ref, [RoundWeights(1, avg, avg)], main_, base, plots=False)
    doc = json.loads(Path(result.report_json).read_text())
    d = doc["seeds"]["DoReMi"]["domains"]
    assert [d[n]["verdict"] for n in NAMES] == ["better", "no significant difference", "worse"]
    assert d["alpha"]["loss"]["values"] == pytest.approx([2.0, 2.02, 1.99]) and d["alpha"]["tokens"] == 100
    assert d["alpha"]["loss"]["mean"] == pytest.approx(6.01 / 3) and d["alpha"]["loss"]["ci95"] > 0
    assert d["alpha"]["bpb"]["mean"] == pytest.approx(6.01 / 9)
    assert doc["verdict_summary"]["DoReMi"] == {"better": 1, "worse": 1, "no significant difference": 1,
                                                "not tested": 0}  # fmt: skip
    assert doc["seeds"]["baseline"]["uniform"]["loss"]["ci95"] is not None
    assert doc["seeds"]["DoReMi"]["worst"]["verdict"] in ("worse", "no significant difference", "better")
    assert doc["comparison"]["improved"] == ["alpha"] and doc["comparison"]["worse"] == ["gamma"]
    assert "±" in result.headline and "better on alpha; worse on gamma" in result.headline
    md = Path(result.report_md).read_text()
    assert (
        "| alpha | 100 | 2.5033 ± 0.0379 | 2.0033 ± 0.0379 | -0.5000 ± 0.0000 | 0.834 ± 0.013 | 0.668 ± 0.013 | better |"
        in md
    )
    # a summary without bpb: bpb is n/a, nothing crashes
    result = write_report(str(tmp_path), NAMES, ref, [RoundWeights(1, avg, avg)],
                          [ev([2.0, 3.0, 1.5], j, bpb=False) for j in jitter], base, plots=False)  # fmt: skip
    assert "[n/a]" in result.headline


# ---- shipped configs and the SLURM template -----------------------------------------------------------------------


@pytest.mark.parametrize("path", ["examples/quickstart/pipeline.json", "examples/pile/pipeline.json",
                                  "examples/pile/pipeline_120m.json"])  # fmt: skip
def test_shipped_pipeline_configs_are_valid(path, monkeypatch):
    from megatron_doremi.pipeline import _Pipeline, load_pipeline_config
    from megatron_doremi.training.config import eval_enabled, validate_run_config

    monkeypatch.chdir(REPO)
    cfg, source = load_pipeline_config(path)
    pipe = _Pipeline(cfg, source, FakeTrainer(), echo=False, command=None)
    weights = {"a": 1.0}
    for step in pipe.steps():
        run = validate_run_config(pipe.run_config(step, weights, step.dir), source, check_files=False)
        assert eval_enabled(run.eval) and run.output_dir == step.dir
    if "pile" in path:
        assert (
            pipe.merged("main")["model"]["num_hidden_layers"] == 22
        )  # the 1B main model replaces the proxy's
        assert pipe.merged("proxy")["model"]["hidden_size"] in (768, 1024)


def test_shipped_pile_run_configs_and_mixture(monkeypatch):
    from megatron_doremi.data.mixture import Mixture
    from megatron_doremi.training.config import load_run_config

    monkeypatch.chdir(REPO)
    for name in ("reference", "proxy", "main"):
        cfg = load_run_config(f"examples/pile/{name}.json", check_files=False)
        assert cfg.seq_length == 1024 and cfg.global_batch_size == 512
    mix = Mixture.from_json(REPO / "examples" / "pile" / "mixture.json")
    assert mix.num_domains == 22 and "pile_cc" in mix.names and "youtubesubtitles" in mix.names
    assert all(p.endswith("/data/pile/" + n + "_text_document") for n, d in zip(mix.names, mix.domains)
               for p in d.prefixes)  # fmt: skip


def test_pipeline_sbatch_composes_the_launcher(tmp_path):
    import os
    import subprocess

    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "scontrol").write_text(
        "#!/bin/sh\n[ \"$1 $2\" = 'show hostnames' ] && printf '%s\\n' node01 node02 gpu7\n"
    )
    (bindir / "scontrol").chmod(0o755)
    cfg = tmp_path / "pipe.json"
    cfg.write_text(json.dumps(_pipeline(tmp_path)))
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "node[01-02],gpu7", "SLURM_GPUS_ON_NODE": "4", "RUN_DIR": "runs/job",
           "PYTHONPATH": str(REPO), "SLURM_SUBMIT_DIR": str(REPO)}  # fmt: skip
    script = str(REPO / "examples" / "slurm" / "pipeline.sbatch")

    def run(**extra):
        return subprocess.run(["bash", script, str(cfg), "--dry-run"], cwd=tmp_path, env={**env, **extra},
                              capture_output=True, text=True, timeout=120)  # fmt: skip

    proc = run()
    assert proc.returncode == 0, proc.stderr
    launcher = "deepspeed --hostfile runs/job/hostfile --num_nodes 3 --num_gpus 4 --master_addr node01 " \
               f"--master_port {20000 + 4242}"  # fmt: skip
    assert proc.stdout.count(f"({launcher})") == 4, proc.stdout
    assert (
        tmp_path / "runs" / "job" / "hostfile"
    ).read_text() == "node01 slots=4\nnode02 slots=4\ngpu7 slots=4\n"
    proc = run(LAUNCHER_KIND="srun", SLURM_CPUS_PER_TASK="32")
    assert proc.returncode == 0, proc.stderr
    assert "(srun --nodes=3 --ntasks-per-node=4 --cpus-per-task=8 --kill-on-bad-exit=1)" in proc.stdout
    proc = run(LAUNCHER_KIND="mpi")
    assert proc.returncode == 2 and "LAUNCHER_KIND must be deepspeed or srun" in proc.stderr


def test_costs_are_fractions_of_one_main_run_when_runs_record_train_flops(tmp_path):
    fake = FakeTrainer()

    def with_flops(name, cmd, log_path, env):
        rc = fake(name, cmd, log_path, env)
        cfg = json.loads(Path(cmd[cmd.index("--config") + 1]).read_text())
        path = Path(cfg["output_dir"]) / "train_summary.json"
        doc = json.loads(path.read_text())
        path.write_text(json.dumps({**doc, "train_flops": 1e9 * cfg["schedule"]["train_iters"]}))
        return rc

    result = run_pipeline(_pipeline(tmp_path), runner=with_flops, echo=False)
    costs = json.loads(Path(result["report_json"]).read_text())["costs"]
    assert costs["main_run_flops"] == 7e9 and costs["train_flops"]["proxy"] == 5e9
    assert costs["search_fraction"]["DoReMi"] == pytest.approx(10 / 7)  # reference + proxy vs one main run
    assert (
        "fraction of one main-model run's training FLOPs (n/a where a run did not record train_flops): DoReMi 1.43x"
        in result["headline"]
    )
