"""Compute accounting of a run: train_flops = model forward+backward (+ a DoReMi reference's forward)."""

from __future__ import annotations

import pytest

from megatron_doremi.training.flops import run_flops

CFG = {"vocab_size": 100, "hidden_size": 8, "num_hidden_layers": 2, "tie_word_embeddings": False}


def test_run_flops_is_6n_plus_attention_and_2n_for_the_reference():
    n, tokens, seq = 10_000, 4_096, 16
    p = n - 100 * 8  # the untied input embedding is a gather, not a matmul
    attn = 2 * 2 * seq * 8  # 2 · layers · seq_length · hidden per token, forward
    out = run_flops(n, CFG, seq, tokens)
    assert out["model_flops"] == pytest.approx(tokens * 3 * (2 * p + attn))
    assert out["reference_flops"] == 0 and out["train_flops"] == out["model_flops"]
    assert out["train_tokens"] == tokens
    proxy = run_flops(n, CFG, seq, tokens, reference=(n, CFG))
    assert proxy["reference_flops"] == pytest.approx(tokens * (2 * p + attn))  # forward only
    assert proxy["train_flops"] == pytest.approx(4 / 3 * out["model_flops"])
