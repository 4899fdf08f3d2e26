"""DoReMi proxy step vs a static step of the same model: the cost of the reference forward and the mixer.

Project figure: the median time of ``Trainer.train_step`` with the ``doremi`` mixer (reference-model forward per
micro-batch, clipped excess per domain, loss multipliers from α, the mixer update). Baseline, same process, same
model config, same DeepSpeed config, same data: ``Trainer.train_step`` with the ``static`` mixer. The reference is
the static trainer's own checkpoint (saved before the proxy is built). Single steps of the two trainers are
interleaved (alternating which goes first) so load changes on a shared machine hit both alike. Target: ratio <= 1.45
(the reference forward is about a third of a forward+backward).

    python benchmarks/bench_proxy_step.py [--model examples/models/tiny.json] [--seq-length 256] [--steps 10]
    # on a GPU, ~125M in bf16:
    python benchmarks/bench_proxy_step.py --model examples/models/125m.json --seq-length 2048 --micro-batch 8 \
        --global-batch 32

Runs as one process (rank 0 of 1, ZeRO-3 by default) on random-token shards written to a temp directory.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def write_data(out: Path, vocab: int, domains: int, tokens_per_domain: int) -> Path:
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
        spec[f"dom{d}"] = {"prefixes": [prefix], "weight": 1.0}
    path = out / "mixture.json"
    path.write_text(json.dumps({"domains": spec}))
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO / "examples" / "models" / "tiny.json"))
    p.add_argument("--ds-config", default=str(REPO / "examples" / "ds_configs" / "zero3.json"))
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=10, help="steps of each trainer per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds (steps x rounds measured steps per trainer)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--domains", type=int, default=4)
    p.add_argument("--reference-mode", default="auto", choices=("auto", "replicated", "zero3"))
    args = p.parse_args()

    import torch

    from megatron_doremi.training.config import load_run_config, read_json
    from megatron_doremi.training.ds_config import zero_stage
    from megatron_doremi.training.engine import Trainer

    model = read_json(args.model, "model config")
    tmp = Path(tempfile.mkdtemp(prefix="bench_proxy_"))
    try:
        steps_total = args.steps * args.rounds + args.warmup + 2
        tokens_needed = args.global_batch * (args.seq_length + 1) * steps_total * 2
        mixture = write_data(
            tmp, model["vocab_size"], args.domains, max(tokens_needed // args.domains, 200_000)
        )

        def config(name: str, mixer: dict) -> object:
            return load_run_config(
                None,
                base={
                    "model": model,
                    "data": {"mixture": str(mixture), "split": "99,1,0"},
                    "mixer": mixer,
                    "schedule": {
                        "seq_length": args.seq_length,
                        "micro_batch_size": args.micro_batch,
                        "global_batch_size": args.global_batch,
                        "train_iters": 10**6,
                        "lr": 1e-4,
                        "warmup_iters": 10,
                    },  # fmt: skip
                    "checkpoint": {"save": str(tmp / name / "ckpt")},
                    "deepspeed_config": args.ds_config,
                    "output_dir": str(tmp / name),
                    "progress_bar": False,
                    "tensorboard": False,
                },
            )

        static = Trainer(config("static", {"type": "static"}))
        static.save()  # the reference checkpoint (weights at step 0: the cost does not depend on them)
        reference = {"checkpoint": str(tmp / "static" / "ckpt"), "mode": args.reference_mode}
        proxy = Trainer(config("proxy", {"type": "doremi", "reference": reference}))
        dev = static.device
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

        def timed(trainer: Trainer) -> tuple[float, float]:
            sync()
            t0 = time.perf_counter()
            record = trainer.train_step()
            sync()
            return time.perf_counter() - t0, float(record.get("reference_time_s", 0.0))

        for _ in range(args.warmup):
            timed(static)
            timed(proxy)
        times: dict[str, list[float]] = {"static": [], "proxy": []}
        ref_times: list[float] = []
        for i in range(args.rounds * args.steps):
            order = [("static", static), ("proxy", proxy)]
            for name, trainer in order if i % 2 == 0 else order[::-1]:
                t, t_ref = timed(trainer)
                times[name].append(t)
                if name == "proxy":
                    ref_times.append(t_ref)
        med = {k: statistics.median(v) for k, v in times.items()}
        tokens = args.global_batch * args.seq_length
        device = (
            torch.cuda.get_device_name() if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
        )
        print(
            f"model {Path(args.model).name} ({static.num_params / 1e6:.1f}M params), ZeRO stage "
            f"{zero_stage(static.ds_config)}, reference {proxy.reference.mode}, L={args.seq_length}, "
            f"micro {args.micro_batch}, global {args.global_batch}, {device}"
        )
        print(
            f"static step (baseline):   {med['static'] * 1e3:>10.1f} ms   {tokens / med['static']:>12,.0f} tokens/s"
        )
        print(
            f"DoReMi proxy step:        {med['proxy'] * 1e3:>10.1f} ms   {tokens / med['proxy']:>12,.0f} tokens/s"
        )
        print(f"  of which reference fwd: {statistics.median(ref_times) * 1e3:>10.1f} ms")
        print(f"ratio (proxy / static):   {med['proxy'] / med['static']:>10.3f}      (target <= 1.45)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
