"""Downstream evaluation of an HF export with EleutherAI's lm-evaluation-harness (the optional ``eval`` extra).

    pip install '.[eval]'
    python -m megatron_doremi.evaluate --hf runs/main/hf --lm-eval hellaswag,arc_easy [--lm-eval-include DIR]

Tasks are lm-eval task names; ``--lm-eval-include`` adds a directory of task YAMLs (e.g. a local task whose
``dataset_path: json`` reads a jsonl file: nothing is downloaded for it). A named public task downloads its data
set through HF ``datasets`` unless it is in the local cache; set ``HF_DATASETS_OFFLINE=1`` to forbid that.
The result written is ``{"tasks": {task: {metric: value}}, "lm_eval_version", "model", "num_fewshot",
"limit"}``, with lm-eval's metric keys (``"acc,none"``, ``"acc_stderr,none"``, ...).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

__all__ = ["LmEvalError", "run_lm_eval"]


class LmEvalError(RuntimeError):
    """lm-eval is missing, or a task cannot be found or run."""


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return str(value)


def run_lm_eval(
    hf_dir: str,
    tasks: Sequence[str],
    *,
    include_path: str | None = None,
    num_fewshot: int | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    device: str | None = None,
) -> dict[str, Any]:
    """Run lm-eval's ``hf`` model on the HF export ``hf_dir`` (its own tokenizer) for ``tasks``; single process.

    Raises :class:`LmEvalError` when lm-eval is not installed or a task is unknown.
    """
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise LmEvalError(
            f"--lm-eval needs EleutherAI's lm-evaluation-harness: pip install 'megatron-doremi[eval]' ({exc})"
        ) from None
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise LmEvalError(f"--hf {hf_dir}: not an HF model directory (no config.json)")
    if include_path is not None and not os.path.isdir(include_path):
        raise LmEvalError(f"--lm-eval-include {include_path}: directory does not exist")
    import torch

    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise LmEvalError(
            f"--lm-eval: unknown task(s) {unknown} (not in lm-eval's registry"
            + (f" nor in {include_path}" if include_path else "; local task YAMLs go in --lm-eval-include")
            + ")"
        )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": hf_dir, "tokenizer": hf_dir, "dtype": "auto"},
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        batch_size=batch_size,
        device=device,
        task_manager=manager,
        log_samples=False,
    )
    if out is None:  # simple_evaluate returns None on non-zero ranks
        return {}
    results = {
        task: {k: _jsonable(v) for k, v in metrics.items() if k not in ("name", "alias")}
        for task, metrics in out.get("results", {}).items()
    }
    return {
        "tasks": results,
        "lm_eval_version": getattr(lm_eval, "__version__", None),
        "model": os.path.abspath(hf_dir),
        "num_fewshot": num_fewshot,
        "limit": limit,
        "n_samples": {
            k: {n: _jsonable(c) for n, c in v.items()} if isinstance(v, dict) else _jsonable(v)
            for k, v in (out.get("n-samples") or {}).items()
        },
    }
