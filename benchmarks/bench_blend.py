"""Benchmark: blend index, default (periodic) mode vs Megatron's exact greedy.

For each case (N samples x D domains) it times, in this process:
  default   PeriodicBlend build + lookup of all N global indices in chunks (np.arange chunks through
            ``lookup``, and the same through ``lookup_range``), i.e. comparable to materialising the index;
  exact     build_exact_blending_indices (native C++, bit-identical to Megatron);
  megatron  a plain C++ re-implementation of Megatron-LM's build_blending_indices loop (csrc/blending.cpp);
  python    the same greedy in plain Python on a prefix, extrapolated linearly to N (said so in the output).
It prints times, table memory, the worst per-domain deviation |count_d(N) - w_d N| and the ratios.

    python benchmarks/bench_blend.py              # full size: 1e8 x 22, 2e8 x 22, 1e7 x 1000
    python benchmarks/bench_blend.py --scale 0.01 # quick
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable

import numpy as np

from megatron_doremi import _native
from megatron_doremi.data.blending import PeriodicBlend, build_exact_blending_indices, validate_weights

# The Pile's 22 components, share of the Pile after epochs (Gao et al. 2020, Table 1), in percent.
PILE_WEIGHTS = {
    "Pile-CC": 18.11,
    "PubMed Central": 14.40,
    "Books3": 12.07,
    "OpenWebText2": 10.01,
    "ArXiv": 8.96,
    "Github": 7.59,
    "FreeLaw": 6.12,
    "StackExchange": 5.13,
    "USPTO Backgrounds": 3.65,
    "PubMed Abstracts": 3.07,
    "Gutenberg (PG-19)": 2.17,
    "OpenSubtitles": 1.55,
    "Wikipedia (en)": 1.53,
    "DM Mathematics": 1.24,
    "Ubuntu IRC": 0.88,
    "BookCorpus2": 0.75,
    "EuroParl": 0.73,
    "HackerNews": 0.62,
    "YoutubeSubtitles": 0.60,
    "PhilPapers": 0.38,
    "NIH ExPorter": 0.30,
    "Enron Emails": 0.14,
}


def skewed_weights(num_domains: int, seed: int = 0) -> np.ndarray:
    """A skewed (log-normal) mixture over many domains (unnormalised)."""
    return np.random.default_rng(seed).lognormal(mean=0.0, sigma=1.0, size=num_domains)


def best_of(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def python_greedy(weights: np.ndarray, n: int) -> tuple[list[int], list[int]]:
    """Megatron's greedy in plain Python (the baseline without C++)."""
    w = weights.tolist()
    current = [0] * len(w)
    dom, smp = [], []
    for i in range(n):
        x = max(float(i), 1.0)
        best, best_err = 0, w[0] * x - current[0]
        for d in range(1, len(w)):
            err = w[d] * x - current[d]
            if err > best_err:
                best, best_err = d, err
        dom.append(best)
        smp.append(current[best])
        current[best] += 1
    return dom, smp


def run_case(name: str, raw: np.ndarray, n: int, args: argparse.Namespace) -> None:
    # Every mode gets ``raw`` and normalises it once, like Megatron; the baselines get that normalised vector.
    weights = validate_weights(raw)
    d = len(weights)
    print(f"\n== {name}: N = {n:,} samples x D = {d} domains (period {args.period:,}, chunk {args.chunk:,})")

    def default_lookup() -> None:
        blend = PeriodicBlend(raw, args.period)
        for a in range(0, n, args.chunk):
            blend.lookup(np.arange(a, min(a + args.chunk, n), dtype=np.int64))

    def default_range() -> None:
        blend = PeriodicBlend(raw, args.period)
        for a in range(0, n, args.chunk):
            blend.lookup_range(a, min(args.chunk, n - a))

    t_build = best_of(lambda: PeriodicBlend(raw, args.period), args.repeats)
    t_default = best_of(default_lookup, args.repeats)
    t_range = best_of(default_range, args.repeats)
    blend = PeriodicBlend(raw, args.period)
    dev_default = float(np.max(np.abs(blend.realised_counts(n) - blend.weights * n)))
    print(f"default  build                     {t_build * 1e3:10.1f} ms")
    print(
        f"default  build + lookup(arange)    {t_default * 1e3:10.1f} ms   tables {blend.nbytes / 2**20:.2f} MiB"
    )
    print(f"default  build + lookup_range      {t_range * 1e3:10.1f} ms")

    holder: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def exact() -> None:
        holder.clear()
        gc.collect()
        holder["x"] = build_exact_blending_indices(raw, n)

    t_exact = best_of(exact, args.exact_repeats)
    dom, smp = holder.pop("x")
    exact_bytes = dom.nbytes + smp.nbytes
    dev_exact = float(np.max(np.abs(np.bincount(dom, minlength=d) - blend.weights * n)))
    py_n = max(1, min(n, int(args.python_work / d)))
    head = (dom[:py_n].copy(), smp[:py_n].copy())
    del dom, smp
    gc.collect()
    print(
        f"exact    native (Megatron bits)    {t_exact * 1e3:10.1f} ms   index {exact_bytes / 2**20:.0f} MiB"
    )

    t_meg = float("nan")
    if d <= 65535:
        dtype = np.uint8 if d <= 255 else np.uint16

        def megatron() -> None:
            out_d = np.empty(n, dtype=dtype)
            out_s = np.empty(n, dtype=np.int64)
            _native.helpers.blend_exact_megatron(weights, out_d, out_s)

        t_meg = best_of(megatron, args.exact_repeats)
        print(f"megatron-style plain C++ loop      {t_meg * 1e3:10.1f} ms")

    t0 = time.perf_counter()
    py_dom, py_smp = python_greedy(weights, py_n)
    t_py_part = time.perf_counter() - t0
    if py_dom != head[0].tolist() or py_smp != head[1].tolist():
        raise SystemExit("error: plain-Python greedy and native exact mode disagree")
    t_py = t_py_part * n / py_n
    print(
        f"python   plain greedy              {t_py * 1e3:10.1f} ms   EXTRAPOLATED linearly from a "
        f"{py_n:,}-sample prefix ({t_py_part:.2f} s; identical to native exact on it)"
    )
    print(f"max |count_d(N) - w_d N|: default {dev_default:.1f}, exact {dev_exact:.1f} samples")
    print(
        f"ratios (time / default lookup): exact-native {t_exact / t_default:.1f}x, megatron-style-loop "
        f"{t_meg / t_default:.1f}x, python-extrapolated {t_py / t_default:.0f}x;  "
        f"(time / default lookup_range): exact-native {t_exact / t_range:.1f}x"
    )
    print(f"memory: default tables {blend.nbytes:,} B vs exact index {exact_bytes:,} B")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every N by this (e.g. 0.01)")
    parser.add_argument("--period", type=int, default=2**20, help="default-mode period P")
    parser.add_argument("--chunk", type=int, default=2**16, help="indices per lookup call")
    parser.add_argument("--repeats", type=int, default=3, help="default-mode repeats (best is reported)")
    parser.add_argument("--exact-repeats", type=int, default=1, help="exact / megatron repeats")
    parser.add_argument(
        "--python-work",
        type=float,
        default=22e6,
        help="plain-Python baseline budget in sample x domain steps (prefix = work / D samples)",
    )
    parser.add_argument("--cases", default="pile,pile2x,many", help="comma list of pile, pile2x, many")
    args = parser.parse_args(argv)
    if args.scale <= 0 or args.chunk <= 0 or args.repeats <= 0 or args.exact_repeats <= 0:
        print("error: --scale, --chunk, --repeats and --exact-repeats must be > 0", file=sys.stderr)
        return 2
    if not _native.native_enabled():
        print(
            "error: the native extension is required (build it: python setup.py build_ext --inplace)",
            file=sys.stderr,
        )
        return 1
    pile = np.array(list(PILE_WEIGHTS.values()), dtype=np.float64)
    cases = {
        "pile": ("Pile 22 domains", pile, 10**8),
        "pile2x": ("Pile 22 domains, 2x", pile, 2 * 10**8),
        "many": ("1000 skewed domains", skewed_weights(1000), 10**7),
    }
    for key in args.cases.split(","):
        if key not in cases:
            print(f"error: unknown case {key!r} (choose from {', '.join(cases)})", file=sys.stderr)
            return 2
        name, w, n = cases[key]
        run_case(name, w, max(1, int(n * args.scale)), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
