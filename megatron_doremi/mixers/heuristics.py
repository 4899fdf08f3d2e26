"""Offline domain-weight rules from per-domain token counts: proportional, temperature sampling, UniMax.

Each rule is a pure function of ``tokens`` (int or float array [D], tokens per domain, >= 0, not all zero) that
returns float64 weights [D] summing to 1:

* :func:`proportional_weights`: ``w_d = n_d / sum(n)``.
* :func:`temperature_weights`: ``w_d ∝ (n_d / sum(n)) ** (1 / T)``; T = 1 is proportional, T -> inf uniform,
  T < 1 sharpens toward the largest domain (multilingual "temperature sampling").
* :func:`unimax_weights` (Chung et al. 2023, "UniMax"): spread a token budget N as uniformly as possible over the
  domains, but give no domain more than ``max_epochs`` epochs of its data. Domains are visited from the smallest;
  each gets ``min(remaining budget / remaining domains, max_epochs * n_d)``; ``w_d`` = its tokens / N.

Command line (writes DoReMi's ``domain_weights.json`` format, ``average`` = ``final`` = the rule's weights)::

    python -m megatron_doremi.mixers.heuristics --mixture m.json --method unimax --budget-tokens N \
        --max-epochs E --out domain_weights.json
    python -m megatron_doremi.mixers.heuristics --mixture m.json --method temperature --temperature 3 --out w.json

Token counts are read from the shards (:func:`domain_token_counts`: the sum of ``IndexedDataset.num_tokens``
over a domain's prefixes).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "HeuristicError",
    "METHODS",
    "domain_token_counts",
    "proportional_weights",
    "temperature_weights",
    "unimax_weights",
    "heuristic_weights",
    "main",
]

METHODS = ("proportional", "temperature", "unimax")


class HeuristicError(ValueError):
    """Bad token counts or rule parameters; the message names the argument."""


def _check_tokens(tokens: Sequence[float] | np.ndarray) -> np.ndarray:
    arr = np.asarray(tokens, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise HeuristicError("tokens: need at least one domain")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise HeuristicError(f"tokens: counts must be finite and >= 0, got {arr.tolist()}")
    if arr.sum() <= 0:
        raise HeuristicError("tokens: all domains are empty (0 tokens)")
    return arr


def proportional_weights(tokens: Sequence[float] | np.ndarray) -> np.ndarray:
    """float64 [D]: each domain's share of all tokens."""
    arr = _check_tokens(tokens)
    return arr / arr.sum()


def temperature_weights(tokens: Sequence[float] | np.ndarray, temperature: float) -> np.ndarray:
    """float64 [D]: token shares raised to ``1 / temperature`` and renormalised (empty domains stay at 0).

    Computed in log space so huge temperatures (-> uniform over non-empty domains) and tiny ones stay finite.
    """
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise HeuristicError(f"temperature: must be a finite number > 0, got {temperature!r}")
    share = proportional_weights(tokens)
    out = np.zeros_like(share)
    nz = share > 0
    logits = np.log(share[nz]) / float(temperature)
    logits -= logits.max()
    e = np.exp(logits)
    out[nz] = e / e.sum()
    return out


def unimax_weights(
    tokens: Sequence[float] | np.ndarray, budget_tokens: float, max_epochs: float
) -> np.ndarray:
    """float64 [D]: UniMax allocation of ``budget_tokens`` with at most ``max_epochs`` epochs per domain.

    Raises HeuristicError when the budget exceeds ``max_epochs`` epochs of all data together (no allocation can
    respect the cap); the message says by how much.
    """
    arr = _check_tokens(tokens)
    if not (math.isfinite(budget_tokens) and budget_tokens > 0):
        raise HeuristicError(f"budget_tokens: must be a finite number > 0, got {budget_tokens!r}")
    if not (math.isfinite(max_epochs) and max_epochs > 0):
        raise HeuristicError(f"max_epochs: must be a finite number > 0, got {max_epochs!r}")
    caps = arr * float(max_epochs)
    capacity = float(caps.sum())
    if budget_tokens > capacity * (1 + 1e-12):
        raise HeuristicError(
            f"budget_tokens {budget_tokens:.6g} exceeds max_epochs={max_epochs:g} epochs of all domains together "
            f"({capacity:.6g} tokens); lower --budget-tokens or raise --max-epochs"
        )
    alloc = np.zeros_like(arr)
    remaining = float(budget_tokens)
    order = np.argsort(arr, kind="stable")  # smallest domain first
    for k, d in enumerate(order):
        share = remaining / (len(order) - k)
        alloc[d] = min(share, caps[d])
        remaining -= alloc[d]
    return alloc / alloc.sum()


def heuristic_weights(method: str, tokens: Sequence[float] | np.ndarray, **params: Any) -> np.ndarray:
    """Dispatch by name: ``proportional``; ``temperature`` (``temperature``); ``unimax`` (``budget_tokens``,
    ``max_epochs``)."""
    if method == "proportional":
        return proportional_weights(tokens)
    if method == "temperature":
        if params.get("temperature") is None:
            raise HeuristicError("method 'temperature' needs --temperature")
        return temperature_weights(tokens, float(params["temperature"]))
    if method == "unimax":
        for key in ("budget_tokens", "max_epochs"):
            if params.get(key) is None:
                raise HeuristicError(f"method 'unimax' needs --{key.replace('_', '-')}")
        return unimax_weights(tokens, float(params["budget_tokens"]), float(params["max_epochs"]))
    raise HeuristicError(f"unknown method {method!r}; known: {', '.join(METHODS)}")


def domain_token_counts(mixture: Any) -> np.ndarray:
    """int64 [D] in ``mixture.names`` order: tokens of each domain summed over its shard prefixes."""
    from megatron_doremi.data.indexed import IndexedDataset

    counts = np.zeros(mixture.num_domains, dtype=np.int64)
    for d, dom in enumerate(mixture.domains):
        for prefix in dom.prefixes:
            counts[d] += int(IndexedDataset(prefix).num_tokens)
    return counts


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m megatron_doremi.mixers.heuristics",
        description="Offline domain weights from token counts (proportional, temperature, UniMax).",
    )
    p.add_argument("--mixture", required=True, help="mixture JSON or a Megatron --data-path string")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--temperature", type=float, default=None, help="temperature T (method temperature)")
    p.add_argument(
        "--budget-tokens", type=float, default=None, help="training token budget N (method unimax)"
    )
    p.add_argument("--max-epochs", type=float, default=None, help="epoch cap per domain (method unimax)")
    p.add_argument("--out", required=True, help="output domain_weights.json")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry; prints the weights table, returns the exit status (1 on bad input)."""
    args = _parse_args(argv)
    from megatron_doremi.data.mixture import Mixture
    from megatron_doremi.mixers.weights_io import write_domain_weights_json

    try:
        mixture = Mixture.load(args.mixture)
        tokens = domain_token_counts(mixture)
        params = {
            "temperature": args.temperature,
            "budget_tokens": args.budget_tokens,
            "max_epochs": args.max_epochs,
        }
        weights = heuristic_weights(args.method, tokens, **params)
        used = {k: v for k, v in params.items() if v is not None}
        extra = {
            "method": args.method,
            "params": used,
            "tokens": {n: int(t) for n, t in zip(mixture.names, tokens)},
        }
        if args.method == "unimax":
            epochs = weights * float(args.budget_tokens) / np.maximum(tokens, 1)
            extra["epochs"] = {n: float(e) for n, e in zip(mixture.names, epochs)}
        prefixes = {d.name: list(d.prefixes) for d in mixture.domains}
        write_domain_weights_json(args.out, mixture.names, weights, weights, prefixes=prefixes, extra=extra)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    width = max(len(n) for n in mixture.names)
    print(f"{args.method} weights ({', '.join(f'{k}={v:g}' for k, v in used.items()) or 'no parameters'}):")
    for n, t, w in zip(mixture.names, tokens, weights):
        print(f"  {n:<{width}}  {int(t):>14,} tokens  {w:.4f}")
    print(f"wrote {args.out}")
    print(f'compare with DoReMi: add "compare": {{"{args.method}": "{args.out}"}} to the pipeline config')
    return 0


if __name__ == "__main__":
    sys.exit(main())
