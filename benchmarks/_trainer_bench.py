"""Shared setup of the trainer benchmarks (bench_train_step.py, bench_proxy_step.py): data, flags, run config."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def write_data(out: Path, vocab: int, domains: int, tokens_per_domain: int, weights: list[float]) -> Path:
    """``domains`` shards of random tokens (documents of 200-2000 tokens) and their mixture JSON."""
    from megatron_doremi.data.indexed import IndexedDatasetWriter

    rng = np.random.default_rng(0)
    spec = {}
    dtype = np.uint16 if vocab < 65500 else np.int32
    for d in range(domains):
        prefix = str(out / f"dom{d}_text_document")
        with IndexedDatasetWriter(prefix, dtype) as w:
            left = tokens_per_domain
            while left > 0:
                n = int(min(left, rng.integers(200, 2000)))
                w.add_document(rng.integers(0, vocab, n))
                left -= n
        spec[f"dom{d}"] = {"prefixes": [prefix], "weight": weights[d]}
    path = out / "mixture.json"
    path.write_text(json.dumps({"domains": spec}))
    return path


def add_common_args(p: argparse.ArgumentParser, what: str) -> None:
    """Model, DeepSpeed config, batch and timing flags shared by the trainer benchmarks (``what``: 'loop'/'trainer')."""
    p.add_argument("--model", default=str(REPO / "examples" / "models" / "tiny.json"))
    p.add_argument("--ds-config", default=str(REPO / "examples" / "ds_configs" / "zero3.json"))
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=10, help=f"steps of each {what} per round")
    p.add_argument("--rounds", type=int, default=3, help=f"rounds (steps x rounds measured steps per {what})")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--domains", type=int, default=4)


def run_config(args: argparse.Namespace, model: dict, mixture: Path, out_dir: Path, **extra: Any) -> dict:
    """The benchmark run config (as a ``load_run_config`` base): effectively endless schedule, no logs/progress."""
    return {
        "model": model,
        "data": {"mixture": str(mixture), "split": "99,1,0"},
        "schedule": {
            "seq_length": args.seq_length,
            "micro_batch_size": args.micro_batch,
            "global_batch_size": args.global_batch,
            "train_iters": 10**6,
            "lr": 1e-4,
            "warmup_iters": 10,
        },
        "deepspeed_config": args.ds_config,
        "output_dir": str(out_dir),
        "progress_bar": False,
        "tensorboard": False,
        **extra,
    }


def device_name(dev: Any) -> str:
    import torch

    return torch.cuda.get_device_name() if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
