"""DoReMi step 2 in the real trainer (CPU, DeepSpeed, 1 or 2 gloo ranks) on synthetic domains built here.

Domains: ``noise`` (uniform random tokens), ``trivial`` (one repeated 5-token pattern), and two learnable but
structured ones: ``markov`` (a first-order chain, 5 successors per token) and ``grammar`` (a second-order chain,
2 successors per context). The module fixture runs the DoReMi pipeline (reference 300 steps, proxy 300 steps, a
few main/baseline steps) once; its reference checkpoint serves the other tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_doremi.training.config import ConfigError, load_run_config
from tests.conftest import free_port, run_checked, sigkill_when

REPO = Path(__file__).resolve().parent.parent
VOCAB = 128
MODEL = {
    "model_type": "llama",
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}
DS = REPO / "examples" / "ds_configs"
STEPS = 24  # proxy runs other than the behaviour run

pytestmark = pytest.mark.slow


# ---- synthetic data -------------------------------------------------------------------------------------------


def _markov_chain(rng: np.random.Generator, lo: int, hi: int, order: int, fanout: int):
    """A random order-``order`` Markov chain over tokens [lo, hi): each context has ``fanout`` successors."""
    n = hi - lo
    contexts = n**order
    succ = np.stack([rng.choice(n, size=fanout, replace=False) for _ in range(contexts)]) + lo
    prob = rng.dirichlet(np.ones(fanout), size=contexts)

    def generate(r: np.random.Generator, length: int) -> list[int]:
        x = [int(v) for v in r.integers(lo, hi, order)]
        while len(x) < length:
            c = 0
            for t in x[-order:]:
                c = c * n + (t - lo)
            x.append(int(succ[c][r.choice(fanout, p=prob[c])]))
        return x

    return generate


def write_synthetic(out: Path, docs: int = 400, doc_len: int = 200, seed: int = 0) -> Path:
    """Four domains of ``docs`` documents (``doc_len`` tokens + EOD 0); returns the mixture JSON path."""
    from megatron_doremi.data.indexed import IndexedDatasetWriter

    rng = np.random.default_rng(seed)
    generators = {
        "noise": lambda r, n: r.integers(0, VOCAB, n).tolist(),
        "trivial": lambda r, n: ([100, 101, 102, 103, 104] * (n // 5 + 1))[:n],
        "markov": _markov_chain(rng, 16, 64, order=1, fanout=5),
        "grammar": _markov_chain(rng, 64, 88, order=2, fanout=2),
    }
    domains = {}
    for name, gen in generators.items():
        prefix = str(out / f"{name}_text_document")
        with IndexedDatasetWriter(prefix, np.uint16) as w:
            for _ in range(docs):
                w.add_document(np.array(gen(rng, doc_len) + [0], dtype=np.int64))
        domains[name] = {"prefixes": [prefix], "weight": 1.0}
    path = out / "mixture.json"
    path.write_text(json.dumps({"domains": domains}))
    return path


def base_config(mixture: Path, **extra) -> dict:
    cfg = {
        "model": dict(MODEL),
        "data": {"mixture": str(mixture), "split": "90,5,5"},
        "schedule": {
            "seq_length": 32,
            "micro_batch_size": 16,
            "global_batch_size": 16,
            "train_iters": 300,
            "lr": 3e-3,
            "min_lr": 3e-4,
            "warmup_iters": 10,
        },  # fmt: skip
        "eval": {"eval_iters": 1},
        "deepspeed_config": str(DS / "zero2.json"),
        "log_interval": 100,
        "tensorboard": False,
        "progress_bar": False,
    }
    cfg.update(extra)
    return cfg


# ---- helpers ----------------------------------------------------------------------------------------------------


def _run(cmd: list[str], timeout: int = 300, ok: bool = True) -> subprocess.CompletedProcess:
    return run_checked(cmd, timeout, ok)


def _write(path: Path, cfg: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg, indent=1))
    return path


def _train(cfg_path: Path, ranks: int = 1, **kw) -> subprocess.CompletedProcess:
    if ranks == 1:
        return _run([sys.executable, "-m", "megatron_doremi.train", "--config", str(cfg_path)], **kw)
    return _run(["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()), "--module",
                 "megatron_doremi.train", "--config", str(cfg_path)], **kw)  # fmt: skip


def _alphas(run_dir: Path) -> list[dict]:
    """doremi_weights.jsonl without timestamps."""
    rows = [json.loads(line) for line in open(run_dir / "doremi_weights.jsonl")]
    return [{k: v for k, v in r.items() if k != "timestamp"} for r in rows]


def _mixer_dumps(run_dir: Path, rank: int) -> dict[int, dict]:
    return {r["step"]: r["mixer"] for r in map(json.loads, open(run_dir / f"mixer_rank{rank}.jsonl"))}


def proxy_config(data: dict, run_dir: Path, **kw) -> dict:
    cfg = base_config(
        data["mixture"],
        mixer={"type": "doremi", "reference": {"checkpoint": str(data["reference"])}},
        output_dir=str(run_dir),
    )
    cfg["schedule"]["train_iters"] = STEPS
    cfg["eval"] = {"eval_iters": 0}
    for key, value in kw.items():
        section, _, name = key.partition("__")
        if name:
            cfg[section] = {**cfg.get(section, {}), name: value}
        else:
            cfg[section] = value
    return cfg


# ---- the behaviour run (module fixture) ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """Synthetic shards + the DoReMi pipeline run on them (single process, python launcher)."""
    from megatron_doremi.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("doremi")
    mixture = write_synthetic(root)
    pipe = {
        "output_dir": str(root / "pipeline"),
        "launcher": "python",
        "export_hf": False,
        "base": base_config(mixture),
        "main": {"schedule": {"train_iters": 6, "warmup_iters": 2}},
    }
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        result = run_pipeline(pipe, echo=False)
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old
    return {
        "root": root,
        "mixture": mixture,
        "result": result,
        "reference": root / "pipeline" / "reference" / "checkpoints",
        "proxy": root / "pipeline" / "proxy",
    }


def test_doremi_moves_weight_from_noise_and_trivial_to_structured_domains(data):
    weights = json.loads((data["proxy"] / "domain_weights.json").read_text())
    avg = weights["average"]["weights"]
    # uniform reference weights are 0.25 each; the paper's observation, with a margin
    assert avg["noise"] < 0.125 and avg["trivial"] < 0.125, avg
    assert avg["markov"] + avg["grammar"] > 0.75, avg
    assert min(avg["markov"], avg["grammar"]) > max(avg["noise"], avg["trivial"]) + 0.05, avg
    # both mixture forms are written, and they load
    from megatron_doremi.data.mixture import Mixture

    mix = Mixture.from_dict(weights["average"]["mixture"])
    assert dict(zip(mix.names, mix.weights.tolist())) == pytest.approx(avg, abs=1e-12)
    assert Mixture.from_data_path(weights["average"]["data_path"]).names == mix.names
    # the jsonl has α_0 and one line per update; its last ᾱ is the written average
    rows = _alphas(data["proxy"])
    assert [r["step"] for r in rows] == list(range(0, 301))
    assert rows[0]["domain_weights"] == [0.25] * 4
    names = rows[-1]["domain_names"]
    assert dict(zip(names, rows[-1]["avg_domain_weights"])) == avg
    assert (data["proxy"] / "domain_weights.png").stat().st_size > 1000
    # metrics carry α, the multipliers and the reference forward time
    last = json.loads((data["proxy"] / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["domain_weights"] == dict(zip(names, rows[-1]["domain_weights"]))
    assert last["sampling_weights"] == {n: 0.25 for n in names} and last["reference_time_s"] > 0
    # compute: the proxy's training plus the same-size reference's forward (a third of it)
    summary = json.loads((data["proxy"] / "train_summary.json").read_text())
    assert summary["train_tokens"] == 300 * 16 * 32
    assert summary["reference_flops"] == pytest.approx(summary["model_flops"] / 3)
    assert summary["train_flops"] == pytest.approx(summary["model_flops"] + summary["reference_flops"])
    assert weights["sampling_weights"] == {n: 0.25 for n in names}


def test_pipeline_outputs_and_report(data):
    result = data["result"]
    root = data["root"] / "pipeline"
    assert result["ran"] == ["reference", "proxy", "main", "baseline"]
    main_cfg = json.loads((root / "main" / "pipeline_config.json").read_text())
    avg = json.loads((data["proxy"] / "domain_weights.json").read_text())["average"]["weights"]
    assert main_cfg["mixer"] == {"type": "static", "weights": avg}
    base_cfg = json.loads((root / "baseline" / "pipeline_config.json").read_text())
    assert base_cfg["mixer"]["weights"] == {n: 0.25 for n in avg}
    proxy_cfg = json.loads((data["proxy"] / "pipeline_config.json").read_text())
    assert proxy_cfg["mixer"]["reference"]["checkpoint"] == str(data["reference"])
    report = Path(result["report_md"]).read_text()
    for name in avg:
        assert f"| {name} | 0.2500 | {avg[name]:.4f} |" in report
    main_eval = json.loads((root / "main" / "eval_summary.json").read_text())
    assert f"{main_eval['uniform']['loss']:.4f}" in report and "worst case" in report
    assert (root / "weights.png").exists() and (root / "loss.png").exists()
    # a second run skips every step and trains nothing
    from megatron_doremi.pipeline import run_pipeline

    again = run_pipeline(json.loads((root / "pipeline.json").read_text()), echo=False)
    assert again["ran"] == [] and len(again["skipped"]) == 4


# ---- bit-identical α across ranks; the two reference modes ----------------------------------------------------


def test_two_ranks_compute_bit_identical_alpha_in_both_reference_modes(data, tmp_path):
    trajectories = {}
    for mode in ("zero3", "replicated"):
        run_dir = tmp_path / mode
        ref = {"checkpoint": str(data["reference"]), "mode": mode}
        cfg = proxy_config(data, run_dir, deepspeed_config=str(DS / "zero3.json"), debug={"dump_mixer": True},
                           mixer={"type": "doremi", "reference": ref}, schedule__micro_batch_size=8)  # fmt: skip
        proc = _train(_write(tmp_path / f"{mode}.json", cfg), ranks=2)
        assert "INFO reference: " in proc.stderr and f", {mode}, float32" in proc.stderr
        r0, r1 = _mixer_dumps(run_dir, 0), _mixer_dumps(run_dir, 1)
        assert sorted(r0) == sorted(r1) == list(range(1, STEPS + 1))
        for step in r0:
            assert r0[step] == r1[step], f"{mode}: ranks differ at step {step}"  # hex floats: bit-identical
        rows = _alphas(run_dir)
        assert [r["step"] for r in rows] == list(range(STEPS + 1))
        for r in rows[1:]:
            assert [float.fromhex(h) for h in r0[r["step"]]["weights"]] == r["domain_weights"]
        trajectories[mode] = np.array([r["domain_weights"] for r in rows])
    a, b = trajectories["zero3"], trajectories["replicated"]
    assert np.abs(a[-1] - a[0]).max() > 0.05  # α actually moves
    assert np.abs(a - b).max() < 1e-6  # the ZeRO-3 reference engine and the replicated copy agree


# ---- gradient accumulation, kill/resume ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def accum_one(data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("accum") / "accum1"
    cfg = proxy_config(data, run_dir, checkpoint={"save": str(run_dir / "ckpt"), "save_interval": 6})
    _train(_write(run_dir.parent / "accum1.json", cfg))
    return run_dir


def test_grad_accumulation_gives_the_same_alpha_trajectory(data, accum_one, tmp_path):
    run_dir = tmp_path / "accum4"
    cfg = proxy_config(data, run_dir, schedule__micro_batch_size=4)
    _train(_write(tmp_path / "accum4.json", cfg))
    a = np.array([r["domain_weights"] for r in _alphas(accum_one)])
    b = np.array([r["domain_weights"] for r in _alphas(run_dir)])
    assert a.shape == b.shape == (STEPS + 1, 4)
    assert np.abs(a - b).max() < 1e-6, np.abs(a - b).max()
    assert np.abs(a[-1] - a[0]).max() > 0.05  # not trivially equal: α moved


def test_sigkill_and_resume_continue_the_same_alpha_trajectory(data, accum_one, tmp_path):
    run_dir = tmp_path / "killed"
    ckpt = {"save": str(run_dir / "ckpt"), "load": str(run_dir / "ckpt"), "save_interval": 6}
    cfg_path = _write(tmp_path / "killed.json", proxy_config(data, run_dir, checkpoint=ckpt,
                                                             debug={"step_sleep_s": 0.4}))  # fmt: skip
    cmd = [sys.executable, "-m", "megatron_doremi.train", "--config", str(cfg_path)]
    jsonl = run_dir / "doremi_weights.jsonl"
    sigkill_when(cmd, lambda: jsonl.exists() and len(jsonl.read_text().splitlines()) >= 16, 120, cwd=REPO)
    latest = (run_dir / "ckpt" / "latest").read_text()
    assert latest in ("global_step12", "global_step18"), latest
    assert len(_alphas(run_dir)) > int(latest.removeprefix("global_step")) + 1  # lines past the checkpoint
    _write(cfg_path, proxy_config(data, run_dir, checkpoint=ckpt))
    out = _train(cfg_path)
    assert "resumed from" in out.stderr
    assert _alphas(run_dir) == _alphas(accum_one)  # bit-identical α, ᾱ, λ, excess; no duplicated steps
    done = json.loads((run_dir / "domain_weights.json").read_text())
    ref = json.loads((accum_one / "domain_weights.json").read_text())
    assert done["average"] == ref["average"] and done["final"] == ref["final"]


def test_resample_mode_without_reference_samples_with_alpha(data, tmp_path):
    run_dir = tmp_path / "resample"
    cfg = proxy_config(data, run_dir, mixer={"type": "doremi", "reference": None, "resample": True})
    cfg["schedule"]["train_iters"] = 6
    proc = _train(_write(tmp_path / "resample.json", cfg))
    assert "DEBUG mode, NOT DoReMi" in proc.stderr
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    alphas = _alphas(run_dir)
    for t in range(1, 6):  # step t+1 samples with α_t; nothing is reweighted
        assert rows[t]["sampling_weights"] == dict(
            zip(alphas[t]["domain_names"], alphas[t]["domain_weights"])
        )
        assert "loss_multipliers" not in rows[t]
        # debug mode: λ = the proxy's own loss (domains sampled in the step)
        for d, name in enumerate(alphas[t]["domain_names"]):
            if rows[t]["domain_loss"][name] is not None:
                assert alphas[t + 1]["perdomain_scores"][d] == pytest.approx(
                    rows[t]["domain_loss"][name], rel=1e-12
                )
    state = json.loads((run_dir / "train_summary.json").read_text())
    assert state["steps"] == 6


# ---- clear errors before training -------------------------------------------------------------------------------


def _error(cfg: dict) -> str:
    with pytest.raises(ConfigError) as info:
        load_run_config(None, base=cfg)
    return str(info.value)


def test_reference_problems_are_errors_before_training(data, tmp_path):
    good = proxy_config(data, tmp_path / "x")
    load_run_config(None, base=good)
    missing = tmp_path / "no_such_ref"
    msg = _error(proxy_config(data, tmp_path / "x", mixer={"type": "doremi", "reference": str(missing)}))
    assert "mixer.reference.checkpoint" in msg and str(missing) in msg and "does not exist" in msg
    bigger_vocab = dict(MODEL, vocab_size=256)
    msg = _error(proxy_config(data, tmp_path / "x", model=bigger_vocab))
    assert "vocab_size 128" in msg and "256" in msg
    msg = _error(proxy_config(data, tmp_path / "x", model=dict(MODEL, hidden_size=32)))
    assert "hidden_size (64 vs 32)" in msg and "allow_architecture_mismatch" in msg
    wrong_model = {"type": "doremi", "reference": {"checkpoint": str(data["reference"]),
                                                   "model": dict(MODEL, num_hidden_layers=3)}}  # fmt: skip
    assert "num_hidden_layers (3 vs 2)" in _error(proxy_config(data, tmp_path / "x", mixer=wrong_model))
    # a mixture with other domains than the reference run's
    three = json.loads(Path(data["mixture"]).read_text())
    three["domains"].pop("noise")
    (tmp_path / "three.json").write_text(json.dumps(three))
    cfg = proxy_config(data, tmp_path / "x")
    cfg["data"]["mixture"] = str(tmp_path / "three.json")
    assert "trained on domains" in _error(cfg) and "same domains" in _error(cfg)
    # the CLI: error line naming the key, exit 2, before any process group
    cfg_path = _write(tmp_path / "bad.json", proxy_config(data, tmp_path / "x", model=bigger_vocab))
    proc = _train(cfg_path, ok=False, timeout=120)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith("error: ") and "vocab_size" in last


@pytest.mark.parametrize(
    "mixer, needle",
    [
        ({"step_size": 0}, "mixer.step_size (eta) must be finite and > 0"),
        ({"step_size": -1.0}, "mixer.step_size (eta) must be finite and > 0"),
        ({"step_size": float("nan")}, "mixer.step_size (eta) must be finite"),
        ({"step_size": "big"}, "mixer.step_size (eta) must be a number"),
        ({"smoothing": 1.5}, "mixer.smoothing (epsilon) must be in [0, 1]"),
        ({"smoothing": -0.1}, "mixer.smoothing (epsilon) must be in [0, 1]"),
        ({"update_step": 0}, "update_step must be an integer >= 1"),
        ({"stepsize": 1.0}, "unknown key 'mixer.stepsize' (did you mean 'step_size'?)"),
        ({"reference_weights": [1, 2]}, "expected 4 values"),
        ({"reference_weights": "tokens"}, "mixer.reference_weights: expected null"),
        ({"reference": {"checkpoint": "x", "mode": "sharded"}}, "mixer.reference.mode must be one of"),
    ],
)
def test_bad_doremi_options_are_config_errors(data, tmp_path, mixer, needle):
    spec = {"type": "doremi", "reference": str(data["reference"]), **mixer}
    assert needle in _error(proxy_config(data, tmp_path / "x", mixer=spec))


def test_reference_key_is_required_and_odm_is_registered(data, tmp_path):
    assert "mixer.reference is required" in _error(
        proxy_config(data, tmp_path / "x", mixer={"type": "doremi"})
    )
    from megatron_doremi.data.mixture import Mixture
    from megatron_doremi.mixers.odm import ODMMixer
    from megatron_doremi.training.mixer_factory import build_mixer

    mixer = build_mixer({"type": "odm", "alpha": 0.5}, Mixture.from_json(data["mixture"]))
    assert isinstance(mixer, ODMMixer) and mixer.domain_names == ("grammar", "markov", "noise", "trivial")


def test_hf_export_as_reference_gives_the_same_alpha_and_tokenizers_must_match(data, accum_one, tmp_path):
    from megatron_doremi.training.export import export_hf

    hf = tmp_path / "ref_hf"
    export_hf(str(data["reference"]), str(hf))
    run_dir = tmp_path / "from_hf"
    cfg = proxy_config(data, run_dir, mixer={"type": "doremi", "reference": str(hf)})
    proc = _train(_write(tmp_path / "from_hf.json", cfg))
    assert f"from {hf} (hf), replicated" in proc.stderr
    assert _alphas(run_dir) == _alphas(accum_one)  # the same fp32 weights as the ZeRO checkpoint
    # a reference trained with another tokenizer than the proxy's is an error
    (hf / "tokenizer.json").write_text('{"model": "reference"}')
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text('{"model": "proxy"}')
    msg = _error(proxy_config(data, run_dir, mixer={"type": "doremi", "reference": str(hf)},
                              tokenizer=str(tmp_path / "tok")))  # fmt: skip
    assert "must share the tokenizer" in msg and str(hf) in msg


def test_reference_model_reproduces_the_reference_runs_validation_loss(data):
    """The loaded reference (replicated, in-process) scores the validation samples as the reference run did."""
    import torch

    from megatron_doremi.data.loader import build_domain_datasets
    from megatron_doremi.data.mixture import Mixture
    from megatron_doremi.training.reference import ReferenceModel, check_reference, parse_reference_spec

    mixture = Mixture.from_json(data["mixture"])
    spec = parse_reference_spec(str(data["reference"]), "test")
    info = check_reference(spec, dict(MODEL), mixture.names, 32, "test")
    assert info.kind == "deepspeed" and info.step == 300 and info.domain_names == list(mixture.names)
    ref = ReferenceModel.build(info, {}, torch.device("cpu"), rank=0, micro_batch_size=16, world_size=1)
    assert ref.mode == "replicated" and not any(p.requires_grad for p in ref.module.parameters())
    summary = json.loads((data["root"] / "pipeline" / "reference" / "eval_summary.json").read_text())
    valid = build_domain_datasets(mixture, 32, "90,5,5", seed=1234)["valid"]
    for d, (name, ds) in enumerate(zip(mixture.names, valid)):
        n = summary["domains"][name]["samples"]
        samples = torch.from_numpy(ds.get_batch(np.arange(n), out_dtype=np.int64))
        loss = ref.token_loss(samples[:, :-1], samples[:, 1:], torch.full((n,), d), len(mixture.names))
        assert loss.shape == (n, 32) and loss.dtype == torch.float32
        assert float(loss.double().mean()) == pytest.approx(summary["domains"][name]["loss"], rel=1e-5)
