"""End-to-end trainer runs on CPU: real DeepSpeed ZeRO-3 on 2 gloo ranks, tiny Llama, the quickstart sample text.

One uninterrupted 2-rank run (deepspeed launcher) is the reference; the other runs are compared with it:
a single-rank run (same global batch), a run SIGKILLed mid-way and resumed, two torchrun "nodes" on 127.0.0.1,
and the standalone evaluator on its checkpoint plus the HF export.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import free_port, launch_env, run_checked, sigkill_when

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "examples" / "quickstart" / "data"
STEPS = 8

pytestmark = pytest.mark.slow


def _run(cmd: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    return run_checked(cmd, timeout)


def _deepspeed(*args: str) -> list[str]:
    return ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "--module", *args]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer and one shard per quickstart domain (first 40 documents, 3000 chars each)."""
    from megatron_doremi.data.indexed import IndexedDatasetWriter
    from megatron_doremi.data.tokenizer import train_bpe_tokenizer

    out = tmp_path_factory.mktemp("data")
    texts = {}
    for f in sorted(SAMPLE.glob("*.jsonl")):
        texts[f.stem] = [json.loads(line)["text"][:3000] for line in open(f)][:40]
    tok = train_bpe_tokenizer((t for v in texts.values() for t in v), 384, out / "tokenizer")
    domains = {}
    for name, docs in texts.items():
        prefix = str(out / f"{name}_text_document")
        with IndexedDatasetWriter(prefix, np.uint16) as w:
            for enc in tok.encode_batch(docs):
                w.add_document(np.array(enc.ids + [0], dtype=np.int64))
        domains[name] = {"prefixes": [prefix], "weight": 1.0}
    domains["code"]["weight"] = 2.0
    (out / "mixture.json").write_text(json.dumps({"domains": domains}))
    return out


def _config(data: Path, run_dir: Path, **extra) -> Path:
    cfg = {
        "model": {
            "model_type": "llama",
            "vocab_size": 384,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "max_position_embeddings": 128,
        },
        "tokenizer": str(data / "tokenizer"),
        "data": {"mixture": str(data / "mixture.json"), "split": "80,10,10"},
        "schedule": {
            "seq_length": 64,
            "micro_batch_size": 4,
            "global_batch_size": 16,
            "train_iters": STEPS,
            "lr": 3e-3,
            "min_lr": 3e-4,
            "warmup_iters": 2,
        },  # fmt: skip
        "eval": {"eval_interval": 4, "eval_iters": 1},
        "checkpoint": {"save": str(run_dir / "ckpt"), "save_interval": 2, "load": str(run_dir / "ckpt")},
        "output_dir": str(run_dir),
        "deepspeed_config": str(REPO / "examples" / "ds_configs" / "zero3.json"),
        "debug": {"dump_samples": True},
        "progress_bar": False,
    }
    for key, value in extra.items():
        section, _, name = key.partition("__")
        if name:
            cfg[section][name] = value
        else:
            cfg[section] = value
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir.parent / f"{run_dir.name}.json"
    path.write_text(json.dumps(cfg, indent=1))
    return path


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """The uninterrupted 2-rank ZeRO-3 run, with the HF export at the end."""
    run_dir = tmp_path_factory.mktemp("runs") / "ref"
    cfg = _config(data, run_dir, checkpoint__export_hf=str(run_dir / "hf"))
    proc = _run(_deepspeed("megatron_doremi.train", "--config", str(cfg)))
    assert "final evaluation (step 8)" in proc.stdout and "worst (" in proc.stdout
    return run_dir


def test_loss_decreases_and_outputs_are_complete(reference):
    rows = _metrics(reference)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    losses = [r["loss"] for r in rows]
    assert np.mean(losses[-2:]) < losses[0] - 0.2, losses
    evals = [json.loads(line) for line in open(reference / "eval.jsonl")]
    assert [e["step"] for e in evals] == [4, 8]
    assert evals[1]["token_weighted"]["loss"] < evals[0]["token_weighted"]["loss"]
    summary = json.loads((reference / "eval_summary.json").read_text())
    assert summary["step"] == 8 and set(summary["domains"]) == {"code", "docs", "lexicon", "scripture"}
    for key in ("token_weighted", "uniform", "worst"):
        assert summary[key]["loss"] is not None
    r = rows[-1]
    for key in ("lr", "grad_norm", "tokens_per_s", "consumed_samples", "domain_loss", "domain_weights"):
        assert r[key] is not None, key
    assert r["consumed_samples"] == STEPS * 16
    assert r["domain_weights"]["code"] == pytest.approx(0.4)
    assert (reference / "ckpt" / "latest").read_text() == "global_step8"
    run = json.loads((reference / "train_summary.json").read_text())
    assert run["train_tokens"] == STEPS * 16 * 64 and run["reference_flops"] == 0
    assert run["train_flops"] == run["model_flops"] > 6 * 0.5 * run["parameters"] * run["train_tokens"]
    assert (reference / "ckpt" / "global_step8" / "tokenizer_digest.json").is_file()
    assert "bpb" in evals[1]["domains"]["code"] and evals[1]["domains"]["code"]["bpb"] > 0


def _samples(run_dir: Path, world: int) -> dict[int, list[list[str]]]:
    per_step: dict[int, list[list[str]]] = {}
    for rank in range(world):
        for line in open(run_dir / f"samples_rank{rank}.jsonl"):
            rec = json.loads(line)
            per_step.setdefault(rec["step"], [[] for _ in range(world)])[rank] = rec["samples"]
    return per_step


def test_two_ranks_split_the_single_rank_global_batch(reference, data, tmp_path):
    run_dir = tmp_path / "single"
    cfg = _config(data, run_dir, checkpoint={})  # ZeRO-3 on one rank: the same initial weights as on two
    _run([sys.executable, "-m", "megatron_doremi.train", "--config", str(cfg)])
    two, one = _samples(reference, 2), _samples(run_dir, 1)
    assert sorted(two) == sorted(one) == list(range(1, STEPS + 1))
    for step in one:
        r0, r1 = two[step]
        assert len(r0) == len(r1) == 8 and not set(r0) & set(r1)
        assert r0 + r1 == one[step][0]  # rank r holds the r-th contiguous half of the same global batch
    a, b = _metrics(reference), _metrics(run_dir)
    np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], rtol=2e-4)
    np.testing.assert_allclose([r["grad_norm"] for r in a], [r["grad_norm"] for r in b], rtol=2e-3)


def test_zero2_single_process_trains_saves_and_exports(data, tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "zero2"
    cfg = _config(
        data,
        run_dir,
        deepspeed_config=str(REPO / "examples" / "ds_configs" / "zero2.json"),
        schedule__train_iters=3,
        eval={"eval_interval": 0, "eval_iters": 0},
        checkpoint={"save": str(run_dir / "ckpt"), "export_hf": str(run_dir / "hf")},
        debug={},
    )
    _run([sys.executable, "-m", "megatron_doremi.train", "--config", str(cfg)])
    rows = _metrics(run_dir)
    assert len(rows) == 3 and all(np.isfinite(r["loss"]) for r in rows)
    assert (run_dir / "ckpt" / "latest").read_text() == "global_step3"
    model = AutoModelForCausalLM.from_pretrained(run_dir / "hf")
    assert model.config.vocab_size == 384 and not (run_dir / "eval_summary.json").exists()


def test_sigkill_and_resume_reproduce_the_uninterrupted_losses(reference, data, tmp_path):
    run_dir = tmp_path / "killed"
    cfg = _config(data, run_dir, debug={"dump_samples": False, "step_sleep_s": 0.7})
    cmd = _deepspeed("megatron_doremi.train", "--config", str(cfg))
    metrics = run_dir / "metrics.jsonl"
    sigkill_when(cmd, lambda: metrics.exists() and len(_metrics(run_dir)) >= 5, 180, cwd=REPO)
    latest = (run_dir / "ckpt" / "latest").read_text()
    assert latest in ("global_step4", "global_step6"), latest
    assert len(_metrics(run_dir)) < STEPS
    cfg = _config(data, run_dir, debug={"dump_samples": False})
    out = _run(_deepspeed("megatron_doremi.train", "--config", str(cfg)))
    assert f"({STEPS - int(latest.removeprefix('global_step'))} this run)" in out.stdout
    resumed, ref = _metrics(run_dir), _metrics(reference)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in ref]  # bit-identical
    assert [r["lr"] for r in resumed] == [r["lr"] for r in ref]


def test_two_torchrun_nodes_on_localhost_match_the_deepspeed_launch(reference, data, tmp_path):
    run_dir = tmp_path / "nodes"
    cfg = _config(data, run_dir, checkpoint={}, debug={}, eval={"eval_interval": 0, "eval_iters": 1})
    port = free_port()
    procs = [
        subprocess.Popen(
            [
                "torchrun",
                "--nnodes",
                "2",
                "--node_rank",
                str(node),
                "--nproc_per_node",
                "1",
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(port),
                "-m",
                "megatron_doremi.train",
                "--config",
                str(cfg),
            ],
            cwd=REPO,
            env=launch_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for node in (0, 1)
    ]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert "world size 2" in outs[0]
    ref = _metrics(reference)
    assert [r["loss"] for r in _metrics(run_dir)] == pytest.approx([r["loss"] for r in ref], rel=1e-6)


def test_standalone_evaluate_and_hf_export(reference, data, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_doremi.data.loader import build_domain_datasets
    from megatron_doremi.data.mixture import Mixture

    cfg = reference.parent / "ref.json"
    out_json, logits_file = tmp_path / "eval.json", tmp_path / "logits.pt"
    port = str(free_port())
    _run(["torchrun", "--nproc_per_node", "2", "--master_port", port, "-m", "megatron_doremi.evaluate",
          "--config", str(cfg), "--checkpoint", str(reference / "ckpt"), "--output", str(out_json),
          "--dump-logits", str(logits_file)])  # fmt: skip
    standalone = json.loads(out_json.read_text())
    trained = json.loads((reference / "eval_summary.json").read_text())
    assert standalone["step"] == 8
    for name, d in trained["domains"].items():
        assert standalone["domains"][name]["loss"] == pytest.approx(d["loss"], rel=1e-6)
        assert standalone["domains"][name]["tokens"] == d["tokens"]
        assert d["bytes"] > 0 and standalone["domains"][name]["bytes"] == d["bytes"]
        assert d["bpb"] == pytest.approx(d["loss"] * d["tokens"] / (math.log(2) * d["bytes"]))

    # eval_iters "all": every validation sample once per domain, the same on 2 ranks and on 1 (the HF export)
    all2, all1 = tmp_path / "all2.json", tmp_path / "all1.json"
    _run(["torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()), "-m",
          "megatron_doremi.evaluate", "--config", str(cfg), "--checkpoint", str(reference / "ckpt"),
          "--eval-iters", "all", "--output", str(all2)])  # fmt: skip
    _run([sys.executable, "-m", "megatron_doremi.evaluate", "--config", str(cfg), "--checkpoint",
          str(reference / "hf"), "--eval-iters", "all", "--output", str(all1)])  # fmt: skip
    two, one = json.loads(all2.read_text()), json.loads(all1.read_text())
    for name, d in two["domains"].items():
        assert d["samples"] == d["split_samples"] and d["tokens"] == d["samples"] * 64
        assert (one["domains"][name]["tokens"], one["domains"][name]["bytes"]) == (d["tokens"], d["bytes"])
        assert one["domains"][name]["loss"] == pytest.approx(d["loss"], rel=1e-5)
    total = sum(d["tokens"] for d in two["domains"].values())
    assert two["token_weighted"]["weights"] == {
        n: pytest.approx(d["tokens"] / total) for n, d in two["domains"].items()
    }

    # the HF export evaluates the same (loaded into ZeRO-3 partitions by the trainer, one process)
    hf_json = tmp_path / "eval_hf.json"
    _run([sys.executable, "-m", "megatron_doremi.evaluate", "--config", str(cfg), "--checkpoint",
          str(reference / "hf"), "--output", str(hf_json)])  # fmt: skip
    from_hf = json.loads(hf_json.read_text())
    for name, d in trained["domains"].items():
        assert from_hf["domains"][name]["loss"] == pytest.approx(d["loss"], rel=1e-5)

    # the HF export loads with from_pretrained and gives the ZeRO-3 engine's logits
    hf = AutoModelForCausalLM.from_pretrained(reference / "hf").eval()
    assert AutoTokenizer.from_pretrained(reference / "hf").vocab_size == 384
    dumped = torch.load(logits_file)
    with torch.no_grad():
        assert sorted(dumped) == sorted(trained["domains"])
        for rec in dumped.values():
            torch.testing.assert_close(hf(rec["input_ids"]).logits, rec["logits"], rtol=1e-4, atol=1e-4)

    # per-domain eval numbers match a direct computation with the exported model
    mixture = Mixture.from_json(data / "mixture.json")
    valid = build_domain_datasets(mixture, 64, "80,10,10", seed=1234)["valid"]
    with torch.no_grad():
        for name, ds in zip(mixture.names, valid):
            n = min(16, len(ds))
            samples = torch.from_numpy(ds.get_batch(np.arange(n), out_dtype=np.int64))
            logits = hf(samples[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 384), samples[:, 1:].reshape(-1))
            assert trained["domains"][name]["loss"] == pytest.approx(float(loss), rel=1e-4)
            assert trained["domains"][name]["tokens"] == n * 64
