#!/usr/bin/env python
"""Throughput of preprocessing (read jsonl -> encode -> write shard) vs the tokenizer's own ``encode_batch``.

Figure: tokens/s of ``megatron_doremi.data.preprocess.preprocess`` end to end (tokenizer load, jsonl
read + JSON parse, batch encode, shard write with fsync and rename) at ``--workers 1`` and ``2``.
Baseline, same process, same texts already in memory: ``Tokenizer.encode_batch`` over batches of
the same size (and ``encode_batch_fast`` for reference). Target: ratio >= 0.9 at workers=1.
Each timing is the best of ``--repeats`` runs (the machine may be shared).

    python benchmarks/bench_preprocess.py                 # ~20 MB generated text, 8k-vocab BPE
    python benchmarks/bench_preprocess.py --mb 2          # quick
    python benchmarks/bench_preprocess.py --input data.jsonl --tokenizer tok/
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from megatron_doremi.data.preprocess import PreprocessConfig, preprocess
from megatron_doremi.data.tokenizer import load_tokenizer, train_bpe_tokenizer


def generate_jsonl(path: Path, megabytes: float, seed: int) -> None:
    """Zipf-distributed pseudo-words in documents of 50..1500 words, ~``megabytes`` MB of jsonl."""
    rng = random.Random(seed)
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    vocab = sorted(
        {"".join(rng.choices(letters, k=rng.randint(1, 10))) for _ in range(20000)}
        | {"the", "of", "and", "data", "model", "domain", "weight"}
    )
    rng.shuffle(vocab)
    weights = [1.0 / (r + 1) for r in range(len(vocab))]
    punct = [" ", " ", " ", " ", " ", " ", ", ", ". ", "\n"]
    target = int(megabytes * 1e6)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            n = rng.randint(50, 1500)
            words = rng.choices(vocab, weights=weights, k=n)
            seps = rng.choices(punct, k=n)
            text = "".join(w + s for w, s in zip(words, seps)).strip()
            line = json.dumps({"text": text}) + "\n"
            f.write(line)
            written += len(line)


def read_texts(path: str, key: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)[key] for line in f if line.strip()]


def best_of(repeats: int, fn) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", help="jsonl file (default: generate --mb MB)")
    p.add_argument("--tokenizer", help="tokenizer.json or dir (default: train a --vocab-size BPE)")
    p.add_argument("--json-key", default="text")
    p.add_argument("--mb", type=float, default=20.0, help="generated input size in MB")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--train-mb", type=float, default=2.0, help="MB of the input used to train the tokenizer")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as tmp:
        work = Path(tmp)
        src = args.input
        if src is None:
            src = str(work / "gen.jsonl")
            generate_jsonl(Path(src), args.mb, args.seed)
        texts = read_texts(src, args.json_key)
        tok_path = args.tokenizer
        if tok_path is None:
            budget, sample = int(args.train_mb * 1e6), []
            for t in texts:
                sample.append(t)
                budget -= len(t)
                if budget <= 0:
                    break
            t0 = time.perf_counter()
            train_bpe_tokenizer(sample, args.vocab_size, work / "tok")
            print(
                f"trained {args.vocab_size}-vocab BPE on {args.train_mb} MB in {time.perf_counter() - t0:.1f} s"
            )
            tok_path = str(work / "tok")
        tok = load_tokenizer(tok_path).tokenizer
        size_mb = os.path.getsize(src) / 1e6
        bs = args.batch_size
        print(
            f"input: {src} ({size_mb:.1f} MB, {len(texts):,} docs), batch size {bs}, best of {args.repeats}"
        )

        def baseline(method: str):
            encode = getattr(tok, method)

            def run() -> int:
                return sum(len(e.ids) for i in range(0, len(texts), bs) for e in encode(texts[i : i + bs]))

            return run

        rows = []
        for method in ("encode_batch", "encode_batch_fast"):
            secs, ntok = best_of(args.repeats, baseline(method))
            rows.append((f"baseline {method} (in memory)", ntok, secs))
        base_tps = rows[0][1] / rows[0][2]
        fast_tps = rows[1][1] / rows[1][2]
        results = {}
        for workers in args.workers:

            def run(workers: int = workers) -> int:
                cfg = PreprocessConfig(
                    inputs=[src],
                    output_prefix=str(work / f"out_w{workers}"),
                    tokenizer=tok_path,
                    json_keys=[args.json_key],
                    workers=workers,
                    batch_size=bs,
                    progress=False,
                )
                return preprocess(cfg).total_tokens

            secs, ntok = best_of(args.repeats, run)
            rows.append((f"preprocess workers={workers} (file -> shard)", ntok, secs))
            results[workers] = ntok / secs

        print(f"{'path':<44} {'tokens':>12} {'seconds':>9} {'tokens/s':>12}")
        for name, ntok, secs in rows:
            print(f"{name:<44} {ntok:>12,} {secs:>9.3f} {ntok / secs:>12,.0f}")
        for workers, tps in results.items():
            print(
                f"ratio preprocess(workers={workers}) / encode_batch = {tps / base_tps:.2f}x"
                f"   (/ encode_batch_fast = {tps / fast_tps:.2f}x)"
            )
        if 1 in results:
            ok = results[1] / base_tps >= 0.9
            print(f"target >= 0.90x at workers=1: {'met' if ok else 'NOT met'}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
