"""The DoReMi pipeline's report: ``report.md`` + ``report.json`` + plots, and the headline table.

Inputs are plain data (no training objects): the domain names, the reference weights, each round's DoReMi
weights (``domain_weights.json`` ``average``/``final``) and the per-domain validation results of the DoReMi main
model and the baseline (the trainer's ``eval_summary.json``: ``domains.<name>.loss``, ``token_weighted``,
``uniform``, ``worst``; ``bpb`` when recorded), one summary per seed. A domain *improved* only when the paired
(same seed) difference to the baseline has a 95% interval below 0 (:mod:`megatron_doremi.stats`); with one seed
nothing is claimed. ``TIE_TOLERANCE`` (1e-6 nats/token) only marks the best value of a row. Other mixing methods' main models (the pipeline's ``compare`` entries,
:class:`MethodResult`) become more columns: :func:`compare_methods`, :func:`methods_table`.

Outputs in ``out_dir`` (each written under a temporary name, then renamed):

* ``report.md``: the weights table (reference vs DoReMi ᾱ of every round), the per-domain validation loss of
  DoReMi vs baseline with the token-weighted and uniform averages and the worst case, which domains improved,
  links to the plots and to each proxy's ``domain_weights.png`` (α over the proxy's steps);
* ``report.json``: the same numbers;
* ``weights.png`` (reference vs ᾱ per domain, and the compared methods' weights) and ``loss.png`` (baseline vs
  DoReMi per domain, averages, worst); with compared methods also ``methods.png`` (every method's losses).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from megatron_doremi.atomic_io import atomic_write, atomic_write_json, atomic_write_text
from megatron_doremi.stats import BETTER, NOT_TESTED, WORSE, estimate, paired_verdict, summarize_verdicts

__all__ = [
    "TIE_TOLERANCE",
    "MethodResult",
    "ReportError",
    "ReportResult",
    "RoundWeights",
    "compare_evals",
    "compare_methods",
    "headline_table",
    "methods_table",
    "seed_statistics",
    "write_report",
]


#: losses closer than this (nats/token) count as equal: not "improved", both "best"
TIE_TOLERANCE = 1e-6


def _signed(delta: float) -> str:
    """``+0.0123`` / ``-0.0123``; a delta that rounds to zero prints as ``+0.0000`` (never ``-0.0000``)."""
    return f"{round(delta, 4) + 0.0:+.4f}"


class ReportError(ValueError):
    """Missing or malformed report inputs; the message names the file or key."""


@dataclass
class RoundWeights:
    """One DoReMi round: its ᾱ (what the next step trains on), its final α, and where its runs live."""

    round: int
    average: dict[str, float]
    final: dict[str, float]
    proxy_dir: str | None = None
    reference_dir: str | None = None
    reference_weights: dict[str, float] | None = None
    proxy_averages: Sequence[Mapping[str, float]] = ()  # each proxy replicate's ᾱ (average is their mean)


@dataclass
class MethodResult:
    """Another mixing method's main model (a pipeline ``compare`` entry) for the comparison columns."""

    label: str
    source: str  # where its weights came from ("weights runs/regmix/domain_weights.json", "heuristic unimax", ...)
    weights: dict[str, float] | None  # what it trained on; an online mixer's average weights; None if unknown
    eval_summary: Mapping[str, Any]  # its eval_summary.json (replicate 0)
    run_dir: str | None = None
    online: bool = False  # weights moved during training (an online mixer such as ODM)
    replicates: Sequence[Mapping[str, Any]] = ()  # every seed's eval_summary.json (default: [eval_summary])


@dataclass
class ReportResult:
    """Paths of the written files, the comparison numbers and the printed headline table."""

    report_md: str
    report_json: str
    plots: list[str] = field(default_factory=list)
    headline: str = ""
    comparison: dict[str, Any] | None = None
    method_comparison: dict[str, Any] | None = None


def _eval_losses(summary: Mapping[str, Any], names: Sequence[str], what: str) -> dict[str, float]:
    domains = summary.get("domains")
    if not isinstance(domains, Mapping):
        raise ReportError(f"{what}: no 'domains' in the evaluation summary")
    out = {}
    for n in names:
        entry = domains.get(n)
        loss = entry.get("loss") if isinstance(entry, Mapping) else entry
        if not isinstance(loss, (int, float)) or not math.isfinite(loss):
            raise ReportError(f"{what}: domain {n!r} has no finite validation loss ({loss!r})")
        out[n] = float(loss)
    return out


def _eval_tokens(summary: Mapping[str, Any], name: str) -> float:
    entry = summary["domains"].get(name)
    t = entry.get("tokens") if isinstance(entry, Mapping) else None
    return float(t) if isinstance(t, (int, float)) and t > 0 else 1.0


def _token_weighted(losses: Mapping[str, float], summary: Mapping[str, Any], names: Sequence[str]) -> float:
    """Mean loss weighting each domain by its evaluated tokens in ``summary`` (1 where unknown)."""
    w = {n: _eval_tokens(summary, n) for n in names}
    return math.fsum(losses[n] * w[n] for n in names) / math.fsum(w.values())


def _uniform(losses: Mapping[str, float], _summary: Mapping[str, Any], names: Sequence[str]) -> float:
    return math.fsum(losses[n] for n in names) / len(names)


def _domain_value(summary: Mapping[str, Any], name: str, key: str) -> float | None:
    entry = (summary.get("domains") or {}).get(name)
    v = entry.get(key) if isinstance(entry, Mapping) else (entry if key == "loss" else None)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def mean_summary(summaries: Sequence[Mapping[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    """An ``eval_summary``-shaped dict of the per-domain mean loss (and bpb) over replicates; tokens of the first."""
    domains = {}
    for n in names:
        losses = _eval_losses_many(summaries, n)
        entry: dict[str, Any] = {"loss": math.fsum(losses) / len(losses)}
        bpb = [_domain_value(s, n, "bpb") for s in summaries]
        if all(b is not None for b in bpb):
            entry["bpb"] = math.fsum(bpb) / len(bpb)  # type: ignore[arg-type]
        tokens = _domain_value(summaries[0], n, "tokens")
        if tokens is not None:
            entry["tokens"] = tokens
        domains[n] = entry
    return {"domains": domains}


def _eval_losses_many(summaries: Sequence[Mapping[str, Any]], name: str) -> list[float]:
    return [_eval_losses(s, [name], f"replicate {i} eval")[name] for i, s in enumerate(summaries)]


def _per_seed_aggregates(
    summary: Mapping[str, Any], names: Sequence[str], key: str
) -> dict[str, float | None]:
    vals = {n: _domain_value(summary, n, key) for n in names}
    if any(v is None for v in vals.values()):
        return {"uniform": None, "token_weighted": None, "worst": None}
    full: dict[str, float] = {n: float(v) for n, v in vals.items()}  # type: ignore[arg-type]
    return {
        "uniform": _uniform(full, summary, names),
        "token_weighted": _token_weighted(full, summary, names),
        "worst": max(full.values()),
    }


def seed_statistics(
    names: Sequence[str], evals: Mapping[str, Sequence[Mapping[str, Any]]], baseline: str = "baseline"
) -> dict[str, Any]:
    """Per method (``{label: [eval_summary per seed]}``): for every domain, the uniform and token-weighted
    averages and the worst case, the per-seed values, mean and 95% half-width of loss and bpb
    (:func:`megatron_doremi.stats.estimate`; bpb None where a summary lacks it), and vs ``baseline`` the paired
    difference and its verdict (:func:`megatron_doremi.stats.paired_verdict`, seed i paired with seed i), plus
    a ``summary`` of the domain verdicts on loss and the evaluated ``tokens`` per domain."""
    base = evals[baseline]
    out: dict[str, Any] = {}
    for label, sums in evals.items():
        entry: dict[str, Any] = {"replicates": len(sums), "domains": {}}
        for n in names:
            d: dict[str, Any] = {"tokens": _domain_value(sums[0], n, "tokens")}
            for key in ("loss", "bpb"):
                vals = [_domain_value(s, n, key) for s in sums]
                d[key] = estimate(vals)  # type: ignore[arg-type]
                if label != baseline:
                    k = min(len(sums), len(base))
                    other = [_domain_value(s, n, key) for s in base[:k]]
                    d[f"{key}_vs_baseline"] = paired_verdict(vals[:k], other)  # type: ignore[arg-type]
            if label != baseline:
                d["verdict"] = d["loss_vs_baseline"]["verdict"]
            entry["domains"][n] = d
        for agg in ("uniform", "token_weighted", "worst"):
            a: dict[str, Any] = {}
            for key in ("loss", "bpb"):
                vals = [_per_seed_aggregates(s, names, key)[agg] for s in sums]
                a[key] = estimate(vals)  # type: ignore[arg-type]
                if label != baseline:
                    k = min(len(sums), len(base))
                    other = [_per_seed_aggregates(s, names, key)[agg] for s in base[:k]]
                    a[f"{key}_vs_baseline"] = paired_verdict(vals[:k], other)  # type: ignore[arg-type]
            if label != baseline:
                a["verdict"] = a["loss_vs_baseline"]["verdict"]
            entry[agg] = a
        if label != baseline:
            entry["summary"] = summarize_verdicts([entry["domains"][n]["verdict"] for n in names])
        out[label] = entry
    return out


def _spread(averages: Sequence[Mapping[str, float]], names: Sequence[str]) -> dict[str, Any] | None:
    """Per domain the min, max and mean ± ci95 of ᾱ across proxy replicates (None with fewer than 2)."""
    if len(averages) < 2:
        return None
    out = {}
    for n in names:
        vals = [float(a[n]) for a in averages]
        out[n] = {"min": min(vals), "max": max(vals), **estimate(vals)}
    return out


def _pm(est: Mapping[str, Any] | None, digits: int = 4, sign: bool = False) -> str:
    """``mean ± ci95`` (just the mean with one replicate; ``n/a`` when unknown)."""
    if not est or est.get("mean") is None:
        return "n/a"
    text = f"{est['mean']:+.{digits}f}" if sign else f"{est['mean']:.{digits}f}"
    return text + (f" ± {est['ci95']:.{digits}f}" if est.get("ci95") is not None else "")


def _verdict_line(label: str, entry: Mapping[str, Any], names: Sequence[str]) -> str:
    """One sentence: the method's domain verdicts vs the baseline (or why none can be claimed)."""
    s = entry["summary"]
    if s[NOT_TESTED] == len(names):
        return (
            f"{label}: 1 replicate, so no significance can be claimed (set replicates >= 2 for paired "
            "95% intervals)"
        )
    parts = []
    for v in (BETTER, WORSE):
        doms = [n for n in names if entry["domains"][n]["verdict"] == v]
        if doms:
            parts.append(f"{v} on {', '.join(doms)}")
    if not parts:
        return f"{label}: no significant difference from the baseline on any domain (paired 95% intervals)"
    return (
        f"{label} vs baseline (paired 95% intervals): "
        + "; ".join(parts)
        + (
            f"; no significant difference on {s['no significant difference']}"
            if s["no significant difference"]
            else ""
        )
    )


def _apply_verdicts(comparison: dict[str, Any], entry: Mapping[str, Any], names: Sequence[str]) -> None:
    """``improved``/``worse`` of :func:`compare_evals` from the paired-seed verdicts (none with one seed)."""
    for n in names:
        v = entry["domains"][n]["verdict"]
        comparison["domains"][n]["improved"] = v == BETTER
        comparison["domains"][n]["verdict"] = v
    comparison["improved"] = [n for n in names if entry["domains"][n]["verdict"] == BETTER]
    comparison["worse"] = [n for n in names if entry["domains"][n]["verdict"] == WORSE]
    comparison["summary"] = entry["summary"]


def compare_evals(
    names: Sequence[str],
    doremi: Mapping[str, Any],
    baseline: Mapping[str, Any],
    what: tuple[str, str] = ("DoReMi main eval", "baseline eval"),
) -> dict[str, Any]:
    """Per-domain and aggregate comparison of two ``eval_summary.json`` dicts (DoReMi first).

    Returns ``{"domains": {name: {"baseline", "doremi", "delta", "improved"}}, "token_weighted", "uniform",
    "worst": {"baseline", "doremi", "delta", "baseline_domain", "doremi_domain"}, "improved": [names],
    "worse": [names]}``. ``delta = doremi - baseline`` (negative is better). Token-weighted averages weight each
    domain by its evaluated tokens (from the summaries); the uniform average and the worst case are recomputed
    from the per-domain losses.
    """
    c = compare_methods(
        names, {"doremi": doremi, "baseline": baseline}, what={"doremi": what[0], "baseline": what[1]}
    )
    domains = {}
    for n in names:
        b, d = c["domains"][n]["baseline"], c["domains"][n]["doremi"]
        domains[n] = {"baseline": b, "doremi": d, "delta": d - b, "improved": d - b < -TIE_TOLERANCE}
    agg: dict[str, Any] = {}
    for key in ("token_weighted", "uniform"):
        b, d = c[key]["baseline"], c[key]["doremi"]
        agg[key] = {"baseline": b, "doremi": d, "delta": d - b}
    bw, dw = c["worst"]["baseline"], c["worst"]["doremi"]
    agg["worst"] = {
        "baseline": bw["loss"],
        "doremi": dw["loss"],
        "delta": dw["loss"] - bw["loss"],
        "baseline_domain": bw["domain"],
        "doremi_domain": dw["domain"],
    }
    return {
        "domains": domains,
        **agg,
        "improved": [n for n in names if domains[n]["improved"]],
        "worse": [n for n in names if not domains[n]["improved"]],
    }


def compare_methods(
    names: Sequence[str],
    evals: Mapping[str, Mapping[str, Any]],
    baseline: str = "baseline",
    what: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Validation losses of several main models (``{label: eval_summary}``, one of them ``baseline``).

    Returns ``{"methods": [labels], "baseline", "domains": {name: {label: loss}}, "best": {name: label},
    "token_weighted": {label: loss}, "uniform": {label: loss}, "worst": {label: {"loss", "domain"}},
    "vs_baseline": {label: {"token_weighted", "uniform", "worst" (Δ = label − baseline), "improved": [names]}},
    "ranking": [labels by uniform average, best first]}``. ``best`` and ``ranking`` break ties by label order.
    ``what``: label -> the summary's name in error messages (default ``"<label> eval"``).
    """
    labels = list(evals)
    if baseline not in evals:
        raise ReportError(f"compare_methods: no {baseline!r} among {labels}")
    what = what or {}
    losses = {label: _eval_losses(evals[label], names, what.get(label, f"{label} eval")) for label in labels}
    out: dict[str, Any] = {"methods": labels, "baseline": baseline}
    out["domains"] = {n: {label: losses[label][n] for label in labels} for n in names}
    out["best"] = {n: min(labels, key=lambda label, n=n: losses[label][n]) for n in names}
    out["token_weighted"] = {label: _token_weighted(losses[label], evals[label], names) for label in labels}
    out["uniform"] = {label: _uniform(losses[label], evals[label], names) for label in labels}
    out["worst"] = {}
    for label in labels:
        d = max(names, key=losses[label].__getitem__)
        out["worst"][label] = {"loss": losses[label][d], "domain": d}
    base = losses[baseline]
    out["vs_baseline"] = {
        label: {
            "token_weighted": out["token_weighted"][label] - out["token_weighted"][baseline],
            "uniform": out["uniform"][label] - out["uniform"][baseline],
            "worst": out["worst"][label]["loss"] - out["worst"][baseline]["loss"],
            "improved": [n for n in names if losses[label][n] < base[n] - TIE_TOLERANCE],
        }
        for label in labels
        if label != baseline
    }
    out["ranking"] = sorted(labels, key=lambda label: (out["uniform"][label], labels.index(label)))
    return out


def methods_table(
    names: Sequence[str],
    weights: Mapping[str, Mapping[str, float] | None],
    comparison: Mapping[str, Any],
) -> str:
    """Plain-text block: each method's weights and per-domain / average validation loss (``*`` = best in the row).

    ``weights``: ``{label: {name: w} or None}`` for the labels of ``comparison["methods"]``.
    """
    labels = list(comparison["methods"])
    base = comparison["baseline"]
    first = max(len("Δ uniform vs baseline"), *(len(n) for n in names))
    widths = [max(8, len(label)) + 1 for label in labels]  # + 1: the best-in-row mark

    def row(label: str, cells: Sequence[str]) -> str:
        return f"{label:<{first}}" + "".join(f"  {c:>{w}}" for c, w in zip(cells, widths))

    def losses(values: Mapping[str, float]) -> list[str]:
        best = min(values.values())
        return [f"{values[m]:.4f}" + ("*" if values[m] <= best + TIE_TOLERANCE else " ") for m in labels]

    head = row("domain weights", [label + " " for label in labels])
    lines = [head, "-" * len(head)]
    for n in names:
        lines.append(
            row(n, [f"{weights[m][n]:.4f} " if weights.get(m) is not None else "- " for m in labels])
        )
    head = row("validation loss", [label + " " for label in labels])
    lines += ["", head, "-" * len(head)]
    for n in names:
        lines.append(row(n, losses(comparison["domains"][n])))
    lines.append(row("token-weighted avg", losses(comparison["token_weighted"])))
    lines.append(row("uniform avg", losses(comparison["uniform"])))
    lines.append(row("worst case", losses({m: comparison["worst"][m]["loss"] for m in labels})))
    vs = comparison["vs_baseline"]
    lines.append(
        row(
            "Δ uniform vs baseline", [("-" if m == base else _signed(vs[m]["uniform"])) + " " for m in labels]
        )
    )
    lines.append(
        row(
            "domains improved",
            [("-" if m == base else f"{len(vs[m]['improved'])}/{len(names)}") + " " for m in labels],
        )
    )
    lines.append(
        "ranking by uniform average (best first): " + ", ".join(comparison["ranking"])
        + " (an order of means, not a verdict: see the paired intervals)"
    )  # fmt: skip
    return "\n".join(lines)


def headline_table(
    names: Sequence[str],
    reference: Mapping[str, float],
    doremi_weights: Mapping[str, float],
    comparison: Mapping[str, Any] | None,
    seeds: Mapping[str, Any] | None = None,
) -> str:
    """The plain-text table the pipeline prints: weights and (when compared) validation losses per domain (the
    mean over seeds), then with ``seeds`` (:func:`seed_statistics`) the ``mean ± ci95`` table and verdicts."""
    width = max(len("token-weighted avg"), *(len(n) for n in names))
    head = f"{'domain':<{width}}  {'ref w':>7}  {'DoReMi w':>8}"
    if comparison is not None:
        head += f"  {'baseline':>9}  {'DoReMi':>9}  {'Δ loss':>8}"
    lines = [head, "-" * len(head)]
    for n in names:
        row = f"{n:<{width}}  {reference[n]:>7.4f}  {doremi_weights[n]:>8.4f}"
        if comparison is not None:
            c = comparison["domains"][n]
            mark = "  better" if c["improved"] else ""
            row += f"  {c['baseline']:>9.4f}  {c['doremi']:>9.4f}  {c['delta']:>+8.4f}{mark}"
        lines.append(row)
    if comparison is not None:
        pad = " " * (width + 19)
        for key, label in (("token_weighted", "token-weighted avg"), ("uniform", "uniform avg")):
            c = comparison[key]
            lines.append(
                f"{label:<{width}}{pad[width:]}  {c['baseline']:>9.4f}  {c['doremi']:>9.4f}  {c['delta']:>+8.4f}"
            )
        w = comparison["worst"]
        lines.append(
            f"{'worst case':<{width}}{pad[width:]}  {w['baseline']:>9.4f}  {w['doremi']:>9.4f}  {w['delta']:>+8.4f}"
            f"  ({w['baseline_domain']} / {w['doremi_domain']})"
        )
    if seeds is not None and comparison is not None:
        lines += ["", seeds_table(names, seeds)]
    return "\n".join(lines)


def seeds_table(names: Sequence[str], seeds: Mapping[str, Any], labels: Sequence[str] | None = None) -> str:
    """Plain text: per domain the evaluated tokens, each method's ``mean ± ci95`` loss and bpb and its verdict
    vs the baseline; then one verdict sentence per method."""
    labels = list(labels or seeds)
    n_rep = max(seeds[m]["replicates"] for m in labels)
    width = max(len("token-weighted avg"), *(len(n) for n in names))
    lines = [f"validation loss, mean ± 95% CI over {n_rep} seed(s) (bpb in brackets; verdicts vs baseline):"]
    head = f"{'':<{width}}  {'tokens':>9}" + "".join(f"  {m:>28}" for m in labels)
    lines += [head, "-" * len(head)]

    def cell(entry: Mapping[str, Any]) -> str:
        text = f"{_pm(entry['loss'])} [{_pm(entry['bpb'], 3)}]"
        v = entry.get("verdict")
        return text + ({BETTER: " +", WORSE: " -"}.get(v, "") if v else "")

    for n in names:
        tok = seeds[labels[0]]["domains"][n]["tokens"]
        row = f"{n:<{width}}  {(f'{tok:,.0f}' if tok is not None else 'n/a'):>9}"
        lines.append(row + "".join(f"  {cell(seeds[m]['domains'][n]):>28}" for m in labels))
    for key, label in (
        ("token_weighted", "token-weighted avg"),
        ("uniform", "uniform avg"),
        ("worst", "worst case"),
    ):
        lines.append(f"{label:<{width}}  {'':>9}" + "".join(f"  {cell(seeds[m][key]):>28}" for m in labels))
    if n_rep >= 2:
        lines.append("(+ better / - worse than the baseline: the paired 95% interval excludes 0)")
    lines += [_verdict_line(m, seeds[m], names) for m in labels if "summary" in seeds[m]]
    return "\n".join(lines)


def _rel(path: str | None, start: str) -> str | None:
    if path is None:
        return None
    try:
        return os.path.relpath(path, start)
    except ValueError:  # another drive (Windows)
        return path


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _grouped_bars(
    path: str,
    groups: Sequence[str],
    series: Sequence[tuple[str, Sequence[float]]],
    ylabel: str,
    title: str,
    zoom: bool,
) -> None:
    """One bar per (group, series) side by side, saved as a PNG; ``zoom`` starts the y axis near the data."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(min(14.0, max(6.0, (0.35 * len(series) + 0.2) * len(groups) + 2)), 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series):
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(groups))]
        ax.bar(xs, values, width, label=label)
    if zoom:
        flat = [v for _, values in series for v in values]
        lo, hi = min(flat), max(flat)
        ax.set_ylim(bottom=max(0.0, lo - 0.1 * (hi - lo + 1e-9) - 0.05))
    tilt = len(groups) > 6 or zoom
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=45 if tilt else 0, ha="right" if tilt else "center")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize="small")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    _save_fig(fig, path)


def _plot_weights(
    path: str,
    names: Sequence[str],
    reference: Mapping[str, float],
    rounds: Sequence[RoundWeights],
    methods: Sequence[MethodResult] = (),
) -> None:
    series = [("reference", [reference[n] for n in names])]
    series += [
        (f"DoReMi ᾱ round {r.round}" if len(rounds) > 1 else "DoReMi ᾱ", [r.average[n] for n in names])
        for r in rounds
    ]
    series += [
        (m.label + (" (average)" if m.online else ""), [m.weights[n] for n in names])
        for m in methods
        if m.weights is not None
    ]
    title = "domain weights: reference vs DoReMi" + (" and other methods" if methods else "")
    _grouped_bars(path, names, series, "domain weight", title, zoom=False)


_LOSS_GROUPS = ("token-wtd avg", "uniform avg", "worst")


def _plot_loss(path: str, names: Sequence[str], comparison: Mapping[str, Any]) -> None:
    """Baseline vs DoReMi validation loss per domain, on the averages and the worst case."""
    series = []
    for key, label in (("baseline", "baseline (reference weights)"), ("doremi", "DoReMi (ᾱ)")):
        values = [comparison["domains"][n][key] for n in names]
        values += [comparison[agg][key] for agg in ("token_weighted", "uniform", "worst")]
        series.append((label, values))
    groups = [*names, *_LOSS_GROUPS]
    _grouped_bars(
        path,
        groups,
        series,
        "validation loss (nats/token)",
        "per-domain validation loss of the main models",
        True,
    )


def _plot_methods(path: str, names: Sequence[str], comparison: Mapping[str, Any]) -> None:
    """Every method's validation loss per domain, on the averages and the worst case."""
    series = [
        (
            m,
            [comparison["domains"][n][m] for n in names]
            + [comparison["token_weighted"][m], comparison["uniform"][m], comparison["worst"][m]["loss"]],
        )
        for m in comparison["methods"]
    ]
    groups = [*names, *_LOSS_GROUPS]
    _grouped_bars(
        path,
        groups,
        series,
        "validation loss (nats/token)",
        "per-domain validation loss by mixing method",
        True,
    )


def _save_fig(fig: Any, path: str) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    data = buf.getvalue()
    atomic_write(path, lambda fh: fh.write(data), mode="wb")


def _methods_md(
    names: Sequence[str],
    methods: Sequence[MethodResult],
    weights: Mapping[str, Mapping[str, float] | None],
    comparison: Mapping[str, Any],
    out_dir: str,
    plots: bool,
) -> list[str]:
    """The report's "Comparison of mixing methods" section (markdown lines)."""
    labels = list(comparison["methods"])
    base = comparison["baseline"]
    lines = ["## Comparison of mixing methods", ""]
    lines.append(
        "Every column is a main model with the same config, trained on that method's weights: baseline = the "
        "reference weights, DoReMi = ᾱ, then the pipeline's `compare` entries:"
    )
    lines.append("")
    for m in methods:
        run = f" (run `{_rel(m.run_dir, out_dir)}`)" if m.run_dir else ""
        note = "; online mixer, weights shown are its average sampling weights" if m.online else ""
        lines.append(f"- **{m.label}**: {m.source}{note}{run}")
    lines.append("")
    rows = []
    for n in names:
        rows.append([n] + [f"{weights[m][n]:.4f}" if weights.get(m) is not None else "-" for m in labels])
    lines += _md_table(["domain weights", *labels], rows)
    lines.append("")

    def cells(values: Mapping[str, float]) -> list[str]:
        best = min(values.values())
        return [
            f"**{values[m]:.4f}**" if values[m] <= best + TIE_TOLERANCE else f"{values[m]:.4f}"
            for m in labels
        ]

    rows = [[n, *cells(comparison["domains"][n])] for n in names]
    rows.append(["token-weighted average", *cells(comparison["token_weighted"])])
    rows.append(["uniform average", *cells(comparison["uniform"])])
    worst = comparison["worst"]
    best_worst = min(worst[m]["loss"] for m in labels)
    rows.append(
        ["worst case"]
        + [
            (
                f"**{worst[m]['loss']:.4f}**"
                if worst[m]["loss"] <= best_worst + TIE_TOLERANCE
                else f"{worst[m]['loss']:.4f}"
            )
            + f" ({worst[m]['domain']})"
            for m in labels
        ]
    )
    vs = comparison["vs_baseline"]
    rows.append(
        ["Δ uniform average vs baseline"] + ["" if m == base else _signed(vs[m]["uniform"]) for m in labels]
    )
    rows.append(
        ["domains better than baseline"]
        + ["" if m == base else f"{len(vs[m]['improved'])} of {len(names)}" for m in labels]
    )
    lines.append("Validation loss (nats/token; **bold** = best in the row):")
    lines.append("")
    lines += _md_table(["", *labels], rows)
    lines.append("")
    lines.append(
        "Ranking by uniform average (best first): " + ", ".join(comparison["ranking"])
        + " (an order of means, not a verdict: the verdicts above come from the paired intervals)."
    )  # fmt: skip
    lines.append("")
    if plots:
        lines += ["![validation loss by method](methods.png)", ""]
    return lines


def write_report(
    out_dir: str,
    names: Sequence[str],
    reference_weights: Mapping[str, float],
    rounds: Sequence[RoundWeights],
    main_eval: Mapping[str, Any] | None = None,
    baseline_eval: Mapping[str, Any] | None = None,
    runs: Mapping[str, str] | None = None,
    command: str | None = None,
    plots: bool = True,
    methods: Sequence[MethodResult] = (),
    costs: Mapping[str, Any] | None = None,
) -> ReportResult:
    """Write ``report.md``, ``report.json`` and the plots into ``out_dir`` (see the module docstring).

    ``rounds`` (at least one) in order; the last round's ᾱ is what the main model trained on. ``runs`` maps a
    label (``"main"``, ``"baseline"``, ...) to a run directory for the links. ``main_eval``/``baseline_eval``:
    both or neither (then the report has the weights only). ``methods``: other mixing methods' main models,
    compared beside DoReMi and the baseline (needs both evals); labels must differ from "baseline"/"DoReMi".
    """
    names = list(names)
    if not rounds:
        raise ReportError("the report needs at least one DoReMi round's weights")
    for what, mapping in [("reference_weights", reference_weights)] + [
        (f"round {r.round} average weights", r.average) for r in rounds
    ]:
        missing = [n for n in names if n not in mapping]
        if missing:
            raise ReportError(f"{what}: missing domain(s) {missing}")
    comparison = None
    if (main_eval is None) != (baseline_eval is None):
        raise ReportError("main_eval and baseline_eval must be given together")
    seeds = None
    if main_eval is not None and baseline_eval is not None:
        main_list = [main_eval] if isinstance(main_eval, Mapping) else list(main_eval)
        base_list = [baseline_eval] if isinstance(baseline_eval, Mapping) else list(baseline_eval)
        main_eval = main_list[0] if len(main_list) == 1 else mean_summary(main_list, names)
        baseline_eval = base_list[0] if len(base_list) == 1 else mean_summary(base_list, names)
        methods = [
            MethodResult(
                m.label,
                m.source,
                m.weights,
                mean_summary(m.replicates, names),
                m.run_dir,
                m.online,
                m.replicates,
            )
            if len(m.replicates) > 1
            else m
            for m in methods
        ]
        all_evals = {"baseline": base_list, "DoReMi": main_list}
        all_evals.update({m.label: list(m.replicates) or [m.eval_summary] for m in methods})
        seeds = seed_statistics(names, all_evals)
        comparison = compare_evals(names, main_eval, baseline_eval)
        _apply_verdicts(comparison, seeds["DoReMi"], names)
    final = rounds[-1]
    method_comparison = None
    method_weights: dict[str, Mapping[str, float] | None] = {}
    if methods:
        if main_eval is None or baseline_eval is None:
            raise ReportError("compared methods need the DoReMi main model's and the baseline's evaluations")
        labels = [m.label for m in methods]
        clash = [x for x in labels if x.lower() in ("baseline", "doremi") or labels.count(x) > 1]
        if clash:
            raise ReportError(f"method labels must be unique and not 'baseline'/'DoReMi', got {labels}")
        for m in methods:
            if m.weights is not None and [n for n in names if n not in m.weights]:
                raise ReportError(
                    f"method {m.label}: weights miss domain(s) {[n for n in names if n not in m.weights]}"
                )
        evals = {"baseline": baseline_eval, "DoReMi": main_eval, **{m.label: m.eval_summary for m in methods}}
        method_comparison = compare_methods(names, evals)
        for label, vs in method_comparison["vs_baseline"].items():
            doms = seeds["DoReMi" if label == "DoReMi" else label]["domains"]  # type: ignore[index]
            vs["improved"] = [n for n in names if doms[n]["verdict"] == BETTER]
            vs["verdicts"] = {n: doms[n]["verdict"] for n in names}
        method_weights = {"baseline": reference_weights, "DoReMi": final.average}
        method_weights.update({m.label: m.weights for m in methods})
    md_path, json_path = os.path.join(out_dir, "report.md"), os.path.join(out_dir, "report.json")
    plot_paths = []
    if plots:
        plot_paths.append(os.path.join(out_dir, "weights.png"))
        _plot_weights(plot_paths[-1], names, reference_weights, rounds, methods)
        if comparison is not None:
            plot_paths.append(os.path.join(out_dir, "loss.png"))
            _plot_loss(plot_paths[-1], names, comparison)
        if method_comparison is not None:
            plot_paths.append(os.path.join(out_dir, "methods.png"))
            _plot_methods(plot_paths[-1], names, method_comparison)

    lines = ["# DoReMi pipeline report", ""]
    lines.append(
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')}" + (f" by `{command}`." if command else ".")
    )
    lines.append("")
    if runs:
        lines.append("Runs: " + ", ".join(f"{k} `{_rel(v, out_dir)}`" for k, v in runs.items()) + ".")
        lines.append("")
    lines += ["## Domain weights", ""]
    lines.append(
        "Reference weights: what the reference model (step 1) and the baseline trained on. DoReMi ᾱ: the proxy's "
        "(step 2) domain weights averaged over its updates; the main model (step 3) trained on the last round's ᾱ."
    )
    lines.append("")
    header = ["domain", "reference"]
    header += [f"DoReMi ᾱ (round {r.round})" for r in rounds] if len(rounds) > 1 else ["DoReMi ᾱ"]
    header += ["final α", "ᾱ / reference"]
    rows = []
    for n in names:
        row = [n, f"{reference_weights[n]:.4f}"] + [f"{r.average[n]:.4f}" for r in rounds]
        ratio = final.average[n] / reference_weights[n] if reference_weights[n] > 0 else float("inf")
        row += [f"{final.final[n]:.4f}", f"{ratio:.2f}x"]
        rows.append(row)
    lines += _md_table(header, rows)
    lines.append("")
    up = [n for n in names if final.average[n] > 1.01 * reference_weights[n]]
    down = [n for n in names if final.average[n] < 0.99 * reference_weights[n]]
    same = [n for n in names if n not in up and n not in down]
    lines.append(
        f"DoReMi up-weights {', '.join(up) or 'no domain'} and down-weights {', '.join(down) or 'no domain'}"
        + (f"; {', '.join(same)} within 1% of the reference." if same else ".")
    )
    lines.append("")
    for r in rounds:
        spread = _spread(r.proxy_averages, names)
        if spread:
            lines.append(
                f"Spread of ᾱ across the {len(r.proxy_averages)} proxy seeds (round {r.round}; the main model "
                "trained on their mean):"
            )
            lines.append("")
            rows = [[n, _pm(spread[n]), f"{spread[n]['min']:.4f}", f"{spread[n]['max']:.4f}"] for n in names]
            lines += _md_table(["domain", "ᾱ mean ± ci95", "min", "max"], rows)
            lines.append("")
    if plots:
        lines += ["![domain weights](weights.png)", ""]
    for r in rounds:
        if r.proxy_dir and os.path.isfile(os.path.join(r.proxy_dir, "domain_weights.png")):
            png = _rel(os.path.join(r.proxy_dir, "domain_weights.png"), out_dir)
            lines += [f"α over the proxy's steps (round {r.round}): ![round {r.round}]({png})", ""]

    if comparison is not None:
        lines += ["## Validation loss: DoReMi main model vs baseline", ""]
        lines.append(
            "Per-domain validation loss (nats/token) and bits per byte (n/a where the evaluation did not record "
            "it), from each run's `eval_summary.json`, as mean ± 95% CI half-width (Student t over the seeds; "
            "the mean alone with one seed). Δ = DoReMi − baseline paired by seed; negative is better. A verdict "
            "is better/worse only when the paired 95% interval excludes 0 (see docs/doremi.md, Reading the report)."
        )
        lines.append("")
        rows = []
        sb, sd = seeds["baseline"], seeds["DoReMi"]  # type: ignore[index]

        def md_row(label: str, b: Mapping[str, Any], d: Mapping[str, Any], tokens: str) -> list[str]:
            delta = d["loss_vs_baseline"]
            return [
                label,
                tokens,
                _pm(b["loss"]),
                _pm(d["loss"]),
                _pm(delta, sign=True),
                _pm(b["bpb"], 3),
                _pm(d["bpb"], 3),
                d["verdict"],
            ]

        for n in names:
            tok = sb["domains"][n]["tokens"]
            rows.append(
                md_row(n, sb["domains"][n], sd["domains"][n], f"{tok:,.0f}" if tok is not None else "n/a")
            )
        for key, label in (
            ("token_weighted", "**token-weighted average**"),
            ("uniform", "**uniform average**"),
            ("worst", "**worst case**"),
        ):
            rows.append(md_row(label, sb[key], sd[key], ""))
        header = [
            "domain",
            "eval tokens",
            "baseline loss",
            "DoReMi loss",
            "Δ (paired)",
            "baseline bpb",
            "DoReMi bpb",
            "verdict",
        ]
        lines += _md_table(header, rows)
        lines.append("")
        w = comparison["worst"]
        lines.append(_verdict_line("DoReMi", sd, names) + ".")
        lines.append(
            f"Uniform average {comparison['uniform']['delta']:+.4f}, token-weighted average "
            f"{comparison['token_weighted']['delta']:+.4f}, worst case {w['delta']:+.4f}."
        )
        lines.append("")
        if plots:
            lines += ["![validation loss](loss.png)", ""]
    if method_comparison is not None:
        lines += _methods_md(names, methods, method_weights, method_comparison, out_dir, plots)
    headline = headline_table(names, reference_weights, final.average, comparison, seeds)
    if method_comparison is not None:
        headline += "\n\n" + methods_table(names, method_weights, method_comparison)
    frac = (costs or {}).get("search_fraction") or {}
    if frac:
        parts = [f"{m} {v:.2f}x" if isinstance(v, (int, float)) else f"{m} n/a" for m, v in frac.items()]
        cost_line = (
            "Search cost beside the main model, as a fraction of one main-model run's training FLOPs "
            "(n/a where a run did not record train_flops): " + ", ".join(parts) + "."
        )
        lines += [cost_line, ""]
        headline += "\n" + cost_line
    lines += ["## Headline", "", "```", headline, "```", ""]
    atomic_write_text(md_path, "\n".join(lines))
    doc = {
        "domain_names": names,
        "reference_weights": dict(reference_weights),
        "rounds": [
            {
                "round": r.round,
                "average": r.average,
                "final": r.final,
                "proxy_dir": r.proxy_dir,
                "reference_dir": r.reference_dir,
                "reference_weights": r.reference_weights,
                "proxy_averages": [dict(a) for a in r.proxy_averages],
                "proxy_spread": _spread(r.proxy_averages, names),
            }
            for r in rounds
        ],
        "doremi_weights": final.average,
        "comparison": comparison,
        "methods": {
            m.label: {"source": m.source, "weights": m.weights, "online": m.online, "run_dir": m.run_dir}
            for m in methods
        },
        "method_comparison": method_comparison,
        "seeds": seeds,
        "verdict_summary": {m: e["summary"] for m, e in (seeds or {}).items() if "summary" in e},
        "costs": dict(costs or {}),
        "runs": dict(runs or {}),
    }
    atomic_write_json(json_path, doc, indent=1)
    return ReportResult(md_path, json_path, plot_paths, headline, comparison, method_comparison)
