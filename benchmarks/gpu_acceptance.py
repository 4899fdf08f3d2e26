"""Everything the GPU must show for the fused per-domain loss ops, in one call (<= 8 min on one H100/H200).

Writes ``gpu_acceptance.json`` (every check: status pass / fail / skip, details, figures) and
``gpu_acceptance.md`` (the same as a table, for the README) into ``--out``. Needs torch (CUDA build), triton and
nvcc; **not** DeepSpeed (nothing here imports it). transformers is needed only for the ~125M Llama train step and
pytest only for the CUDA cases of the test suite: when missing they are reported as ``skip`` with the reason.

    python benchmarks/gpu_acceptance.py --out gpu_results          # on the GPU machine, from the repo root
    python benchmarks/gpu_acceptance.py --cpu-selfcheck --out /tmp/x  # tiny sizes on the CPU: checks the script

Checks (in order; each is timed, the whole run stops starting new checks when --budget-s is spent):
build (CUDA extension JIT/prebuilt), pytest (CUDA cases), layout sweep vs an fp64 oracle (fp32/fp16/bf16; V in
{1, 7, 8, 9, 17, 1001, 4099, 32000, 50257, 128256}; start offsets 0..7; vocab stride 2; transposed B/T; labels at
0, V-1 and the head/body boundary; ignored rows; in place == out of place bit for bit), non-finite rows,
> 2^31 and > 2^32 elements, 70,000 rows, 5 runs bit-identical, D = 1 / 1024 / empty domains, autograd through
``h @ W.T`` with a loss scale (in place and out of place), a non-default stream, the fused linear op vs the
unfused one, bench_domain_loss.py at V in {32000, 50257, 128256}, and a ~125M Llama bf16 train step (static
and DoReMi proxy with its reference; tokens/s, MFU, peak memory; logits path vs fused lm_head).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_doremi.ops import fused_linear_domain_cross_entropy  # noqa: E402
from megatron_doremi.ops._build import load_cuda_extension  # noqa: E402
from megatron_doremi.ops.fused_domain_loss import (  # noqa: E402
    domain_cross_entropy_reference,
    fused_domain_cross_entropy,
)

CHECKS: list[tuple[str, Callable[[Ctx], dict]]] = []
VOCABS = [1, 7, 8, 9, 17, 1001, 4099, 32000, 50257, 128256]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# token-loss tolerance vs the fp64 oracle, by dtype of the logits (the kernels compute in fp32)
TOL = {torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}


class Ctx:
    def __init__(self, device: torch.device, small: bool, out: Path) -> None:
        self.device, self.small, self.out = device, small, out
        self.backend = "native" if device.type == "cuda" else "auto"


def check(name: str):
    def deco(fn):
        CHECKS.append((name, fn))
        return fn

    return deco


def _sync(ctx: Ctx) -> None:
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)


def _oracle_token_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    x = logits.double()
    lse = torch.logsumexp(x, dim=-1)
    tgt = x.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return torch.where(labels == ignore_index, 0.0, lse - tgt)


def _labels(batch: int, seq: int, vocab: int, dtype: torch.dtype, device, g) -> torch.Tensor:
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    flat = labels.view(-1)
    head = max(0, min(vocab - 1, (16 // torch.tensor([], dtype=dtype).element_size()) - 1))
    for i, v in enumerate([0, vocab - 1, head, min(vocab - 1, head + 1)]):
        if i < flat.numel():
            flat[i] = v
    if flat.numel() > 4:
        flat[4] = -100
    return labels.to(device)


def _layout_case(ctx: Ctx, dtype, vocab: int, layout: str, offset: int, g) -> tuple[float, bool]:
    """Max |token loss - fp64 oracle| and whether in place == out of place bit for bit, for one layout."""
    batch, seq = 2, 3
    dev = ctx.device
    if layout == "offset":
        buf = torch.randn(batch * seq * vocab + 8, generator=g).mul_(3).to(dev, dtype)
        logits = buf[offset : offset + batch * seq * vocab].view(batch, seq, vocab)
    elif layout == "stride2":
        logits = torch.randn(batch, seq, 2 * vocab, generator=g).mul_(3).to(dev, dtype)[:, :, ::2]
    else:  # transposed B/T
        logits = torch.randn(seq, batch, vocab, generator=g).mul_(3).to(dev, dtype).transpose(0, 1)
    labels = _labels(batch, seq, vocab, dtype, dev, g)
    dom = torch.tensor([0, 1], device=dev)
    out = fused_domain_cross_entropy(logits, labels, dom, 2, backend=ctx.backend)
    err = float((out.token_loss.double() - _oracle_token_loss(logits, labels)).abs().max())
    leaf = logits.detach().clone().requires_grad_(True)
    fused_domain_cross_entropy(leaf, labels, dom, 2, backend=ctx.backend).loss.backward()
    src = logits.detach().clone().requires_grad_(True)
    buf2 = src * 1  # non-leaf, same values: the in-place backward may write into it
    captured = {}
    buf2.register_hook(lambda gr: captured.update(g=gr.clone()))
    fused_domain_cross_entropy(
        buf2, labels, dom, 2, backend=ctx.backend, inplace_backward=True
    ).loss.backward()
    same = torch.equal(captured["g"], leaf.grad.to(captured["g"].dtype))
    return err, same


@check("build")
def check_build(ctx: Ctx) -> dict:
    if ctx.device.type != "cuda":
        return {"status": "skip", "detail": "CPU self-check: no CUDA extension to build"}
    t0 = time.time()
    ext = load_cuda_extension()
    ok = ext is not None
    return {"status": "pass" if ok else "fail", "figures": {"seconds": round(time.time() - t0, 1)}}


@check("pytest-cuda-cases")
def check_pytest(ctx: Ctx) -> dict:
    if ctx.device.type != "cuda":
        return {"status": "skip", "detail": "CPU self-check: the CUDA cases need a GPU"}
    try:
        import pytest  # noqa: F401
    except ImportError:
        return {"status": "skip", "detail": "pytest is not installed on this machine"}
    tests = [
        "tests/test_fused_domain_loss.py",
        "tests/test_domain_loss.py",
        "tests/test_fused_linear_domain_loss.py",
    ]
    cmd = [sys.executable, "-m", "pytest", "-q", "-k", "cuda", "-p", "no:cacheprovider", *tests]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    tail = proc.stdout.strip().splitlines()[-1:] or [proc.stderr[-300:]]
    ok = proc.returncode == 0 and "skipped" not in tail[0].split("passed")[-1]
    return {"status": "pass" if ok else "fail", "detail": tail[0]}


@check("layout-sweep")
def check_layouts(ctx: Ctx) -> dict:
    g = torch.Generator().manual_seed(0)
    vocabs = [v for v in VOCABS if not ctx.small or v <= 4099]
    worst, mismatches, cases = 0.0, [], 0
    for dname, dtype in DTYPES.items():
        for vocab in vocabs:
            layouts = [("offset", o) for o in range(8)] + [("stride2", 0), ("transposed", 0)]
            for layout, offset in layouts:
                err, same = _layout_case(ctx, dtype, vocab, layout, offset, g)
                cases += 1
                worst = max(worst, err)
                if err > TOL[dtype] * max(1.0, math.log(vocab + 1)) * 10 or not same:
                    mismatches.append(
                        f"{dname} V={vocab} {layout}{offset}: err {err:.2e} inplace==out {same}"
                    )
    return {
        "status": "pass" if not mismatches else "fail",
        "detail": "; ".join(mismatches[:5]) or f"{cases} cases",
        "figures": {"max_abs_err_vs_fp64": worst, "cases": cases},
    }


@check("non-finite-rows")
def check_nonfinite(ctx: Ctx) -> dict:
    dev = ctx.device
    bad = []
    for dtype in DTYPES.values():
        logits = torch.randn(4, 2, 4099).to(dev, dtype)
        labels = torch.full((4, 2), 5, device=dev)
        logits[0, 0, 0] = float("nan")
        logits[1, 0] = float("-inf")
        logits[1, 0, 9] = float("nan")  # NaN while the running max is -inf
        logits[2, 0, 3000] = float("inf")
        logits[3, 0, 5] = float("-inf")
        ref = torch.zeros(4, 2, device=dev)
        out = fused_domain_cross_entropy(
            logits, labels, torch.arange(4, device=dev), 4, ref, backend=ctx.backend
        )
        tl = out.token_loss.cpu()
        if not (math.isnan(tl[0, 0]) and math.isnan(tl[1, 0])):
            bad.append(f"{dtype}: NaN lost {tl[:2, 0].tolist()}")
        if math.isfinite(tl[2, 0]) or math.isfinite(tl[3, 0]):
            bad.append(f"{dtype}: inf lost {tl[2:, 0].tolist()}")
        if torch.isfinite(out.domain_excess_sum).any() or not torch.isfinite(tl[:, 1]).all():
            bad.append(f"{dtype}: sums {out.domain_excess_sum.tolist()}")
    return {"status": "pass" if not bad else "fail", "detail": "; ".join(bad)}


def _big_case(ctx: Ctx, rows: int, vocab: int) -> dict:
    dev = ctx.device
    logits = torch.empty(1, rows, vocab, device=dev, dtype=torch.bfloat16).normal_(0, 2)
    labels = torch.randint(0, vocab, (1, rows), device=dev)
    labels[0, -1] = vocab - 1
    dom = torch.zeros(1, dtype=torch.long, device=dev)
    out = fused_domain_cross_entropy(logits, labels, dom, 1, backend=ctx.backend)
    exp = fused_domain_cross_entropy(logits, labels, dom, 1, backend="torch")
    rel = float((out.domain_loss_sum - exp.domain_loss_sum).abs() / exp.domain_loss_sum.abs())
    tail = float((out.token_loss[0, -8:] - exp.token_loss[0, -8:]).abs().max())
    del logits
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    ok = rel < 1e-6 and tail < 1e-4
    return {
        "status": "pass" if ok else "fail",
        "figures": {"elements": rows * vocab, "rel_err": rel, "tail": tail},
    }


@check("elements>2^31")
def check_2_31(ctx: Ctx) -> dict:
    return _big_case(ctx, 70_000 if not ctx.small else 64, 32_000 if not ctx.small else 33)


@check("elements>2^32")
def check_2_32(ctx: Ctx) -> dict:
    return _big_case(ctx, 34_000 if not ctx.small else 70, 128_256 if not ctx.small else 65)


@check("70000-rows")
def check_rows(ctx: Ctx) -> dict:
    return _big_case(ctx, 70_000 if not ctx.small else 700, 1_001 if not ctx.small else 17)


@check("deterministic-5-runs")
def check_determinism(ctx: Ctx) -> dict:
    g = torch.Generator().manual_seed(3)
    rows, vocab = (4096, 50257) if not ctx.small else (64, 301)
    logits = torch.randn(8, rows // 8, vocab, generator=g).to(ctx.device, torch.bfloat16)
    labels = torch.randint(0, vocab, (8, rows // 8), generator=g).to(ctx.device)
    dom = torch.arange(8, device=ctx.device) % 3
    outs = []
    for _ in range(5):
        leaf = logits.detach().clone().requires_grad_(True)
        out = fused_domain_cross_entropy(leaf, labels, dom, 3, backend=ctx.backend)
        out.loss.backward()
        outs.append([out.loss, out.domain_loss_sum, out.token_loss, leaf.grad])
    same = all(torch.equal(a, b) for o in outs[1:] for a, b in zip(o, outs[0], strict=True))
    return {"status": "pass" if same else "fail"}


@check("domains-1-1024-empty")
def check_domains(ctx: Ctx) -> dict:
    bad = []
    g = torch.Generator().manual_seed(4)
    for num_domains in (1, 1024):
        logits = torch.randn(6, 5, 257, generator=g).to(ctx.device)
        labels = torch.randint(0, 257, (6, 5), generator=g).to(ctx.device)
        dom = (
            torch.tensor([0, 0, 0, 0, 0, 0]) if num_domains == 1 else torch.tensor([1023, 5, 5, 0, 700, 1023])
        )
        dom = dom.to(ctx.device)
        out = fused_domain_cross_entropy(logits, labels, dom, num_domains, backend=ctx.backend)
        exp = domain_cross_entropy_reference(logits, labels, dom, num_domains)
        if not torch.allclose(out.domain_loss_sum, exp.domain_loss_sum, rtol=1e-6, atol=1e-6):
            bad.append(f"D={num_domains}")
        if not torch.equal(out.domain_token_count, exp.domain_token_count):
            bad.append(f"D={num_domains} counts")
    return {"status": "pass" if not bad else "fail", "detail": ", ".join(bad)}


@check("autograd-h@W.T-scaled")
def check_autograd(ctx: Ctx) -> dict:
    g = torch.Generator().manual_seed(5)
    h0 = torch.randn(4, 16, 64, generator=g).to(ctx.device)
    w0 = (torch.randn(4099, 64, generator=g) / 8).to(ctx.device)
    labels = torch.randint(0, 4099, (4, 16), generator=g).to(ctx.device)
    dom = torch.tensor([0, 1, 1, 2], device=ctx.device)
    scale = torch.tensor([0.5, 2.0, 1.0], device=ctx.device)
    grads = {}
    for name in ("oracle", "out-of-place", "in-place"):
        h, w = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        logits = h @ w.t()
        if name == "oracle":
            out = domain_cross_entropy_reference(logits, labels, dom, 3, None, scale)
        else:
            out = fused_domain_cross_entropy(
                logits, labels, dom, 3, None, scale, backend=ctx.backend, inplace_backward=name == "in-place"
            )
        (out.loss * 3.0).backward()
        grads[name] = (h.grad, w.grad)
    errs = {k: max(float((a - b).abs().max()) for a, b in zip(v, grads["oracle"])) for k, v in grads.items()}
    ok = max(errs.values()) < 1e-5
    return {"status": "pass" if ok else "fail", "figures": {k: v for k, v in errs.items() if k != "oracle"}}


@check("non-default-stream")
def check_stream(ctx: Ctx) -> dict:
    if ctx.device.type != "cuda":
        return {"status": "skip", "detail": "CPU self-check"}
    logits = torch.randn(64, 64, 50257, device=ctx.device, dtype=torch.bfloat16)
    labels = torch.randint(0, 50257, (64, 64), device=ctx.device)
    dom = torch.arange(64, device=ctx.device) % 4
    exp = fused_domain_cross_entropy(logits, labels, dom, 4, backend=ctx.backend)
    side = torch.cuda.Stream(ctx.device)
    side.wait_stream(torch.cuda.current_stream(ctx.device))
    with torch.cuda.stream(side):
        logits2 = logits * 1  # produced on the side stream: a wrong stream would race with this
        out = fused_domain_cross_entropy(logits2, labels, dom, 4, backend=ctx.backend)
        ls = out.domain_loss_sum.clone()
    torch.cuda.current_stream(ctx.device).wait_stream(side)
    same = torch.equal(ls, exp.domain_loss_sum)
    return {"status": "pass" if same else "fail"}


@check("fused-linear-vs-unfused")
def check_fused_linear(ctx: Ctx) -> dict:
    g = torch.Generator().manual_seed(6)
    rows_b, seq, width, vocab = (8, 512, 768, 50257) if not ctx.small else (2, 8, 16, 97)
    errs = {}
    for dname in ("fp32", "bf16"):
        dtype = DTYPES[dname]
        h0 = torch.randn(rows_b, seq, width, generator=g).to(ctx.device, dtype)
        w0 = (torch.randn(vocab, width, generator=g) / width**0.5).to(ctx.device, dtype)
        labels = torch.randint(0, vocab, (rows_b, seq), generator=g).to(ctx.device)
        dom = torch.arange(rows_b, device=ctx.device) % 3
        res = []
        for fused in (False, True):
            h, w = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
            if fused:
                out = fused_linear_domain_cross_entropy(h, w, labels, dom, 3)
            else:
                out = fused_domain_cross_entropy(h @ w.t(), labels, dom, 3)
            out.loss.backward()
            res.append((out.loss.detach().float(), h.grad.float(), w.grad.float()))
        errs[dname] = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) for a, b in zip(*res))
    ok = errs["fp32"] < 1e-4 and errs["bf16"] < 2e-2
    return {"status": "pass" if ok else "fail", "figures": {f"max_rel_err_{k}": v for k, v in errs.items()}}


@check("bench_domain_loss")
def check_bench(ctx: Ctx) -> dict:
    args = ["--no-linear"] if ctx.small else []
    if ctx.small:
        args += ["--device", "cpu", "--tokens", "64", "--vocab", "1001", "--dtypes", "fp32", "--repeats", "1"]
    else:
        args += ["--vocab", "32000", "50257", "128256", "--impls", "fused", "fused-inplace", "torch-ce"]
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_domain_loss.py"), *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=_env())
    (ctx.out / "bench_domain_loss.txt").write_text(proc.stdout + proc.stderr)
    return {"status": "pass" if proc.returncode == 0 else "fail", "detail": "see bench_domain_loss.txt"}


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _llama(small: bool, device, dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    if small:
        cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)  # fmt: skip
    else:  # ~125M parameters (GPT-2 small / Pythia-160M scale)
        cfg = LlamaConfig(vocab_size=50257, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                          num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=2048)  # fmt: skip
    cfg.use_cache = False
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).to(device=device, dtype=dtype)


def _peak_tflops(device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return 989.0 if ("H100" in name or "H200" in name) else None  # dense bf16


def _train_rows(ctx: Ctx) -> list[dict]:
    from megatron_doremi.training.lm_head_loss import domain_loss, enable_fused_lm_head

    dev = ctx.device
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    batch, seq, steps, warmup = (2, 16, 2, 1) if ctx.small else (8, 1024, 6, 2)
    rows = []
    for fused in (False, True):
        for mode in ("static", "doremi"):
            model = _llama(ctx.small, dev, dtype)
            reference = _llama(ctx.small, dev, dtype).eval() if mode == "doremi" else None
            if fused:
                enable_fused_lm_head(model)
                if reference is not None:
                    enable_fused_lm_head(reference)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            vocab = model.config.vocab_size
            n_params = sum(p.numel() for p in model.parameters())
            g = torch.Generator().manual_seed(0)
            ids = torch.randint(0, vocab, (batch, seq), generator=g).to(dev)
            labels = torch.roll(ids, -1, 1)
            labels[:, -1] = -100
            dom = (torch.arange(batch) % 4).to(dev)
            scale = torch.tensor([0.5, 1.0, 1.5, 2.0], device=dev)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dev)
            loss = float("nan")
            for step in range(warmup + steps):
                if step == warmup:
                    _sync(ctx)
                    t0 = time.perf_counter()
                kw = {}
                if reference is not None:
                    with torch.no_grad():
                        ref = domain_loss(reference, reference(input_ids=ids).logits, labels, dom, 4)
                    kw = {"ref_token_loss": ref.token_loss, "loss_scale_per_domain": scale}
                out = domain_loss(model, model(input_ids=ids).logits, labels, dom, 4, **kw)
                out.loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                loss = float(out.loss)
            _sync(ctx)
            dt = (time.perf_counter() - t0) / steps
            tokens_s = batch * seq / dt
            flops_tok = 6 * n_params + (2 * n_params if reference is not None else 0)
            peak = _peak_tflops(dev)
            rows.append(
                {
                    "lm_head": "fused" if fused else "logits",
                    "mode": mode,
                    "params_M": round(n_params / 1e6, 1),
                    "tokens_per_s": round(tokens_s, 1),
                    "mfu": None if peak is None else round(flops_tok * tokens_s / (peak * 1e12), 4),
                    "peak_mem_GiB": round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
                    if dev.type == "cuda"
                    else None,
                    "loss": loss,
                }
            )
            del model, reference, opt
    return rows


@check("llama-125m-train-step")
def check_train_step(ctx: Ctx) -> dict:
    try:
        import transformers  # noqa: F401
    except ImportError as exc:
        return {"status": "skip", "detail": f"transformers missing: {exc}"}
    rows = _train_rows(ctx)
    ok = all(math.isfinite(r["loss"]) for r in rows)
    return {"status": "pass" if ok else "fail", "figures": {"rows": rows}}


def _markdown(results: list[dict], where: str) -> str:
    lines = [
        f"GPU acceptance on {where}",
        "",
        "| check | status | seconds | figures / detail |",
        "|---|---|---|---|",
    ]
    for r in results:
        figs = r.get("figures") or {}
        text = json.dumps(figs, default=str)[:300] if figs else ""
        detail = (r.get("detail") or "").replace("|", "/")[:200]
        lines.append(f"| {r['name']} | {r['status']} | {r['seconds']:.1f} | {text} {detail} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=".", help="directory for gpu_acceptance.json / .md")
    parser.add_argument(
        "--cpu-selfcheck", action="store_true", help="tiny sizes on the CPU (tests the script)"
    )
    parser.add_argument(
        "--budget-s", type=float, default=450.0, help="start no check after this many seconds"
    )
    parser.add_argument("--only", nargs="+", default=None, help="run only these checks")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.cpu_selfcheck:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("error: no CUDA device (use --cpu-selfcheck to test the script on the CPU)", file=sys.stderr)
        return 2
    ctx = Ctx(device, args.cpu_selfcheck, out)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (self-check, tiny sizes)"
    t_start = time.time()
    results = []
    for name, fn in CHECKS:
        if args.only and name not in args.only:
            continue
        t0 = time.time()
        if t0 - t_start > args.budget_s:
            res = {"status": "skip", "detail": f"time budget of {args.budget_s:.0f} s spent"}
        else:
            try:
                res = fn(ctx)
            except Exception as exc:  # a check that crashes is a failed check; the others still run
                res = {
                    "status": "fail",
                    "detail": f"{type(exc).__name__}: {exc}",
                    "trace": traceback.format_exc(),
                }
            _sync(ctx)
        res = {"name": name, "seconds": time.time() - t0, **res}
        results.append(res)
        print(f"{name:<26} {res['status']:<5} {res['seconds']:6.1f}s {res.get('detail', '')}", flush=True)
    summary = {
        "device": where,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "total_seconds": time.time() - t_start,
        "passed": sum(r["status"] == "pass" for r in results),
        "failed": sum(r["status"] == "fail" for r in results),
        "skipped": sum(r["status"] == "skip" for r in results),
        "checks": results,
    }
    from megatron_doremi.atomic_io import atomic_write_json, atomic_write_text

    atomic_write_json(out / "gpu_acceptance.json", summary)
    atomic_write_text(out / "gpu_acceptance.md", _markdown(results, where))
    print(f"passed {summary['passed']}, failed {summary['failed']}, skipped {summary['skipped']}")
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
