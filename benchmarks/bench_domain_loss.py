"""Fused per-domain cross-entropy: forward and forward+backward time, bandwidth, peak extra memory.

Project figure: ``fused_domain_cross_entropy`` (CUDA kernel on a GPU, C++ kernel on the CPU), out of place and with
``inplace_backward=True``. Baselines in the same process: the eager torch composition (log_softmax, gather,
subtract, clamp, scatter_add = ``domain_cross_entropy_reference``), torch's ``F.cross_entropy`` (per-token loss
only, no per-domain statistics) and the project's chunked-torch fallback. Every variant scores the same inputs:
D = 4 domains, a reference loss and per-domain scales (the DoReMi proxy step).

Bandwidth counts the minimum traffic: forward reads the logits once (N*V*elt bytes), forward+backward reads them
twice and writes the gradient once (3*N*V*elt); "%copy" compares with a measured ``dst.copy_(src)`` of the logits
(2*N*V*elt bytes). "extra" is the peak memory above what existed before the call, in MiB and in % of the logits
(the out-of-place backward's gradient buffer alone is 100%): CUDA from torch.cuda.max_memory_allocated, CPU from
a sampled resident-set size with large allocations forced to mmap (approximate).

Targets on an H100 (bf16, N = 16384, V = 50k): fwd+bwd <= 2.1 ms (>= 80% of copy), >= 2x the eager composition,
peak extra memory < 1% of the logits in place.

    python benchmarks/bench_domain_loss.py                   # GPU: N=16384, V in {32000, 50257, 128256}, bf16
    python benchmarks/bench_domain_loss.py --device cpu      # CPU: N=1024, fp32 and bf16 (< 2 min)
    python benchmarks/bench_domain_loss.py --device cpu --tokens 512 --vocab 32000 --dtypes bf16 --impls fused eager

A second table (skip with --no-linear) times the lm_head + loss: the logits path (``hidden @ W.T`` then the op
with the in-place backward, as the trainer runs it) vs ``fused_linear_domain_cross_entropy`` (chunked, no [N, V]
logits), fwd and fwd+bwd w.r.t. hidden and weight, with the peak extra memory (CPU: exact, from the profiler).
H100 targets: fused linear fwd+bwd within 1.1x of the logits path, peak extra memory < 5% of the logits.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from megatron_doremi.ops import fused_domain_loss as fdl
from megatron_doremi.ops import fused_linear_domain_cross_entropy
from megatron_doremi.ops.cpu_memory import force_mmap_for_large_allocations, peak_cpu_bytes
from megatron_doremi.ops.fused_domain_loss import (
    domain_cross_entropy_reference,
    fused_domain_cross_entropy,
    resolve_backend,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
IMPLS = ["fused", "fused-inplace", "eager", "torch-ce", "torch-chunked"]
NUM_DOMAINS = 4


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(
    fn: Callable[[], object],
    device: torch.device,
    warmup: int,
    repeats: int,
    setup: Callable[[], object] | None = None,
) -> float:
    """Median wall time of fn() in milliseconds (synchronised); ``setup()`` runs untimed before every call."""
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak memory above the pre-call level during one call of fn (results dropped before measuring ends)."""
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    return peak_cpu_bytes(fn)


def make_inputs(tokens: int, seq: int, vocab: int, dtype: torch.dtype, device: torch.device):
    seq = min(seq, tokens)
    batch = max(1, tokens // seq)
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = (torch.randn(batch, seq, vocab, generator=g, dtype=torch.float32) * 2).to(
        device=device, dtype=dtype
    )
    labels = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    labels[:, -1] = -100
    domain_ids = (torch.arange(batch) % NUM_DOMAINS).to(device)
    ref = (torch.rand(batch, seq, generator=g) * 12).to(device)
    scale = torch.tensor([0.5, 1.0, 1.5, 2.0], device=device)
    return logits, labels, domain_ids, ref, scale


def variants(impl: str, pristine, labels, domain_ids, ref, scale):
    """(forward fn, forward+backward fn, setup fn, its logits) for one implementation, on its own fresh copy.

    The in-place variant overwrites its logits with their gradient, so ``setup`` (untimed, before every call)
    restores them from ``pristine``: every variant and every repetition scores the same logit values. The
    in-place variant calls the autograd function directly, as the trainer's non-leaf logits allow (the public
    wrapper falls back to out of place for a leaf, which this benchmark's input is)."""
    vocab = pristine.shape[-1]
    logits = pristine.clone()
    inplace = impl == "fused-inplace"

    def run(leaf: torch.Tensor, **kw) -> torch.Tensor:
        if impl == "eager":
            return domain_cross_entropy_reference(leaf, labels, domain_ids, NUM_DOMAINS, ref, scale).loss
        if impl == "torch-ce":
            tok = F.cross_entropy(leaf.view(-1, vocab), labels.view(-1), reduction="none")
            return tok.float().sum() / (labels != -100).sum()
        backend = "torch" if impl == "torch-chunked" else "auto"
        if kw.get("inplace_backward"):
            dev = leaf.device
            impl_obj = resolve_backend(dev, backend, leaf.dtype)
            lab = labels.to(torch.long).contiguous()
            dom = domain_ids.to(torch.long).contiguous()
            s64 = scale.to(dtype=torch.float64)
            return fdl._FusedDomainLossFn.apply(leaf, lab, dom, ref, s64, None, -100, impl_obj, True)[0]
        out = fused_domain_cross_entropy(
            leaf, labels, domain_ids, NUM_DOMAINS, ref, scale, backend=backend, **kw
        )
        return out.loss

    def fwd() -> None:
        with torch.no_grad():
            run(logits)

    leaf = logits.detach().requires_grad_(True)

    def fwd_bwd() -> None:
        loss = run(leaf, inplace_backward=True) if inplace else run(leaf)
        torch.autograd.grad(loss, leaf)

    def setup() -> None:
        if inplace:
            with torch.no_grad():
                logits.copy_(pristine)

    return fwd, fwd_bwd, setup, logits


def linear_variants(hidden_states, weight, labels, domain_ids, ref, scale, chunk_rows=None):
    """{name: (forward fn, forward+backward fn)} of the lm_head + loss: the logits path (GEMM, then the fused op
    in place, as the trainer runs it) and the fused linear op (no [N, V] logits)."""
    h = hidden_states.detach().requires_grad_(True)
    w = weight.detach().requires_grad_(True)

    def logits_path(grad: bool) -> torch.Tensor:
        logits = h @ w.t()
        return fused_domain_cross_entropy(
            logits, labels, domain_ids, NUM_DOMAINS, ref, scale, inplace_backward=grad, check_values=False
        ).loss

    def fused(grad: bool) -> torch.Tensor:
        return fused_linear_domain_cross_entropy(
            h, w, labels, domain_ids, NUM_DOMAINS, ref, scale, chunk_rows=chunk_rows, check_values=False
        ).loss

    out = {}
    for name, run in (("logits+op", logits_path), ("fused-linear", fused)):

        def fwd(run=run) -> None:
            with torch.no_grad():
                run(False)

        def fwd_bwd(run=run) -> None:
            torch.autograd.grad(run(True), (h, w))

        out[name] = (fwd, fwd_bwd)
    return out


def linear_table(
    tokens: int, seq: int, hidden: int, vocabs, dtypes, device, warmup: int, repeats: int
) -> list[dict[str, object]]:
    """Time and peak extra memory of the lm_head + loss, logits path vs fused linear (ratios in this process)."""
    results = []
    print(f"\nlm_head + loss (H = {hidden}): logits path (GEMM + op in place) vs fused linear op")
    print(
        f"{'dtype':>5} {'V':>7} {'impl':<13} {'fwd ms':>8} {'f+b ms':>8} {'f+b x base':>10} "
        f"{'f+b extra MiB':>13} {'% logits':>8} {'% base':>7}"
    )
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        for vocab in vocabs:
            logits_like, labels, domain_ids, ref, scale = make_inputs(tokens, seq, 1, dtype, device)
            batch, seq_ = labels.shape
            g = torch.Generator(device="cpu").manual_seed(1)
            h = torch.randn(batch, seq_, hidden, generator=g).to(device=device, dtype=dtype)
            w = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).to(device=device, dtype=dtype)
            labels = torch.randint(0, vocab, labels.shape, generator=g).to(device)
            labels[:, -1] = -100
            logits_bytes = labels.numel() * vocab * torch.tensor([], dtype=dtype).element_size()
            rows = {}
            for name, (fwd, fwd_bwd) in linear_variants(h, w, labels, domain_ids, ref, scale).items():
                t_f = time_ms(fwd, device, warmup, repeats)
                t_fb = time_ms(fwd_bwd, device, warmup, repeats)
                m_fb = peak_extra_bytes(fwd_bwd, device)
                rows[name] = (t_f, t_fb, m_fb)
            base_t, base_m = rows["logits+op"][1], rows["logits+op"][2]
            for name, (t_f, t_fb, m_fb) in rows.items():
                print(
                    f"{dtype_name:>5} {vocab:>7} {name:<13} {t_f:8.2f} {t_fb:8.2f} {t_fb / base_t:10.2f} "
                    f"{m_fb / 2**20:13.1f} {100 * m_fb / logits_bytes:8.1f} {100 * m_fb / max(base_m, 1):7.1f}"
                )
                results.append(
                    {
                        "dtype": dtype_name,
                        "vocab": vocab,
                        "impl": name,
                        "fwd_ms": t_f,
                        "fwd_bwd_ms": t_fb,
                        "fwd_bwd_vs_logits_path": t_fb / base_t,
                        "fwd_bwd_extra_bytes": m_fb,
                        "extra_vs_logits_path": m_fb / max(base_m, 1),
                    }
                )
    return results


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=None, help="B*T (default 16384 on CUDA, 1024 on CPU)")
    parser.add_argument("--seq", type=int, default=1024, help="T (B = tokens // T)")
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 50257, 128256])
    parser.add_argument(
        "--dtypes",
        nargs="+",
        choices=sorted(DTYPES),
        default=None,
        help="default bf16 (CUDA), fp32 bf16 (CPU)",
    )
    parser.add_argument(
        "--impls",
        nargs="+",
        choices=IMPLS,
        default=None,
        help="default: all on CUDA, all but torch-chunked on CPU",
    )
    parser.add_argument("--hidden", type=int, default=None, help="H of the lm_head table (768 CUDA, 256 CPU)")
    parser.add_argument(
        "--no-linear", action="store_true", help="skip the lm_head + loss (fused linear) table"
    )
    parser.add_argument("--no-op", action="store_true", help="skip the loss-op-only table")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    gpu = device.type == "cuda"
    tokens = args.tokens or (16384 if gpu else 1024)
    dtypes = args.dtypes or (["bf16"] if gpu else ["fp32", "bf16"])
    warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    repeats = args.repeats if args.repeats is not None else (20 if gpu else 3)
    if not gpu:
        force_mmap_for_large_allocations()
    impls = args.impls or (IMPLS if gpu else [i for i in IMPLS if i != "torch-chunked"])
    backend = resolve_backend(device).name
    where = torch.cuda.get_device_name(device) if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"device: {where}; fused backend: {backend}; N = B*T = {tokens}; median of {repeats} (warmup {warmup})"
    )
    if not gpu:
        print("GPU figures: pending (no GPU in this run); CPU figures below.")
    header = (
        f"{'dtype':>5} {'V':>7} {'impl':<14} {'fwd ms':>8} {'GB/s':>7} {'%copy':>6} {'f+b ms':>8} {'GB/s':>7} "
        f"{'%copy':>6} {'x eager':>7} {'fwd extra':>17} {'f+b extra':>17}"
    )
    for dtype_name in [] if args.no_op else dtypes:
        dtype = DTYPES[dtype_name]
        for vocab in args.vocab:
            logits, labels, domain_ids, ref, scale = make_inputs(tokens, args.seq, vocab, dtype, device)
            nbytes = logits.numel() * logits.element_size()
            dst = torch.empty_like(logits)
            copy_ms = time_ms(functools.partial(dst.copy_, logits), device, warmup, repeats)
            del dst
            copy_gbs = 2 * nbytes / copy_ms / 1e6
            print(
                f"\n{dtype_name} V={vocab}: logits {nbytes / 2**20:.0f} MiB, copy {copy_ms:.2f} ms = {copy_gbs:.1f} GB/s"
            )
            print(header)
            rows = {}
            for impl in impls:
                fwd, fwd_bwd, setup, _ = variants(impl, logits, labels, domain_ids, ref, scale)
                try:
                    t_f = time_ms(fwd, device, warmup, repeats, setup)
                    t_fb = time_ms(fwd_bwd, device, warmup, repeats, setup)
                    setup()
                    m_f = peak_extra_bytes(fwd, device)
                    setup()
                    m_fb = peak_extra_bytes(fwd_bwd, device)
                except (RuntimeError, MemoryError) as exc:  # e.g. out of memory for the eager composition
                    print(
                        f"{dtype_name:>5} {vocab:>7} {impl:<14} failed: {type(exc).__name__}: {str(exc)[:80]}"
                    )
                    continue
                rows[impl] = (t_f, t_fb, m_f, m_fb)
            eager_fb = rows.get("eager", (None, None))[1]
            for impl, (t_f, t_fb, m_f, m_fb) in rows.items():
                gbs_f = nbytes / t_f / 1e6
                gbs_fb = 3 * nbytes / t_fb / 1e6
                speed = f"{eager_fb / t_fb:7.2f}" if eager_fb else f"{'-':>7}"
                mem_f = f"{m_f / 2**20:9.1f} ({100 * m_f / nbytes:4.0f}%)"
                mem_fb = f"{m_fb / 2**20:9.1f} ({100 * m_fb / nbytes:4.0f}%)"
                print(
                    f"{dtype_name:>5} {vocab:>7} {impl:<14} {t_f:8.2f} {gbs_f:7.1f} {100 * gbs_f / copy_gbs:6.1f} "
                    f"{t_fb:8.2f} {gbs_fb:7.1f} {100 * gbs_fb / copy_gbs:6.1f} {speed} {mem_f} {mem_fb}"
                )
            del logits
    if not args.no_linear:
        hidden = args.hidden or (768 if gpu else 256)
        linear_table(tokens, args.seq, hidden, args.vocab, dtypes, device, warmup, repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
