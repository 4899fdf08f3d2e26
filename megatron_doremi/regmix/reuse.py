"""``regmix reuse``: update a mixture when the domain set changes, re-mixing only what changed (Olmix's reuse).

Given the previous ``domain_weights.json`` (weights ``p``) and the new mixture, every domain is one of:
*unchanged* (in both, same data), *revised* (in both, data changed), *added* (new only) or *removed* (previous
only; must be listed with ``--removed``, so a renamed domain is never dropped silently). Change detection
(:mod:`.fingerprint`): the ``data_fingerprint`` recorded with the previous weights, or ``--previous-manifest``
(a ``regmix sample`` manifest), or the previous weights' shard prefixes; ``--changed a,b`` adds domains by hand.

The unchanged domains become one virtual domain ``__reused__`` whose members keep the ratios
``r_d = p_d / sum_{u in unchanged} p_u`` exactly; the swarm mixes K = 1 + #changed coordinates (the virtual
domain and each revised/added domain) instead of all D domains. A proxy's real mixture expands coordinate
weights ``v``: ``w_d = v_virtual * r_d`` for unchanged d, ``w_c = v_c`` for changed c. Its repetition cap follows:
``v_virtual * N * r_d <= E * tokens_d`` for every member, i.e. the virtual domain has ``min_d tokens_d / r_d``
tokens for the cap (and ``sum_d tokens_d`` for the prior).

Two phases on one ``--runs`` directory (the same layout ``regmix fit`` reads; its ``manifest.json`` has a ``reuse``
block naming the coordinates, so ``regmix fit/search RUNS`` work on it too):

1. no ``RUNS/manifest.json``: plan, sample the smaller swarm there (``--base-config``), print the next commands;
2. finished runs: fit (every regressor; the objective stays the loss over all real domains), search the
   coordinates (``--regressor``, ``--optimizer``, caps), expand, write ``--out`` in the ``domain_weights.json``
   format (``method: "regmix-reuse"``, the ``reuse`` plan, ``virtual_weights``, the new ``data_fingerprint``).

With nothing changed (only removals) the answer is the previous ratios renormalised and no swarm is needed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from megatron_doremi.regmix.fingerprint import data_fingerprint, domain_changed
from megatron_doremi.regmix.runs import MANIFEST, read_json
from megatron_doremi.regmix.sample import RegmixError

__all__ = ["VIRTUAL", "ReusePlan", "load_previous", "plan_reuse", "sample_reuse_swarm", "finish_reuse"]

VIRTUAL = "__reused__"


@dataclass
class ReusePlan:
    """Classification of the new mixture's domains and the coordinates the swarm mixes (module doc)."""

    names: list[str]  # the new mixture's domains, in its order
    unchanged: list[str]
    revised: list[str]
    added: list[str]
    removed: list[str]
    ratios: dict[str, float]  # unchanged domain -> its fixed share of the virtual domain (sum 1; {} if none)
    reasons: dict[str, str] = field(default_factory=dict)  # revised domain -> why
    detection: str = ""
    previous: str = ""
    previous_sha256: str = ""

    @property
    def changed(self) -> list[str]:
        """Revised and added domains, in the new mixture's order."""
        return [n for n in self.names if n in self.revised or n in self.added]

    @property
    def coordinates(self) -> dict[str, list[str]]:
        """Coordinate -> real members: ``__reused__`` (if any unchanged weight) then each changed domain."""
        out: dict[str, list[str]] = {VIRTUAL: list(self.ratios)} if self.ratios else {}
        out.update({c: [c] for c in self.changed})
        return out

    def expand(self, coord_weights: Sequence[float] | np.ndarray) -> np.ndarray:
        """float64 [D] real weights (new mixture order) from coordinate weights [K] (coordinates order)."""
        v = dict(zip(self.coordinates, np.asarray(coord_weights, dtype=np.float64).tolist()))
        return np.array(
            [
                v.get(VIRTUAL, 0.0) * self.ratios.get(n, 0.0) if n in self.unchanged else v[n]
                for n in self.names
            ]
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "previous": self.previous,
            "previous_sha256": self.previous_sha256,
            "detection": self.detection,
            "unchanged": self.unchanged,
            "revised": self.revised,
            "added": self.added,
            "removed": self.removed,
            "reasons": self.reasons,
            "virtual": VIRTUAL,
            "ratios": self.ratios,
            "coordinates": self.coordinates,
        }


def _split(text: str | None) -> list[str] | None:
    if text is None:
        return None
    items = [x.strip() for x in text.split(",") if x.strip()]
    return [] if items == ["none"] else items


def load_previous(path: str) -> tuple[list[str], np.ndarray, dict[str, Any]]:
    """(domain names, average weights [D], the whole document) of a previous ``domain_weights.json``."""
    doc = read_json(path, "previous domain weights (a domain_weights.json)")
    block = doc.get("average") if isinstance(doc, dict) else None
    names = doc.get("domain_names") if isinstance(doc, dict) else None
    if (
        not isinstance(block, dict)
        or not isinstance(block.get("weights"), dict)
        or not isinstance(names, list)
    ):
        raise RegmixError(f"{path}: not a domain_weights.json (expected domain_names and average.weights)")
    table = block["weights"]
    if sorted(table) != sorted(names):
        raise RegmixError(f"{path}: average.weights names {sorted(table)} differ from domain_names {names}")
    w = np.array([table[n] for n in names], dtype=np.float64)
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise RegmixError(f"{path}: average.weights must be finite, >= 0 and not all zero, got {w.tolist()}")
    return list(names), w / w.sum(), doc


def _previous_fingerprint(doc: dict[str, Any], manifest: str | None) -> tuple[dict[str, Any] | None, str]:
    if manifest is not None:
        man = read_json(manifest, "previous RegMix manifest")
        if isinstance(man.get("fingerprint"), dict):
            return man["fingerprint"], f"shard sizes and .idx hashes in {manifest}"
        tokens, prefixes = man.get("tokens") or {}, man.get("prefixes") or {}
        if not tokens and not prefixes:
            raise RegmixError(f"{manifest}: no fingerprint, tokens or prefixes recorded")
        fp = {n: {"tokens": tokens.get(n), "prefixes": prefixes.get(n)} for n in set(tokens) | set(prefixes)}
        return fp, f"token counts and shard prefixes in {manifest}"
    if isinstance(doc.get("data_fingerprint"), dict):
        return doc["data_fingerprint"], "shard sizes and .idx hashes recorded with the previous weights"
    mix = (doc.get("average") or {}).get("mixture")
    if isinstance(mix, dict) and isinstance(mix.get("domains"), dict):
        fp = {n: {"prefixes": d.get("prefixes")} for n, d in mix["domains"].items() if isinstance(d, dict)}
        return fp, "shard prefixes of the previous weights (no sizes or hashes recorded)"
    return None, "none"


def plan_reuse(
    previous: str,
    mixture: Any,
    changed: str | None = None,
    removed: str | None = None,
    previous_manifest: str | None = None,
) -> ReusePlan:
    """Classify the domains of ``mixture`` (a Mixture) against the previous weights (module doc)."""
    prev_names, prev_w, doc = load_previous(previous)
    names = list(mixture.names)
    if VIRTUAL in names:
        raise RegmixError(f"the new mixture has a domain named {VIRTUAL!r}: that name is reserved for reuse")
    forced, dropped = _split(changed), _split(removed) or []
    gone = [n for n in prev_names if n not in names]
    bad = [n for n in dropped if n not in prev_names or n in names]
    if bad:
        raise RegmixError(
            f"--removed {', '.join(bad)}: not a domain of {previous} that the new mixture lacks "
            f"(previous domains: {', '.join(prev_names)})"
        )
    if sorted(gone) != sorted(dropped):
        missing = [n for n in gone if n not in dropped]
        raise RegmixError(
            f"{previous}: the previous weights name domain(s) {missing} that the new mixture "
            f"({getattr(mixture, 'source', 'mixture')}) lacks; if they were removed pass --removed "
            f"{','.join(missing)}, if renamed, rename them back or treat them as added"
        )
    unknown = [n for n in forced or [] if n not in names]
    if unknown:
        raise RegmixError(
            f"--changed {', '.join(unknown)}: not domains of the new mixture ({', '.join(names)})"
        )
    old_fp, detection = _previous_fingerprint(doc, previous_manifest)
    if old_fp is None and forced is None:
        raise RegmixError(
            f"{previous}: records no data fingerprint, shard prefixes or token counts to tell which domains "
            "changed; pass --previous-manifest RUNS/manifest.json, or list them with --changed a,b "
            "(--changed none: only added domains changed)"
        )
    new_fp = data_fingerprint(mixture) if old_fp is not None else {}
    reasons: dict[str, str] = {}
    for n in names:
        if n not in prev_names:
            continue
        if forced is not None and n in forced:
            reasons[n] = "listed with --changed"
        elif old_fp is not None:
            why = domain_changed(old_fp[n], new_fp[n]) if n in old_fp else "not in the previous fingerprint"
            if why:
                reasons[n] = why
    added = [n for n in names if n not in prev_names]
    revised = [n for n in names if n in reasons]
    unchanged = [n for n in names if n in prev_names and n not in reasons]
    prev = dict(zip(prev_names, prev_w.tolist()))
    total = sum(prev[n] for n in unchanged)
    ratios = {n: prev[n] / total for n in unchanged} if total > 0 else {}
    with open(previous, "rb") as fh:
        sha = hashlib.sha256(fh.read()).hexdigest()
    return ReusePlan(
        names, unchanged, revised, added, list(dropped), ratios, reasons,
        detection if forced is None else f"{detection}; plus --changed", os.path.abspath(previous), sha,
    )  # fmt: skip


def coordinate_tokens(plan: ReusePlan, tokens: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """(prior tokens [K], cap tokens [K]) of the coordinates: the virtual domain has sum_d tokens_d for the prior
    and min_d tokens_d / r_d for the cap (module doc)."""
    prior, cap = [], []
    for coord, members in plan.coordinates.items():
        if coord == VIRTUAL:
            prior.append(sum(tokens[m] for m in members))
            cap.append(min(tokens[m] / plan.ratios[m] for m in members if plan.ratios[m] > 0))
        else:
            prior.append(tokens[coord])
            cap.append(tokens[coord])
    return np.array(prior, dtype=np.float64), np.array(cap, dtype=np.float64)


def sample_reuse_swarm(
    plan: ReusePlan, mixture: Any, runs: Path, args: Any, base: dict[str, Any] | None
) -> dict[str, Any]:
    """Sample ``args.num_runs`` coordinate mixtures into ``runs`` (real mixtures in the run dirs); the manifest."""
    from megatron_doremi.mixers.heuristics import domain_token_counts
    from megatron_doremi.regmix.__main__ import _planned_from_config, _train_fraction
    from megatron_doremi.regmix.runs import write_runs
    from megatron_doremi.regmix.sample import sample_mixtures

    coords = list(plan.coordinates)
    tokens = dict(zip(mixture.names, domain_token_counts(mixture).astype(np.float64).tolist()))
    planned = args.planned_tokens if args.planned_tokens is not None else (_planned_from_config(base or {}))
    frac = _train_fraction(base)
    prior_tok, cap_tok = coordinate_tokens(plan, tokens)
    cap_tok = cap_tok * frac
    num_runs = args.num_runs if args.num_runs is not None else max(8, 4 * len(coords))
    res = sample_mixtures(
        cap_tok, num_runs, seed=args.seed, temperature=args.temperature, concentrations=args.concentrations,
        max_epochs=args.max_epochs, planned_tokens=planned, min_weight=args.min_weight,
        min_distance=args.min_distance, prior_tokens=prior_tok,
    )  # fmt: skip
    real = np.array([plan.expand(w) for w in res.weights])
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
        "distance": "l1",
        "mixture_source": str(args.mixture),
        "base_config": str(Path(args.base_config).absolute()) if args.base_config else None,
        "mixture_key": args.mixture_key,
        "output_key": args.output_key,
        "domain_names": coords,
        "prefixes": None,  # coordinates have no shards of their own; the run dirs hold real mixtures
        "tokens": dict(zip(coords, prior_tok.tolist())),
        "cap_tokens": dict(zip(coords, cap_tok.tolist())),
        "prior": dict(zip(coords, res.prior.tolist())),
        "proposals": res.proposals,
        "rejected": res.rejected,
        "runs": [
            {"name": f"run_{k:04d}", "concentration": float(c), "weights": dict(zip(coords, w.tolist()))}
            for k, (w, c) in enumerate(zip(res.weights, res.concentrations))
        ],
        "reuse": plan.to_json(),
        "real_domain_names": list(mixture.names),
        "fingerprint": data_fingerprint(mixture),
    }
    write_runs(runs, mixture, real, manifest, base, args.mixture_key, args.output_key)
    return manifest


def check_swarm(plan: ReusePlan, runs: Path) -> dict[str, Any]:
    """The swarm's manifest, checked to belong to this plan (same previous weights, coordinates, ratios)."""
    man = read_json(runs / MANIFEST, "RegMix manifest")
    old = man.get("reuse")
    if not isinstance(old, dict):
        raise RegmixError(f"{runs / MANIFEST}: not a reuse swarm (no 'reuse' block): choose a new --runs")
    now = plan.to_json()
    diff = [k for k in ("previous_sha256", "coordinates", "ratios") if old.get(k) != now[k]]
    if diff or man.get("real_domain_names") != plan.names:
        raise RegmixError(
            f"{runs / MANIFEST}: sampled for a different reuse ({', '.join(diff) or 'domain set'} differ: e.g. "
            f"coordinates {old.get('coordinates')} vs now {now['coordinates']}); use a new --runs directory"
        )
    return man


def write_reuse_weights(
    out: Path, plan: ReusePlan, mixture: Any, weights: np.ndarray, extra: dict[str, Any]
) -> None:
    """``domain_weights.json`` over the new mixture's domains (both mixture forms) with the reuse plan."""
    from megatron_doremi.mixers.weights_io import write_domain_weights_json

    prefixes = {d.name: [os.path.abspath(p) for p in d.prefixes] for d in mixture.domains}
    extra = {
        "method": "regmix-reuse",
        "reuse": plan.to_json(),
        **extra,
        "data_fingerprint": data_fingerprint(mixture),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    write_domain_weights_json(out, plan.names, weights, weights, prefixes=prefixes, extra=extra)


def finish_reuse(plan: ReusePlan, mixture: Any, runs: Path, out: Path, args: Any) -> dict[str, Any]:
    """Fit the finished swarm, search its coordinates, expand, write ``out``; returns the written extra."""
    from megatron_doremi.regmix.fit import fit_runs
    from megatron_doremi.regmix.search import run_search

    man = check_swarm(plan, runs)
    fit = fit_runs(runs, args.target, args.holdout, args.seed, regressors="all")
    res = run_search(
        runs, args.regressor, args.num_candidates, args.top_k, args.seed, runs / "virtual" / "domain_weights.json",
        optimizer=args.optimizer, budget_tokens=args.budget_tokens, max_epochs=args.max_epochs,
    )  # fmt: skip
    ex = res["extra"]
    real = plan.expand(res["weights"])
    real = real / real.sum()
    caps = ex.get("caps")
    binding: list[str] = []
    if caps:
        from megatron_doremi.mixers.heuristics import domain_token_counts

        frac = float(man.get("train_fraction") or 1.0)
        tok = domain_token_counts(mixture).astype(np.float64) * frac
        upper = np.minimum(1.0, caps["max_epochs"] * tok / caps["budget_tokens"])
        binding = [n for n, w, u in zip(plan.names, real, upper) if u < 1 and w >= u - 1e-6]
    extra = {
        "virtual_weights": dict(zip(res["names"], res["weights"].tolist())),
        "target": ex["target"],
        "regressor": args.regressor,
        "optimizer": args.optimizer,
        "predicted_loss": ex["predicted_loss"],
        "fit": ex["fit"],
        "favoured_regressor": fit.get("favoured_regressor"),
        "caps": None if not caps else {**caps, "binding_domains": binding},
        "compute": {
            "proxy_runs": fit["num_runs"],
            "coordinates": len(plan.coordinates),
            "domains": len(plan.names),
            "note": "the swarm mixes the coordinates only; a full RegMix study would mix every domain",
        },
        "runs_dir": str(runs.absolute()),
    }
    write_reuse_weights(out, plan, mixture, real, extra)
    return extra
