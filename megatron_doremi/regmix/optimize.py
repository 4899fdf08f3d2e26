"""``regmix search --optimizer exact``: minimise a fitted mixing law on the capped simplex.

Feasible set: ``{w : sum_d w_d = 1, 0 <= w_d <= u_d}`` with the repetition caps of :func:`repetition_caps`
(``w_d * budget <= E * tokens_d``, so ``u_d = min(1, E * tokens_d / budget)``). Objective: the regressor's
prediction plus an optional ``kl_weight * KL(w || q)`` to a prior ``q`` (domains with ``q_d = 0`` are held at 0).

Solver: scipy's SLSQP (bounds + the equality constraint, analytic gradients) from several starts: the prior
projected onto the feasible set, the uniform mixture projected, and seeded Dirichlet(1) draws; the best feasible
end point wins. For the log-linear law the objective is convex, so every start reaches the same optimum (up to
the tolerance); the ridge law need not be convex (then the starts matter). The answer is projected onto the
feasible set once more, so it never violates a cap by more than float rounding (``<= u_d * (1 + 1e-12)``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from megatron_doremi.regmix.sample import RegmixError

__all__ = [
    "binding_caps",
    "kl_divergence",
    "minimize_on_simplex",
    "project_capped_simplex",
    "repetition_caps",
]

_EPS = 1e-12


def repetition_caps(
    tokens: Sequence[float] | np.ndarray, budget_tokens: float, max_epochs: float, names: Sequence[str]
) -> np.ndarray:
    """float64 [D] upper bounds ``min(1, E * tokens_d / budget)``; RegmixError when no mixture fits the caps."""
    tok = np.asarray(tokens, dtype=np.float64).reshape(-1)
    for key, v in (("--budget-tokens", budget_tokens), ("--max-epochs", max_epochs)):
        if not (np.isfinite(v) and v > 0):
            raise RegmixError(f"{key}: must be a finite number > 0, got {v!r}")
    if tok.size != len(names) or not np.all(np.isfinite(tok)) or np.any(tok < 0):
        raise RegmixError(f"token counts: expected {len(names)} finite counts >= 0, got {tok.tolist()}")
    capacity = float(max_epochs) * float(tok.sum())
    if capacity < budget_tokens:
        per = ", ".join(f"{n} {t:.4g}" for n, t in zip(names, tok))
        raise RegmixError(
            f"repetition caps infeasible: a budget of {budget_tokens:.6g} tokens needs more than "
            f"--max-epochs {max_epochs:g} epochs of all the data together ({capacity:.6g} tokens: {per}); raise "
            "--max-epochs, lower --budget-tokens or add data"
        )
    return np.minimum(1.0, float(max_epochs) * tok / float(budget_tokens))


def project_capped_simplex(v: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Euclidean projection of ``v`` [D] onto ``{sum w = 1, 0 <= w <= upper}`` (needs ``sum upper >= 1``)."""
    v = np.asarray(v, dtype=np.float64)
    upper = np.asarray(upper, dtype=np.float64)
    if upper.sum() < 1.0 - 1e-12:
        raise RegmixError(f"caps sum to {upper.sum():.6g} < 1: no mixture fits them")
    lo, hi = float(v.min() - upper.max() - 1.0), float(v.max())
    for _ in range(200):  # sum clip(v - tau, 0, u) is non-increasing in tau
        tau = 0.5 * (lo + hi)
        if np.clip(v - tau, 0.0, upper).sum() > 1.0:
            lo = tau
        else:
            hi = tau
    w = np.clip(v - 0.5 * (lo + hi), 0.0, upper)
    slack = upper - w
    gap = 1.0 - w.sum()  # bisection leftovers (~1e-16): put them where the caps leave room
    if gap > 0 and slack.sum() > 0:
        w = w + gap * slack / slack.sum()
    return np.minimum(w, upper)


def kl_divergence(w: np.ndarray, q: np.ndarray) -> float:
    """KL(w || q) = sum_d w_d log(w_d / q_d) (0 log 0 = 0; +inf when w_d > 0 = q_d)."""
    w, q = np.asarray(w, dtype=np.float64), np.asarray(q, dtype=np.float64)
    pos = w > 0
    if np.any(pos & (q <= 0)):
        return float("inf")
    return float(np.sum(w[pos] * np.log(w[pos] / q[pos])))


def binding_caps(w: np.ndarray, upper: np.ndarray, names: Sequence[str], tol: float = 1e-6) -> list[str]:
    """Names of the domains whose cap binds (``w_d >= u_d - tol`` for a cap ``u_d < 1``)."""
    return [n for n, x, u in zip(names, w, upper) if u < 1.0 and x >= u - tol]


def minimize_on_simplex(
    objective: Callable[[np.ndarray], float],
    gradient: Callable[[np.ndarray], np.ndarray],
    upper: np.ndarray,
    *,
    prior: np.ndarray | None = None,
    kl_prior: np.ndarray | None = None,
    kl_weight: float = 0.0,
    starts: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """Minimise ``objective(w) + kl_weight * KL(w || kl_prior)`` on the capped simplex (module doc).

    Returns ``{"weights" [D], "objective" (the regressor part), "penalised" (with the KL term), "kl",
    "starts", "converged" (starts SLSQP reported as successful), "messages"}``.
    """
    from scipy.optimize import minimize

    upper = np.asarray(upper, dtype=np.float64).copy()
    d = upper.size
    if kl_weight < 0 or not np.isfinite(kl_weight):
        raise RegmixError(f"--kl-weight: must be a finite number >= 0, got {kl_weight!r}")
    q = None
    if kl_weight > 0:
        if kl_prior is None:
            raise RegmixError("--kl-weight > 0 needs --kl-prior")
        q = np.asarray(kl_prior, dtype=np.float64)
        q = q / q.sum()
        upper = np.where(q > 0, upper, 0.0)  # KL is infinite off the prior's support
    if upper.sum() < 1.0 - 1e-12:
        raise RegmixError(
            f"caps (and the KL prior's support) allow a total weight of only {upper.sum():.6g} < 1: infeasible"
        )
    if starts < 1:
        raise RegmixError(f"--starts: must be >= 1, got {starts}")

    def fun(w: np.ndarray) -> float:
        val = float(objective(w))
        if q is not None:
            ws = np.maximum(w, _EPS)
            val += kl_weight * float(np.sum(ws * np.log(ws / np.where(q > 0, q, 1.0))))
        return val

    def jac(w: np.ndarray) -> np.ndarray:
        g = np.asarray(gradient(w), dtype=np.float64).copy()
        if q is not None:
            g += kl_weight * (np.log(np.maximum(w, _EPS) / np.where(q > 0, q, 1.0)) + 1.0)
        return g

    rng = np.random.Generator(np.random.PCG64(seed))
    x0s = (
        [np.full(d, 1.0 / d)] if prior is None else [np.asarray(prior, dtype=np.float64), np.full(d, 1.0 / d)]
    )
    while len(x0s) < starts:
        x0s.append(rng.dirichlet(np.ones(d)))
    bounds = list(zip(np.zeros(d), upper))
    cons = [{"type": "eq", "fun": lambda w: float(w.sum() - 1.0), "jac": lambda w: np.ones_like(w)}]
    best: tuple[float, np.ndarray] | None = None
    converged, messages = 0, []
    for x0 in x0s[:starts]:
        start = project_capped_simplex(x0, upper)
        res = minimize(fun, start, jac=jac, method="SLSQP", bounds=bounds, constraints=cons,
                       options={"maxiter": 1000, "ftol": 1e-12})  # fmt: skip
        converged += bool(res.success)
        messages.append(str(res.message))
        w = project_capped_simplex(res.x if np.all(np.isfinite(res.x)) else start, upper)
        val = fun(w)
        if np.isfinite(val) and (best is None or val < best[0]):
            best = (val, w)
    if best is None:
        raise RegmixError("exact search: the objective was not finite at any start")
    w = best[1]
    kl = kl_divergence(w, q) if q is not None else None
    return {
        "weights": w,
        "objective": float(objective(w)),
        "penalised": float(best[0]),
        "kl": kl,
        "starts": min(starts, len(x0s)),
        "converged": converged,
        "messages": sorted(set(messages)),
    }
