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
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _trainer_bench import add_common_args, device_name, run_config, write_data


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, "trainer")
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
        tokens_per_domain = max(tokens_needed // args.domains, 200_000)
        mixture = write_data(tmp, model["vocab_size"], args.domains, tokens_per_domain, [1.0] * args.domains)

        def config(name: str, mixer: dict) -> object:
            extra = {"mixer": mixer, "checkpoint": {"save": str(tmp / name / "ckpt")}}
            return load_run_config(None, base=run_config(args, model, mixture, tmp / name, **extra))

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
        device = device_name(dev)
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
