"""Seed statistics for the report: mean and 95% Student-t half-width over replicates, paired verdicts.

A method's verdict on one metric (lower is better, e.g. validation loss) compares it with the baseline *paired
by seed*: ``d_i = method_i - baseline_i`` for every seed ``i`` both ran. With ``n >= 2`` pairs the 95% interval
of the mean difference is ``mean(d) ± t_{0.975, n-1} · sd(d) / sqrt(n)``; the verdict is ``"better"`` when the
whole interval is below 0, ``"worse"`` when it is above 0 and ``"no significant difference"`` otherwise. With
fewer than two pairs (or a non-finite value) nothing can be claimed: ``"not tested"``.
No scipy needed: the t quantiles come from a table (df <= 30) and a Cornish-Fisher expansion (df > 30).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "BETTER",
    "NOT_TESTED",
    "NO_DIFFERENCE",
    "VERDICTS",
    "WORSE",
    "estimate",
    "paired_verdict",
    "summarize_verdicts",
    "t_quantile_975",
]

BETTER, WORSE, NO_DIFFERENCE, NOT_TESTED = "better", "worse", "no significant difference", "not tested"
VERDICTS = (BETTER, WORSE, NO_DIFFERENCE, NOT_TESTED)

# t_{0.975, df} for df = 1..30
_T975 = (12.706204736, 4.30265273, 3.182446305, 2.776445105, 2.570581836, 2.446911851, 2.364624252,
         2.306004135, 2.262157163, 2.228138852, 2.20098516, 2.17881283, 2.160368656, 2.144786688,
         2.131449546, 2.119905299, 2.109815578, 2.10092204, 2.093024054, 2.085963447, 2.079613845,
         2.073873068, 2.06865761, 2.063898562, 2.059538553, 2.055529439, 2.051830516, 2.048407142,
         2.045229642, 2.042272456)  # fmt: skip
_Z975 = 1.959963984540054


def t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df >= 1`` degrees of freedom (two-sided 95% intervals)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z, n = _Z975, float(df)
    return (
        z
        + (z**3 + z) / (4 * n)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * n**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * n**3)
    )


def _finite(values: Iterable[Any]) -> list[float] | None:
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return None
        out.append(float(v))
    return out


def estimate(values: Sequence[float]) -> dict[str, Any]:
    """``{"values", "n", "mean", "sd", "ci95"}`` of per-seed values; ``sd``/``ci95`` are None for n < 2,
    everything but ``values`` None when a value is missing or non-finite."""
    vals = _finite(values)
    out: dict[str, Any] = {"values": list(values), "n": len(values), "mean": None, "sd": None, "ci95": None}
    if not vals:
        return out
    n = len(vals)
    mean = math.fsum(vals) / n
    out["mean"] = mean
    if n >= 2:
        sd = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (n - 1))
        out["sd"], out["ci95"] = sd, t_quantile_975(n - 1) * sd / math.sqrt(n)
    return out


def paired_verdict(method: Sequence[float], baseline: Sequence[float]) -> dict[str, Any]:
    """Paired (same seed) comparison, lower is better: ``{"deltas", "n", "mean", "sd", "ci95", "verdict"}``
    with ``delta = method - baseline``. Sequences must have equal length (seed i in both)."""
    if len(method) != len(baseline):
        raise ValueError(
            f"paired comparison needs one value per seed in both, got {len(method)} and {len(baseline)}"
        )
    m, b = _finite(method), _finite(baseline)
    if m is None or b is None:
        deltas: list[float | None] = [None] * len(method)
        return {
            "deltas": deltas,
            "n": len(method),
            "mean": None,
            "sd": None,
            "ci95": None,
            "verdict": NOT_TESTED,
        }
    est = estimate([x - y for x, y in zip(m, b)])
    verdict = NOT_TESTED
    if est["ci95"] is not None:
        lo, hi = est["mean"] - est["ci95"], est["mean"] + est["ci95"]
        verdict = BETTER if hi < 0 else WORSE if lo > 0 else NO_DIFFERENCE
    return {"deltas": est["values"], **{k: est[k] for k in ("n", "mean", "sd", "ci95")}, "verdict": verdict}


def summarize_verdicts(verdicts: Mapping[str, str] | Iterable[str]) -> dict[str, int]:
    """``{"better": n, "worse": n, "no significant difference": n, "not tested": n}`` over ``verdicts``."""
    items = verdicts.values() if isinstance(verdicts, Mapping) else verdicts
    out = dict.fromkeys(VERDICTS, 0)
    for v in items:
        if v not in out:
            raise ValueError(f"unknown verdict {v!r}; known: {', '.join(VERDICTS)}")
        out[v] += 1
    return out
