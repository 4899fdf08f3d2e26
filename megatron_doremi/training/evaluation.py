"""Per-domain evaluation on held-out splits: loss, perplexity, token-weighted / uniform averages, worst case.

Every domain's first ``num_samples`` validation samples (fixed order, same on every rank) are split into
micro-batches; rank ``r`` of ``W`` scores micro-batches ``r, r+W, ...``. Under ZeRO-3 a forward is a collective
(parameters are all-gathered), so every rank runs the same number of forwards: a rank with no micro-batch left
in a domain repeats a padding forward whose result is discarded. The per-domain sums and token counts are
all-reduced once (fp64) at the end.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from megatron_doremi.ops.domain_loss import domain_cross_entropy
from megatron_doremi.training.dist import all_reduce_sum

__all__ = ["evaluate_domains", "summarize_eval"]


def summarize_eval(names: Sequence[str], loss_sum: np.ndarray, token_count: np.ndarray) -> dict[str, Any]:
    """Eval summary from per-domain token-loss sums and token counts (fp64 [D]).

    Returns ``{"domains": {name: {"loss", "ppl", "tokens"}}, "token_weighted": {"loss", "ppl"},
    "uniform": {"loss", "ppl"}, "worst": {"domain", "loss", "ppl"}}``; domains with no tokens get null loss and
    are left out of the averages.
    """
    domains: dict[str, Any] = {}
    losses: dict[str, float] = {}
    for name, s, n in zip(names, loss_sum.tolist(), token_count.tolist()):
        if n > 0:
            loss = s / n
            losses[name] = loss
            domains[name] = {"loss": loss, "ppl": _ppl(loss), "tokens": int(n)}
        else:
            domains[name] = {"loss": None, "ppl": None, "tokens": 0}
    out: dict[str, Any] = {"domains": domains}
    total = float(token_count.sum())
    if losses:
        tw = float(loss_sum.sum()) / total
        uni = float(np.mean(list(losses.values())))
        worst = max(losses, key=lambda k: losses[k])
        out["token_weighted"] = {"loss": tw, "ppl": _ppl(tw)}
        out["uniform"] = {"loss": uni, "ppl": _ppl(uni)}
        out["worst"] = {"domain": worst, "loss": losses[worst], "ppl": _ppl(losses[worst])}
    else:
        out["token_weighted"] = out["uniform"] = {"loss": None, "ppl": None}
        out["worst"] = {"domain": None, "loss": None, "ppl": None}
    return out


def _ppl(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def evaluate_domains(
    forward_logits: Callable[..., torch.Tensor],
    datasets: Sequence[Any],
    names: Sequence[str],
    num_samples: int,
    micro_batch_size: int,
    rank: int,
    world_size: int,
    device: torch.device,
    on_batch: Callable[[int, dict[str, torch.Tensor], torch.Tensor], None] | None = None,
) -> dict[str, Any]:
    """Evaluate ``forward_logits(input_ids, **model_inputs(batch)) -> logits [B, T, V]`` on each domain's dataset.

    ``on_batch(domain_index, batch, logits)`` is called for every real micro-batch of this rank (e.g. to dump
    logits). Collective when ``world_size > 1``. Returns :func:`summarize_eval` plus ``"samples"`` per domain.
    """
    from megatron_doremi.data.loader import iter_eval_batches, model_inputs

    num_domains = len(datasets)
    sums = torch.zeros(2, num_domains, dtype=torch.float64, device=device)
    samples = []
    with torch.no_grad():
        for d, ds in enumerate(datasets):
            total = min(int(num_samples), len(ds))
            samples.append(total)
            n_mb = -(-total // micro_batch_size)
            slots = -(-n_mb // world_size)
            if slots == 0:
                continue
            real_batches = iter_eval_batches(
                ds, total, micro_batch_size, domain_id=d, rank=rank, world_size=world_size
            )
            pad = None
            for _ in range(slots):
                batch = next(real_batches, None)
                real = batch is not None
                if batch is None:  # this rank is out of micro-batches: a padding forward keeps ZeRO-3 in step
                    if pad is None:
                        pad = next(
                            iter_eval_batches(ds, min(total, micro_batch_size), micro_batch_size, domain_id=d)
                        )
                    batch = pad
                input_ids = batch["input_ids"].to(device, non_blocking=True)
                logits = forward_logits(input_ids, **model_inputs({**batch, "input_ids": input_ids}))
                if not real:
                    continue
                out = domain_cross_entropy(
                    logits, batch["labels"].to(device), batch["domain_id"].to(device), num_domains
                )
                sums[0] += out.domain_loss_sum
                sums[1] += out.domain_token_count
                if on_batch is not None:
                    on_batch(d, batch, logits)
    all_reduce_sum(sums)
    result = summarize_eval(names, sums[0].cpu().numpy(), sums[1].cpu().numpy())
    for name, n in zip(names, samples):
        result["domains"][name]["samples"] = n
    return result
