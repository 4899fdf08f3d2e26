"""RegMix step 3: regress a target validation loss on the mixture weights.

Three regressors, all fitted on ``X`` = mixture weights [N, D] (domain order of the runs' mixtures):

* **LightGBM** (``lightgbm.train``, small-data settings: shallow trees, ``min_data_in_leaf`` 2, 300 rounds of
  learning rate 0.03, ``deterministic``, one thread, seeded), as in the RegMix paper.
* **Linear** on ``[w_d, log(w_d + eps)]`` (eps = 0.01 by default) with a ridge penalty picked by exact
  leave-one-out error over a fixed grid (standardised features). Why these features: loss falls with a domain's
  share roughly like a power law, so ``log w`` captures the diminishing returns a plain linear model on ``w``
  cannot, while ``w`` keeps the linear case; eps keeps zero weights finite (a weight below ``min_weight`` is 0).
  ``--linear-features weights`` gives RegMix's plain linear model.
* **Log-linear** (Olmix's mixing law, :mod:`.loglinear`): ``loss_k(w) = exp(c_k) + exp(t_k . w)`` per domain loss,
  Huber-robust; the ``average`` target is the mean of the per-domain laws (a domain target: that domain's law).

Protocol: a seeded random ``holdout`` fraction of the runs is held out; the regressors (all by default) are fitted
on the rest and scored on it (Spearman and Pearson from ``scipy.stats``, RMSE). ``fit.json`` names the regressor
the held-out numbers favour (``favoured_regressor``: highest held-out Spearman, ties broken by Pearson, then RMSE).
The saved models are then refitted on all runs (what ``regmix search`` uses). Outputs in ``runs/regmix_fit/``:
``fit.json``, ``lightgbm_model.txt``, ``linear_model.json``, ``loglinear_model.json``, ``pred_vs_actual.png``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megatron_doremi.regmix.loglinear import LogLinearModel, fit_loglinear
from megatron_doremi.regmix.runs import (
    atomic_write_json,
    collect_results,
    read_json,
    target_losses,
    target_vector,
)
from megatron_doremi.regmix.sample import RegmixError

__all__ = [
    "FIT_DIR",
    "LinearModel",
    "MIN_RUNS",
    "REGRESSORS",
    "favoured_regressor",
    "fit_lightgbm",
    "fit_linear",
    "fit_runs",
    "holdout_metrics",
    "load_regressor",
    "lightgbm_params",
]

FIT_DIR = "regmix_fit"
MIN_RUNS = 4
LINEAR_FEATURES = ("both", "log", "weights")
REGRESSORS = ("lightgbm", "linear", "loglinear")
MODEL_FILES = {
    "lightgbm": "lightgbm_model.txt",
    "linear": "linear_model.json",
    "loglinear": "loglinear_model.json",
}
_RIDGE_GRID = tuple(10.0**e for e in np.arange(-6.0, 3.01, 0.5))


# ---- linear ---------------------------------------------------------------------------------------------------------


def linear_features(weights: np.ndarray, kind: str, eps: float) -> np.ndarray:
    """Features [N, F] of weights [N, D]: ``weights`` -> w, ``log`` -> log(w + eps), ``both`` -> [w, log(w + eps)]."""
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    if kind == "weights":
        return w
    if kind == "log":
        return np.log(w + eps)
    if kind == "both":
        return np.concatenate([w, np.log(w + eps)], axis=1)
    raise RegmixError(f"linear features: expected one of {', '.join(LINEAR_FEATURES)}, got {kind!r}")


@dataclass
class LinearModel:
    """``y = intercept + features(w) @ coef`` (coef on raw, unstandardised features)."""

    kind: str
    eps: float
    intercept: float
    coef: np.ndarray
    ridge: float
    domain_names: list[str]

    def predict(self, weights: np.ndarray) -> np.ndarray:
        """float64 [N] for weights [N, D]."""
        return self.intercept + linear_features(weights, self.kind, self.eps) @ self.coef

    def gradient(self, weights: np.ndarray) -> np.ndarray:
        """float64 [D]: gradient of :meth:`predict` at one weight vector [D]."""
        w = np.asarray(weights, dtype=np.float64).reshape(-1)
        d = w.size
        if self.kind == "weights":
            return self.coef.copy()
        dlog = self.coef[-d:] / (w + self.eps)
        return dlog if self.kind == "log" else self.coef[:d] + dlog

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "linear",
            "features": self.kind,
            "eps": self.eps,
            "intercept": self.intercept,
            "coef": self.coef.tolist(),
            "ridge": self.ridge,
            "domain_names": self.domain_names,
            "formula": {
                "weights": "y = intercept + sum_d coef[d] * w_d",
                "log": "y = intercept + sum_d coef[d] * log(w_d + eps)",
                "both": "y = intercept + sum_d coef[d] * w_d + sum_d coef[D + d] * log(w_d + eps)",
            }[self.kind],
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any], where: str) -> LinearModel:
        try:
            return cls(
                str(doc["features"]),
                float(doc["eps"]),
                float(doc["intercept"]),
                np.asarray(doc["coef"], dtype=np.float64),
                float(doc["ridge"]),
                list(doc["domain_names"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RegmixError(f"{where}: malformed linear model ({exc})") from None


def fit_linear(
    weights: np.ndarray, y: np.ndarray, domain_names: Sequence[str], kind: str = "both", eps: float = 0.01
) -> LinearModel:
    """Ridge regression on standardised features, penalty chosen by closed-form leave-one-out MSE."""
    feats = linear_features(weights, kind, eps)
    mu, sd = feats.mean(axis=0), feats.std(axis=0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    z = (feats - mu) / sd
    y = np.asarray(y, dtype=np.float64)
    ym = float(y.mean())
    yc = y - ym
    n = z.shape[0]
    best: tuple[float, float, np.ndarray] | None = None
    gram = z.T @ z
    eye = np.eye(z.shape[1])
    for lam in _RIDGE_GRID:
        inv = np.linalg.solve(gram + lam * eye, eye)
        beta = inv @ z.T @ yc
        hat = np.einsum("ij,jk,ik->i", z, inv, z) + 1.0 / n  # diagonal of the hat matrix incl. the intercept
        resid = yc - z @ beta
        loo = float(np.mean((resid / np.maximum(1.0 - hat, 1e-9)) ** 2))
        if best is None or loo < best[0] - 1e-15:
            best = (loo, lam, beta)
    assert best is not None
    _, lam, beta = best
    coef = beta / sd
    intercept = ym - float(mu @ coef)
    return LinearModel(kind, float(eps), intercept, coef, float(lam), list(domain_names))


# ---- lightgbm -------------------------------------------------------------------------------------------------------


def lightgbm_params(seed: int) -> dict[str, Any]:
    """Small-data LightGBM settings (deterministic, single-threaded)."""
    return {
        "objective": "regression",
        "learning_rate": 0.03,
        "num_leaves": 7,
        "max_depth": 3,
        "min_data_in_leaf": 2,
        "min_data_in_bin": 1,
        "min_sum_hessian_in_leaf": 0.0,
        "lambda_l2": 0.0,
        "feature_fraction": 1.0,
        "bagging_fraction": 1.0,
        "deterministic": True,
        "force_col_wise": True,
        "num_threads": 1,
        "seed": int(seed),
        "verbose": -1,
    }


NUM_BOOST_ROUND = 300


def fit_lightgbm(
    weights: np.ndarray, y: np.ndarray, seed: int = 0, num_boost_round: int = NUM_BOOST_ROUND
) -> Any:
    """A ``lightgbm.Booster`` fitted on weights [N, D] -> y [N] (features named w_0..w_{D-1})."""
    import lightgbm as lgb

    x = np.asarray(weights, dtype=np.float64)
    params = lightgbm_params(seed)
    data = lgb.Dataset(
        x,
        label=np.asarray(y, dtype=np.float64),
        feature_name=[f"w_{i}" for i in range(x.shape[1])],
        params={"min_data_in_bin": 1, "verbose": -1},
        free_raw_data=False,
    )
    return lgb.train(params, data, num_boost_round=num_boost_round)


# ---- metrics, protocol ----------------------------------------------------------------------------------------------


def _finite_or_none(v: float) -> float | None:
    return float(v) if v is not None and math.isfinite(v) else None


def holdout_metrics(pred: np.ndarray, actual: np.ndarray) -> dict[str, float | None]:
    """Spearman, Pearson (None when undefined, e.g. constant values or < 2 points), RMSE, MAE."""
    from scipy import stats

    pred = np.asarray(pred, dtype=np.float64)
    actual = np.asarray(actual, dtype=np.float64)
    out: dict[str, float | None] = {"spearman": None, "pearson": None}
    if pred.size >= 2 and np.ptp(pred) > 0 and np.ptp(actual) > 0:
        out["spearman"] = _finite_or_none(stats.spearmanr(pred, actual).statistic)
        out["pearson"] = _finite_or_none(stats.pearsonr(pred, actual).statistic)
    out["rmse"] = float(np.sqrt(np.mean((pred - actual) ** 2))) if pred.size else None
    out["mae"] = float(np.mean(np.abs(pred - actual))) if pred.size else None
    return out


def split_holdout(n: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) index arrays: a seeded permutation; the test set has max(3, round(holdout * n)) runs (0 if
    holdout == 0; a correlation over 2 points is always +-1), and the training set keeps >= 3."""
    if not (0.0 <= holdout < 1.0):
        raise RegmixError(f"--holdout: must be in [0, 1), got {holdout}")
    perm = np.random.Generator(np.random.PCG64(seed)).permutation(n)
    n_test = 0 if holdout == 0 else max(3, int(round(holdout * n)))
    n_test = min(n_test, n - 3)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def _plot(
    path: Path, panels: list[tuple[str, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]], target: str
) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2 * len(panels), 4.8), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, actual, pred, is_test, metrics) in zip(axes, panels):
        ax.scatter(actual[~is_test], pred[~is_test], s=14, c="0.6", label="train")
        if is_test.any():
            ax.scatter(actual[is_test], pred[is_test], s=22, c="tab:red", label="held out")
        lo, hi = float(min(actual.min(), pred.min())), float(max(actual.max(), pred.max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        sp, pe = metrics.get("spearman"), metrics.get("pearson")
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        ax.set_title(f"{name}: held-out Spearman {fmt(sp)}, Pearson {fmt(pe)}", fontsize=9)
        ax.set_xlabel(f"actual {target} loss")
        ax.set_ylabel("predicted")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)


def favoured_regressor(regs: dict[str, Any]) -> str | None:
    """The regressor the held-out numbers favour: highest Spearman, then Pearson, then lowest RMSE (None: no
    held-out numbers)."""

    def key(name: str) -> tuple[float, float, float]:
        h = regs[name]["holdout"]
        miss = lambda v, bad: bad if v is None else v  # noqa: E731
        return (
            miss(h.get("spearman"), -2.0),
            miss(h.get("pearson"), -2.0),
            -miss(h.get("rmse"), float("inf")),
        )

    scored = [k for k in regs if regs[k]["holdout"].get("spearman") is not None]
    return max(scored, key=key) if scored else None


def parse_regressors(text: str | Sequence[str]) -> list[str]:
    """``"all"`` or a comma list of :data:`REGRESSORS` -> the list (in :data:`REGRESSORS` order)."""
    items = [x.strip() for x in text.split(",")] if isinstance(text, str) else list(text)
    items = [x for x in items if x]
    if items == ["all"]:
        return list(REGRESSORS)
    bad = [x for x in items if x not in REGRESSORS]
    if bad or not items:
        raise RegmixError(
            f"--regressor: expected 'all' or a comma list of {', '.join(REGRESSORS)}, got {text!r}"
        )
    return [r for r in REGRESSORS if r in items]


def _fit_one(
    kind: str, x: np.ndarray, results: Any, y: np.ndarray, ys: np.ndarray, target_names: list[str], opts: dict
) -> Any:
    """A fitted model with ``predict`` (a LightGBM booster, LinearModel or LogLinearModel)."""
    if kind == "lightgbm":
        return fit_lightgbm(x, y, opts["seed"])
    if kind == "linear":
        return fit_linear(x, y, results.names, opts["linear_kind"], opts["eps"])
    return fit_loglinear(x, ys, results.names, target_names, opts["huber_delta"])


def _save_model(kind: str, model: Any, out_dir: Path) -> None:
    path = out_dir / MODEL_FILES[kind]
    if kind == "lightgbm":
        tmp = out_dir / f".{path.name}.tmp"
        model.save_model(str(tmp))
        os.replace(tmp, path)
    else:
        atomic_write_json(path, model.to_json())


def fit_runs(
    runs_dir: str | os.PathLike[str],
    target: str = "average",
    holdout: float = 0.25,
    seed: int = 0,
    linear_kind: str = "both",
    eps: float = 0.01,
    plot: bool = True,
    regressors: str | Sequence[str] = "all",
    huber_delta: float | None = None,
) -> dict[str, Any]:
    """Collect results, fit and score the regressors, save models/plot/fit.json; returns the fit.json dict."""
    kinds = parse_regressors(regressors)
    results = collect_results(runs_dir)
    y = target_vector(results, target)
    ys, target_names = target_losses(results, target)
    n = len(results.runs)
    if n < MIN_RUNS:
        raise RegmixError(
            f"{runs_dir}: only {n} finished run(s) ({', '.join(results.runs)}); need at least {MIN_RUNS} to fit "
            f"(ideally several times the number of domains, {len(results.names)})"
        )
    if linear_kind not in LINEAR_FEATURES:
        raise RegmixError(
            f"--linear-features: expected one of {', '.join(LINEAR_FEATURES)}, got {linear_kind!r}"
        )
    x = results.weights
    tr, te = split_holdout(n, holdout, seed)
    is_test = np.zeros(n, dtype=bool)
    is_test[te] = True
    out_dir = Path(runs_dir) / FIT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    opts = {"seed": seed, "linear_kind": linear_kind, "eps": eps, "huber_delta": huber_delta}

    preds: dict[str, np.ndarray] = {}
    regs: dict[str, Any] = {}
    for kind in kinds:
        split = _fit_one(kind, x[tr], results, y[tr], ys[tr], target_names, opts)
        preds[kind] = np.asarray(split.predict(x), dtype=np.float64)
        regs[kind] = {
            "holdout": holdout_metrics(preds[kind][te], y[te]),
            "train": holdout_metrics(preds[kind][tr], y[tr]),
            "model": MODEL_FILES[kind],
        }
        full = _fit_one(kind, x, results, y, ys, target_names, opts)
        _save_model(kind, full, out_dir)
        if kind == "lightgbm":
            regs[kind].update({"params": lightgbm_params(seed), "num_boost_round": NUM_BOOST_ROUND})
        elif kind == "linear":
            regs[kind].update({"features": linear_kind, "eps": eps, "ridge": full.ridge})
        else:
            regs[kind].update({"loss_names": target_names, "huber_delta": full.huber_delta})

    plot_path = out_dir / "pred_vs_actual.png"
    if plot:
        _plot(plot_path, [(k, y, preds[k], is_test, regs[k]["holdout"]) for k in kinds], target)
    best = favoured_regressor(regs)
    if best is None:
        verdict = "no held-out runs (--holdout 0): the held-out numbers favour no regressor"
    else:
        h = regs[best]["holdout"]
        verdict = (
            f"the held-out numbers favour {best} (Spearman {h['spearman']:.3f}, "
            f"Pearson {'n/a' if h['pearson'] is None else format(h['pearson'], '.3f')}, over {len(te)} runs)"
        )
    doc = {
        "target": target,
        "domain_names": results.names,
        "loss_names": results.targets,
        "num_runs": n,
        "runs": results.runs,
        "unfinished": results.unfinished,
        "holdout": holdout,
        "seed": seed,
        "train_runs": [results.runs[i] for i in tr],
        "test_runs": [results.runs[i] for i in te],
        "target_values": dict(zip(results.runs, y.tolist())),
        "best_observed": {"run": results.runs[int(np.argmin(y))], "loss": float(y.min())},
        "regressors": regs,
        "favoured_regressor": best,
        "verdict": verdict,
        "best_regressor_by_holdout_spearman": best,
        "plot": plot_path.name if plot else None,
        "note": "metrics from models fitted on train_runs; saved models are refitted on all runs",
    }
    atomic_write_json(out_dir / "fit.json", doc)
    return doc


def load_regressor(runs_dir: str | os.PathLike[str], kind: str) -> tuple[Any, dict[str, Any]]:
    """(model with ``predict``: weights [N, D] -> float64 [N], fit.json dict) for ``kind`` in :data:`REGRESSORS`.
    LinearModel and LogLinearModel also have ``gradient`` (what ``--optimizer exact`` needs)."""
    if kind not in REGRESSORS:
        raise RegmixError(f"--regressor: expected one of {', '.join(REGRESSORS)}, got {kind!r}")
    fit_dir = Path(runs_dir) / FIT_DIR
    doc = read_json(fit_dir / "fit.json", "fit summary (run 'regmix fit' first)")
    entry = doc.get("regressors", {}).get(kind)
    path = fit_dir / (entry or {}).get("model", MODEL_FILES[kind])
    if entry is None or not path.is_file():
        raise RegmixError(
            f"{fit_dir / 'fit.json'}: no {kind} model was fitted (run 'regmix fit {runs_dir} --regressor "
            f"{kind}' or '--regressor all')"
        )
    if kind == "lightgbm":
        import lightgbm as lgb

        booster = lgb.Booster(model_file=str(path))
        threads = os.cpu_count() or 1
        return _Booster(booster, threads), doc
    if kind == "linear":
        return LinearModel.from_json(read_json(path, "linear model"), str(path)), doc
    return LogLinearModel.from_json(read_json(path, "log-linear model"), str(path)), doc


@dataclass
class _Booster:
    booster: Any
    threads: int

    def predict(self, weights: np.ndarray) -> np.ndarray:
        return np.asarray(
            self.booster.predict(np.atleast_2d(weights), num_threads=self.threads), dtype=np.float64
        )
