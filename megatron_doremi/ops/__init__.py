"""Fused per-domain loss ops (DESIGN section 5): the package face.

* :func:`domain_cross_entropy` - per-token cross-entropy of [B, T, V] logits grouped by row domain, with the
  clipped excess against a reference and per-domain loss scales (:mod:`.fused_domain_loss`).
* :func:`fused_linear_domain_cross_entropy` - the same result from the final hidden states and the lm_head weight,
  never materialising the logits (:mod:`.fused_linear`).
"""

from megatron_doremi.ops.fused_domain_loss import DomainLossError, DomainLossOutput, domain_cross_entropy
from megatron_doremi.ops.fused_linear import fused_linear_domain_cross_entropy

__all__ = ["DomainLossError", "DomainLossOutput", "domain_cross_entropy", "fused_linear_domain_cross_entropy"]
