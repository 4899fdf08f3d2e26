"""The trainer's lm_head + loss (training/lm_head_loss.py): fused lm_head == logits path, in place is safe.

The unit tests run a tiny HF Llama in one process; the slow test runs the real trainer on 2 gloo ranks with
ZeRO-3 with and without ``fused_lm_head`` and compares the losses.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from megatron_doremi.training.lm_head_loss import (
    domain_loss,
    enable_fused_lm_head,
    is_fused,
    logits_from_output,
)
from tests.test_train import STEPS, _config, _deepspeed, _metrics, _run, data  # noqa: F401, F811 (data: fixture)


def _tiny_llama(tie: bool = False):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=257,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 257, (3, 16), generator=g)
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    return ids, labels, torch.tensor([0, 2, 0]), torch.rand(3, 16, generator=g) * 5


@pytest.mark.parametrize("tie", [False, True])
def test_fused_lm_head_matches_the_logits_path(tie):
    plain = _tiny_llama(tie)
    fused = copy.deepcopy(plain)
    assert enable_fused_lm_head(fused) and is_fused(fused) and not is_fused(plain)
    ids, labels, dom, ref = _batch()
    scale = torch.tensor([0.5, 1.0, 2.0])
    kw = dict(ref_token_loss=ref, loss_scale_per_domain=scale, normalizer=40.0)
    a = domain_loss(plain, plain(input_ids=ids).logits, labels, dom, 3, **kw)
    b = domain_loss(fused, fused(input_ids=ids).logits, labels, dom, 3, **kw)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    a.loss.backward()
    b.loss.backward()
    grads_a = dict(plain.named_parameters())
    for name, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, grads_a[name].grad, rtol=1e-5, atol=1e-6, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(
            logits_from_output(fused, fused(input_ids=ids).logits),
            plain(input_ids=ids).logits,
            rtol=1e-5,
            atol=1e-5,
        )


def test_logits_path_backward_is_in_place_and_exact():
    """The lm_head's backward needs only its input and weight: the in-place op gives autograd's gradients."""
    from megatron_doremi.ops.fused_domain_loss import domain_cross_entropy_reference

    model = _tiny_llama()
    ref_model = copy.deepcopy(model)
    ids, labels, dom, ref = _batch()
    logits = model(input_ids=ids).logits
    ptr = logits.data_ptr()
    seen = {}
    logits.register_hook(lambda g: seen.update(ptr=g.data_ptr()))
    domain_loss(model, logits, labels, dom, 3, ref_token_loss=ref).loss.backward()
    assert seen["ptr"] == ptr  # the gradient was written into the logits' own buffer
    domain_cross_entropy_reference(ref_model(input_ids=ids).logits, labels, dom, 3, ref).loss.backward()
    grads = dict(ref_model.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-5, atol=1e-6, msg=name)


def test_models_with_post_logit_transforms_keep_the_logits_path(caplog):
    model = _tiny_llama()
    model.config.final_logit_softcapping = 30.0
    assert not enable_fused_lm_head(model) and not is_fused(model)
    assert "softcapping" in caplog.text


def test_config_key_is_validated():
    from megatron_doremi.training.config import ConfigError, validate_run_config

    raw = {
        "model": {"model_type": "llama"},
        "data": {"mixture": "m.json"},
        "schedule": {
            "seq_length": 8,
            "micro_batch_size": 1,
            "global_batch_size": 1,
            "train_iters": 1,
            "lr": 0.1,
        },
    }
    for value in (True, False):
        assert validate_run_config({**raw, "fused_lm_head": value}, check_files=False).fused_lm_head is value
    assert validate_run_config(raw, check_files=False).fused_lm_head is False
    with pytest.raises(ConfigError, match="fused_lm_head"):
        validate_run_config({**raw, "fused_lm_head": "yes"}, check_files=False)


@pytest.mark.slow
def test_zero3_two_ranks_fused_lm_head_gives_the_same_losses(data, tmp_path):  # noqa: F811
    """Real DeepSpeed ZeRO-3 on 2 gloo ranks: the gathered lm_head weight's gradient reaches its partitions."""
    losses = {}
    for fused in (False, True):
        run_dir = tmp_path / f"fused_{fused}"
        cfg = _config(data, run_dir, checkpoint={}, fused_lm_head=fused)
        proc = _run(_deepspeed("megatron_doremi.train", "--config", str(cfg)))
        assert ("fused with the per-domain loss" in proc.stdout + proc.stderr) == fused
        losses[fused] = [r["loss"] for r in _metrics(run_dir)]
    assert len(losses[True]) == STEPS
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5, atol=1e-5)
