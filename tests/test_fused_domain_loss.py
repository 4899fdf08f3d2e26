"""Fused per-domain cross-entropy (native CPU / CUDA kernels and the chunked torch path) vs the plain oracle.

The oracle is ``domain_cross_entropy_reference`` (log_softmax, gather, subtract, clamp, scatter_add with ordinary
autograd); a float64 per-token loop double-checks the oracle itself. The native CPU extension is JIT-built once
per process (first run ~30 s, then cached under ~/.cache); CUDA cases run only where a GPU exists.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_doremi.ops import _build
from megatron_doremi.ops import fused_domain_loss as fdl
from megatron_doremi.ops.fused_domain_loss import (
    DomainLossError,
    domain_cross_entropy_reference,
    fused_domain_cross_entropy,
    resolve_backend,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BACKENDS = ["native", "torch"]
F32 = {"rtol": 1e-6, "atol": 1e-6}


@pytest.fixture(autouse=True)
def small_torch_chunks(monkeypatch):
    """Chunks of a few rows in the torch path, so that chunk boundaries are exercised by small inputs."""
    monkeypatch.setattr(fdl, "_TORCH_CHUNK_BYTES", 8 * 1001 * 3)


def _native_available(device: str) -> bool:
    if device == "cpu":
        return _build.load_cpu_extension() is not None
    return _build.load_cuda_extension() is not None


@pytest.fixture(params=[(d, b) for d in DEVICES for b in BACKENDS], ids=lambda p: f"{p[0]}-{p[1]}")
def impl(request):
    device, backend = request.param
    if backend == "native" and not _native_available(device):
        pytest.skip(
            f"native {device} extension did not build here (see the warning from megatron_doremi.ops._build)"
        )
    return device, backend


def _inputs(B=3, T=5, V=1001, D=4, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g) * 3).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    domain_ids = torch.randint(0, D, (B,), generator=g)
    ref = torch.rand(B, T, generator=g) * 2 * math.log(V)
    return logits.to(device), labels.to(device), domain_ids.to(device), ref.to(device)


def _run(fn, logits, *args, grad_scale=1.0, **kwargs):
    """Output of fn and the gradient of grad_scale * loss w.r.t. (a copy of) logits."""
    leaf = logits.detach().clone().requires_grad_(True)
    out = fn(leaf, *args, **kwargs)
    (out.loss * grad_scale).backward()
    return out, leaf.grad


def _compare(out, ref, grad=None, ref_grad=None, tol=F32, grad_tol=F32):
    torch.testing.assert_close(out.token_loss, ref.token_loss, **tol)
    torch.testing.assert_close(out.loss, ref.loss, **tol)
    torch.testing.assert_close(out.domain_loss_sum, ref.domain_loss_sum, **tol)
    torch.testing.assert_close(out.domain_excess_sum, ref.domain_excess_sum, **tol)
    assert torch.equal(out.domain_token_count, ref.domain_token_count)
    assert out.token_loss.dtype == torch.float32 and out.loss.dtype == torch.float32
    assert out.domain_loss_sum.dtype == out.domain_token_count.dtype == torch.float64
    if grad is not None:
        assert grad.dtype == ref_grad.dtype and grad.shape == ref_grad.shape
        torch.testing.assert_close(grad, ref_grad, **grad_tol)


def test_oracle_matches_float64_token_loop():
    logits, labels, dom, ref = _inputs(B=2, T=3, V=9, D=3)
    labels[1, 0] = -100
    scale = torch.tensor([0.5, 2.0, 1.5])
    out = domain_cross_entropy_reference(logits, labels, dom, 3, ref, scale)
    lg = logits.double()
    total = norm = 0.0
    loss_sum, excess, count = [0.0] * 3, [0.0] * 3, [0] * 3
    for b in range(2):
        d = int(dom[b])
        for t in range(3):
            y = int(labels[b, t])
            if y == -100:
                assert float(out.token_loss[b, t]) == 0.0
                continue
            val = float(torch.logsumexp(lg[b, t], 0) - lg[b, t, y])
            assert float(out.token_loss[b, t]) == pytest.approx(val, rel=1e-6)
            loss_sum[d] += val
            excess[d] += max(val - float(ref[b, t]), 0.0)
            count[d] += 1
            total += float(scale[d]) * val
            norm += float(scale[d])
    assert float(out.loss) == pytest.approx(total / norm, rel=1e-6)
    assert out.domain_loss_sum.tolist() == pytest.approx(loss_sum, rel=1e-6)
    assert out.domain_excess_sum.tolist() == pytest.approx(excess, rel=1e-6)
    assert out.domain_token_count.tolist() == count


@pytest.mark.parametrize("with_ref", [False, True])
@pytest.mark.parametrize("normalizer", [None, 37.5, "tensor"])
def test_fp32_values_and_grads_match_oracle(impl, with_ref, normalizer):
    device, backend = impl
    logits, labels, dom, ref = _inputs(device=device)
    labels[0, 1] = -100
    scale = torch.tensor([0.5, 1.0, 2.0, 3.0], device=device)
    norm = torch.tensor(41.0, device=device) if normalizer == "tensor" else normalizer
    args = (labels, dom, 4, ref if with_ref else None, scale, -100, norm)
    out, grad = _run(fused_domain_cross_entropy, logits, *args, backend=backend)
    exp, exp_grad = _run(domain_cross_entropy_reference, logits, *args)
    _compare(out, exp, grad, exp_grad)
    assert float(out.token_loss[0, 1]) == 0.0 and grad[0, 1].abs().max() == 0
    if not with_ref:  # the reference is 0: the excess sums are the loss sums, bit for bit
        assert torch.equal(out.domain_excess_sum, out.domain_loss_sum)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_within_dtype_tolerance(impl, dtype):
    device, backend = impl
    logits, labels, dom, ref = _inputs(B=2, T=6, V=3001, dtype=dtype, device=device)
    out, grad = _run(fused_domain_cross_entropy, logits, labels, dom, 4, ref, backend=backend)
    exp, exp_grad = _run(domain_cross_entropy_reference, logits, labels, dom, 4, ref)
    # values are computed in fp32 from the same low-precision inputs; the gradient is rounded to `dtype` once
    _compare(
        out, exp, grad, exp_grad, tol={"rtol": 1e-5, "atol": 1e-5}, grad_tol={"rtol": 1.6e-2, "atol": 1e-5}
    )


def test_float64_logits(impl):
    device, backend = impl
    logits, labels, dom, ref = _inputs(B=2, T=3, V=257, dtype=torch.float64, device=device)
    if device == "cuda" and backend == "native":  # the CUDA kernel is fp32/fp16/bf16 only; "auto" uses torch
        with pytest.raises(DomainLossError, match="float64"):
            fused_domain_cross_entropy(logits, labels, dom, 4, ref, backend=backend)
        backend = "auto"
    out, grad = _run(fused_domain_cross_entropy, logits, labels, dom, 4, ref, backend=backend)
    exp, exp_grad = _run(domain_cross_entropy_reference, logits, labels, dom, 4, ref)
    _compare(out, exp, grad, exp_grad)


def test_custom_ignore_index_fully_ignored_rows_and_grad_scale(impl):
    device, backend = impl
    logits, labels, dom, ref = _inputs(B=4, T=3, V=17, device=device)
    labels[1] = -1
    labels[2, 0] = -1
    args = (labels, dom, 4, ref, None, -1)
    out, grad = _run(fused_domain_cross_entropy, logits, *args, backend=backend, grad_scale=3.0)
    exp, exp_grad = _run(domain_cross_entropy_reference, logits, *args, grad_scale=3.0)
    _compare(out, exp, grad, exp_grad)
    assert grad[1].abs().max() == 0 and grad[2, 0].abs().max() == 0
    assert out.domain_token_count.sum() == 12 - 4


def test_everything_ignored_gives_zero_loss_and_zero_grad(impl):
    device, backend = impl
    logits, labels, dom, _ = _inputs(B=2, T=2, V=5, device=device)
    labels[:] = -100
    out, grad = _run(fused_domain_cross_entropy, logits, labels, dom, 4, backend=backend)
    assert float(out.loss.detach()) == 0.0 and grad.abs().max() == 0
    assert out.domain_token_count.abs().sum() == 0 and out.domain_loss_sum.abs().sum() == 0


def test_empty_and_single_domains(impl):
    device, backend = impl
    logits, labels, _, ref = _inputs(B=3, T=4, V=33, device=device)
    dom = torch.tensor([0, 3, 0], device=device)
    out, grad = _run(fused_domain_cross_entropy, logits, labels, dom, 5, ref, backend=backend)
    exp, exp_grad = _run(domain_cross_entropy_reference, logits, labels, dom, 5, ref)
    _compare(out, exp, grad, exp_grad)
    for d in (1, 2, 4):
        assert (
            out.domain_token_count[d] == 0 and out.domain_loss_sum[d] == 0 and out.domain_excess_sum[d] == 0
        )
    one = torch.zeros(3, dtype=torch.long, device=device)
    out1, grad1 = _run(fused_domain_cross_entropy, logits, labels, one, 1, ref, backend=backend)
    exp1, exp_grad1 = _run(domain_cross_entropy_reference, logits, labels, one, 1, ref)
    _compare(out1, exp1, grad1, exp_grad1)
    assert out1.domain_token_count.tolist() == [12.0]


def _non_contiguous_views(device):
    g = torch.Generator().manual_seed(4)
    wide = torch.randn(3, 5, 1040, generator=g).to(device)
    yield "vocab-slice", wide[:, :, 3:1004]  # rows start misaligned, stride(1) = 1040
    yield "transposed", torch.randn(5, 3, 1001, generator=g).to(device).transpose(0, 1)
    yield "vocab-stride", torch.randn(3, 5, 2002, generator=g).to(device)[:, :, ::2]


def test_non_contiguous_logits(impl):
    device, backend = impl
    _, labels, dom, ref = _inputs(device=device)
    for name, view in _non_contiguous_views(device):
        assert not view.is_contiguous(), name
        out = fused_domain_cross_entropy(view, labels, dom, 4, ref, backend=backend)
        exp = domain_cross_entropy_reference(view, labels, dom, 4, ref)
        _compare(out, exp)
        # gradient through the view (the non-leaf path the trainer uses)
        base = view.detach().clone().requires_grad_(True)
        fused_domain_cross_entropy(base * 1.0, labels, dom, 4, ref, backend=backend).loss.backward()
        base_ref = view.detach().clone().requires_grad_(True)
        domain_cross_entropy_reference(base_ref * 1.0, labels, dom, 4, ref).loss.backward()
        torch.testing.assert_close(base.grad, base_ref.grad, **F32)


def test_inplace_backward_overwrites_only_the_view(impl):
    device, backend = impl
    _, labels, dom, ref = _inputs(device=device)
    labels[2, 4] = -100
    wide = torch.randn(3, 5, 1040, generator=torch.Generator().manual_seed(9)).to(device)
    before = wide.clone()
    view = wide[:, :, 3:1004]
    _, exp_grad = _run(domain_cross_entropy_reference, view, labels, dom, 4, ref)
    leaf = wide.clone().requires_grad_(True)
    captured = {}

    def hook(grad):
        captured["grad"] = grad.clone()
        return grad

    sliced = leaf[:, :, 3:1004] * 1.0  # a fresh non-leaf buffer the backward may destroy
    sliced.register_hook(hook)
    out = fused_domain_cross_entropy(sliced, labels, dom, 4, ref, backend=backend, inplace_backward=True)
    out.loss.backward()
    torch.testing.assert_close(captured["grad"], exp_grad, **F32)
    torch.testing.assert_close(sliced.detach(), exp_grad, **F32)  # the logits buffer now holds the gradient
    torch.testing.assert_close(leaf.grad[:, :, 3:1004], exp_grad, **F32)
    assert leaf.grad[:, :, :3].abs().max() == 0 and leaf.grad[:, :, 1004:].abs().max() == 0
    assert torch.equal(wide, before)

    # a leaf view that requires grad: out of place (its .grad must not alias itself), the buffer is untouched
    buf = wide.clone()
    part = buf[:, :, 3:1004].requires_grad_(True)
    fused_domain_cross_entropy(
        part, labels, dom, 4, ref, backend=backend, inplace_backward=True
    ).loss.backward()
    torch.testing.assert_close(part.grad, exp_grad, **F32)
    assert part.grad.data_ptr() != part.data_ptr()
    assert torch.equal(buf, before)


def test_inplace_backward_into_a_strided_slice_keeps_the_other_columns(impl):
    device, backend = impl
    _, labels, dom, ref = _inputs(device=device)
    wide = torch.randn(3, 5, 1040, generator=torch.Generator().manual_seed(9)).to(device)
    _, exp_grad = _run(domain_cross_entropy_reference, wide[:, :, 3:1004], labels, dom, 4, ref)
    leaf = wide.clone().requires_grad_(True)
    buf = leaf * 1.0  # non-leaf: the backward may destroy it
    part = buf[:, :, 3:1004]
    fused_domain_cross_entropy(
        part, labels, dom, 4, ref, backend=backend, inplace_backward=True
    ).loss.backward()
    torch.testing.assert_close(part.detach(), exp_grad, **F32)  # written in place
    torch.testing.assert_close(buf.detach()[:, :, :3], wide[:, :, :3], rtol=0, atol=0)
    torch.testing.assert_close(buf.detach()[:, :, 1004:], wide[:, :, 1004:], rtol=0, atol=0)
    torch.testing.assert_close(leaf.grad[:, :, 3:1004], exp_grad, **F32)


@pytest.mark.parametrize("shape", ["expand_rows", "expand_batch", "expand_vocab"])
def test_inplace_backward_on_overlapping_logits_falls_back_out_of_place(impl, shape):
    """Expanded (stride-0) logits: in place would sum several rows' gradients into one element; out of place is
    used instead and the gradient equals the oracle's."""
    device, backend = impl
    g = torch.Generator().manual_seed(3)
    _, labels, dom, ref = _inputs(B=3, T=5, V=33, device=device)
    if shape == "expand_rows":
        src = torch.randn(3, 1, 33, generator=g).to(device)
        make = lambda leaf: (leaf * 1.0).expand(3, 5, 33)  # noqa: E731
    elif shape == "expand_batch":
        src = torch.randn(1, 5, 33, generator=g).to(device)
        make = lambda leaf: (leaf * 1.0).expand(3, 5, 33)  # noqa: E731
    else:
        src = torch.randn(3, 5, 1, generator=g).to(device)
        make = lambda leaf: (leaf * 1.0).expand(3, 5, 33)  # noqa: E731
    exp_leaf = src.clone().requires_grad_(True)
    domain_cross_entropy_reference(make(exp_leaf), labels, dom, 4, ref).loss.backward()
    leaf = src.clone().requires_grad_(True)
    logits = make(leaf)
    assert not fdl._non_overlapping(logits)
    out = fused_domain_cross_entropy(logits, labels, dom, 4, ref, backend=backend, inplace_backward=True)
    out.loss.backward()
    torch.testing.assert_close(leaf.grad, exp_leaf.grad, **F32)


def test_non_overlapping_test_itself():
    x = torch.zeros(4, 6, 10)
    assert (
        fdl._non_overlapping(x)
        and fdl._non_overlapping(x[:, :, 2:7])
        and fdl._non_overlapping(x.transpose(0, 1))
    )
    assert fdl._non_overlapping(x[:, ::2, ::3]) and fdl._non_overlapping(torch.zeros(1, 1, 5).expand(1, 1, 5))
    assert not fdl._non_overlapping(torch.zeros(4, 1, 10).expand(4, 6, 10))
    assert not fdl._non_overlapping(x.as_strided((4, 6, 10), (10, 10, 1)))  # rows alias each other
    assert not fdl._non_overlapping(x.view(-1).as_strided((4, 6, 10), (60, 5, 1)))


@pytest.mark.parametrize("vocab", [1, 7, 4099])
def test_odd_vocab_sizes_and_max_position(impl, vocab):
    device, backend = impl
    logits, labels, dom, ref = _inputs(B=2, T=3, V=vocab, device=device)
    if vocab > 2048:  # the max in the last block / in the first block: the online rescaling path
        logits[0, :, -1] += 40.0
        logits[1, :, 0] += 40.0
    out, grad = _run(fused_domain_cross_entropy, logits, labels, dom, 4, ref, backend=backend)
    exp, exp_grad = _run(domain_cross_entropy_reference, logits, labels, dom, 4, ref)
    _compare(out, exp, grad, exp_grad)


def test_single_token(impl):
    device, backend = impl
    logits, labels, dom, ref = _inputs(B=1, T=1, V=1001, device=device)
    out, grad = _run(fused_domain_cross_entropy, logits, labels, dom, 4, ref, backend=backend)
    exp, exp_grad = _run(domain_cross_entropy_reference, logits, labels, dom, 4, ref)
    _compare(out, exp, grad, exp_grad)
    assert out.domain_token_count.sum() == 1


def test_masked_vocabulary_entries(impl):
    device, backend = impl
    logits, labels, dom, ref = _inputs(B=2, T=3, V=300, device=device)
    logits[..., 250:] = float("-inf")
    labels = labels % 250
    out, grad = _run(fused_domain_cross_entropy, logits, labels, dom, 4, ref, backend=backend)
    exp, exp_grad = _run(domain_cross_entropy_reference, logits, labels, dom, 4, ref)
    _compare(out, exp, grad, exp_grad)
    assert torch.isfinite(out.token_loss).all() and grad[..., 250:].abs().max() == 0


def test_deterministic_over_ten_runs(impl):
    device, backend = impl
    logits, labels, dom, ref = _inputs(B=4, T=16, V=4099, D=3, dtype=torch.bfloat16, device=device)
    scale = torch.tensor([0.3, 1.7, 1.0], device=device)
    first, first_grad = _run(fused_domain_cross_entropy, logits, labels, dom, 3, ref, scale, backend=backend)
    for _ in range(9):
        out, grad = _run(fused_domain_cross_entropy, logits, labels, dom, 3, ref, scale, backend=backend)
        for a, b in zip(out, first):
            assert torch.equal(a, b)
        assert torch.equal(grad, first_grad)


def test_native_cpu_sums_do_not_depend_on_thread_count():
    if not _native_available("cpu"):
        pytest.skip("native CPU extension disabled or not built")
    logits, labels, dom, ref = _inputs(B=8, T=16, V=513, D=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fused_domain_cross_entropy(logits, labels, dom, 3, ref, backend="native")
        torch.set_num_threads(max(2, threads))
        many = fused_domain_cross_entropy(logits, labels, dom, 3, ref, backend="native")
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


def test_no_grad_and_stats_only_use():
    logits, labels, dom, ref = _inputs()
    with torch.no_grad():
        out = fused_domain_cross_entropy(logits.requires_grad_(True), labels, dom, 4, ref)
    assert out.loss.grad_fn is None and not out.token_loss.requires_grad
    out = fused_domain_cross_entropy(logits, labels, dom, 4, ref)
    assert out.loss.requires_grad and not out.domain_loss_sum.requires_grad


@pytest.mark.parametrize(
    "change, match",
    [
        ({"labels": torch.tensor([[0, 5, 1]])}, "labels"),
        ({"labels": torch.tensor([[0, -2, 1]])}, "labels"),
        ({"domain_ids": torch.tensor([2])}, "domain_ids"),
        ({"logits": torch.zeros(1, 3, 0)}, "logits"),
        ({"backend": "cuda"}, "backend"),
    ],
)
def test_bad_inputs_raise_domain_loss_error(change, match):
    args = {
        "logits": torch.zeros(1, 3, 5),
        "labels": torch.tensor([[0, 4, -100]]),
        "domain_ids": torch.tensor([1]),
    }
    args.update(change)
    with pytest.raises(DomainLossError, match=match):
        fused_domain_cross_entropy(num_domains=2, **args)


def test_backend_resolution_and_fallback(monkeypatch):
    monkeypatch.setenv("MEGATRON_DOREMI_NO_NATIVE", "1")
    assert resolve_backend(torch.device("cpu")).name == "torch-chunked"
    with pytest.raises(DomainLossError, match="native"):
        resolve_backend(torch.device("cpu"), "native")
    monkeypatch.delenv("MEGATRON_DOREMI_NO_NATIVE")
    monkeypatch.setattr(
        fdl, "load_cpu_extension", lambda: None
    )  # a failed build: auto falls back, quietly correct
    assert resolve_backend(torch.device("cpu")).name == "torch-chunked"
    logits, labels, dom, ref = _inputs(B=2, T=2, V=11)
    out = fused_domain_cross_entropy(logits, labels, dom, 4, ref)
    _compare(out, domain_cross_entropy_reference(logits, labels, dom, 4, ref))


def test_no_kernel_image_falls_back_to_torch_with_one_warning(monkeypatch, caplog):
    """A CUDA module built without this GPU's architecture: the launch error switches to the torch path."""
    import contextlib
    import types

    calls = []

    class NoImage:
        def forward(self, *args):
            calls.append("forward")
            raise RuntimeError(
                "domain_loss_cuda: forward launch failed: no kernel image is available for execution"
            )

        backward = forward

    monkeypatch.setattr(fdl, "_cuda_unusable", [])
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda d=None: types.SimpleNamespace(cuda_stream=0))
    impl = fdl._CudaNative(NoImage())
    logits, labels, dom, ref = _inputs(B=2, T=3, V=17)
    exp, exp_grad = _run(domain_cross_entropy_reference, logits, labels, dom, 4, ref)
    monkeypatch.setattr(fdl, "resolve_backend", lambda *a, **k: impl)
    with caplog.at_level("WARNING", logger=fdl.__name__):
        for _ in range(2):
            out, grad = _run(fused_domain_cross_entropy, logits, labels, dom, 4, ref)
            _compare(out, exp, grad, exp_grad)
    assert calls == ["forward"]  # tried once, then the torch path directly
    assert len([r for r in caplog.records if "no kernel image" in r.getMessage()]) == 1

    class OtherError(NoImage):
        def forward(self, *args):
            raise RuntimeError("domain_loss_cuda: forward launch failed: an illegal memory access")

    monkeypatch.setattr(fdl, "_cuda_unusable", [])
    monkeypatch.setattr(fdl, "resolve_backend", lambda *a, **k: fdl._CudaNative(OtherError()))
    with pytest.raises(RuntimeError, match="illegal memory"):
        fused_domain_cross_entropy(logits, labels, dom, 4, ref)
