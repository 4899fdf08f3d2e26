"""In-process pieces of the trainer: LR schedule, mixers, evaluation, launch env, apex detection, logs, latest."""

from __future__ import annotations

import json
import math
import os
import sys
import types

import numpy as np
import pytest
import torch

from megatron_doremi.data.loader import build_domain_datasets
from megatron_doremi.data.mixture import Mixture
from megatron_doremi.mixers.base import MixerError
from megatron_doremi.mixers.static import StaticMixer
from megatron_doremi.training.checkpoint import (
    CheckpointError,
    atomic_write_text,
    read_latest,
    resolve_checkpoint,
)
from megatron_doremi.training.dist import expand_nodelist, setup_env
from megatron_doremi.training.evaluation import evaluate_domains, summarize_eval
from megatron_doremi.training.lr_schedule import lr_at, make_lr_scheduler
from megatron_doremi.training.metrics import JsonlLog, format_eval_table
from megatron_doremi.training.mixer_factory import build_mixer
from megatron_doremi.training.model import detect_apex, param_groups
from tests.conftest import random_documents


def test_lr_schedule_warmup_cosine_linear_constant():
    f = lambda s, style="cosine": lr_at(s, 1.0, 0.1, 4, 14, style)  # noqa: E731
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0) and f(9) == pytest.approx(0.55) and f(14) == pytest.approx(0.1)
    assert f(100) == pytest.approx(0.1)
    assert f(9, "linear") == pytest.approx(0.55) and f(6, "linear") == pytest.approx(1.0 - 0.9 * 0.2)
    assert f(6, "cosine") == pytest.approx(0.1 + 0.9 * 0.5 * (math.cos(math.pi * 0.2) + 1))
    assert f(10, "constant") == 1.0
    assert all(f(s) >= f(s + 1) for s in range(4, 20))


def test_lr_scheduler_is_resumable_through_state_dict():
    sched_cfg = {
        "lr": 0.5,
        "min_lr": 0.05,
        "warmup_iters": 2,
        "lr_decay_iters": 10,
        "lr_decay_style": "cosine",
    }
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.5)
    sched = make_lr_scheduler(sched_cfg)(opt)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    sched2 = make_lr_scheduler(sched_cfg)(opt2)
    sched2.load_state_dict(state)
    for g in opt2.param_groups:
        g["lr"] = lr_at(6, 0.5, 0.05, 2, 10, "cosine")
    assert lrs == pytest.approx([lr_at(s, 0.5, 0.05, 2, 10, "cosine") for s in range(6)])
    sched.step()
    sched2.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(opt2.param_groups[0]["lr"])


def test_static_mixer_contract_and_state():
    m = StaticMixer(["a", "b", "c"], [1, 1, 2])
    assert m.sampling_weights().tolist() == [0.25, 0.25, 0.5] and m.sampling_weights().dtype == np.float64
    assert m.loss_multipliers().tolist() == [1.0, 1.0, 1.0]
    stats = {k: np.ones(3) for k in ("loss_sum", "excess_sum", "token_count")}
    assert m.observe(1, stats) is False
    state = json.loads(json.dumps(m.state_dict()))
    m2 = StaticMixer(["a", "b", "c"], [1, 1, 1])
    m2.load_state_dict(state)
    assert m2.sampling_weights().tolist() == [0.25, 0.25, 0.5]
    with pytest.raises(MixerError, match="domains"):
        StaticMixer(["a", "b"], [1, 1]).load_state_dict(state)
    for bad in ([1, 2], [1, -1, 1], [0, 0, 0], [1, float("nan"), 1]):
        with pytest.raises(MixerError, match="mixer weights"):
            StaticMixer(["a", "b", "c"], bad)


def test_mixer_factory(make_shard):
    rng = np.random.default_rng(0)
    doms = {n: {"prefixes": [make_shard(n, random_documents(rng, 3, 10, 20))], "weight": w}
            for n, w in (("x", 1), ("y", 3))}  # fmt: skip
    mix = Mixture.from_dict({"domains": doms})
    assert build_mixer({"type": "static"}, mix).sampling_weights().tolist() == [0.25, 0.75]
    assert build_mixer({"type": "static", "weights": {"x": 1, "y": 1}}, mix).sampling_weights().tolist() == [
        0.5,
        0.5,
    ]
    assert build_mixer({"weights": [3, 1]}, mix).sampling_weights().tolist() == [0.75, 0.25]
    with pytest.raises(MixerError, match="mixer.type 'doremi2' is not known"):
        build_mixer({"type": "doremi2"}, mix)
    with pytest.raises(MixerError, match="mixer: unknown key"):
        build_mixer({"type": "static", "eta": 1}, mix)
    with pytest.raises(MixerError, match="mixer.weights"):
        build_mixer({"type": "static", "weights": {"x": 1}}, mix)


def test_summarize_eval_averages_and_worst():
    out = summarize_eval(["a", "b", "c"], np.array([10.0, 40.0, 0.0]), np.array([10.0, 20.0, 0.0]))
    assert out["domains"]["a"] == {"loss": 1.0, "ppl": math.e, "bpb": None, "tokens": 10, "bytes": None}
    assert out["domains"]["c"]["loss"] is None
    assert out["token_weighted"]["loss"] == pytest.approx(50 / 30)
    assert out["uniform"]["loss"] == pytest.approx(1.5)
    assert out["worst"] == {"domain": "b", "loss": 2.0, "ppl": math.exp(2.0), "bpb": None}
    assert "worst (b)" in format_eval_table(out)


def test_evaluate_domains_matches_direct_computation_and_pads_ranks(make_shard):
    rng = np.random.default_rng(1)
    doms = {n: {"prefixes": [make_shard(n, random_documents(rng, 40, 20, 60, vocab=50))], "weight": 1}
            for n in ("p", "q", "r")}  # fmt: skip
    mix = Mixture.from_dict({"domains": doms})
    valid = build_domain_datasets(mix, 8, "60,40,0", seed=3)["valid"]
    table = torch.randn(50, 50, generator=torch.Generator().manual_seed(0))
    calls = []

    def forward(input_ids):
        calls.append(input_ids.shape[0])
        return table[input_ids]

    single = evaluate_domains(forward, valid, mix.names, 13, 4, 0, 1, torch.device("cpu"))
    # direct: the first 13 samples of each domain, token loss by log_softmax
    for d, ds in enumerate(valid):
        samples = torch.from_numpy(ds.get_batch(np.arange(13), out_dtype=np.int64))
        logp = torch.log_softmax(table[samples[:, :-1]].double(), -1)
        nll = -logp.gather(-1, samples[:, 1:].unsqueeze(-1)).mean()
        assert single["domains"][mix.names[d]]["loss"] == pytest.approx(float(nll), rel=1e-6)
        assert single["domains"][mix.names[d]]["tokens"] == 13 * 8
    # two simulated ranks, 9 samples = 3 micro-batches per domain: rank 0 scores micro-batches 0 and 2, rank 1
    # scores micro-batch 1 and runs one padding forward, so both run the same number of (ZeRO-3 collective) forwards.
    per_rank = []
    for rank in (0, 1):
        calls.clear()
        per_rank.append(evaluate_domains(forward, valid, mix.names, 9, 4, rank, 2, torch.device("cpu")))
        assert len(calls) == 3 * 2, calls  # ceil(ceil(9/4)/2) = 2 forwards per domain on every rank
    for name in mix.names:
        tokens = sum(r["domains"][name]["tokens"] for r in per_rank)
        assert tokens == 9 * 8


def test_expand_nodelist():
    assert expand_nodelist("gpu[01-03,7],cpu5") == ["gpu01", "gpu02", "gpu03", "gpu7", "cpu5"]
    assert expand_nodelist("n[008-010]-ib") == ["n008-ib", "n009-ib", "n010-ib"]
    assert expand_nodelist("single") == ["single"]


def test_setup_env_maps_slurm_and_keeps_launcher_vars():
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "node[3-6]"}
    d = setup_env(env)
    assert (d.rank, d.local_rank, d.world_size, d.launcher) == (5, 1, 8, "srun")
    assert env["RANK"] == "5" and env["WORLD_SIZE"] == "8" and env["MASTER_ADDR"] == "node3"
    env = {
        "RANK": "2",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "h",
        "SLURM_PROCID": "9",
        "SLURM_NTASKS": "1",
    }
    d = setup_env(env)
    assert (d.rank, d.world_size, d.launcher) == (2, 4, "torchrun/deepspeed")
    env = {}
    d = setup_env(env)
    assert (d.rank, d.world_size) == (0, 1) and int(env["MASTER_PORT"]) > 0


def test_apex_detection_rejects_the_pypi_apex(monkeypatch):
    import importlib.util

    real_find = importlib.util.find_spec
    fake = types.ModuleType("apex")  # the PyPI "apex" has no apex.normalization
    fake.__path__ = []  # a package
    monkeypatch.setitem(sys.modules, "apex", fake)
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: object() if n == "apex" else real_find(n, *a)
    )
    status = detect_apex()
    assert not status.available and "not NVIDIA apex" in status.reason
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "apex" else real_find(n, *a))
    assert detect_apex().reason == "apex is not installed"


def test_param_groups_exclude_norms_from_weight_decay():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    model = AutoModelForCausalLM.from_config(cfg)
    decay, no_decay = param_groups(model)
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3  # 2 per layer + final norm


def test_jsonl_truncate_after_resume(tmp_path):
    log = JsonlLog(str(tmp_path / "m.jsonl"))
    for s in range(1, 6):
        log.write({"step": s})
    with open(log.path, "a") as fh:
        fh.write('{"step": 6, "lo')  # cut by a kill
    log.truncate_after(3)
    log.write({"step": 4, "again": True})
    assert [json.loads(x) for x in open(log.path)] == [
        {"step": 1},
        {"step": 2},
        {"step": 3},
        {"step": 4, "again": True},
    ]


def test_latest_and_resolve_checkpoint(tmp_path):
    assert read_latest(str(tmp_path)) is None
    (tmp_path / "global_step4").mkdir()
    atomic_write_text(str(tmp_path / "latest"), "global_step4")
    assert [p for p in os.listdir(tmp_path) if ".tmp" in p] == []
    assert resolve_checkpoint(str(tmp_path)) == (str(tmp_path), "global_step4")
    assert resolve_checkpoint(str(tmp_path / "global_step4")) == (str(tmp_path), "global_step4")
    atomic_write_text(str(tmp_path / "latest"), "global_step9")
    with pytest.raises(CheckpointError, match="global_step9"):
        read_latest(str(tmp_path))
    with pytest.raises(CheckpointError, match="neither"):
        resolve_checkpoint(str(tmp_path / "nothing"))
