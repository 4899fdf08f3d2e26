"""The log-linear mixing law (Olmix's default): ``loss_k(w) = exp(c_k) + exp(t_k . w)`` per target k.

One law per target loss (a domain's validation loss); the ``average`` objective is the mean of the per-domain
laws, so it stays a sum of convex functions of ``w`` (``exp`` of an affine map is convex): ``regmix search
--optimizer exact`` minimises it on the simplex with a gradient (:meth:`LogLinearModel.gradient`).

Fit (:func:`fit_law`): ``scipy.optimize.least_squares`` with ``loss="huber"`` on the residuals
``exp(c) + exp(t . w_i) - y_i`` (analytic Jacobian), so a diverged proxy counts linearly instead of squared. The
Huber threshold ``delta`` defaults to 10% of the target's standard deviation over the runs. Starts: for each
fraction ``a`` in :data:`START_FRACTIONS` of ``min(y)``, ``c = log(a * min y)`` and ``t`` = least squares of
``log(y - a * min y)`` on ``w`` (the simplex rows absorb the intercept); the lowest robust cost wins. Targets must
be positive (cross-entropy losses are). Deterministic: no random starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from megatron_doremi.regmix.sample import RegmixError

__all__ = ["LogLinearModel", "START_FRACTIONS", "fit_law", "fit_loglinear"]

START_FRACTIONS = (0.01, 0.3, 0.6, 0.9)
_MAX_EXPONENT = 60.0  # t . w is clipped here: exp(60) ~ 1e26 keeps predictions and gradients finite


@dataclass
class LogLinearModel:
    """``predict(w) = mean_k [exp(c[k]) + exp(t[k] . w)]`` over the fitted targets ``loss_names`` (one target for a
    domain objective, every domain for ``average``). ``c`` [K], ``t`` [K, D] in ``domain_names`` order."""

    c: np.ndarray
    t: np.ndarray
    domain_names: list[str]
    loss_names: list[str]
    huber_delta: list[float]

    def _exp_tw(self, weights: np.ndarray) -> np.ndarray:
        w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
        return np.exp(np.minimum(w @ self.t.T, _MAX_EXPONENT))  # [N, K]

    def predict_targets(self, weights: np.ndarray) -> np.ndarray:
        """float64 [N, K]: each target's law at weights [N, D]."""
        return np.exp(self.c)[None, :] + self._exp_tw(weights)

    def predict(self, weights: np.ndarray) -> np.ndarray:
        """float64 [N]: the objective (mean over the targets) at weights [N, D]."""
        return self.predict_targets(weights).mean(axis=1)

    def gradient(self, weights: np.ndarray) -> np.ndarray:
        """float64 [D]: gradient of :meth:`predict` at one weight vector [D]."""
        e = self._exp_tw(np.asarray(weights, dtype=np.float64)[None, :])[0]  # [K]
        return (e[:, None] * self.t).mean(axis=0)

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "loglinear",
            "formula": "loss_k(w) = exp(c[k]) + exp(sum_d t[k][d] * w_d); objective = mean over loss_names",
            "domain_names": self.domain_names,
            "loss_names": self.loss_names,
            "c": self.c.tolist(),
            "t": self.t.tolist(),
            "huber_delta": self.huber_delta,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any], where: str) -> LogLinearModel:
        try:
            model = cls(
                np.asarray(doc["c"], dtype=np.float64).reshape(-1),
                np.atleast_2d(np.asarray(doc["t"], dtype=np.float64)),
                list(doc["domain_names"]),
                list(doc["loss_names"]),
                [float(x) for x in doc.get("huber_delta", [])],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RegmixError(f"{where}: malformed log-linear model ({exc})") from None
        if model.t.shape != (model.c.size, len(model.domain_names)) or model.c.size != len(model.loss_names):
            raise RegmixError(
                f"{where}: log-linear model shapes disagree: c {model.c.shape}, t {model.t.shape}, "
                f"{len(model.domain_names)} domains, {len(model.loss_names)} loss names"
            )
        return model


def fit_law(
    weights: np.ndarray, y: np.ndarray, huber_delta: float | None = None
) -> tuple[float, np.ndarray, float]:
    """(c, t [D], delta) of ``y ~ exp(c) + exp(t . w)`` by a Huber-loss least squares from several starts."""
    from scipy.optimize import least_squares

    w = np.asarray(weights, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if w.ndim != 2 or w.shape[0] != y.size:
        raise RegmixError(f"log-linear fit: weights {w.shape} and targets {y.shape} disagree")
    if not np.all(np.isfinite(y)) or y.min() <= 0:
        raise RegmixError(f"log-linear fit: target losses must be finite and > 0, got min {y.min()!r}")
    delta = (
        float(huber_delta) if huber_delta is not None else max(0.1 * float(np.std(y)), 1e-6 * float(y.mean()))
    )

    def resid(p: np.ndarray) -> np.ndarray:
        return np.exp(p[0]) + np.exp(np.minimum(w @ p[1:], _MAX_EXPONENT)) - y

    def jac(p: np.ndarray) -> np.ndarray:
        e = np.exp(np.minimum(w @ p[1:], _MAX_EXPONENT))
        return np.concatenate([np.full((y.size, 1), np.exp(p[0])), e[:, None] * w], axis=1)

    best: tuple[float, np.ndarray] | None = None
    for frac in START_FRACTIONS:
        a = frac * float(y.min())
        t0 = np.linalg.lstsq(w, np.log(y - a), rcond=None)[0]
        p0 = np.concatenate([[np.log(a)], t0])
        res = least_squares(resid, p0, jac=jac, loss="huber", f_scale=delta, method="trf", max_nfev=2000)
        if np.all(np.isfinite(res.x)) and (best is None or res.cost < best[0] - 1e-15):
            best = (float(res.cost), res.x)
    if best is None:
        raise RegmixError("log-linear fit: no start converged to finite parameters")
    return float(best[1][0]), best[1][1:].copy(), delta


def fit_loglinear(
    weights: np.ndarray,
    losses: np.ndarray,
    domain_names: Sequence[str],
    loss_names: Sequence[str],
    huber_delta: float | None = None,
) -> LogLinearModel:
    """One law per column of ``losses`` [N, K] (targets named ``loss_names``) on ``weights`` [N, D]."""
    losses = np.atleast_2d(np.asarray(losses, dtype=np.float64))
    if losses.shape[1] != len(loss_names):
        raise RegmixError(f"log-linear fit: {losses.shape[1]} loss columns for {len(loss_names)} names")
    cs, ts, deltas = [], [], []
    for k, name in enumerate(loss_names):
        try:
            c, t, d = fit_law(weights, losses[:, k], huber_delta)
        except RegmixError as exc:
            raise RegmixError(f"target {name!r}: {exc}") from None
        cs.append(c)
        ts.append(t)
        deltas.append(d)
    return LogLinearModel(np.array(cs), np.array(ts), list(domain_names), list(loss_names), deltas)
