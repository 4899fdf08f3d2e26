"""Run config + DeepSpeed config validation: every error names its key; overrides; the shipped configs."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest

from megatron_doremi.training.config import ConfigError, apply_overrides, load_run_config, parse_override
from megatron_doremi.training.ds_config import resolve_deepspeed_config, zero_stage
from tests.conftest import write_shard

REPO = Path(__file__).resolve().parent.parent
DS_CONFIGS = REPO / "examples" / "ds_configs"
MODELS = REPO / "examples" / "models"
TINY = {"model_type": "llama", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 2}  # fmt: skip


@pytest.fixture
def env(tmp_path):
    """A minimal valid run: two one-document-each shards, a mixture file and a DeepSpeed config."""
    rng = np.random.default_rng(0)
    domains = {}
    for name in ("alpha", "beta"):
        prefix = write_shard(
            str(tmp_path / f"{name}_text_document"), [rng.integers(0, 64, 300) for _ in range(4)]
        )
        domains[name] = {"prefixes": [prefix], "weight": 1}
    (tmp_path / "mixture.json").write_text(json.dumps({"domains": domains}))
    base = {
        "model": TINY,
        "data": {"mixture": str(tmp_path / "mixture.json")},
        "schedule": {
            "seq_length": 16,
            "micro_batch_size": 2,
            "global_batch_size": 8,
            "train_iters": 4,
            "lr": 1e-3,
        },
        "deepspeed_config": str(DS_CONFIGS / "zero3.json"),
        "output_dir": str(tmp_path / "run"),
    }
    return tmp_path, base


def _write(tmp_path: Path, cfg: dict, name: str = "run.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(cfg, indent=1))
    return str(path)


def _error(tmp_path, cfg, overrides=()):
    with pytest.raises(ConfigError) as info:
        load_run_config(_write(tmp_path, cfg), overrides)
    return str(info.value)


def test_valid_config_defaults_and_resolved_deepspeed(env):
    tmp_path, base = env
    cfg = load_run_config(_write(tmp_path, base))
    assert cfg.schedule["lr_decay_iters"] == 4 and cfg.schedule["lr_decay_style"] == "cosine"
    assert cfg.mixer == {"type": "static"} and cfg.data["split"] == "969,30,1"
    ds = resolve_deepspeed_config(cfg, world_size=2, on_gpu=False, hidden_size=16)
    assert ds["train_batch_size"] == 8 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["optimizer"]["params"]["lr"] == 1e-3 and ds["optimizer"]["params"]["torch_adam"] is True
    assert ds["bf16"]["enabled"] is False and zero_stage(ds) == 3
    assert ds["zero_optimization"]["reduce_bucket_size"] == 256
    gpu = resolve_deepspeed_config(cfg, world_size=4, on_gpu=True, hidden_size=16)
    assert gpu["bf16"]["enabled"] is True and "torch_adam" not in gpu["optimizer"]["params"]
    assert gpu["gradient_accumulation_steps"] == 1


@pytest.mark.parametrize("name", ["zero3.json", "zero3_offload.json", "zero2.json"])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_shipped_deepspeed_configs_resolve(env, name, world):
    tmp_path, base = env
    cfg = load_run_config(_write(tmp_path, {**base, "deepspeed_config": str(DS_CONFIGS / name)}))
    ds = resolve_deepspeed_config(cfg, world, on_gpu=True, hidden_size=64)
    assert (
        ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world
        == ds["train_batch_size"]
    )
    assert zero_stage(ds) == (2 if name == "zero2.json" else 3)
    assert "auto" not in json.dumps(ds)


def test_model_json_is_inlined_and_overridable(env):
    tmp_path, base = env
    cfg = load_run_config(
        _write(tmp_path, {**base, "model": str(MODELS / "tiny.json")}),
        ["model.num_hidden_layers=3", "schedule.lr=5e-4", "mixer.weights=[1, 3]", 'description="x y"'],
    )
    assert cfg.model["num_hidden_layers"] == 3 and cfg.model["hidden_size"] == 64
    assert cfg.schedule["lr"] == 5e-4 and cfg.mixer["weights"] == [1, 3] and cfg.description == "x y"


def test_shipped_model_configs_have_the_advertised_sizes():
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_doremi.training.model import hf_config

    expected = {"tiny": (0.5e6, 2e6), "125m": (110e6, 140e6), "350m": (320e6, 380e6), "1b": (0.9e9, 1.3e9),
                "8b": (7.5e9, 8.5e9)}  # fmt: skip
    for name, (lo, hi) in expected.items():
        spec = json.loads((MODELS / f"{name}.json").read_text())
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config(spec))
        n = sum(p.numel() for p in model.parameters())
        assert lo <= n <= hi, (name, n)


def test_parse_override_values():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=1e-4") == (["a"], 1e-4)
    assert parse_override("a=null") == (["a"], None)
    assert parse_override("a=hello world") == (["a"], "hello world")
    assert parse_override('a={"x": [1]}') == (["a"], {"x": [1]})
    out = apply_overrides({"a": {"b": 1}}, ["a.c=2", "new.deep.key=true"])
    assert out == {"a": {"b": 1, "c": 2}, "new": {"deep": {"key": True}}}
    for bad in ("novalue", "a..b=1", "=3"):
        with pytest.raises(ConfigError, match="--set"):
            parse_override(bad)
    with pytest.raises(ConfigError, match="a.b is a int"):
        apply_overrides({"a": {"b": 1}}, ["a.b.c=1"])


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda c: c.update(shedule={}), r"unknown key 'shedule' \(did you mean 'schedule'\?\)"),
        (lambda c: c["schedule"].update(lr_decay_stlye="cosine"), "schedule.lr_decay_stlye.*lr_decay_style"),
        (lambda c: c["schedule"].pop("lr"), "schedule.lr is required"),
        (lambda c: c["schedule"].pop("train_iters"), "schedule.train_iters is required"),
        (lambda c: c["schedule"].update(seq_length=0), "schedule.seq_length must be >= 1"),
        (
            lambda c: c["schedule"].update(micro_batch_size="2"),
            "schedule.micro_batch_size must be an integer",
        ),
        (lambda c: c["schedule"].update(global_batch_size=7), "global_batch_size \\(7\\) must be a multiple"),
        (lambda c: c["schedule"].update(min_lr=1.0), "schedule.min_lr .* must be <= schedule.lr"),
        (lambda c: c["schedule"].update(lr_decay_style="exp"), "schedule.lr_decay_style must be one of"),
        (
            lambda c: (
                c["eval"].update(eval_interval=-1) if "eval" in c else c.update(eval={"eval_interval": -1})
            ),
            "eval.eval_interval must be >= 0",
        ),
        (
            lambda c: c.update(checkpoint={"save_interval": 5}),
            "checkpoint.save_interval is set but checkpoint.save",
        ),
        (lambda c: c.update(checkpoint={"export_hf": "x"}), "checkpoint.export_hf .* set checkpoint.save"),
        (lambda c: c.update(model={"hidden_size": 8}), "model: an HF config dict needs 'model_type'"),
        (
            lambda c: c.update(model="/nonexistent/model"),
            "model: model directory '/nonexistent/model' does not exist",
        ),
        (
            lambda c: c.update(model="/nonexistent/model.json"),
            "model: HF config file '/nonexistent/model.json'",
        ),
        (lambda c: c.pop("model"), "model is required"),
        (lambda c: c["data"].pop("mixture"), "data.mixture is required"),
        (
            lambda c: c["data"].update(mixture="/nonexistent/mix.json"),
            "data.mixture: .*cannot read mixture file",
        ),
        (lambda c: c["data"].update(blend_mode="fast"), "data.blend_mode must be"),
        (
            lambda c: c.update(deepspeed_config="/nonexistent/ds.json"),
            "deepspeed_config: DeepSpeed config file",
        ),
        (
            lambda c: c.update(tokenizer="/nonexistent/tok"),
            "tokenizer: tokenizer '/nonexistent/tok' does not exist",
        ),
        (lambda c: c.update(progress_bar="yes"), "progress_bar must be true or false"),
        (lambda c: c.update(mixer="static"), "mixer must be an object"),
    ],
)
def test_run_config_errors_name_the_key(env, mutate, match):
    tmp_path, base = env
    cfg = copy.deepcopy(base)
    mutate(cfg)
    with pytest.raises(ConfigError, match=match):
        load_run_config(_write(tmp_path, cfg))


def test_missing_shard_file_is_named(env):
    tmp_path, base = env
    os.remove(tmp_path / "beta_text_document.idx")
    msg = _error(tmp_path, base)
    assert "domain 'beta'" in msg and "beta_text_document.idx does not exist" in msg


def test_invalid_json_names_file_and_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "model": {,\n}')
    with pytest.raises(ConfigError, match=r"bad\.json:2:"):
        load_run_config(str(path))
    path.write_text('{"seed": 1, "seed": 2}')
    with pytest.raises(ConfigError, match="duplicate key 'seed'"):
        load_run_config(str(path))


ZERO3 = {"zero_optimization": {"stage": 3}}


@pytest.mark.parametrize(
    "ds, world, sched, match",
    [
        (
            ZERO3,
            3,
            {},
            r"global_batch_size \(8\) must equal schedule.micro_batch_size \(2\) x gradient accumulation "
            r"steps x world size \(3\)",
        ),
        (
            {**ZERO3, "train_micro_batch_size_per_gpu": 4},
            2,
            {},
            "train_micro_batch_size_per_gpu = 4 conflicts with schedule.micro_batch_size = 2",
        ),
        ({**ZERO3, "gradient_accumulation_steps": 4}, 2, {}, "gradient_accumulation_steps = 4 conflicts"),
        (
            {**ZERO3, "train_batch_size": 16},
            2,
            {},
            "train_batch_size = 16 conflicts with schedule.global_batch_size",
        ),
        ({"zero_optimization": {"stage": 4}}, 2, {}, "zero_optimization.stage must be 0, 1, 2 or 3"),
        (
            {"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}},
            2,
            {},
            "zero_optimization.offload_param needs stage 3",
        ),
        (
            {"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}},
            2,
            {},
            "offload_optimizer needs stage >= 1",
        ),
        (
            {**ZERO3, "bf16": {"enabled": True}, "fp16": {"enabled": True}},
            2,
            {},
            "bf16.enabled and fp16.enabled",
        ),
        ({**ZERO3, "scheduler": {"type": "WarmupLR"}}, 2, {}, "remove the 'scheduler' section"),
        (
            {**ZERO3, "optimizer": {"type": "AdamW", "params": {"lr": 0.1}}},
            2,
            {},
            "optimizer.params.lr = 0.1 conflicts with schedule.lr",
        ),
        ({**ZERO3, "gradient_clipping": -1}, 2, {}, "gradient_clipping must be a number >= 0"),
        (
            {**ZERO3, "zero_optimization": {"stage": 3, "sub_group_size": "auto"}},
            2,
            {},
            r"deepspeed_config.zero_optimization.sub_group_size is \"auto\"",
        ),
    ],
)
def test_deepspeed_config_errors_name_the_key(env, ds, world, sched, match):
    tmp_path, base = env
    cfg = copy.deepcopy(base)
    cfg["deepspeed_config"] = ds
    cfg["schedule"].update(sched)
    run = load_run_config(_write(tmp_path, cfg))
    with pytest.raises(ConfigError, match=match):
        resolve_deepspeed_config(run, world, False, hidden_size=16)


def test_train_cli_reports_config_errors_before_launch(env, capsys, monkeypatch):
    from megatron_doremi import train

    monkeypatch.setattr(
        os, "environ", os.environ.copy()
    )  # the CLI fills RANK/WORLD_SIZE for a single process
    tmp_path, base = env
    cfg = copy.deepcopy(base)
    cfg["schedule"]["global_batch_size"] = 6
    cfg["schedule"]["micro_batch_size"] = 4
    assert train.main(["--config", _write(tmp_path, cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "schedule.global_batch_size (6)" in err
    assert train.main(["--config", _write(tmp_path, base), "--set", "schedule.lr=abc"]) == 2
    assert "schedule.lr must be a number" in capsys.readouterr().err
    # the batch identity is checked against the launch's world size before any process group exists
    os.environ.update(RANK="0", WORLD_SIZE="3", LOCAL_RANK="0")
    assert train.main(["--config", _write(tmp_path, base)]) == 2
    assert "x world size (3)" in capsys.readouterr().err
