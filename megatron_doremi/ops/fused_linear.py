"""Fused lm_head GEMM + per-domain cross-entropy that never materialises the [B*T, V] logits (issue 13).

:func:`fused_linear_domain_cross_entropy` returns what
``domain_cross_entropy(hidden @ weight.T + bias, labels, domain_ids, ...)`` returns (same fields, same
definitions) and is differentiable w.r.t. ``hidden``, ``weight`` and ``bias``. The rows (flattened B*T tokens) are
processed in chunks of ``chunk_rows``, in a fixed order:

1. ``logits_c = hidden_c @ weight.T (+ bias)`` in the hidden states' dtype (one [chunk, V] buffer, reused);
2. the per-domain loss kernel of :mod:`megatron_doremi.ops.fused_domain_loss` (CUDA / C++ / chunked torch)
   writes the chunk's token loss and log-sum-exp, then, when gradients are needed, writes
   ``g_c = coef * (softmax - onehot)`` into ``logits_c`` in place;
3. ``grad_hidden_c = g_c @ weight`` and ``grad_weight += g_c.T @ hidden_c`` (and ``grad_bias += g_c.sum(0)``),
   accumulated in fp32 in chunk order, so repeated calls give bit-identical results.

Gradients are computed during the forward with an incoming gradient of 1 and scaled by the real one in
backward (the loss is linear in them), so the GEMM runs once. Extra memory: one [chunk, V] logits buffer, the fp32
[V, H] weight gradient and the [B*T, H] hidden gradient, instead of the [B*T, V] logits and their gradient.
Under ``torch.no_grad()`` (the reference model, evaluation), or when no input requires grad, only step 1-2's
forward runs. Per-domain sums are reduced token -> row -> domain in a fixed order, as by the plain op; they match
it to fp32 rounding (the GEMM is chunked), not bit for bit.

Default ``chunk_rows``: ``max(64, next_pow2(ceil(N * H / V)))`` (capped at N), i.e. the chunk's logits are about
as large as the hidden states (Liger-Kernel's choice).
"""

from __future__ import annotations

import math

import torch

from megatron_doremi.ops.fused_domain_loss import (
    DomainLossError,
    DomainLossOutput,
    _check_shapes,
    _check_values,
    _clip_excess,
    resolve_backend,
)

__all__ = ["default_chunk_rows", "fused_linear_domain_cross_entropy"]


def default_chunk_rows(rows: int, hidden: int, vocab: int) -> int:
    """Rows per chunk: the chunk's [rows, V] logits about the size of the [N, H] hidden states, >= 64."""
    if rows <= 0:
        return 1
    want = max(1, math.ceil(rows * hidden / max(vocab, 1)))
    return max(1, min(rows, max(64, 1 << (want - 1).bit_length())))


def _domain_sums(token_loss, excess, valid, domain_ids, num_domains):
    """Fixed-order fp64 per-domain sums (token -> row -> domain), NaN kept in its own domain."""
    rows = torch.stack([token_loss.double().sum(1), excess.double().sum(1), valid.double().sum(1)])  # [3, B]
    onehot = domain_ids.unsqueeze(0) == torch.arange(num_domains, device=domain_ids.device).unsqueeze(1)
    per_domain = torch.where(onehot.unsqueeze(0), rows.unsqueeze(1), 0.0).sum(dim=2)  # [3, D]
    return per_domain[0], per_domain[1], per_domain[2]


class _FusedLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        bias,
        labels,
        domain_ids,
        ref,
        scale,
        normalizer,
        ignore_index,
        chunk,
        impl,
        need_grad,
    ):
        batch, seq, width = hidden.shape
        vocab = weight.shape[0]
        rows = batch * seq
        device = hidden.device
        h2 = hidden.reshape(rows, width)
        lab = labels.reshape(rows)
        valid = labels != ignore_index
        if normalizer is None:
            norm = (scale[domain_ids][:, None] * valid.double()).sum().clamp_min(1e-12)
        else:
            norm = normalizer
        tok_coef = (scale[domain_ids] / norm).float().repeat_interleave(seq)  # [N] dloss/dtoken_loss
        token_loss = torch.empty(rows, dtype=torch.float32, device=device)
        lse = torch.empty(rows, dtype=torch.float32, device=device)
        dummy = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(3)]
        empty_ref = torch.empty(0, dtype=torch.float32, device=device)
        grad_h = torch.empty_like(h2) if need_grad and hidden.requires_grad else None
        grad_w = torch.zeros(vocab, width, dtype=torch.float32, device=device) if need_grad else None
        grad_b = (
            torch.zeros(vocab, dtype=torch.float32, device=device) if need_grad and bias is not None else None
        )
        w_t = weight.t()
        for s in range(0, rows, chunk):
            e = min(rows, s + chunk)
            h_c = h2[s:e]
            logits = torch.addmm(bias, h_c, w_t) if bias is not None else h_c @ w_t
            logits3 = logits.view(e - s, 1, vocab)
            lab_c = lab[s:e].reshape(e - s, 1)
            zeros = torch.zeros(e - s, dtype=torch.long, device=device)
            tl_c, lse_c = token_loss[s:e].view(e - s, 1), lse[s:e].view(e - s, 1)
            impl.forward(logits3, lab_c, zeros, empty_ref, ignore_index, tl_c, lse_c, *dummy)
            if not need_grad:
                continue
            impl.backward(logits3, lab_c, lse_c, tok_coef[s:e], ignore_index, logits3)
            if grad_h is not None:
                torch.mm(logits, weight, out=grad_h[s:e])
            if weight.requires_grad:
                if logits.dtype == torch.float32:
                    grad_w.addmm_(logits.t(), h_c)
                else:  # half precision: the GEMM accumulates in fp32, the chunk sum is added in fp32
                    grad_w.add_(logits.t() @ h_c)
            if grad_b is not None:
                grad_b.add_(logits.float().sum(0))
        token_loss = token_loss.view(batch, seq)
        excess = token_loss if ref.numel() == 0 else torch.where(valid, _clip_excess(token_loss, ref), 0.0)
        loss_sum, excess_sum, count = _domain_sums(token_loss, excess, valid, domain_ids, scale.numel())
        loss = ((scale * loss_sum).sum() / norm).float()
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.shapes = (hidden.shape, hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(token_loss, loss_sum, excess_sum, count)
        return loss, token_loss, loss_sum, excess_sum, count

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        shape, h_dtype, w_dtype, b_dtype = ctx.shapes
        g = grad_loss.float()
        out_h = out_w = out_b = None
        if ctx.needs_input_grad[0] and grad_h is not None:
            out_h = (grad_h * g.to(grad_h.dtype)).view(shape)
        if ctx.needs_input_grad[1] and grad_w is not None:
            out_w = (grad_w * g).to(w_dtype)
        if ctx.needs_input_grad[2] and grad_b is not None:
            out_b = (grad_b * g).to(b_dtype)
        return out_h, out_w, out_b, None, None, None, None, None, None, None, None, None


def fused_linear_domain_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    domain_ids: torch.Tensor,
    num_domains: int,
    ref_token_loss: torch.Tensor | None = None,
    loss_scale_per_domain: torch.Tensor | None = None,
    ignore_index: int = -100,
    normalizer: float | torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    chunk_rows: int | None = None,
    *,
    backend: str = "auto",
    check_values: bool = True,
) -> DomainLossOutput:
    """``domain_cross_entropy(hidden @ weight.T + bias, ...)`` without the [B*T, V] logits (see module doc).

    Args:
        hidden: [B, T, H] final hidden states (float dtype; the GEMM runs in it).
        weight: [V, H] lm_head weight, same dtype and device as ``hidden``; bias: optional [V].
        labels, domain_ids, num_domains, ref_token_loss, loss_scale_per_domain, ignore_index, normalizer,
        backend, check_values: as for :func:`megatron_doremi.ops.domain_cross_entropy`.
        chunk_rows: tokens per chunk (> 0); default :func:`default_chunk_rows`.
    """
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise DomainLossError(f"hidden: expected [B, T, H], got shape {tuple(getattr(hidden, 'shape', ()))}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise DomainLossError(
            f"weight: expected [V, {hidden.shape[2]}] (H of hidden), got {tuple(getattr(weight, 'shape', ()))}"
        )
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise DomainLossError(
            f"weight: expected dtype {hidden.dtype} on {hidden.device} like hidden, got {weight.dtype} on "
            f"{weight.device}"
        )
    vocab = weight.shape[0]
    if bias is not None and (tuple(bias.shape) != (vocab,) or bias.dtype != hidden.dtype):
        raise DomainLossError(
            f"bias: expected [{vocab}] {hidden.dtype}, got {tuple(bias.shape)} {bias.dtype}"
        )
    batch, seq, width = hidden.shape
    shape_probe = hidden.new_empty((1, 1, 1)).expand(batch, seq, vocab)  # [B, T, V] for the shared checks
    _check_shapes(shape_probe, labels, domain_ids, num_domains, ref_token_loss, loss_scale_per_domain)
    if chunk_rows is not None and int(chunk_rows) <= 0:
        raise DomainLossError(f"chunk_rows: expected > 0, got {chunk_rows}")
    num_domains = int(num_domains)
    device = hidden.device
    labels64 = labels.to(device=device, dtype=torch.long).contiguous()
    domains64 = domain_ids.to(device=device, dtype=torch.long).contiguous()
    if check_values:
        _check_values(labels64, domains64, num_domains, vocab, ignore_index)
    ref = (
        torch.empty(0, dtype=torch.float32, device=device)
        if ref_token_loss is None
        else ref_token_loss.detach().to(device=device, dtype=torch.float32).contiguous()
    )
    scale = (
        torch.ones(num_domains, dtype=torch.float64, device=device)
        if loss_scale_per_domain is None
        else loss_scale_per_domain.detach().to(device=device, dtype=torch.float64)
    )
    norm = None
    if normalizer is not None:
        norm = torch.as_tensor(normalizer, dtype=torch.float64, device=device).detach().reshape(())
    rows = batch * seq
    chunk = int(chunk_rows) if chunk_rows is not None else default_chunk_rows(rows, width, vocab)
    impl = resolve_backend(device, backend, hidden.dtype)
    need_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    loss, token_loss, loss_sum, excess_sum, count = _FusedLinearFn.apply(
        hidden,
        weight,
        bias,
        labels64,
        domains64,
        ref,
        scale,
        norm,
        int(ignore_index),
        max(1, chunk),
        impl,
        need_grad,
    )
    return DomainLossOutput(loss, token_loss, loss_sum, excess_sum, count)
