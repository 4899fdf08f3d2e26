"""Sequence-index build time: one epoch's document order, sample index and sample shuffle.

Project figure: ``build_epoch_indices`` (native Feistel document order + sample index; the sample shuffle is
lazy). Baselines, same process: a straightforward numpy build (``rng.permutation`` of the documents, gathered
lengths, cumsum + searchsorted sample index, ``rng.permutation`` of the samples: what a vectorised Megatron
port does), and the project's own numpy fallback (``MEGATRON_DOREMI_NO_NATIVE=1``). Target: < 0.5 s for 10^7
documents at L = 2048.

``packing: "megatron"`` (Megatron-LM's GPTDataset document, sample and shuffle indices for one epoch of the same
documents, ``build_megatron_indices``) is timed the same way, with its ratio to the project's packing, and so is
Megatron-Core's own index build (``GPTDataset._build_document_sample_shuffle_indices`` pieces: its document index,
``helpers.build_sample_idx`` and shuffle index) when megatron-core is importable.

    python benchmarks/bench_sequences.py [--docs 10000000] [--seq-length 2048]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from megatron_doremi._native import native_enabled
from megatron_doremi.data.megatron_gpt import build_megatron_indices
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

    lengths32 = lengths.astype(np.int32)

    def megatron_mode() -> None:
        build_megatron_indices(lengths32, 0, len(lengths32), args.seq_length, None, 1234)

    assert native_enabled(), "build the extension first: pip install --no-build-isolation -e ."
    native = best_of(run, args.repeats)
    baseline = best_of(straightforward, args.repeats)
    megatron = best_of(megatron_mode, args.repeats)
    os.environ["MEGATRON_DOREMI_NO_NATIVE"] = "1"
    fallback = best_of(run, max(1, args.repeats - 2))
    del os.environ["MEGATRON_DOREMI_NO_NATIVE"]
    print(f"project (native)                        : {native:.3f} s   (target < 0.5 s)")
    print(f"baseline (straightforward numpy build)  : {baseline:.3f} s   ratio {baseline / native:.2f}x")
    print(f"project's numpy fallback (no extension) : {fallback:.3f} s   ratio {fallback / native:.2f}x")
    print(
        f"packing 'megatron' (GPTDataset indices) : {megatron:.3f} s   ratio {megatron / native:.2f}x of project"
    )
    core = megatron_core_build(lengths32, args.seq_length, args.repeats)
    if core is None:
        print("megatron-core's own build               : not measured (megatron-core is not importable)")
    else:
        print(
            f"megatron-core's own build               : {core:.3f} s   ratio {core / megatron:.2f}x of 'megatron'"
        )


def megatron_core_build(lengths: np.ndarray, seq_length: int, repeats: int) -> float | None:
    """Megatron-Core's index build for one epoch of all documents (its own functions), or None if absent."""
    try:
        import warnings

        warnings.filterwarnings("ignore")
        from megatron.core.datasets import helpers
        from megatron.core.datasets.gpt_dataset import _build_document_index, _build_shuffle_index
    except Exception:  # noqa: BLE001 - not installed or not importable
        return None
    tokens = int(lengths.sum())

    def build() -> None:
        rs = np.random.RandomState(1234)
        doc = _build_document_index(np.arange(len(lengths), dtype=np.int32), 1, rs, False)
        sample = helpers.build_sample_idx(lengths, doc, seq_length, 1, tokens, True, True)
        _build_shuffle_index(sample.shape[0] - 1, sample.shape[0] - 1, rs)

    return best_of(build, repeats)


if __name__ == "__main__":
    main()
