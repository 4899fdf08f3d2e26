"""Random warm reads of (L+1)-token samples.

Project figure: samples/s of ``DomainSequences.get_batch`` (shuffled epoch, packed across document boundaries,
native gather) for random sample indices, in batches as the loader asks for them. Baseline, same process: raw
mmap slicing, ``np.array(tokens[s : s + L + 1])`` at random offsets in a Python loop (no packing, no shuffle:
the cheapest possible Python read). Also printed: the per-sample ``dataset[k]`` path. The batch path reuses one output buffer, as a
loader with pinned buffers does (a fresh 1 MB array per call costs page faults that dominate the copy). Target: >= 200k samples/s
per core through the dataset. The shard is written once to a temp dir and read warm (page cache).

    python benchmarks/bench_reads.py [--tokens 100000000] [--seq-length 2048] [--batch 256]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from megatron_doremi.data.indexed import IndexedDataset, IndexedDatasetWriter
from megatron_doremi.data.sequences import DomainSequences


def rate(fn, count: int, min_seconds: float = 1.0) -> float:
    """Items per second of ``fn`` (which processes ``count`` items), repeated for at least ``min_seconds``."""
    fn()  # warm
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_seconds:
        fn()
        done += count
    return done / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=100_000_000)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    L = args.seq_length
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        prefix = f"{tmp}/bench_text_document"
        lengths = rng.lognormal(np.log(600) - 0.5, 1.0, size=args.tokens // 600).astype(np.int64) + 1
        tokens = rng.integers(0, 50000, size=int(lengths.sum()), dtype=np.uint16)
        with IndexedDatasetWriter(prefix, np.uint16) as writer:
            writer.add_documents(tokens, lengths)
        del tokens
        shard = IndexedDataset(prefix)
        ds = DomainSequences("bench", [shard], "train", (0, shard.num_documents), L, seed=1)
        flat = shard.tokens
        print(
            f"{shard.num_documents:,} documents, {shard.num_tokens:,} tokens, L={L}: {len(ds):,} samples/epoch"
        )
        np.asarray(flat).sum()  # warm the page cache

        ks_batches = [rng.integers(0, len(ds), size=args.batch) for _ in range(64)]
        it = iter(range(10**12))

        buffer = np.empty((args.batch, L + 1), dtype=shard.dtype)

        def dataset_batch() -> None:
            ds.get_batch(ks_batches[next(it) % 64], out=buffer)

        offsets = rng.integers(0, shard.num_tokens - L - 1, size=args.batch * 64)
        pos = iter(range(10**12))

        def raw_slices() -> None:
            base = (next(pos) % 64) * args.batch
            for s in offsets[base : base + args.batch].tolist():
                np.array(flat[s : s + L + 1])

        def dataset_items() -> None:
            for k in ks_batches[next(it) % 64][:32].tolist():
                ds[k]

        project = rate(dataset_batch, args.batch)
        baseline = rate(raw_slices, args.batch)
        single = rate(dataset_items, 32)
        print(f"project  get_batch (packed, shuffled)  : {project:12,.0f} samples/s  (target >= 200,000)")
        print(f"baseline raw mmap slicing loop         : {baseline:12,.0f} samples/s")
        print(f"ratio                                  : {project / baseline:.2f}x")
        print(f"per-sample dataset[k] (python path)    : {single:12,.0f} samples/s")


if __name__ == "__main__":
    main()
