"""The trainer's lm_head + per-domain loss: the logits path, or the fused linear op (config ``fused_lm_head``).

* Logits path (``fused_lm_head: false``, the default): the model returns its [B, T, V] logits and
  :func:`megatron_doremi.ops.domain_cross_entropy` scores them with the **in-place** backward (the lm_head's
  backward needs only its input and weight, never its output, so the logits' buffer can take their gradient: no
  second [B, T, V] buffer). Should any other autograd node have saved the logits, torch raises its "modified by
  an inplace operation" error instead of computing a wrong gradient.
* Fused (``fused_lm_head: true``): :func:`enable_fused_lm_head` turns the model's output embedding into an
  identity, so the model returns its final hidden states as ``.logits``; :func:`domain_loss` then runs
  :func:`megatron_doremi.ops.fused_linear_domain_cross_entropy` on the lm_head weight (and bias) - no [B, T, V]
  logits are ever materialised. The op runs *inside the lm_head module's forward* (a second call of the module
  with the loss arguments), so under ZeRO-3 DeepSpeed's own module hooks gather the weight for the forward and
  re-gather it before the backward, and the weight's gradient reaches its partitions through DeepSpeed's usual
  reduce-scatter path. (Using the weight outside its module inside ``deepspeed.zero.GatheredParameters`` does
  not work: the backward then meets the re-partitioned, empty parameter - tested, it fails.) Evaluation
  gathers the weight with ``GatheredParameters`` (no gradient) to form the logits.
  Models whose logits are not a plain ``Linear`` of the last hidden states (final logit soft-capping, logit
  scaling) keep the logits path, with a warning.
"""

from __future__ import annotations

import contextlib
import logging
import types
from collections.abc import Iterator
from typing import Any

import torch

from megatron_doremi.ops import domain_cross_entropy, fused_linear_domain_cross_entropy
from megatron_doremi.ops.fused_domain_loss import DomainLossOutput

logger = logging.getLogger(__name__)

__all__ = ["domain_loss", "enable_fused_lm_head", "is_fused", "logits_from_output"]

_MARK = "_megatron_doremi_fused_lm_head"
# HF config fields that change the logits after the lm_head GEMM: the fused op cannot reproduce them.
_POST_LOGIT_FIELDS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _fused_head_forward(self: torch.nn.Linear, hidden_states: torch.Tensor, loss_args: dict | None = None):
    """Called by the model (no ``loss_args``): the hidden states unchanged. Called by :func:`domain_loss`: the
    fused op on this module's own weight, so that ZeRO-3's module hooks gather it for the forward and again for
    the backward (the gradient then reaches the partitioned parameter through DeepSpeed's usual path)."""
    if loss_args is None:
        return hidden_states
    out = fused_linear_domain_cross_entropy(
        hidden_states.to(self.weight.dtype), self.weight, bias=self.bias, **loss_args
    )
    return tuple(out)


def enable_fused_lm_head(model: torch.nn.Module) -> bool:
    """Make ``model(...).logits`` the final hidden states (the lm_head GEMM moves into the loss op).

    Returns False (model unchanged, warning logged) when the model's logits are more than ``lm_head(hidden)``.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    post = [f for f in _POST_LOGIT_FIELDS if getattr(config, f, None) not in (None, 1, 1.0)]
    if not isinstance(head, torch.nn.Linear) or post:
        why = f"post-logit transforms {post}" if post else f"output embedding {type(head).__name__}"
        logger.warning(
            "fused_lm_head: not used for %s (%s); using the logits path", type(model).__name__, why
        )
        return False
    head.forward = types.MethodType(_fused_head_forward, head)
    setattr(model, _MARK, True)
    logger.info("fused_lm_head: %s's lm_head GEMM is fused with the per-domain loss", type(model).__name__)
    return True


def is_fused(model: torch.nn.Module) -> bool:
    """Whether :func:`enable_fused_lm_head` rewired ``model`` (a DeepSpeed engine's ``.module`` is looked at)."""
    return bool(getattr(getattr(model, "module", model), _MARK, False))


@contextlib.contextmanager
def _gathered(params: list[torch.nn.Parameter]) -> Iterator[None]:
    """The full parameters (ZeRO-3 partitions gathered, read-only), or a no-op for ordinary parameters."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


def _head(model: torch.nn.Module) -> torch.nn.Linear:
    return getattr(model, "module", model).get_output_embeddings()


def domain_loss(
    model: torch.nn.Module,
    model_logits: torch.Tensor,
    labels: torch.Tensor,
    domain_ids: torch.Tensor,
    num_domains: int,
    **kwargs: Any,
) -> DomainLossOutput:
    """The per-domain loss of one micro-batch from the model's output (see the module doc for both paths).

    ``kwargs`` go to the op (ref_token_loss, loss_scale_per_domain, normalizer, ignore_index, ...).
    """
    if not is_fused(model):
        return domain_cross_entropy(
            model_logits, labels, domain_ids, num_domains, inplace_backward=True, **kwargs
        )
    loss_args = {"labels": labels, "domain_ids": domain_ids, "num_domains": num_domains, **kwargs}
    return DomainLossOutput(*_head(model)(model_logits, loss_args=loss_args))


def logits_from_output(model: torch.nn.Module, model_logits: torch.Tensor) -> torch.Tensor:
    """[B, T, V] logits from the model's output (evaluation): the hidden states times the lm_head when fused."""
    if not is_fused(model):
        return model_logits
    head = _head(model)
    params = [head.weight] + ([head.bias] if head.bias is not None else [])
    with _gathered(params), torch.no_grad():
        return torch.nn.functional.linear(model_logits.to(head.weight.dtype), head.weight, head.bias)
