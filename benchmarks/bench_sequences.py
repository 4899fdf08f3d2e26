"""Sequence-index build time: one epoch's document order, sample index and sample shuffle.

Project figure: ``build_epoch_indices`` (native Feistel document order + sample index; the sample shuffle is
lazy). Baselines, same process: a straightforward numpy build (``rng.permutation`` of the documents, gathered
lengths, cumsum + searchsorted sample index, ``rng.permutation`` of the samples: what a vectorised Megatron
port does), and the project's own numpy fallback (``MEGATRON_DOREMI_NO_NATIVE=1``). Target: < 0.5 s for 10^7
documents at L = 2048.

    python benchmarks/bench_sequences.py [--docs 10000000] [--seq-length 2048]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from megatron_doremi._native import native_enabled
from megatron_doremi.data.sequences import build_epoch_indices


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--docs", type=int, default=10_000_000)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--mean-doc-tokens", type=float, default=600.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    # heavy-tailed document lengths, like web text: lognormal with the requested mean
    sigma = 1.0
    lengths = (
        rng.lognormal(np.log(args.mean_doc_tokens) - sigma**2 / 2, sigma, size=args.docs).astype(np.int64) + 1
    )
    num_samples = (int(lengths.sum()) - 1) // args.seq_length
    print(
        f"{args.docs:,} documents, {int(lengths.sum()):,} tokens, L={args.seq_length}: {num_samples:,} samples/epoch"
    )

    def run() -> None:
        build_epoch_indices(
            lengths,
            args.seq_length,
            num_samples,
            np.random.default_rng([1, 0]),
            np.random.default_rng([1, 1]),
        )

    def straightforward() -> None:
        order = np.random.default_rng([1, 0]).permutation(len(lengths))
        ends = np.cumsum(lengths[order])
        starts = np.arange(num_samples + 1, dtype=np.int64) * args.seq_length
        doc = np.searchsorted(ends, starts, side="right")
        _ = np.stack([doc, starts - (ends[doc] - lengths[order][doc])], axis=1)
        np.random.default_rng([1, 1]).permutation(num_samples)

    assert native_enabled(), "build the extension first: pip install --no-build-isolation -e ."
    native = best_of(run, args.repeats)
    baseline = best_of(straightforward, args.repeats)
    os.environ["MEGATRON_DOREMI_NO_NATIVE"] = "1"
    fallback = best_of(run, max(1, args.repeats - 2))
    del os.environ["MEGATRON_DOREMI_NO_NATIVE"]
    print(f"project (native)                        : {native:.3f} s   (target < 0.5 s)")
    print(f"baseline (straightforward numpy build)  : {baseline:.3f} s   ratio {baseline / native:.2f}x")
    print(f"project's numpy fallback (no extension) : {fallback:.3f} s   ratio {fallback / native:.2f}x")


if __name__ == "__main__":
    main()
