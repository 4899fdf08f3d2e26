"""A RegMix answer as a pipeline ``compare`` entry: ``{"regmix": {"runs": DIR, "regressor": ..., ...}}``.

The swarm in ``runs`` (``regmix sample`` + ``regmix train``) is the expensive part and is trained beforehand; this
module fits it when its ``regmix_fit/fit.json`` lacks the regressor, searches it under the entry's options into the
compared step's directory, and returns the weights plus the swarm's compute (the sum of its runs' ``train_flops``).
Deterministic: the same swarm, options and seed give the same weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from megatron_doremi.regmix.fit import FIT_DIR, fit_runs
from megatron_doremi.regmix.runs import RegmixError, list_run_dirs, load_manifest
from megatron_doremi.regmix.search import OPTIMIZERS, run_search

__all__ = ["REGMIX_COMPARE_KEYS", "check_regmix_spec", "regmix_compare_weights"]

#: the keys of a compare entry's ``regmix`` object, with their defaults
REGMIX_COMPARE_KEYS: dict[str, Any] = {
    "runs": None,  # required: the swarm directory
    "regressor": "lightgbm",
    "optimizer": None,  # None: "exact" for a smooth regressor (linear, loglinear), "sample" for lightgbm
    "budget_tokens": "main",  # "main": the main run's train_iters x global batch x seq_length; null: the swarm's cap
    "max_epochs": None,  # with budget_tokens: w_d * budget <= max_epochs * tokens_d (default 1 epoch)
    "num_candidates": 1_000_000,
    "top_k": 100,
    "seed": 0,
}
_REGRESSORS = ("lightgbm", "linear", "loglinear")


def check_regmix_spec(spec: Any, where: str) -> dict[str, Any]:
    """The entry's options with defaults filled in; ValueError naming ``where.key`` on a bad one."""
    if not isinstance(spec, Mapping):
        raise ValueError(
            f'{where}: expected an object such as {{"runs": "runs/regmix", "regressor": "loglinear"}}'
        )
    unknown = sorted(set(spec) - set(REGMIX_COMPARE_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} (known: {', '.join(REGMIX_COMPARE_KEYS)})")
    opts = {**REGMIX_COMPARE_KEYS, **spec}
    if not isinstance(opts["runs"], str) or not opts["runs"]:
        raise ValueError(
            f"{where}.runs: the RegMix swarm directory (regmix sample + regmix train) is required"
        )
    if opts["regressor"] not in _REGRESSORS:
        raise ValueError(
            f"{where}.regressor: expected one of {', '.join(_REGRESSORS)}, got {opts['regressor']!r}"
        )
    if opts["optimizer"] is None:
        opts["optimizer"] = "sample" if opts["regressor"] == "lightgbm" else "exact"
    if opts["optimizer"] not in OPTIMIZERS:
        raise ValueError(
            f"{where}.optimizer: expected one of {', '.join(OPTIMIZERS)}, got {opts['optimizer']!r}"
        )
    if opts["optimizer"] == "exact" and opts["regressor"] == "lightgbm":
        raise ValueError(
            f"{where}: optimizer exact needs a smooth regressor (linear or loglinear), not lightgbm"
        )
    budget = opts["budget_tokens"]
    if budget not in (None, "main") and (
        isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0
    ):
        raise ValueError(f'{where}.budget_tokens: expected "main", null or a number > 0, got {budget!r}')
    epochs = opts["max_epochs"]
    if epochs is not None and (
        isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or epochs <= 0
    ):
        raise ValueError(f"{where}.max_epochs: expected null or a number > 0, got {epochs!r}")
    for key in ("num_candidates", "top_k", "seed"):
        v = opts[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if key == "seed" else 1):
            raise ValueError(f"{where}.{key}: expected an integer >= {0 if key == 'seed' else 1}, got {v!r}")
    return dict(opts)


def _swarm_flops(runs: Path) -> tuple[int, float | None]:
    """(finished runs, the sum of their ``train_flops``; None when a run did not record it)."""
    total, count = 0.0, 0
    for d in list_run_dirs(runs):
        path = d / "train_summary.json"
        if not path.is_file():
            continue
        count += 1
        try:
            flops = json.loads(path.read_text()).get("train_flops")
        except (OSError, ValueError):
            flops = None
        if not isinstance(flops, (int, float)):
            return count, None
        total += float(flops)
    return count, total


def regmix_compare_weights(
    opts: Mapping[str, Any], names: Sequence[str], out_dir: str, main_budget_tokens: float | None
) -> tuple[dict[str, float], dict[str, Any]]:
    """Search the swarm ``opts["runs"]`` (options from :func:`check_regmix_spec`) into ``out_dir``.

    Returns ``({name: w}, info)``; ``info``: ``weights_file``, ``regressor``, ``optimizer``, ``swarm_runs``,
    ``swarm_flops`` (None if unknown), ``binding_caps``. RegmixError when the swarm is missing, unfinished, or
    has other domains than ``names``.
    """
    runs = Path(opts["runs"])
    man = load_manifest(runs)
    if list(man["domain_names"]) != list(names):
        raise RegmixError(
            f"{runs}: the swarm's domains {man['domain_names']} differ from the pipeline's {list(names)}"
        )
    fit_json = runs / FIT_DIR / "fit.json"
    fitted = json.loads(fit_json.read_text()).get("regressors", {}) if fit_json.is_file() else {}
    if opts["regressor"] not in fitted:
        fit_runs(runs, regressors=sorted({*fitted, opts["regressor"]}), plot=False)
    budget = main_budget_tokens if opts["budget_tokens"] == "main" else opts["budget_tokens"]
    epochs = opts["max_epochs"] if opts["max_epochs"] is not None else (1.0 if budget is not None else None)
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, "domain_weights.json")
    result = run_search(
        runs, opts["regressor"], opts["num_candidates"], opts["top_k"], opts["seed"], out,
        optimizer=opts["optimizer"], budget_tokens=budget, max_epochs=epochs,
    )  # fmt: skip
    weights = dict(zip(result["names"], (float(w) for w in result["weights"])))
    count, flops = _swarm_flops(runs)
    caps = (result.get("extra") or {}).get("caps") or {}
    info = {
        "weights_file": out,
        "regressor": opts["regressor"],
        "optimizer": opts["optimizer"],
        "swarm_runs": count,
        "swarm_flops": flops,
        "binding_caps": list(caps.get("binding") or []),
    }
    return weights, info
