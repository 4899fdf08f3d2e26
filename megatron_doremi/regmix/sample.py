"""RegMix step 1: draw K proxy mixtures around a token-share prior.

Scheme (shared by ``regmix sample`` and the candidate generator of ``regmix search``):

1. prior p = token shares raised to 1/T, renormalised (T = ``temperature``; T = 1 is the token share).
2. proposal w ~ Dirichlet(c * p) with c from the concentration grid (small c: sparse mixtures near a vertex,
   large c: near the prior). Drawn in log space (Gamma(a) = Gamma(a + 1) * U^(1/a)), so tiny concentrations never
   underflow to an all-zero row.
3. weights below ``min_weight`` are zeroed and the rest renormalised.
4. epoch cap: reject w if some domain would be repeated more than E epochs in N planned tokens,
   i.e. ``w_d * N > E * n_d`` (n_d = the domain's training tokens). Checked after step 3.
5. ``regmix sample`` only: reject w if its distance (L1 or L-inf) to an accepted mixture is < ``min_distance``.

Run k starts at grid level ``k mod len(grid)``; if that level keeps failing (e.g. sparse mixtures that collapse to
an already-accepted vertex), the next level is tried. After ``max_attempts`` proposals per level on every level
the sampler raises :class:`SamplingError` naming the binding constraint. Everything is drawn from one
``numpy.random.Generator(PCG64(seed))``: the same arguments give the same mixtures bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from megatron_doremi.mixers.heuristics import HeuristicError, temperature_weights

__all__ = [
    "DEFAULT_CONCENTRATIONS",
    "RegmixError",
    "SampleResult",
    "SamplingError",
    "apply_threshold",
    "dirichlet_log_space",
    "epoch_cap_ok",
    "propose",
    "sample_mixtures",
    "token_prior",
]

DEFAULT_CONCENTRATIONS: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0)


class RegmixError(ValueError):
    """Bad RegMix input (arguments, run directories, result files); the message names the file or key."""


class SamplingError(RegmixError):
    """The sampler could not find enough mixtures; the message names the binding constraint."""


def token_prior(tokens: Sequence[float] | np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """float64 [D]: token shares raised to ``1 / temperature``, normalised (empty domains get 0)."""
    try:
        return temperature_weights(tokens, temperature)
    except HeuristicError as exc:
        raise RegmixError(str(exc)) from None


def dirichlet_log_space(rng: np.random.Generator, alpha: np.ndarray) -> np.ndarray:
    """Rows ~ Dirichlet(alpha[i]) for alpha [N, D] (entries >= 0; 0 gives weight 0); float64 [N, D], rows sum 1.

    Uses log Gamma(a) = log Gamma(a + 1) + log(U) / a, stable for a << 1 where plain Gamma draws underflow.
    """
    alpha = np.asarray(alpha, dtype=np.float64)
    pos = alpha > 0
    safe = np.where(pos, alpha, 1.0)
    g = rng.standard_gamma(safe + 1.0)
    u = rng.random(alpha.shape)
    with np.errstate(divide="ignore"):
        logw = np.log(g) + np.log1p(-u) / safe  # 1 - U is in (0, 1]: never log(0)
    logw = np.where(pos, logw, -np.inf)
    logw -= logw.max(axis=1, keepdims=True)
    w = np.exp(logw)
    return w / w.sum(axis=1, keepdims=True)


def apply_threshold(weights: np.ndarray, min_weight: float) -> tuple[np.ndarray, np.ndarray]:
    """Zero entries < ``min_weight`` and renormalise rows of [N, D]; returns (weights, valid [N] bool).

    A row is invalid when every entry falls below the threshold (only possible if min_weight > 1/D).
    """
    w = np.where(weights >= min_weight, weights, 0.0)
    total = w.sum(axis=1, keepdims=True)
    valid = total[:, 0] > 0
    w = np.divide(w, total, out=np.zeros_like(w), where=total > 0)
    return w, valid


def epoch_cap_ok(
    weights: np.ndarray, tokens: np.ndarray | None, planned_tokens: float | None, max_epochs: float | None
) -> np.ndarray:
    """bool [N]: rows with ``w_d * planned_tokens <= max_epochs * tokens_d`` for every d (all True if unknown)."""
    weights = np.atleast_2d(weights)
    if tokens is None or planned_tokens is None or max_epochs is None:
        return np.ones(weights.shape[0], dtype=bool)
    cap = max_epochs * np.asarray(tokens, dtype=np.float64) / float(planned_tokens)
    return np.all(weights <= cap * (1 + 1e-9), axis=1)


def propose(
    rng: np.random.Generator, prior: np.ndarray, concentrations: np.ndarray, min_weight: float
) -> tuple[np.ndarray, np.ndarray]:
    """One proposal per entry of ``concentrations`` [N]: Dirichlet(c * prior), thresholded -> (weights, valid)."""
    alpha = np.asarray(concentrations, dtype=np.float64)[:, None] * prior[None, :]
    return apply_threshold(dirichlet_log_space(rng, alpha), min_weight)


def _distance(a: np.ndarray, b: np.ndarray, metric: str) -> np.ndarray:
    diff = np.abs(a - b[None, :])
    return diff.sum(axis=1) if metric == "l1" else diff.max(axis=1)


@dataclass
class SampleResult:
    """Accepted mixtures: ``weights`` [K, D] float64 (rows sum to 1), ``concentrations`` [K], the ``prior`` [D]
    and per-reason rejection counts."""

    weights: np.ndarray
    concentrations: np.ndarray
    prior: np.ndarray
    rejected: dict[str, int] = field(default_factory=dict)
    proposals: int = 0


def check_cap_feasible(tokens: np.ndarray, planned_tokens: float, max_epochs: float) -> None:
    """SamplingError when no mixture at all can respect the cap (all data * E < planned tokens)."""
    capacity = float(max_epochs) * float(np.sum(tokens))
    if capacity < planned_tokens:
        raise SamplingError(
            f"epoch cap infeasible: {planned_tokens:.6g} planned tokens need more than max_epochs={max_epochs:g} "
            f"epochs of all data together ({capacity:.6g} tokens); raise --max-epochs or lower the planned tokens"
        )


def sample_mixtures(
    tokens: Sequence[float] | np.ndarray,
    num_runs: int,
    *,
    seed: int = 0,
    temperature: float = 1.0,
    concentrations: Sequence[float] = DEFAULT_CONCENTRATIONS,
    max_epochs: float | None = None,
    planned_tokens: float | None = None,
    min_weight: float = 0.01,
    min_distance: float = 0.02,
    distance: str = "l1",
    max_attempts: int = 2000,
    chunk: int = 64,
    prior_tokens: Sequence[float] | np.ndarray | None = None,
) -> SampleResult:
    """Draw ``num_runs`` distinct mixtures by the module's scheme (tokens [D] in domain order).

    The epoch cap applies only when both ``max_epochs`` and ``planned_tokens`` are given. ``prior_tokens`` (default
    ``tokens``) are the counts the prior is computed from, when they differ from the cap's (a reuse swarm).
    Raises SamplingError (binding constraint named) when a run exhausts ``max_attempts`` proposals on every level.
    """
    tok = np.asarray(tokens, dtype=np.float64).reshape(-1)
    if isinstance(num_runs, bool) or not isinstance(num_runs, int) or num_runs < 1:
        raise RegmixError(f"num_runs: must be an integer >= 1, got {num_runs!r}")
    grid = np.asarray(list(concentrations), dtype=np.float64)
    if grid.size == 0 or not np.all(np.isfinite(grid)) or np.any(grid <= 0):
        raise RegmixError(f"concentrations: need finite values > 0, got {list(concentrations)}")
    if not (0 <= min_weight < 1):
        raise RegmixError(f"min_weight: must be in [0, 1), got {min_weight!r}")
    if not (min_distance >= 0 and math.isfinite(min_distance)):
        raise RegmixError(f"min_distance: must be >= 0, got {min_distance!r}")
    if distance not in ("l1", "linf"):
        raise RegmixError(f"distance: must be 'l1' or 'linf', got {distance!r}")
    for key, value in (("max_epochs", max_epochs), ("planned_tokens", planned_tokens)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise RegmixError(f"{key}: must be a finite number > 0, got {value!r}")
    prior = token_prior(tok if prior_tokens is None else prior_tokens, temperature)
    capped = max_epochs is not None and planned_tokens is not None
    if capped:
        check_cap_feasible(tok, float(planned_tokens), float(max_epochs))
    rng = np.random.Generator(np.random.PCG64(seed))
    accepted = np.zeros((0, tok.size), dtype=np.float64)
    used_c: list[float] = []
    rejected = {"epoch cap": 0, "duplicate": 0, "below threshold": 0}
    proposals = 0
    for k in range(num_runs):
        done = False
        for shift in range(grid.size):
            c = float(grid[(k + shift) % grid.size])
            tries = 0
            while tries < max_attempts and not done:
                n = min(chunk, max_attempts - tries)
                cand, valid = propose(rng, prior, np.full(n, c), min_weight)
                ok_cap = epoch_cap_ok(cand, tok, planned_tokens, max_epochs) if capped else np.ones(n, bool)
                for i in range(n):
                    tries += 1
                    proposals += 1
                    if not valid[i]:
                        rejected["below threshold"] += 1
                    elif not ok_cap[i]:
                        rejected["epoch cap"] += 1
                    elif accepted.shape[0] and _distance(accepted, cand[i], distance).min() < min_distance:
                        rejected["duplicate"] += 1
                    else:
                        accepted = np.vstack([accepted, cand[i]])
                        used_c.append(c)
                        done = True
                        break
            if done:
                break
        if not done:
            binding = max(rejected, key=lambda r: rejected[r])
            hint = {
                "epoch cap": "raise --max-epochs, lower --planned-tokens, or raise --temperature (flatter prior)",
                "duplicate": "lower --min-distance or --num-runs, or add larger --concentrations",
                "below threshold": "lower --min-weight",
            }[binding]
            raise SamplingError(
                f"found only {k} of {num_runs} mixtures after {proposals} proposals; binding constraint: {binding} "
                f"(rejections: {', '.join(f'{r} {v}' for r, v in rejected.items())}); {hint}"
            )
    return SampleResult(accepted, np.asarray(used_c), prior, rejected, proposals)
