"""Training throughput: this project's step vs a plain DeepSpeed loop where the HF model computes its own loss.

Project figure: tokens/s of ``Trainer.train_step`` (mixture loader, global token-count all-reduce, logits ->
``domain_cross_entropy`` with per-domain statistics, mixer hooks). Baseline, same process, same DeepSpeed engine,
same batches from the same loader: ``engine(input_ids, labels=input_ids).loss`` (HF shifts the labels and
computes its mean cross-entropy), ``engine.backward``, ``engine.step``. The two loops alternate in rounds; the
median step time of each is reported (steps interleaved one by one). Target: ratio >= 1.0.

    python benchmarks/bench_train_step.py [--model examples/models/tiny.json] [--seq-length 256] [--steps 10]
    # on a GPU, ~125M in bf16 with MFU:
    python benchmarks/bench_train_step.py --model examples/models/125m.json --seq-length 2048 --micro-batch 8 \
        --global-batch 32

Runs as one process (rank 0 of 1, ZeRO-3 by default) on random-token shards written to a temp directory.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _trainer_bench import add_common_args, device_name, run_config, write_data


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, "loop")
    p.add_argument(
        "--peak-tflops", type=float, default=989.0, help="per-GPU dense bf16 peak for MFU (H100 SXM)"
    )
    args = p.parse_args()

    import torch

    from megatron_doremi.training.config import load_run_config, read_json
    from megatron_doremi.training.engine import Trainer

    model = read_json(args.model, "model config")
    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    tokens_needed = args.global_batch * args.seq_length * (args.steps * args.rounds * 2 + args.warmup * 2 + 4)
    tokens_per_domain = max(tokens_needed // args.domains, 200_000)
    weights = [float(d + 1) for d in range(args.domains)]
    mixture = write_data(tmp, model["vocab_size"], args.domains, tokens_per_domain, weights)
    cfg = load_run_config(None, base=run_config(args, model, mixture, tmp / "run"))
    trainer = Trainer(cfg)
    engine, loader, dev = trainer.engine, trainer.loader, trainer.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def plain_step() -> None:
        for b in loader.next_batch():
            ids = b["input_ids"].to(dev, non_blocking=True)
            loss = engine(input_ids=ids, labels=ids, use_cache=False).loss
            engine.backward(loss)
            engine.step()

    def ours_step() -> None:
        trainer.train_step()

    def timed(fn, n: int) -> list[float]:
        out = []
        for _ in range(n):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            out.append(time.perf_counter() - t0)
        return out

    timed(plain_step, args.warmup)
    timed(ours_step, args.warmup)
    # Interleave single steps (alternating which goes first) so load changes on a shared machine hit both alike.
    times: dict[str, list[float]] = {"ours": [], "plain": []}
    for i in range(args.rounds * args.steps):
        order = [("plain", plain_step), ("ours", ours_step)]
        for name, fn in order if i % 2 == 0 else order[::-1]:
            times[name] += timed(fn, 1)
    tokens = args.global_batch * args.seq_length
    tps = {k: tokens / statistics.median(v) for k, v in times.items()}
    n_params = trainer.num_params
    device = device_name(dev)
    print(
        f"model {os.path.basename(args.model)} ({n_params / 1e6:.1f}M params), ZeRO stage "
        f"{cfg_stage(trainer)}, L={args.seq_length}, micro {args.micro_batch}, global {args.global_batch}, {device}"
    )
    print(f"plain DeepSpeed loop (HF loss):        {tps['plain']:>12,.0f} tokens/s")
    print(f"megatron_doremi train_step:            {tps['ours']:>12,.0f} tokens/s")
    print(f"ratio (ours / plain):                  {tps['ours'] / tps['plain']:>12.3f}   (target >= 1.0)")
    if dev.type == "cuda":
        cfg_m = trainer.hf_config
        flops_per_token = (
            6 * n_params + 12 * cfg_m["num_hidden_layers"] * cfg_m["hidden_size"] * args.seq_length
        )
        for k in ("plain", "ours"):
            mfu = flops_per_token * tps[k] / (args.peak_tflops * 1e12)
            print(f"MFU {k}: {mfu * 100:.1f}% of {args.peak_tflops:.0f} TFLOP/s")
    return 0


def cfg_stage(trainer) -> int:
    from megatron_doremi.training.ds_config import zero_stage

    return zero_stage(trainer.ds_config)


if __name__ == "__main__":
    sys.exit(main())
