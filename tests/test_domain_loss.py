"""domain_cross_entropy against an independent per-token loop (log-softmax by hand, no F.cross_entropy)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_doremi.ops.domain_loss import DomainLossError, domain_cross_entropy, domain_token_counts


def _oracle(
    logits, labels, domain_ids, num_domains, ref=None, scale=None, ignore_index=-100, normalizer=None
):
    """Token-by-token reference in float64 with explicit loops over rows."""
    B, T, _ = logits.shape
    lg = logits.detach().to(torch.float64)
    tok = torch.zeros(B, T, dtype=torch.float64)
    loss_sum = [0.0] * num_domains
    excess = [0.0] * num_domains
    count = [0.0] * num_domains
    total, scale_sum = 0.0, 0.0
    for b in range(B):
        d = int(domain_ids[b])
        s = 1.0 if scale is None else float(scale[d])
        for t in range(T):
            y = int(labels[b, t])
            if y == ignore_index:
                continue
            row = lg[b, t]
            lse = math.log(sum(math.exp(v - float(row.max())) for v in row.tolist())) + float(row.max())
            val = lse - float(row[y])
            tok[b, t] = val
            loss_sum[d] += val
            excess[d] += max(val - (0.0 if ref is None else float(ref[b, t])), 0.0)
            count[d] += 1
            total += s * val
            scale_sum += s
    norm = scale_sum if normalizer is None else normalizer
    return tok, total / norm, loss_sum, excess, count


def _inputs(B=5, T=7, V=11, D=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g) * 3).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    domain_ids = torch.randint(0, D, (B,), generator=g)
    return logits, labels, domain_ids


def test_values_match_oracle_with_ignore_scale_and_reference():
    logits, labels, dom = _inputs()
    labels[0, :3] = -100
    labels[3, -1] = -100
    D = 3
    scale = torch.tensor([0.5, 2.0, 1.25], dtype=torch.float64)
    ref = torch.rand(5, 7, generator=torch.Generator().manual_seed(1)) * 3
    out = domain_cross_entropy(logits, labels, dom, D, ref_token_loss=ref, loss_scale_per_domain=scale)
    tok, loss, loss_sum, excess, count = _oracle(logits, labels, dom, D, ref=ref, scale=scale)
    assert out.token_loss.dtype == torch.float32 and out.token_loss.shape == (5, 7)
    assert out.domain_loss_sum.dtype == torch.float64 and out.domain_loss_sum.shape == (D,)
    torch.testing.assert_close(out.token_loss.double(), tok, rtol=1e-5, atol=1e-5)
    assert out.token_loss[0, :3].eq(0).all()
    assert float(out.loss) == pytest.approx(loss, rel=1e-5)
    torch.testing.assert_close(
        out.domain_loss_sum, torch.tensor(loss_sum, dtype=torch.float64), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        out.domain_excess_sum, torch.tensor(excess, dtype=torch.float64), rtol=1e-5, atol=1e-5
    )
    assert out.domain_token_count.tolist() == count
    assert domain_token_counts(labels, dom, D).tolist() == count


def test_no_reference_means_excess_equals_loss_and_default_normalizer_is_token_mean():
    logits, labels, dom = _inputs(seed=3)
    out = domain_cross_entropy(logits, labels, dom, 3)
    assert torch.equal(out.domain_excess_sum, out.domain_loss_sum)
    mean = sum(_oracle(logits, labels, dom, 3)[2]) / labels.numel()
    assert float(out.loss) == pytest.approx(mean, rel=1e-5)


def test_gradient_matches_autograd_of_plain_composition_with_global_normalizer():
    logits, labels, dom = _inputs(seed=5)
    labels[1, 2] = -100
    scale = torch.tensor([1.0, 3.0, 0.25])
    normalizer = 17.5
    a = logits.clone().requires_grad_(True)
    out = domain_cross_entropy(a, labels, dom, 3, loss_scale_per_domain=scale, normalizer=normalizer)
    out.loss.backward()
    b = logits.clone().double().requires_grad_(True)
    logp = torch.log_softmax(b, dim=-1)
    mask = labels != -100
    nll = -logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1) * mask
    ((nll.sum(dim=1) * scale.double()[dom]).sum() / normalizer).backward()
    torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-5, atol=1e-7)


def test_bf16_and_non_contiguous_logits():
    logits, labels, dom = _inputs(B=4, T=6, V=16, seed=7)
    wide = torch.randn(4, 6, 32)
    wide[..., ::2] = logits
    strided = wide[..., ::2]
    assert not strided.is_contiguous()
    ref = domain_cross_entropy(logits, labels, dom, 3)
    out = domain_cross_entropy(strided, labels, dom, 3)
    torch.testing.assert_close(out.token_loss, ref.token_loss)
    out16 = domain_cross_entropy(logits.to(torch.bfloat16), labels, dom, 3)
    assert out16.token_loss.dtype == torch.float32
    tok16 = _oracle(logits.to(torch.bfloat16).float(), labels, dom, 3)[0]
    torch.testing.assert_close(out16.token_loss.double(), tok16, rtol=1e-4, atol=1e-4)


def test_empty_domain_has_zero_counts():
    logits, labels, _ = _inputs(B=3)
    dom = torch.tensor([0, 0, 2])
    out = domain_cross_entropy(logits, labels, dom, 4)
    assert out.domain_token_count.tolist() == [14.0, 0.0, 7.0, 0.0]
    assert out.domain_loss_sum[1] == 0 and out.domain_loss_sum[3] == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"logits": torch.zeros(2, 3)}, "logits"),
        ({"labels": torch.zeros(2, 4, dtype=torch.long)}, "labels"),
        ({"labels": torch.zeros(2, 3)}, "labels"),
        ({"domain_ids": torch.tensor([0, 5])}, "domain_ids"),
        ({"domain_ids": torch.tensor([0])}, "domain_ids"),
        ({"ref_token_loss": torch.zeros(2, 2)}, "ref_token_loss"),
        ({"loss_scale_per_domain": torch.ones(2)}, "loss_scale_per_domain"),
    ],
)
def test_bad_inputs_name_the_argument(kwargs, match):
    args = {
        "logits": torch.zeros(2, 3, 5),
        "labels": torch.zeros(2, 3, dtype=torch.long),
        "domain_ids": torch.tensor([0, 1]),
        "num_domains": 3,
    }
    args.update(kwargs)
    with pytest.raises(DomainLossError, match=match):
        domain_cross_entropy(**args)


def test_ignored_positions_get_zero_gradient():
    logits, labels, dom = _inputs(seed=11)
    labels[2] = -100
    a = logits.clone().requires_grad_(True)
    out = domain_cross_entropy(a, labels, dom, 3)
    out.loss.backward()
    assert a.grad[2].abs().max() == 0 and a.grad[1].abs().max() > 0
    b = logits.to(torch.bfloat16).requires_grad_(True)
    domain_cross_entropy(b, labels, dom, 3).loss.backward()
    assert b.grad.dtype == torch.bfloat16
