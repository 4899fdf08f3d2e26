"""``python -m megatron_doremi.regmix {sample,train,fit,search}``: the RegMix workflow (see the package doc)."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from megatron_doremi.regmix.sample import DEFAULT_CONCENTRATIONS, RegmixError

PROG = "python -m megatron_doremi.regmix"


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _indices(text: str) -> list[int]:
    """``"3"``, ``"0-3,7"`` -> run indices."""
    out: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if not part:
                continue
            if "-" in part:
                lo, hi = part.split("-", 1)
                out.extend(range(int(lo), int(hi) + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected run indices like '3' or '0-3,7', got {text!r}") from None
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="RegMix: data mixture search by regression over proxy runs."
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("sample", help="draw K proxy mixtures and write run directories")
    s.add_argument(
        "--mixture", required=True, help="mixture JSON or Megatron --data-path string (domains, shards)"
    )
    s.add_argument("--num-runs", type=int, required=True, help="number of proxy mixtures K")
    s.add_argument("--out", required=True, help="new directory for run_XXXX/ and manifest.json")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--temperature", type=float, default=1.0, help="prior = token share ** (1/T), normalised")
    s.add_argument("--concentrations", type=_floats, default=list(DEFAULT_CONCENTRATIONS),
                   help="Dirichlet concentration grid c (alpha = c * prior), comma-separated")  # fmt: skip
    s.add_argument("--max-epochs", type=float, default=4.0,
                   help="epoch cap per domain (applied when the planned tokens are known)")  # fmt: skip
    s.add_argument("--planned-tokens", type=float, default=None,
                   help="tokens each proxy trains on (default: train_iters*global_batch_size*seq_length of the "
                   "base config)")  # fmt: skip
    s.add_argument("--min-weight", type=float, default=0.01, help="zero weights below this, renormalise")
    s.add_argument(
        "--min-distance", type=float, default=0.02, help="drop mixtures closer than this to an accepted one"
    )
    s.add_argument("--distance", choices=("l1", "linf"), default="l1", help="metric for --min-distance")
    s.add_argument("--base-config", default=None, help="run config JSON to copy into run_XXXX/config.json")
    s.add_argument(
        "--mixture-key", default="data.mixture", help="dotted config key for the run's mixture path"
    )
    s.add_argument(
        "--output-key", default="output_dir", help="dotted config key for the run's output directory"
    )

    t = sub.add_parser("train", help="train every unfinished proxy run (resumable)")
    t.add_argument("runs", help="directory written by 'sample'")
    t.add_argument("--parallel", type=int, default=1, help="runs at once")
    t.add_argument("--launcher", choices=("python", "torchrun", "deepspeed"), default="python")
    t.add_argument("--command", default=None,
                   help="command template overriding --launcher; placeholders {config} {run_dir} {port} {gpus} "
                   "{num_gpus} {python}")  # fmt: skip
    t.add_argument(
        "--gpus-per-run", type=int, default=0, help="GPUs per run (0: do not set CUDA_VISIBLE_DEVICES)"
    )
    t.add_argument(
        "--gpu-ids", type=_indices, default=None, help="GPU ids to hand out round-robin (default 0..)"
    )
    t.add_argument(
        "--only", type=_indices, default=None, help="run indices, e.g. $SLURM_ARRAY_TASK_ID or '0-3,7'"
    )
    t.add_argument(
        "--base-port",
        type=int,
        default=None,
        help="MASTER_PORT of slot s is base-port + s (default: a free port for every launch)",
    )
    t.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")

    f = sub.add_parser("fit", help="fit LightGBM, ridge and log-linear regressors on finished runs")
    f.add_argument("runs")
    f.add_argument(
        "--target", default="average", help="a domain name, or 'average' (uniform mean of domain losses)"
    )
    f.add_argument(
        "--holdout", type=float, default=0.25, help="fraction of runs held out for the reported metrics"
    )
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--linear-features", choices=("both", "log", "weights"), default="both")
    f.add_argument("--eps", type=float, default=0.01, help="log(w + eps) in the linear features")
    f.add_argument("--regressor", default="all",
                   help="'all' or a comma list of lightgbm, linear, loglinear (Olmix's law exp(c) + exp(t.w))")  # fmt: skip
    f.add_argument("--huber-delta", type=float, default=None,
                   help="Huber threshold of the log-linear fit (default: 10%% of the target's std over the runs)")  # fmt: skip

    q = sub.add_parser(
        "search", help="minimise the fitted regressor over mixtures (capped) -> domain_weights.json"
    )
    q.add_argument("runs")
    q.add_argument("--regressor", choices=("lightgbm", "linear", "loglinear"), default="lightgbm")
    q.add_argument("--optimizer", choices=("sample", "exact"), default="sample",
                   help="sample: score sampled candidates, average the top-k; exact: SLSQP on the capped simplex "
                   "(linear/loglinear)")  # fmt: skip
    q.add_argument("--budget-tokens", type=float, default=None,
                   help="planned main-run tokens N: caps w_d * N <= E * tokens_d (default: the manifest's proxy cap)")  # fmt: skip
    q.add_argument("--max-epochs", type=float, default=None,
                   help="epoch cap E with --budget-tokens (default 4; without it: overrides the manifest's)")  # fmt: skip
    q.add_argument("--kl-prior", default=None, help="weights file q for the penalty kl_weight * KL(w || q)")
    q.add_argument("--kl-weight", type=float, default=0.0, help="lambda of the KL penalty (needs --kl-prior)")
    q.add_argument("--starts", type=int, default=8, help="SLSQP starts of --optimizer exact")
    q.add_argument("--num-candidates", type=int, default=1_000_000)
    q.add_argument("--top-k", type=int, default=100)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument(
        "--out", default=None, help="output domain_weights.json (default RUNS/domain_weights.json)"
    )
    _add_reuse_parser(sub)
    return p


def _add_reuse_parser(sub: Any) -> None:
    r = sub.add_parser("reuse", help="re-mix only the changed domains; unchanged ones keep their ratios")
    r.add_argument("--previous", required=True, help="the previous domain_weights.json")
    r.add_argument("--mixture", required=True, help="the new mixture (JSON or --data-path string)")
    r.add_argument("--runs", required=True,
                   help="swarm directory: sampled here when it has no manifest.json, fitted once trained")  # fmt: skip
    r.add_argument("--changed", default=None,
                   help="comma list of domains whose data changed (added to what the fingerprints detect; "
                   "'none' when nothing was recorded and only added domains changed)")  # fmt: skip
    r.add_argument("--removed", default=None, help="comma list of previous domains the new mixture drops")
    r.add_argument("--previous-manifest", default=None,
                   help="the previous study's manifest.json (its fingerprint or token counts) for change detection")  # fmt: skip
    r.add_argument(
        "--out", default=None, help="output domain_weights.json (default RUNS/domain_weights.json)"
    )
    r.add_argument("--base-config", default=None, help="proxy run config (phase 1)")
    r.add_argument("--num-runs", type=int, default=None, help="swarm size (default max(8, 4 x coordinates))")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--temperature", type=float, default=1.0)
    r.add_argument("--concentrations", type=_floats, default=list(DEFAULT_CONCENTRATIONS))
    r.add_argument(
        "--max-epochs", type=float, default=4.0, help="epoch cap of the proxies and of the main run"
    )
    r.add_argument(
        "--planned-tokens", type=float, default=None, help="tokens per proxy (default: base config)"
    )
    r.add_argument("--min-weight", type=float, default=0.01)
    r.add_argument("--min-distance", type=float, default=0.02)
    r.add_argument("--mixture-key", default="data.mixture")
    r.add_argument("--output-key", default="output_dir")
    r.add_argument("--target", default="average")
    r.add_argument("--holdout", type=float, default=0.25)
    r.add_argument("--regressor", choices=("lightgbm", "linear", "loglinear"), default="loglinear")
    r.add_argument("--optimizer", choices=("sample", "exact"), default="exact")
    r.add_argument("--budget-tokens", type=float, default=None, help="planned main-run tokens for the caps")
    r.add_argument("--num-candidates", type=int, default=100_000, help="--optimizer sample")
    r.add_argument("--top-k", type=int, default=100, help="--optimizer sample")


# ---- sample ---------------------------------------------------------------------------------------------------------


def _planned_from_config(cfg: dict[str, Any]) -> float | None:
    sched = cfg.get("schedule")
    if not isinstance(sched, dict):
        return None
    vals = [sched.get(k) for k in ("train_iters", "global_batch_size", "seq_length")]
    if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in vals):
        return float(math.prod(vals))  # type: ignore[arg-type]
    return None


def _train_fraction(cfg: dict[str, Any] | None) -> float:
    """Share of documents in the training split (``data.split`` like "98,1,1"); 1.0 when unknown."""
    split = (cfg or {}).get("data", {}).get("split") if isinstance((cfg or {}).get("data"), dict) else None
    if not isinstance(split, str):
        return 1.0
    try:
        parts = [float(x) for x in split.replace("/", ",").split(",")]
    except ValueError:
        return 1.0
    return parts[0] / sum(parts) if parts and sum(parts) > 0 else 1.0


def cmd_sample(args: argparse.Namespace) -> int:
    from megatron_doremi.data.mixture import Mixture
    from megatron_doremi.mixers.heuristics import domain_token_counts
    from megatron_doremi.regmix.fingerprint import data_fingerprint
    from megatron_doremi.regmix.runs import read_json, write_runs
    from megatron_doremi.regmix.sample import sample_mixtures

    mixture = Mixture.load(args.mixture)
    tokens = domain_token_counts(mixture)
    base = read_json(args.base_config, "base run config") if args.base_config else None
    if base is not None and not isinstance(base, dict):
        raise RegmixError(f"{args.base_config}: expected a JSON object (a run config)")
    planned = (
        args.planned_tokens
        if args.planned_tokens is not None
        else (_planned_from_config(base) if base else None)
    )
    frac = _train_fraction(base)
    cap_tokens = tokens.astype(np.float64) * frac
    res = sample_mixtures(
        cap_tokens,
        args.num_runs,
        seed=args.seed,
        temperature=args.temperature,
        concentrations=args.concentrations,
        max_epochs=args.max_epochs,
        planned_tokens=planned,
        min_weight=args.min_weight,
        min_distance=args.min_distance,
        distance=args.distance,
    )
    names = list(mixture.names)
    manifest = {
        "version": 1,
        "seed": args.seed,
        "temperature": args.temperature,
        "concentrations": list(args.concentrations),
        "max_epochs": args.max_epochs if planned is not None else None,
        "planned_tokens": planned,
        "train_fraction": frac,
        "min_weight": args.min_weight,
        "min_distance": args.min_distance,
        "distance": args.distance,
        "mixture_source": str(args.mixture),
        "base_config": str(Path(args.base_config).absolute()) if args.base_config else None,
        "mixture_key": args.mixture_key,
        "output_key": args.output_key,
        "domain_names": names,
        "prefixes": {d.name: [str(Path(p).absolute()) for p in d.prefixes] for d in mixture.domains},
        "tokens": {n: int(t) for n, t in zip(names, tokens)},
        "fingerprint": data_fingerprint(mixture),
        "cap_tokens": {n: float(t) for n, t in zip(names, cap_tokens)},
        "prior": dict(zip(names, res.prior.tolist())),
        "proposals": res.proposals,
        "rejected": res.rejected,
        "runs": [
            {"name": f"run_{k:04d}", "concentration": float(c), "weights": dict(zip(names, w.tolist()))}
            for k, (w, c) in enumerate(zip(res.weights, res.concentrations))
        ],
    }
    write_runs(args.out, mixture, res.weights, manifest, base, args.mixture_key, args.output_key)
    cap = (
        f"epoch cap {args.max_epochs:g} for {planned:.4g} planned tokens (train share {frac:.3f})"
        if planned is not None
        else "no epoch cap (planned tokens unknown: pass --planned-tokens or a --base-config with a schedule)"
    )
    print(
        f"sampled {args.num_runs} mixtures of {len(names)} domains into {args.out} ({res.proposals} proposals; {cap})"
    )
    print(f"  rejected: {', '.join(f'{k} {v}' for k, v in res.rejected.items())}")
    print("  prior: " + ", ".join(f"{n}={p:.3f}" for n, p in zip(names, res.prior)))
    if base is None:
        print("  no --base-config: run dirs hold mixture.json only ('regmix train' needs config.json)")
    return 0


# ---- train ----------------------------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    import shlex

    from megatron_doremi.regmix.runs import train_runs

    rep = train_runs(
        args.runs,
        parallel=args.parallel,
        launcher=args.launcher,
        command=args.command,
        gpus_per_run=args.gpus_per_run,
        gpu_ids=args.gpu_ids,
        only=args.only,
        dry_run=args.dry_run,
        base_port=args.base_port,
    )
    if args.dry_run:
        for name, argv, env in rep.planned:
            envs = " ".join(f"{k}={v}" for k, v in env.items())
            print(f"{name}: {envs} {shlex.join(argv)}")
        print(f"{len(rep.planned)} run(s) to train, {len(rep.skipped)} already done")
        return 0
    resume = len(rep.requeued) + len(rep.pending)
    print(
        f"regmix train: {len(rep.trained)} trained, {len(rep.skipped)} skipped (done), {len(rep.failed)} failed"
        + (f", {resume} to resume (rerun)" if resume else "")
    )
    for name, why in rep.failed.items():
        print(f"  FAILED {name}: {why}", file=sys.stderr)
    return rep.exit_status()  # REQUEUE (75) when runs were stopped to be resumed


# ---- fit ------------------------------------------------------------------------------------------------------------


def _f(v: Any) -> str:
    return "  n/a" if v is None else f"{v:.3f}"


def cmd_fit(args: argparse.Namespace) -> int:
    from megatron_doremi.regmix.fit import FIT_DIR, fit_runs

    doc = fit_runs(
        args.runs, args.target, args.holdout, args.seed, args.linear_features, args.eps,
        regressors=args.regressor, huber_delta=args.huber_delta,
    )  # fmt: skip
    print(
        f"fit target {doc['target']!r} on {doc['num_runs']} runs ({len(doc['test_runs'])} held out"
        f"{', ' + str(len(doc['unfinished'])) + ' unfinished skipped' if doc['unfinished'] else ''})"
    )
    print("  regressor  held-out Spearman  Pearson   RMSE")
    for k, r in doc["regressors"].items():
        h = r["holdout"]
        print(f"  {k:<9}  {_f(h['spearman']):>17}  {_f(h['pearson']):>7}  {_f(h['rmse']):>6}")
    print(f"  {doc['verdict']}")
    if len(doc["test_runs"]) < 5:
        print(f"  note: held-out metrics from {len(doc['test_runs'])} runs are noisy; train more proxies")
    print(f"  best observed run: {doc['best_observed']['run']} ({doc['best_observed']['loss']:.4f})")
    files = ", ".join(["fit.json", *(r["model"] for r in doc["regressors"].values()), "pred_vs_actual.png"])
    print(f"  wrote {Path(args.runs) / FIT_DIR}/{{{files}}}")
    return 0


# ---- search ---------------------------------------------------------------------------------------------------------


def cmd_search(args: argparse.Namespace) -> int:
    from megatron_doremi.regmix.search import run_search

    res = run_search(
        args.runs, args.regressor, args.num_candidates, args.top_k, args.seed, args.out,
        optimizer=args.optimizer, budget_tokens=args.budget_tokens, max_epochs=args.max_epochs,
        kl_prior=args.kl_prior, kl_weight=args.kl_weight, starts=args.starts,
    )  # fmt: skip
    ex = res["extra"]
    how = (
        f"exact minimum ({ex['exact']['starts']} starts, {ex['exact']['converged']} converged)"
        if args.optimizer == "exact"
        else f"{ex['num_candidates']:,} candidates, top {ex['top_k']} averaged"
    )
    print(f"searched with {args.regressor}: {how}; predicted {ex['target']} loss {ex['predicted_loss']:.4f}")
    caps = ex["caps"]
    if caps:
        print(
            f"  caps ({caps['source']}): {caps['max_epochs']:g} epochs of {caps['budget_tokens']:.4g} tokens; "
            f"binding: {', '.join(caps['binding']) or 'none'}"
        )
    else:
        print("  no repetition caps (pass --budget-tokens N --max-epochs E for the main run)")
    width = max(len(n) for n in res["names"])
    binding = set(caps["binding"]) if caps else set()
    for n, w in zip(res["names"], res["weights"]):
        print(
            f"  {n:<{width}}  {w:.4f}  (prior {ex['prior'][n]:.4f}){'  at its cap' if n in binding else ''}"
        )
    for k, p in res["paths"].items():
        print(f"  {k}: {p}")
    weights_json = res["paths"].get("weights", args.out)
    print(f'  compare with DoReMi: add "compare": {{"regmix": "{weights_json}"}} to the pipeline config')
    return 0


# ---- reuse ----------------------------------------------------------------------------------------------------------


def cmd_reuse(args: argparse.Namespace) -> int:
    from megatron_doremi.data.mixture import Mixture
    from megatron_doremi.regmix.reuse import finish_reuse, plan_reuse, sample_reuse_swarm, write_reuse_weights
    from megatron_doremi.regmix.runs import MANIFEST, read_json

    mixture = Mixture.load(args.mixture)
    plan = plan_reuse(args.previous, mixture, args.changed, args.removed, args.previous_manifest)
    runs = Path(args.runs)
    out = Path(args.out) if args.out else runs / "domain_weights.json"
    print(f"reuse of {args.previous} ({plan.detection}):")
    notes = {n: f" (ratio {plan.ratios.get(n, 0.0):.4f})" for n in plan.unchanged}
    notes.update({n: f" ({why})" for n, why in plan.reasons.items()})
    for label, items in (
        ("unchanged", plan.unchanged), ("revised", plan.revised), ("added", plan.added), ("removed", plan.removed),
    ):  # fmt: skip
        print(f"  {label:<9}  {', '.join(n + notes.get(n, '') for n in items) or '-'}")
    if not plan.changed:
        if not plan.ratios:
            raise RegmixError(
                f"{args.previous}: every remaining domain has weight 0 and none changed: nothing to mix"
            )
        weights = plan.expand([1.0])
        write_reuse_weights(out, plan, mixture, weights, {"compute": {"proxy_runs": 0}})
        print(f"  nothing to re-mix: the previous ratios renormalised -> {out}")
        return 0
    coords = list(plan.coordinates)
    if not (runs / MANIFEST).exists():
        base = read_json(args.base_config, "base run config") if args.base_config else None
        man = sample_reuse_swarm(plan, mixture, runs, args, base)
        print(
            f"  sampled {len(man['runs'])} proxies over {len(coords)} coordinates ({', '.join(coords)}) into {runs}"
        )
        print(f"  next: python -m megatron_doremi.regmix train {runs}   then rerun this command")
        return 0
    ex = finish_reuse(plan, mixture, runs, out, args)
    print(
        f"  {ex['compute']['proxy_runs']} proxies over {len(coords)} coordinates; {args.regressor} + {args.optimizer}"
    )
    print("  virtual: " + ", ".join(f"{k}={v:.4f}" for k, v in ex["virtual_weights"].items()))
    if ex["caps"]:
        print(f"  binding caps: {', '.join(ex['caps']['binding_domains']) or 'none'}")
    print(f"  wrote {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {
        "sample": cmd_sample, "train": cmd_train, "fit": cmd_fit, "search": cmd_search, "reuse": cmd_reuse,
    }[args.cmd]  # fmt: skip
    try:
        return handler(args)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
