"""RegMix step 4: score many sampled mixtures with the fitted regressor and average the best ones.

Candidates come from the same scheme as ``regmix sample`` (manifest prior, concentration grid, ``min_weight``
threshold, epoch cap when the manifest knows the token counts and planned tokens; no dedupe), drawn in batches
from ``PCG64(seed)`` and scored by the regressor; the ``top_k`` lowest predicted target losses are averaged
(and renormalised) into the answer. Outputs, in the directory of ``--out`` (default ``runs/domain_weights.json``):

* ``domain_weights.json``: DoReMi's format; ``average`` and ``final`` both hold the top-k average (what to train
  the main model on); extra keys: ``method``, ``target``, ``regressor``, ``predicted_loss``, ``best_candidate``,
  ``prior``, ``fit`` (held-out metrics), search arguments;
* ``report.md``: weights table (prior / RegMix / best observed run), regressor fit statistics, plot paths;
* ``regmix_weights.png``: the chosen weights next to the prior.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from megatron_doremi.regmix.fit import FIT_DIR, load_regressor
from megatron_doremi.regmix.runs import load_manifest
from megatron_doremi.regmix.sample import RegmixError, SamplingError, epoch_cap_ok, propose

__all__ = ["search_candidates", "run_search", "write_search_outputs"]


def search_candidates(
    predict: Any,
    prior: np.ndarray,
    concentrations: np.ndarray,
    min_weight: float,
    num_candidates: int,
    top_k: int,
    seed: int,
    tokens: np.ndarray | None = None,
    planned_tokens: float | None = None,
    max_epochs: float | None = None,
    batch: int = 100_000,
    max_draw_factor: int = 20,
) -> dict[str, Any]:
    """Score ``num_candidates`` accepted candidates; returns ``{"weights" [D] (top-k mean), "top_weights" [k, D],
    "top_scores" [k] ascending, "num_scored", "num_drawn"}``. SamplingError when the cap rejects nearly all draws."""
    if num_candidates < 1 or top_k < 1:
        raise RegmixError(f"--num-candidates and --top-k must be >= 1, got {num_candidates}, {top_k}")
    top_k = min(top_k, num_candidates)
    prior = np.asarray(prior, dtype=np.float64)
    grid = np.asarray(concentrations, dtype=np.float64)
    rng = np.random.Generator(np.random.PCG64(seed))
    best_s = np.zeros(0)
    best_w = np.zeros((0, prior.size))
    scored = drawn = 0
    while scored < num_candidates:
        if drawn >= max_draw_factor * num_candidates:
            raise SamplingError(
                f"only {scored} of {num_candidates} candidates passed after {drawn} draws; binding constraint: "
                "the epoch cap or the min_weight threshold (see the manifest's max_epochs, planned_tokens, min_weight)"
            )
        n = min(batch, max(num_candidates - scored, 1024))
        conc = grid[(np.arange(drawn, drawn + n)) % grid.size]
        drawn += n
        w, valid = propose(rng, prior, conc, min_weight)
        if tokens is not None:
            valid &= epoch_cap_ok(w, tokens, planned_tokens, max_epochs)
        w = w[valid][: num_candidates - scored]
        if not len(w):
            continue
        s = np.asarray(predict(w), dtype=np.float64)
        if not np.all(np.isfinite(s)):
            raise RegmixError("the regressor returned non-finite predictions")
        scored += len(w)
        all_s = np.concatenate([best_s, s])
        all_w = np.concatenate([best_w, w])
        keep = np.argsort(all_s, kind="stable")[:top_k]
        best_s, best_w = all_s[keep], all_w[keep]
    avg = best_w.mean(axis=0)
    return {
        "weights": avg / avg.sum(),
        "top_weights": best_w,
        "top_scores": best_s,
        "num_scored": scored,
        "num_drawn": drawn,
    }


def _plot_weights(path: Path, names: list[str], series: dict[str, np.ndarray]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 0.7 * len(names) + 3), 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    x = np.arange(len(names))
    width = 0.8 / len(series)
    for i, (label, vals) in enumerate(series.items()):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, vals, width, label=label)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylabel("domain weight")
    ax.set_title("RegMix weights vs prior")
    ax.legend(fontsize="small")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def write_search_outputs(
    out: Path,
    names: list[str],
    prefixes: dict[str, list[str]] | None,
    weights: np.ndarray,
    extra: dict[str, Any],
    prior: np.ndarray,
    best_run: tuple[str, np.ndarray] | None,
    fit_doc: dict[str, Any],
    runs_dir: Path,
) -> dict[str, Path]:
    """domain_weights.json, report.md and regmix_weights.png in ``out``'s directory; returns their paths."""
    from megatron_doremi.mixers.weights_io import write_domain_weights_json

    out_dir = out.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    write_domain_weights_json(out, names, weights, weights, prefixes=prefixes, extra=extra)
    plot = out_dir / "regmix_weights.png"
    series = {"prior": prior, "RegMix": weights}
    if best_run is not None:
        series[f"best run ({best_run[0]})"] = best_run[1]
    _plot_weights(plot, names, series)
    fit_plot = runs_dir / FIT_DIR / str(fit_doc.get("plot") or "pred_vs_actual.png")
    lines = [
        "# RegMix search",
        "",
        f"Target: **{extra['target']}** validation loss; regressor **{extra['regressor']}**; "
        f"{extra['num_candidates']:,} candidates scored, top {extra['top_k']} averaged (seed {extra['seed']}).",
        f"Predicted target loss of the averaged mixture: {extra['predicted_loss']:.4f} "
        f"(best candidate {extra['best_candidate']['predicted_loss']:.4f}; best observed run "
        f"{fit_doc.get('best_observed', {}).get('run')}: {_fmt(fit_doc.get('best_observed', {}).get('loss'))}).",
        "",
        "| domain | prior | RegMix |" + (" best run |" if best_run else ""),
        "|---|---:|---:|" + ("---:|" if best_run else ""),
    ]
    for d, n in enumerate(names):
        row = f"| {n} | {prior[d]:.4f} | {weights[d]:.4f} |"
        if best_run:
            row += f" {best_run[1][d]:.4f} |"
        lines.append(row)
    lines += [
        "",
        f"## Regressor fit ({fit_doc.get('num_runs')} runs, {len(fit_doc.get('test_runs', []))} held out)",
        "",
        "| regressor | held-out Spearman | held-out Pearson | held-out RMSE | train Spearman |",
        "|---|---:|---:|---:|---:|",
    ]
    for k, r in fit_doc.get("regressors", {}).items():
        h, t = r.get("holdout", {}), r.get("train", {})
        lines.append(
            f"| {k} | {_fmt(h.get('spearman'))} | {_fmt(h.get('pearson'))} | {_fmt(h.get('rmse'))} | "
            f"{_fmt(t.get('spearman'))} |"
        )
    lines += [
        "",
        "## Files",
        "",
        f"- weights: `{out}` (`average` = `final` = the RegMix mixture, both mixture forms)",
        f"- weights plot: `{plot}`",
        f"- predicted vs actual: `{fit_plot}`",
        f"- fit summary: `{runs_dir / FIT_DIR / 'fit.json'}`",
        "",
    ]
    report = out_dir / "report.md"
    tmp = report.with_name(".report.md.tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, report)
    return {"weights": out, "report": report, "plot": plot}


def run_search(
    runs_dir: str | os.PathLike[str],
    regressor: str = "lightgbm",
    num_candidates: int = 1_000_000,
    top_k: int = 100,
    seed: int = 0,
    out: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """The ``regmix search`` command: returns ``{"weights", "names", "paths", "extra"}``."""
    runs = Path(runs_dir)
    man = load_manifest(runs)
    model, fit_doc = load_regressor(runs, regressor)
    predict = model.predict
    names = list(man["domain_names"])
    if list(fit_doc.get("domain_names", [])) != names:
        raise RegmixError(
            f"{runs / FIT_DIR / 'fit.json'}: domains {fit_doc.get('domain_names')} differ from the manifest's {names}"
        )
    prior = np.array([man["prior"][n] for n in names], dtype=np.float64)
    tokens = man.get("cap_tokens") or man.get("tokens")  # training-split tokens the cap was checked against
    tok = np.array([tokens[n] for n in names], dtype=np.float64) if tokens else None
    planned, epochs = man.get("planned_tokens"), man.get("max_epochs")
    if tok is None or planned is None or epochs is None:
        tok = None
    res = search_candidates(
        predict, prior, np.asarray(man["concentrations"]), float(man["min_weight"]), num_candidates, top_k, seed,
        tok, planned, epochs,
    )  # fmt: skip
    weights = res["weights"]
    predicted = float(predict(weights[None, :])[0])
    best_w = res["top_weights"][0]
    target_values = fit_doc.get("target_values", {})
    best_run = None
    best_obs = fit_doc.get("best_observed", {}).get("run")
    if best_obs and target_values:
        from megatron_doremi.data.mixture import Mixture

        best_run = (best_obs, Mixture.from_json(runs / best_obs / "mixture.json").weights)
    extra = {
        "method": "regmix",
        "target": fit_doc.get("target"),
        "regressor": regressor,
        "predicted_loss": predicted,
        "best_candidate": {
            "weights": dict(zip(names, best_w.tolist())),
            "predicted_loss": float(res["top_scores"][0]),
        },
        "top_k": int(min(top_k, num_candidates)),
        "num_candidates": int(res["num_scored"]),
        "num_drawn": int(res["num_drawn"]),
        "seed": seed,
        "prior": dict(zip(names, prior.tolist())),
        "fit": {k: v.get("holdout") for k, v in fit_doc.get("regressors", {}).items()},
        "runs_dir": str(runs.absolute()),
    }
    out_path = Path(out) if out is not None else runs / "domain_weights.json"
    prefixes = man.get("prefixes")
    paths = write_search_outputs(out_path, names, prefixes, weights, extra, prior, best_run, fit_doc, runs)
    return {"weights": weights, "names": names, "paths": paths, "extra": extra}
