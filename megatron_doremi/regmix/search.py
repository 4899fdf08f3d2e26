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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from megatron_doremi.regmix.fit import FIT_DIR, load_regressor
from megatron_doremi.regmix.optimize import binding_caps, kl_divergence, minimize_on_simplex, repetition_caps
from megatron_doremi.regmix.runs import load_manifest
from megatron_doremi.regmix.sample import RegmixError, SamplingError, epoch_cap_ok, propose

__all__ = [
    "OPTIMIZERS",
    "read_weights_file",
    "run_search",
    "search_caps",
    "search_candidates",
    "write_search_outputs",
]

OPTIMIZERS = ("sample", "exact")


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
                + (
                    f"the repetition caps ({max_epochs:g} epochs of {planned_tokens:.4g} tokens) or the min_weight "
                    f"threshold ({min_weight:g}); use --optimizer exact (it needs no candidates), fewer "
                    "--num-candidates or looser caps"
                    if tokens is not None
                    else f"the min_weight threshold ({min_weight:g})"
                )
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


def _caps_lines(extra: dict[str, Any]) -> list[str]:
    caps, kl, out = extra.get("caps"), extra.get("kl"), []
    if caps:
        binding = ", ".join(caps["binding"]) or "none"
        out.append(
            f"Repetition caps ({caps['source']}): w_d * {caps['budget_tokens']:.4g} tokens <= {caps['max_epochs']:g} "
            f"epochs * tokens_d; binding: **{binding}**."
        )
    else:
        out.append("No repetition caps (pass --budget-tokens and --max-epochs for the main run).")
    if kl:
        out.append(
            f"KL penalty {kl['weight']:g} * KL(w || {kl['prior']}); KL of the answer {kl['kl_to_prior']:.4f}."
        )
    return out


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
    if extra.get("optimizer") == "exact":
        ex = extra["exact"]
        how = f"exact minimisation on the capped simplex (SLSQP, {ex['starts']} starts, {ex['converged']} converged)"
    else:
        how = f"{extra['num_candidates']:,} candidates scored, top {extra['top_k']} averaged"
    lines = [
        "# RegMix search",
        "",
        f"Target: **{extra['target']}** validation loss; regressor **{extra['regressor']}**; {how} "
        f"(seed {extra['seed']}).",
        f"Predicted target loss of the chosen mixture: {extra['predicted_loss']:.4f} "
        f"(best candidate {extra['best_candidate']['predicted_loss']:.4f}; best observed run "
        f"{fit_doc.get('best_observed', {}).get('run')}: {_fmt(fit_doc.get('best_observed', {}).get('loss'))}).",
        *_caps_lines(extra),
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


def read_weights_file(path: str | os.PathLike[str], names: Sequence[str], what: str) -> np.ndarray:
    """float64 [D] in ``names`` order, normalised, from a ``domain_weights.json`` (its ``average``), a mixture JSON
    (``domains.<name>.weight``) or ``{name: w}``; RegmixError naming the file when domains are missing/unknown."""
    from megatron_doremi.regmix.runs import read_json

    doc = read_json(path, what)
    table: Any = None
    if isinstance(doc, dict):
        block = doc.get("average")
        if isinstance(block, dict) and isinstance(block.get("weights"), dict):
            table = block["weights"]
        elif isinstance(doc.get("domains"), dict):
            table = {
                k: (v.get("weight", 1.0) if isinstance(v, dict) else v) for k, v in doc["domains"].items()
            }
        elif doc and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in doc.values()):
            table = doc
    if table is None:
        raise RegmixError(
            f"{path}: not a weights file: expected a domain_weights.json (average.weights), a mixture JSON "
            "(domains) or an object {domain: weight}"
        )
    missing = [n for n in names if n not in table]
    unknown = sorted(str(k) for k in table if k not in names)
    if missing or unknown:
        raise RegmixError(
            f"{path}: {what} must name exactly the domains {list(names)}; missing {missing}, unknown {unknown}"
        )
    vals = np.array([table[n] for n in names], dtype=np.float64)
    if not np.all(np.isfinite(vals)) or np.any(vals < 0) or vals.sum() <= 0:
        raise RegmixError(
            f"{path}: {what}: weights must be finite, >= 0 and not all zero, got {vals.tolist()}"
        )
    return vals / vals.sum()


def search_caps(
    man: dict[str, Any], names: list[str], budget_tokens: float | None, max_epochs: float | None
) -> dict[str, Any] | None:
    """The repetition caps of a search: from the planned main-run budget when given, else the manifest's proxy
    cap (``planned_tokens``, ``max_epochs``) when it has one, else None. ``{"source", "budget_tokens",
    "max_epochs", "tokens": {name: n}, "max_weight": [D] array}``."""
    tokens = man.get("cap_tokens") or man.get("tokens")  # training-split tokens
    if budget_tokens is not None:
        if not tokens:
            raise RegmixError("--budget-tokens: the manifest records no token counts (tokens / cap_tokens)")
        epochs, budget, source = (4.0 if max_epochs is None else max_epochs), budget_tokens, "--budget-tokens"
    elif man.get("planned_tokens") is not None and man.get("max_epochs") is not None and tokens:
        epochs = float(man["max_epochs"] if max_epochs is None else max_epochs)
        budget, source = float(man["planned_tokens"]), "manifest (the proxies' planned tokens)"
    else:
        return None
    tok = np.array([tokens[n] for n in names], dtype=np.float64)
    return {
        "source": source,
        "budget_tokens": float(budget),
        "max_epochs": float(epochs),
        "tokens": dict(zip(names, tok.tolist())),
        "max_weight": repetition_caps(tok, float(budget), float(epochs), names),
    }


def run_search(
    runs_dir: str | os.PathLike[str],
    regressor: str = "lightgbm",
    num_candidates: int = 1_000_000,
    top_k: int = 100,
    seed: int = 0,
    out: str | os.PathLike[str] | None = None,
    *,
    optimizer: str = "sample",
    budget_tokens: float | None = None,
    max_epochs: float | None = None,
    kl_prior: str | os.PathLike[str] | None = None,
    kl_weight: float = 0.0,
    starts: int = 8,
) -> dict[str, Any]:
    """The ``regmix search`` command: returns ``{"weights", "names", "paths", "extra"}``."""
    runs = Path(runs_dir)
    man = load_manifest(runs)
    if optimizer not in OPTIMIZERS:
        raise RegmixError(f"--optimizer: expected one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    if optimizer == "exact" and regressor == "lightgbm":
        raise RegmixError(
            "--optimizer exact needs a smooth regressor (--regressor loglinear or linear); LightGBM is piecewise "
            "constant: use --optimizer sample with it"
        )
    model, fit_doc = load_regressor(runs, regressor)
    names = list(man["domain_names"])
    if list(fit_doc.get("domain_names", [])) != names:
        raise RegmixError(
            f"{runs / FIT_DIR / 'fit.json'}: domains {fit_doc.get('domain_names')} differ from the manifest's {names}"
        )
    prior = np.array([man["prior"][n] for n in names], dtype=np.float64)
    caps = search_caps(man, names, budget_tokens, max_epochs)
    upper = caps["max_weight"] if caps else np.ones(len(names))
    q = read_weights_file(kl_prior, names, "--kl-prior") if kl_prior is not None else None
    if kl_weight > 0 and q is None:
        raise RegmixError(
            "--kl-weight > 0 needs --kl-prior FILE (a domain_weights.json, mixture JSON or {name: w})"
        )

    def score(w: np.ndarray) -> np.ndarray:
        s = np.asarray(model.predict(w), dtype=np.float64)
        if q is not None and kl_weight > 0:
            s = s + kl_weight * np.array([kl_divergence(x, q) for x in np.atleast_2d(w)])
        return s

    extra: dict[str, Any] = {"method": "regmix", "optimizer": optimizer}
    if optimizer == "exact":
        res = minimize_on_simplex(
            lambda w: float(model.predict(w[None, :])[0]), model.gradient, upper,
            prior=prior, kl_prior=q, kl_weight=kl_weight, starts=starts, seed=seed,
        )  # fmt: skip
        weights = res["weights"]
        extra["exact"] = {k: res[k] for k in ("starts", "converged", "messages", "penalised")}
        best_w, best_score = weights, res["penalised"]
    else:
        cap_tok = np.array(list(caps["tokens"].values())) if caps else None
        res = search_candidates(
            score, prior, np.asarray(man["concentrations"]), float(man["min_weight"]), num_candidates, top_k, seed,
            cap_tok, caps["budget_tokens"] if caps else None, caps["max_epochs"] if caps else None,
        )  # fmt: skip
        weights = np.minimum(
            res["weights"], upper
        )  # an average of capped candidates is capped (float rounding)
        weights = weights / weights.sum()
        best_w, best_score = res["top_weights"][0], float(res["top_scores"][0])
        extra.update(
            top_k=int(min(top_k, num_candidates)),
            num_candidates=int(res["num_scored"]),
            num_drawn=int(res["num_drawn"]),
        )
    predicted = float(model.predict(weights[None, :])[0])
    best_run = None
    best_obs = fit_doc.get("best_observed", {}).get("run")
    if best_obs and fit_doc.get("target_values"):
        best_run = (best_obs, run_coordinates(runs, man, best_obs))
    extra.update(
        {
            "target": fit_doc.get("target"),
            "regressor": regressor,
            "predicted_loss": predicted,
            "best_candidate": {"weights": dict(zip(names, best_w.tolist())), "predicted_loss": best_score},
            "seed": seed,
            "prior": dict(zip(names, prior.tolist())),
            "fit": {k: v.get("holdout") for k, v in fit_doc.get("regressors", {}).items()},
            "favoured_regressor": fit_doc.get("favoured_regressor"),
            "runs_dir": str(runs.absolute()),
            "caps": None
            if caps is None
            else {
                **{k: caps[k] for k in ("source", "budget_tokens", "max_epochs", "tokens")},
                "max_weight": dict(zip(names, caps["max_weight"].tolist())),
                "binding": binding_caps(weights, caps["max_weight"], names),
            },
            "data_fingerprint": man.get("fingerprint"),
            "kl": None
            if q is None
            else {"prior": str(kl_prior), "weight": kl_weight, "kl_to_prior": kl_divergence(weights, q)},
        }
    )
    out_path = Path(out) if out is not None else runs / "domain_weights.json"
    prefixes = man.get("prefixes")
    paths = write_search_outputs(out_path, names, prefixes, weights, extra, prior, best_run, fit_doc, runs)
    return {"weights": weights, "names": names, "paths": paths, "extra": extra}


def run_coordinates(runs: Path, man: dict[str, Any], run: str) -> np.ndarray:
    """A run's weights in the manifest's domain order (a reuse swarm: its coordinates, see :mod:`.reuse`)."""
    from megatron_doremi.data.mixture import Mixture

    mix = Mixture.from_json(runs / run / "mixture.json")
    table = dict(zip(mix.names, mix.weights.tolist()))
    groups = (man.get("reuse") or {}).get("coordinates")
    if groups:
        return np.array([sum(table[m] for m in groups[c]) for c in man["domain_names"]], dtype=np.float64)
    return np.array([table[n] for n in man["domain_names"]], dtype=np.float64)
