"""Per-domain cross-entropy: the loss of every trainer step and the statistics the mixers see.

``domain_cross_entropy`` is the one entry point the trainer, the DoReMi proxy step and evaluation call. It is the
fused op of :mod:`megatron_doremi.ops.fused_domain_loss` (CUDA kernel on GPU, native C++ kernel on CPU, a chunked
torch path when neither extension is available); the plain torch composition used as the test oracle is
``fused_domain_loss.domain_cross_entropy_reference``.

Contract (DESIGN section 5):

* ``logits`` [B, T, V] (bf16/fp16/fp32, any strides) are scored position by position against ``labels`` [B, T]
  (already aligned by the loader: no shift). Positions whose label is ``ignore_index`` contribute nothing.
* ``token_loss`` [B, T] fp32: -log softmax(logits[b, t])[labels[b, t]], 0 at ignored positions (detached).
* ``loss`` (scalar fp32, differentiable): ``sum_{b,t} scale[d(b)] * token_loss[b, t] / normalizer`` where
  ``scale`` = ``loss_scale_per_domain`` (default all ones) and ``normalizer`` defaults to the sum of ``scale`` over
  the non-ignored tokens of this call (a caller may pass a global one, e.g. the all-reduced sum over micro-batches
  and ranks, so gradients add up correctly under accumulation and data parallelism).
* Per-domain statistics (fp64 [D], detached, summed over this call only): ``domain_loss_sum`` (sum of token loss),
  ``domain_excess_sum`` (sum of max(token_loss - ref_token_loss, 0); with no reference the reference is taken as
  0, so it equals the loss sum), ``domain_token_count`` (non-ignored tokens).
"""

from __future__ import annotations

import torch

from megatron_doremi.ops.fused_domain_loss import DomainLossError, DomainLossOutput
from megatron_doremi.ops.fused_domain_loss import fused_domain_cross_entropy as domain_cross_entropy

__all__ = ["DomainLossOutput", "DomainLossError", "domain_cross_entropy", "domain_token_counts"]


def domain_token_counts(
    labels: torch.Tensor, domain_ids: torch.Tensor, num_domains: int, ignore_index: int = -100
) -> torch.Tensor:
    """Non-ignored tokens per domain, fp64 [D] (what a caller all-reduces to build a global ``normalizer``)."""
    valid = (labels != ignore_index).sum(dim=1).to(torch.float64)
    counts = torch.zeros(num_domains, dtype=torch.float64, device=labels.device)
    return counts.index_add_(0, domain_ids.to(torch.long), valid)
