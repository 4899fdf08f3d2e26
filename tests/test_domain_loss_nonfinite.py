"""Non-finite logits / reference losses reach the per-domain sums on every CPU backend, and the DoReMi mixer then
skips its update (issue 10: the skip-on-non-finite guard must work whatever backend computed the sums)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megatron_doremi.mixers.doremi import DoReMiMixer
from megatron_doremi.ops import _build
from megatron_doremi.ops import fused_domain_loss as fdl
from megatron_doremi.ops.fused_domain_loss import domain_cross_entropy_reference, fused_domain_cross_entropy

NAN, INF = float("nan"), float("inf")


def _backend_fns():
    fns = {"reference": domain_cross_entropy_reference}
    fns["torch"] = lambda *a, **k: fused_domain_cross_entropy(*a, backend="torch", **k)
    if _build.load_cpu_extension() is not None:
        fns["native"] = lambda *a, **k: fused_domain_cross_entropy(*a, backend="native", **k)
    return fns


FNS = _backend_fns()


@pytest.fixture(params=sorted(FNS), ids=str)
def fn(request):
    return FNS[request.param]


def _inputs(V=3000):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 3, V, generator=g)
    labels = torch.randint(0, V, (4, 3), generator=g)
    labels[:, 0] = 5  # a position whose label we control
    domain_ids = torch.tensor([0, 1, 2, 1])
    ref = torch.rand(4, 3, generator=g)
    return logits, labels, domain_ids, ref


# (where the bad value goes, value): positions inside a row chosen so that the CPU kernel's 2048-value blocks,
# the first element (running max still -inf) and the label itself are all hit.
CASES = [
    ("first", NAN),
    ("second_block", NAN),
    ("label", NAN),
    ("first", INF),
    ("label", INF),
    ("label", -INF),
]


def _poison(logits, where, value):
    col = {"first": 0, "second_block": 2500, "label": 5}[where]
    logits[0, 0, col] = value


@pytest.mark.parametrize("where, value", CASES)
def test_nonfinite_logit_reaches_its_domain_only(fn, where, value):
    logits, labels, dom, ref = _inputs()
    _poison(logits, where, value)
    out = fn(logits, labels, dom, 3, ref_token_loss=ref)
    assert not math.isfinite(float(out.token_loss[0, 0]))
    assert torch.isfinite(out.token_loss.view(-1)[1:]).all()
    for stat in (out.domain_loss_sum, out.domain_excess_sum):
        assert not math.isfinite(float(stat[0])), f"non-finite token lost from domain 0: {stat}"
        assert torch.isfinite(stat[1:]).all()
    assert torch.isfinite(out.domain_token_count).all() and float(out.domain_token_count[0]) == 3
    if value != value:  # NaN stays NaN (torch's semantics), it is not turned into inf or 0
        assert math.isnan(float(out.domain_excess_sum[0])) and math.isnan(float(out.domain_loss_sum[0]))


def test_nan_arriving_while_the_running_max_is_minus_inf(fn):
    """A row of -inf except one NaN: the online softmax must not drop the NaN (the CUDA bug of issue 13)."""
    logits, labels, dom, ref = _inputs(V=40)
    logits[1, 2] = -INF
    logits[1, 2, 17] = NAN
    labels[1, 2] = 3
    out = fn(logits, labels, dom, 3, ref_token_loss=ref)
    assert math.isnan(float(out.token_loss[1, 2]))
    assert math.isnan(float(out.domain_loss_sum[1])) and math.isnan(float(out.domain_excess_sum[1]))
    assert torch.isfinite(out.domain_loss_sum[[0, 2]]).all()


@pytest.mark.parametrize("ref_value", [NAN, -INF])
def test_nonfinite_reference_reaches_the_excess(fn, ref_value):
    logits, labels, dom, ref = _inputs(V=40)
    ref[2, 1] = ref_value  # domain 2: excess = loss - ref is NaN / +inf, never clipped to a finite value
    out = fn(logits, labels, dom, 3, ref_token_loss=ref)
    assert not math.isfinite(float(out.domain_excess_sum[2]))
    assert math.isfinite(float(out.domain_loss_sum[2]))  # the loss itself does not depend on the reference
    if ref_value != ref_value:
        assert math.isnan(float(out.domain_excess_sum[2]))


def test_clip_keeps_nan_and_clips_negatives():
    d = fdl._clip_excess(
        torch.tensor([1.0, 2.0, NAN, INF, 0.0, -INF]), torch.tensor([2.0, 1.0, 0.0, 0.0, INF, 0.0])
    )
    assert d[0] == 0 and d[1] == 1 and math.isnan(float(d[2])) and d[3] == INF and d[4] == 0 and d[5] == 0


def test_backends_agree_on_which_tokens_are_nonfinite():
    logits, labels, dom, ref = _inputs()
    logits[0, 0, 0] = NAN
    logits[2, 1, 2500] = INF
    logits[3, 2, labels[3, 2]] = -INF
    outs = {name: f(logits, labels, dom, 3, ref_token_loss=ref) for name, f in FNS.items()}
    masks = {name: torch.isfinite(o.token_loss) for name, o in outs.items()}
    nans = {name: torch.isnan(o.token_loss) for name, o in outs.items()}
    first = next(iter(masks.values()))
    assert all(torch.equal(m, first) for m in masks.values()), masks
    # NaN in -> NaN out everywhere; a +inf logit gives +inf (torch's logsumexp, the native kernels) or NaN
    # (torch's log_softmax, the oracle): non-finite either way, which is what the mixers test
    assert all(bool(n[0, 0]) for n in nans.values()), nans
    assert int((~first).sum()) == 3


@pytest.mark.parametrize("where, value", [("first", NAN), ("label", INF), ("second_block", NAN)])
def test_doremi_mixer_skips_alpha_update_on_nonfinite_sums(fn, where, value):
    logits, labels, dom, ref = _inputs()
    mixer = DoReMiMixer(["a", "b", "c"])
    good = fn(logits, labels, dom, 3, ref_token_loss=ref)
    stats = lambda o: {  # noqa: E731
        "loss_sum": o.domain_loss_sum.numpy(),
        "excess_sum": o.domain_excess_sum.numpy(),
        "token_count": o.domain_token_count.numpy(),
    }
    mixer.observe(1, stats(good))
    assert mixer.num_updates == 1
    before = mixer.weights.tolist()
    _poison(logits, where, value)
    bad = fn(logits, labels, dom, 3, ref_token_loss=ref)
    assert mixer.observe(2, stats(bad)) is False
    assert mixer.num_skipped == 1 and mixer.num_updates == 1 and mixer.weights.tolist() == before
    assert np.all(np.isfinite(mixer.weights))
