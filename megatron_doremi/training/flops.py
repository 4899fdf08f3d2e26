"""Model FLOPs of a decoder-only transformer: one formula for MFU (health figures) and compute accounting.

Per token, a dense decoder with ``P`` matmul parameters (every weight matrix, lm_head included, the input
embedding lookup excluded: it is a gather, not a matmul), ``n_layers`` layers of width ``hidden`` and context
``seq_length`` costs ``2 P + 2 n_layers seq_length hidden`` forward FLOPs (the second term: QK^T and AV with the
causal half *not* subtracted, as Megatron-LM and PaLM count it) and three times that for forward + backward.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["flops_per_token", "matmul_params", "run_flops", "training_flops"]


def matmul_params(num_params: int, hf_config: Mapping[str, Any] | None = None) -> int:
    """``num_params`` minus the input embedding (``vocab_size x hidden_size``) when the config says it is untied.

    A tied embedding is the lm_head's weight too, so it stays counted once.
    """
    if not hf_config:
        return int(num_params)
    vocab, hidden = hf_config.get("vocab_size"), hf_config.get("hidden_size")
    if not vocab or not hidden or hf_config.get("tie_word_embeddings", False):
        return int(num_params)
    return int(num_params) - int(vocab) * int(hidden)


def flops_per_token(
    params: int,
    num_layers: int = 0,
    hidden_size: int = 0,
    seq_length: int = 0,
    *,
    backward: bool = True,
) -> float:
    """FLOPs per token: ``(2 P + 2 L T H)`` forward, times 3 with ``backward`` (P = :func:`matmul_params`)."""
    forward = 2.0 * params + 2.0 * num_layers * seq_length * hidden_size
    return 3.0 * forward if backward else forward


def training_flops(
    params: int,
    tokens: int,
    num_layers: int = 0,
    hidden_size: int = 0,
    seq_length: int = 0,
    *,
    backward: bool = True,
) -> float:
    """Total FLOPs of ``tokens`` tokens (6·P·tokens plus attention; 2·P·tokens forward-only for a reference)."""
    return float(tokens) * flops_per_token(params, num_layers, hidden_size, seq_length, backward=backward)


def _model_flops(
    num_params: int, hf_config: Mapping[str, Any] | None, seq_length: int, backward: bool
) -> float:
    cfg = hf_config or {}
    return flops_per_token(
        matmul_params(num_params, cfg),
        int(cfg.get("num_hidden_layers") or 0),
        int(cfg.get("hidden_size") or 0),
        seq_length,
        backward=backward,
    )


def run_flops(
    num_params: int,
    hf_config: Mapping[str, Any] | None,
    seq_length: int,
    tokens: int,
    reference: tuple[int, Mapping[str, Any] | None] | None = None,
) -> dict[str, Any]:
    """Compute of a training run over ``tokens`` trained tokens: ``{"train_flops", "model_flops",
    "reference_flops", "train_tokens"}``. ``model_flops`` = forward + backward of the trained model (≈ 6·N·tokens
    plus attention); ``reference_flops`` = the forward of a DoReMi reference model (``(num_params, hf_config)``)
    over the same tokens (≈ 2·N_ref·tokens), 0 without one; ``train_flops`` is their sum."""
    model = float(tokens) * _model_flops(num_params, hf_config, seq_length, backward=True)
    ref = 0.0
    if reference is not None:
        ref = float(tokens) * _model_flops(reference[0], reference[1], seq_length, backward=False)
    return {
        "train_flops": model + ref,
        "model_flops": model,
        "reference_flops": ref,
        "train_tokens": int(tokens),
    }
