"""Megatron's eod_mask_loss / reset_position_ids / reset_attention_mask: values, the model path, unchanged default."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_doremi.data.blending import BlendSchedule
from megatron_doremi.data.loader import (
    BatchOptions,
    MixtureDataLoader,
    build_domain_datasets,
    iter_eval_batches,
    model_inputs,
    samples_to_batch,
)
from megatron_doremi.data.mixture import Mixture
from megatron_doremi.data.sequences import DataError
from megatron_doremi.ops.domain_loss import domain_cross_entropy, domain_token_counts
from tests.conftest import write_shard

EOD = 0


def megatron_masks(
    tokens: np.ndarray, reset_position_ids: bool, reset_attention_mask: bool, eod_mask_loss: bool
):
    """_get_ltor_masks_and_position_ids for one sample, as documented (loop over the EOD positions)."""
    n = len(tokens)
    attend = np.tril(np.ones((n, n), dtype=bool))
    loss_mask = np.ones(n)
    if eod_mask_loss:
        loss_mask[tokens == EOD] = 0.0
    positions = np.arange(n)
    prev = 0
    for i in np.flatnonzero(tokens == EOD):
        if reset_attention_mask:
            attend[i + 1 :, : i + 1] = False
        if reset_position_ids:
            positions[i + 1 :] -= i + 1 - prev
            prev = i + 1
    return attend, loss_mask, positions


@pytest.fixture
def samples():
    rng = np.random.default_rng(3)
    out = rng.integers(1, 50, size=(6, 33))
    out[out < 8] = EOD  # several EODs per sample
    out[0, 0] = out[0, 1] = EOD  # EOD first and twice in a row
    out[1, :] = 7  # no EOD at all
    return out


@pytest.mark.parametrize("flags", [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 1), (0, 1, 1)])
def test_flags_match_megatrons_masks(samples, flags):
    eod_mask_loss, reset_pos, reset_attn = map(bool, flags)
    opts = BatchOptions(eod_mask_loss, reset_pos, reset_attn, eod_token_id=EOD)
    batch = samples_to_batch(samples, np.zeros(len(samples)), opts)
    plain = samples_to_batch(samples, np.zeros(len(samples)))
    assert torch.equal(batch["input_ids"], plain["input_ids"])
    for r, row in enumerate(samples):
        attend, loss_mask, positions = megatron_masks(row[:-1], reset_pos, reset_attn, eod_mask_loss)
        labels = batch["labels"][r].numpy()
        np.testing.assert_array_equal(labels == -100, loss_mask == 0)
        np.testing.assert_array_equal(labels[loss_mask == 1], row[1:][loss_mask == 1])
        if reset_pos:
            np.testing.assert_array_equal(batch["position_ids"][r].numpy(), positions)
        else:
            assert "position_ids" not in batch
        if reset_attn and not reset_pos:
            np.testing.assert_array_equal(batch["attention_mask"][r, 0].numpy(), attend)
        if reset_pos and not reset_attn:
            assert torch.equal(batch["attention_mask"], torch.ones(samples.shape[0], 32, dtype=torch.int64))
    assert set(model_inputs(batch)) == {"position_ids", "attention_mask"} & set(batch)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def test_document_masking_reaches_the_hf_model(samples):
    model = _tiny_llama()
    both = samples_to_batch(samples, np.zeros(len(samples)), BatchOptions(False, True, True, EOD))
    with torch.no_grad():
        got = model(input_ids=both["input_ids"], use_cache=False, **model_inputs(both)).logits
        # reference: every document of a sample run on its own, positions from 0
        for r, row in enumerate(samples[:, :-1]):
            starts = [0, *(np.flatnonzero(row == EOD) + 1)]
            for a, b in zip(starts, [*starts[1:], len(row)]):
                if a == b:
                    continue
                alone = model(input_ids=torch.from_numpy(row[a:b])[None], use_cache=False).logits[0]
                torch.testing.assert_close(got[r, a:b], alone, rtol=1e-4, atol=1e-4)
        only_mask = samples_to_batch(samples, np.zeros(len(samples)), BatchOptions(False, False, True, EOD))
        masked = model(input_ids=only_mask["input_ids"], use_cache=False, **model_inputs(only_mask)).logits
        plain = model(input_ids=only_mask["input_ids"], use_cache=False).logits
        # sample 1 has no EOD: the document mask is the causal mask there, and differs where EODs are
        torch.testing.assert_close(masked[1], plain[1], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(masked[2], plain[2], atol=1e-3)


def test_eod_mask_loss_drops_the_tokens_from_loss_and_counts(samples):
    batch = samples_to_batch(
        samples, np.arange(len(samples)) % 2, BatchOptions(eod_mask_loss=True, eod_token_id=EOD)
    )
    plain = samples_to_batch(samples, np.arange(len(samples)) % 2)
    logits = torch.randn(len(samples), 32, 64, generator=torch.Generator().manual_seed(0))
    masked = domain_cross_entropy(logits, batch["labels"], batch["domain_id"], 2)
    full = domain_cross_entropy(logits, plain["labels"], plain["domain_id"], 2)
    dropped = torch.from_numpy(samples[:, :-1] == EOD)
    assert float(domain_token_counts(batch["labels"], batch["domain_id"], 2).sum()) == 32 * len(
        samples
    ) - int(dropped.sum())
    per_token = full.token_loss.clone()
    per_token[dropped] = 0
    torch.testing.assert_close(masked.domain_loss_sum.sum(), per_token.sum().double(), rtol=1e-6, atol=1e-6)


def test_defaults_leave_the_batches_and_the_model_call_unchanged(samples, tmp_path):
    ids = np.arange(len(samples)) % 3
    off = samples_to_batch(samples, ids, BatchOptions())
    plain = samples_to_batch(samples, ids)
    assert set(off) == set(plain) == {"input_ids", "labels", "domain_id"}
    assert all(torch.equal(off[k], plain[k]) for k in plain)
    assert model_inputs(off) == {}
    model = _tiny_llama()
    with torch.no_grad():
        a = model(input_ids=off["input_ids"], use_cache=False, **model_inputs(off)).logits
        b = model(input_ids=plain["input_ids"], use_cache=False).logits
    assert torch.equal(a, b)
    # the loader with the default options gives the plain batches of its samples
    rng = np.random.default_rng(0)
    prefix = write_shard(
        str(tmp_path / "x_text_document"), [rng.integers(1, 60, size=40) for _ in range(200)]
    )
    mix = Mixture.from_data_path(f"1 {prefix}")
    for opts in (None, BatchOptions()):
        data = build_domain_datasets(mix, 16, "90,5,5", batch_options=opts)
        loader = MixtureDataLoader(data["train"], BlendSchedule([(0, [1.0])]), 8, 4)
        first, domains = loader.read_samples(0, 8)
        batches = loader.next_batch()
        expected = samples_to_batch(first[:4], domains[:4])
        assert set(batches[0]) == set(expected) and all(
            torch.equal(batches[0][k], expected[k]) for k in expected
        )
        assert set(next(iter_eval_batches(data["valid"][0], 4, 4))) == {"input_ids", "labels", "domain_id"}


def test_flags_without_an_eod_id_are_an_error():
    with pytest.raises(DataError, match="eod_token_id"):
        BatchOptions(reset_position_ids=True)


def test_config_resolves_the_eod_id_or_names_the_keys(tmp_path):
    from megatron_doremi.data.tokenizer import train_bpe_tokenizer
    from megatron_doremi.training.config import ConfigError, load_run_config

    rng = np.random.default_rng(0)
    prefix = write_shard(
        str(tmp_path / "x_text_document"), [rng.integers(1, 60, size=40) for _ in range(200)]
    )
    base = {"model": {"model_type": "llama", "vocab_size": 300}, "data": {"mixture": f"1 {prefix}", "split": "90,5,5"},
            "schedule": {"seq_length": 16, "micro_batch_size": 1, "global_batch_size": 1, "train_iters": 1, "lr": 1e-3},
            "deepspeed_config": {"train_batch_size": 1}}  # fmt: skip
    with pytest.raises(
        ConfigError, match="eod_mask_loss/reset_position_ids/reset_attention_mask need the EOD"
    ):
        load_run_config(None, ["data.eod_mask_loss=true"], base=base)
    cfg = load_run_config(None, ["data.reset_position_ids=true", "data.eod_token_id=5"], base=base)
    assert cfg.data["eod_token_id"] == 5
    train_bpe_tokenizer(["hello world"] * 20, 300, tmp_path / "tok")
    cfg = load_run_config(None, ["data.eod_mask_loss=true", f"tokenizer={tmp_path / 'tok'}"], base=base)
    assert cfg.data["eod_token_id"] == 0  # <|endoftext|>
    with pytest.raises(ConfigError, match="data.packing must be one of"):
        load_run_config(None, ["data.packing=fast"], base=base)
    with pytest.raises(ConfigError, match="need data.train_path"):
        load_run_config(None, [f"data.valid_path=1 {prefix}"], base=base)
    per_split = load_run_config(
        None, [f"data.train_path=1 {prefix}", f"data.valid_path={prefix}", "data.mixture=null"], base=base
    )
    assert per_split.data["mixture"] == f"1 {prefix}"


def test_training_with_megatron_packing_exact_blend_and_document_flags(tmp_path_factory, tmp_path):
    """One ZeRO-2 process: the flags reach the train step and the evaluation forward (the tokenizer's EOD)."""
    import json
    import sys

    from tests.test_train import REPO, _config, _metrics, _run
    from tests.test_train import data as data_fixture

    data = data_fixture.__wrapped__(tmp_path_factory)
    run_dir = tmp_path / "flags"
    flags = {"eod_mask_loss": True, "reset_position_ids": True, "reset_attention_mask": True}
    cfg = _config(
        data,
        run_dir,
        data__packing="megatron",
        data__blend_mode="exact",
        **{f"data__{k}": v for k, v in flags.items()},
        deepspeed_config=str(REPO / "examples" / "ds_configs" / "zero2.json"),
        schedule__train_iters=3,
        eval={"eval_interval": 0, "eval_iters": 1},
        checkpoint={},
        debug={},
    )
    _run([sys.executable, "-m", "megatron_doremi.train", "--config", str(cfg)])
    rows = _metrics(run_dir)
    assert len(rows) == 3 and all(np.isfinite(r["loss"]) for r in rows)
    summary = json.loads((run_dir / "eval_summary.json").read_text())
    assert np.isfinite(summary["token_weighted"]["loss"])
