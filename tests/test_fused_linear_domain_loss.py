"""fused_linear_domain_cross_entropy vs domain_cross_entropy(hidden @ weight.T + bias, ...) on the CPU backends."""

from __future__ import annotations

import pytest
import torch

from megatron_doremi.ops import (
    DomainLossError,
    _build,
    domain_cross_entropy,
    fused_linear_domain_cross_entropy,
)
from megatron_doremi.ops.cpu_memory import peak_cpu_bytes
from megatron_doremi.ops.fused_linear import default_chunk_rows

BACKENDS = ["torch"] + (["native"] if _build.load_cpu_extension() is not None else [])
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _inputs(B=3, T=5, H=16, V=97, D=4, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H**0.5
    b = torch.randn(V, generator=g) if bias else None
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[1, 2] = -100
    domains = torch.randint(0, D, (B,), generator=g)
    ref = torch.rand(B, T, generator=g) * 4
    return hidden, weight, b, labels, domains, ref


def _grads(fn, hidden, weight, bias, grad_scale=1.7, **kw):
    leaves = [
        t.detach().clone().requires_grad_(True)
        for t in (hidden, weight) + ((bias,) if bias is not None else ())
    ]
    out = fn(*leaves, **kw)
    (out.loss * grad_scale).backward()
    return out, [t.grad for t in leaves]


def _fused(backend, chunk_rows):
    def run(h, w, b=None, **kw):
        return fused_linear_domain_cross_entropy(h, w, bias=b, chunk_rows=chunk_rows, backend=backend, **kw)

    return run


def _unfused(h, w, b=None, **kw):
    logits = h @ w.t() + (b if b is not None else 0)
    return domain_cross_entropy(logits, **kw)


def _check(out, exp, grads=None, exp_grads=None):
    for name in ("loss", "token_loss", "domain_loss_sum", "domain_excess_sum"):
        torch.testing.assert_close(getattr(out, name), getattr(exp, name), **TOL, msg=name)
    assert torch.equal(out.domain_token_count, exp.domain_token_count)
    assert out.domain_loss_sum.dtype == torch.float64 and out.token_loss.dtype == torch.float32
    for g, e in zip(grads or [], exp_grads or [], strict=True):
        assert g.dtype == e.dtype and g.shape == e.shape
        torch.testing.assert_close(g, e, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_rows", [1, 7, 15, None])
@pytest.mark.parametrize("with_bias", [True, False])
def test_values_and_grads_match_unfused(backend, chunk_rows, with_bias):
    h, w, b, labels, dom, ref = _inputs(bias=with_bias)
    scale = torch.tensor([0.5, 2.0, 1.0, 3.0])
    kw = dict(labels=labels, domain_ids=dom, num_domains=4, ref_token_loss=ref, loss_scale_per_domain=scale)
    out, grads = _grads(_fused(backend, chunk_rows), h, w, b, **kw)
    exp, exp_grads = _grads(_unfused, h, w, b, **kw)
    _check(out, exp, grads, exp_grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_index_empty_domains_and_normalizer(backend):
    h, w, b, labels, dom, ref = _inputs(B=4, T=3, D=6)
    labels[1, 2] = 3
    labels[0] = 7  # custom ignore index: a whole row ignored
    labels[2, 1] = 7
    dom = torch.tensor([0, 2, 2, 5])  # domains 1, 3, 4 empty; domain 0 fully ignored
    kw = dict(labels=labels, domain_ids=dom, num_domains=6, ignore_index=7, normalizer=11.0)
    out, grads = _grads(_fused(backend, 5), h, w, b, **kw)
    exp, exp_grads = _grads(_unfused, h, w, b, **kw)
    _check(out, exp, grads, exp_grads)
    assert out.domain_token_count.tolist() == [0, 0, 5, 0, 0, 3]
    assert out.domain_loss_sum[[0, 1, 3, 4]].abs().max() == 0
    assert torch.equal(out.domain_excess_sum, out.domain_loss_sum)  # no reference: excess = loss


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_over_runs(backend):
    h, w, b, labels, dom, ref = _inputs(B=4, T=9, V=301)
    kw = dict(labels=labels, domain_ids=dom, num_domains=4, ref_token_loss=ref)
    runs = [_grads(_fused(backend, 7), h, w, b, **kw) for _ in range(4)]
    out0, g0 = runs[0]
    for out, g in runs[1:]:
        for a, c in zip(out, out0, strict=True):
            assert torch.equal(a, c)
        for a, c in zip(g, g0, strict=True):
            assert torch.equal(a, c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_only_under_no_grad(backend):
    h, w, b, labels, dom, ref = _inputs()
    hw = [t.clone().requires_grad_(True) for t in (h, w)]
    with torch.no_grad():
        out = fused_linear_domain_cross_entropy(
            *hw, labels, dom, 4, ref, bias=b, chunk_rows=4, backend=backend
        )
    assert not out.loss.requires_grad
    exp = _unfused(h, w, b, labels=labels, domain_ids=dom, num_domains=4, ref_token_loss=ref)
    _check(out, exp)
    # no [V, H] gradient and no hidden gradient are allocated without grad: compare with the grad path
    g = torch.Generator().manual_seed(2)
    hb = torch.randn(2, 8, 64, generator=g)
    wb = torch.randn(20000, 64, generator=g).requires_grad_(True)
    lb = torch.randint(0, 20000, (2, 8), generator=g)
    db = torch.tensor([0, 1])

    def run():
        return fused_linear_domain_cross_entropy(hb, wb, lb, db, 2, chunk_rows=4, backend=backend)

    with torch.no_grad():
        peak_nograd = peak_cpu_bytes(run)
    peak_grad = peak_cpu_bytes(lambda: torch.autograd.grad(run().loss, wb))
    assert peak_grad >= 20000 * 64 * 4  # the fp32 weight gradient
    assert peak_nograd < 0.25 * peak_grad, (peak_nograd, peak_grad)


def test_gradient_reaches_only_what_requires_it():
    h, w, b, labels, dom, _ = _inputs()
    w = w.clone().requires_grad_(True)
    out = fused_linear_domain_cross_entropy(h, w, labels, dom, 4, bias=b, chunk_rows=4)
    out.loss.backward()
    assert w.grad is not None and w.grad.shape == w.shape


def test_bad_inputs_name_the_argument():
    h, w, b, labels, dom, _ = _inputs()
    with pytest.raises(DomainLossError, match="weight"):
        fused_linear_domain_cross_entropy(h, w[:, :3], labels, dom, 4)
    with pytest.raises(DomainLossError, match="weight"):
        fused_linear_domain_cross_entropy(h, w.double(), labels, dom, 4)
    with pytest.raises(DomainLossError, match="bias"):
        fused_linear_domain_cross_entropy(h, w, labels, dom, 4, bias=b[:3])
    with pytest.raises(DomainLossError, match="hidden"):
        fused_linear_domain_cross_entropy(h[0], w, labels, dom, 4)
    with pytest.raises(DomainLossError, match="labels"):
        fused_linear_domain_cross_entropy(h, w, labels[:, :2], dom, 4)
    with pytest.raises(DomainLossError, match="chunk_rows"):
        fused_linear_domain_cross_entropy(h, w, labels, dom, 4, chunk_rows=0)
    with pytest.raises(DomainLossError, match="labels"):
        fused_linear_domain_cross_entropy(h, w, torch.full_like(labels, 97), dom, 4)


def test_default_chunk_rows():
    assert default_chunk_rows(16384, 768, 50257) == 256
    assert default_chunk_rows(10, 768, 50257) == 10
    assert default_chunk_rows(100000, 4096, 128256) == 4096
    assert default_chunk_rows(0, 8, 8) == 1


def test_peak_extra_memory_under_a_quarter_of_the_logits_path_at_50k_vocab():
    """fwd+bwd at V=50257: the fused op's peak extra CPU memory is < 25% of logits + op (measured)."""
    g = torch.Generator().manual_seed(0)
    B, T, H, V = 8, 128, 32, 50257
    hidden = torch.randn(B, T, H, generator=g).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g) / H**0.5).requires_grad_(True)
    labels = torch.randint(0, V, (B, T), generator=g)
    dom = torch.randint(0, 4, (B,), generator=g)

    def unfused():
        domain_cross_entropy(hidden @ weight.t(), labels, dom, 4).loss.backward()

    def fused():
        fused_linear_domain_cross_entropy(hidden, weight, labels, dom, 4).loss.backward()

    base = peak_cpu_bytes(unfused)
    hidden.grad = weight.grad = None
    mine = peak_cpu_bytes(fused)
    logits_bytes = B * T * V * 4
    assert base >= logits_bytes  # the measurement sees the logits
    assert mine < 0.25 * base, (mine, base)
