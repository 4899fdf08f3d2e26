"""Per-domain evaluation on held-out splits: loss, perplexity, bits per byte, token-weighted / uniform averages,
worst case.

Every domain's first ``num_samples`` validation samples (fixed order, same on every rank; None = every sample of
the split once) are split into micro-batches; rank ``r`` of ``W`` scores micro-batches ``r, r+W, ...``. Under
ZeRO-3 a forward is a collective (parameters are all-gathered), so every rank runs the same number of forwards: a
rank with no micro-batch left in a domain repeats a padding forward whose result is discarded. The per-domain
sums (loss, tokens, target bytes) are all-reduced once (fp64) at the end.

Bits per byte of a domain: ``Σ loss / (ln 2 · Σ bytes)`` over its evaluated targets, the bytes of a target id
from the tokenizer's own pieces (:mod:`megatron_doremi.data.token_bytes`). The token-weighted average weights
each domain by its share of the *whole* split's targets (``split_tokens``): with ``eval_iters: "all"`` that is
the plain ratio of sums; with a per-domain cap a domain's evaluated sums are scaled up to its split size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from megatron_doremi.ops.domain_loss import domain_cross_entropy
from megatron_doremi.training.dist import all_reduce_sum

__all__ = ["epoch_samples", "evaluate_domains", "summarize_eval"]

LN2 = math.log(2.0)


def epoch_samples(dataset: Any) -> int:
    """Samples in one pass over ``dataset``'s split (the whole split, each sample once)."""
    per_epoch = getattr(dataset, "samples_per_epoch", None)
    if per_epoch is None and hasattr(dataset, "num_tokens") and hasattr(dataset, "seq_length"):
        per_epoch = (int(dataset.num_tokens) - 1) // int(dataset.seq_length)
    return min(int(per_epoch), len(dataset)) if per_epoch is not None else len(dataset)


def summarize_eval(
    names: Sequence[str],
    loss_sum: np.ndarray,
    token_count: np.ndarray,
    byte_count: np.ndarray | None = None,
    split_scale: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Eval summary from per-domain token-loss sums, token counts and target byte counts (fp64 [D]).

    ``split_scale[d]``: split samples / evaluated samples of domain d (default 1: the whole split was evaluated),
    so the token-weighted average weights each domain by its share of the split's targets.
    Returns ``{"domains": {name: {"loss", "ppl", "bpb", "tokens", "bytes"}}, "token_weighted": {"loss", "ppl",
    "bpb", "weights"}, "uniform": {"loss", "ppl", "bpb"}, "worst": {"domain", "loss", "ppl", "bpb"}}``;
    ``bpb``/``bytes`` are null without a byte table; domains with no tokens get null loss and are left out of the
    averages. ``worst`` is the domain of the highest loss.
    """
    num = len(names)
    bytes_ = np.zeros(num) if byte_count is None else np.asarray(byte_count, dtype=np.float64)
    has_bytes = byte_count is not None
    scale = np.ones(num) if split_scale is None else np.asarray(split_scale, dtype=np.float64)
    domains: dict[str, Any] = {}
    losses: dict[str, float] = {}
    bpbs: dict[str, float | None] = {}
    for d, (name, s, n) in enumerate(zip(names, loss_sum.tolist(), token_count.tolist())):
        b = float(bytes_[d])
        bpb = s / (LN2 * b) if has_bytes and n > 0 and b > 0 else None
        entry = {
            "loss": None,
            "ppl": None,
            "bpb": None,
            "tokens": int(n),
            "bytes": int(b) if has_bytes else None,
        }
        if n > 0:
            loss = s / n
            losses[name], bpbs[name] = loss, bpb
            entry.update(loss=loss, ppl=_ppl(loss), bpb=bpb)
        domains[name] = entry
    out: dict[str, Any] = {"domains": domains}
    if losses:
        w_loss = float(np.sum(loss_sum * scale))
        w_tokens = float(np.sum(token_count * scale))
        w_bytes = float(np.sum(bytes_ * scale))
        tw = w_loss / w_tokens
        uni = float(np.mean(list(losses.values())))
        uni_bpb = float(np.mean(list(bpbs.values()))) if all(v is not None for v in bpbs.values()) else None
        worst = max(losses, key=lambda k: losses[k])
        shares = {n: float(token_count[d] * scale[d]) / w_tokens for d, n in enumerate(names)}
        out["token_weighted"] = {
            "loss": tw,
            "ppl": _ppl(tw),
            "bpb": w_loss / (LN2 * w_bytes) if has_bytes and w_bytes > 0 else None,
            "weights": shares,
        }
        out["uniform"] = {"loss": uni, "ppl": _ppl(uni), "bpb": uni_bpb}
        out["worst"] = {
            "domain": worst,
            "loss": losses[worst],
            "ppl": _ppl(losses[worst]),
            "bpb": bpbs[worst],
        }
    else:
        out["token_weighted"] = {"loss": None, "ppl": None, "bpb": None, "weights": None}
        out["uniform"] = {"loss": None, "ppl": None, "bpb": None}
        out["worst"] = {"domain": None, "loss": None, "ppl": None, "bpb": None}
    return out


def _ppl(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def evaluate_domains(
    forward_logits: Callable[..., torch.Tensor],
    datasets: Sequence[Any],
    names: Sequence[str],
    num_samples: int | None,
    micro_batch_size: int,
    rank: int,
    world_size: int,
    device: torch.device,
    on_batch: Callable[[int, dict[str, torch.Tensor], torch.Tensor], None] | None = None,
    token_bytes: np.ndarray | torch.Tensor | None = None,
) -> dict[str, Any]:
    """Evaluate ``forward_logits(input_ids, **model_inputs(batch)) -> logits [B, T, V]`` on each domain's dataset.

    ``num_samples``: samples per domain (capped at one pass over the split), None = the whole split once.
    ``token_bytes``: int [V] UTF-8 bytes per target id (bits per byte; None leaves ``bpb`` null).
    ``on_batch(domain_index, batch, logits)`` is called for every real micro-batch of this rank (e.g. to dump
    logits). Collective when ``world_size > 1``. Returns :func:`summarize_eval` plus ``"samples"`` (evaluated)
    and ``"split_samples"`` (in the whole split) per domain.
    """
    from megatron_doremi.data.loader import iter_eval_batches, model_inputs

    num_domains = len(datasets)
    sums = torch.zeros(3, num_domains, dtype=torch.float64, device=device)
    table = None if token_bytes is None else torch.as_tensor(token_bytes, dtype=torch.int64).to(device)
    samples, split_samples = [], []
    with torch.no_grad():
        for d, ds in enumerate(datasets):
            per_split = epoch_samples(ds)
            total = per_split if num_samples is None else min(int(num_samples), per_split)
            samples.append(total)
            split_samples.append(per_split)
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
                labels = batch["labels"].to(device)
                out = domain_cross_entropy(logits, labels, batch["domain_id"].to(device), num_domains)
                sums[0] += out.domain_loss_sum
                sums[1] += out.domain_token_count
                if table is not None:
                    sums[2, d] += _target_bytes(labels, table)
                if on_batch is not None:
                    on_batch(d, batch, logits)
    all_reduce_sum(sums)
    scale = [p / t if t > 0 else 1.0 for p, t in zip(split_samples, samples)]
    result = summarize_eval(
        names,
        sums[0].cpu().numpy(),
        sums[1].cpu().numpy(),
        None if table is None else sums[2].cpu().numpy(),
        split_scale=scale,
    )
    for name, n, p in zip(names, samples, split_samples):
        result["domains"][name]["samples"] = n
        result["domains"][name]["split_samples"] = p
    return result


def _target_bytes(labels: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Bytes of the scored targets (labels >= 0; ignored positions are negative) as an fp64 scalar."""
    valid = labels >= 0
    ids = torch.where(valid, labels, torch.zeros_like(labels)).clamp_(max=table.numel() - 1)
    return (table[ids] * valid).sum().to(torch.float64)
