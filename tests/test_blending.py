"""Blending index builders: exact Megatron greedy, periodic default mode, schedules, validation."""

from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import pytest

from megatron_doremi import _native
from megatron_doremi.data.blending import (
    BlendError,
    BlendSchedule,
    PeriodicBlend,
    build_exact_blending_indices,
    quantize_weights,
    validate_weights,
)

needs_native = pytest.mark.skipif(_native.helpers is None, reason="native extension not built")


@pytest.fixture(params=["native", "fallback"])
def backend(request, monkeypatch):
    """Run a test once with the native helpers and once with the numpy/python fallbacks."""
    if request.param == "native":
        if _native.helpers is None:
            pytest.skip("native extension not built")
        monkeypatch.delenv("MEGATRON_DOREMI_NO_NATIVE", raising=False)
    else:
        monkeypatch.setenv("MEGATRON_DOREMI_NO_NATIVE", "1")
    return request.param


def megatron_reference(weights: list[float], n: int) -> tuple[list[int], list[int]]:
    """Megatron-LM build_blending_indices in plain Python (weights normalised like BlendedDataset does)."""
    w = np.asarray(weights, dtype=np.float64)
    w = (w / np.sum(w)).tolist()
    current = [0] * len(w)
    dom, smp = [], []
    for i in range(n):
        x = max(float(i), 1.0)
        best, best_err = 0, w[0] * x - float(current[0])
        for d in range(1, len(w)):
            err = w[d] * x - float(current[d])
            if err > best_err:
                best, best_err = d, err
        dom.append(best)
        smp.append(current[best])
        current[best] += 1
    return dom, smp


def prefix_counts(domains: np.ndarray, num_domains: int) -> np.ndarray:
    """[len+1, D] counts of each domain among the first t samples, t = 0..len."""
    out = np.zeros((len(domains) + 1, num_domains), dtype=np.int64)
    np.cumsum(np.eye(num_domains, dtype=np.int64)[domains], axis=0, out=out[1:])
    return out


RNG = np.random.default_rng(1234)
EXACT_CASES = {
    "one_domain": ([3.0], 500),
    "zero_weights": ([0.0, 0.5, 0.5, 0.0, 1.0], 3000),
    "pile_like": ((RNG.random(22) ** 3 + 1e-3).tolist(), 20000),
    "ties": ([1.0, 1.0, 1.0, 1.0], 2000),
    "300_domains": ((RNG.random(300) + 0.01).tolist(), 2500),
}


# ---------------------------------------------------------------------------------------------- exact mode


@pytest.mark.parametrize("case", sorted(EXACT_CASES))
def test_exact_matches_megatron_reference(case, backend):
    weights, n = EXACT_CASES[case]
    if backend == "fallback":
        n = min(n, 3000)
    dom, smp = build_exact_blending_indices(weights, n)
    ref_dom, ref_smp = megatron_reference(weights, n)
    assert dom.dtype == (np.uint8 if len(weights) <= 255 else np.uint16)
    assert smp.dtype == np.int64
    assert dom.tolist() == ref_dom
    assert smp.tolist() == ref_smp


@needs_native
def test_exact_equals_plain_megatron_loop_native():
    weights = np.asarray(EXACT_CASES["pile_like"][0])
    w = weights / weights.sum()
    dom, smp = build_exact_blending_indices(weights, 50000)
    vdom = np.empty(50000, dtype=np.uint8)
    vsmp = np.empty(50000, dtype=np.int64)
    _native.helpers.blend_exact_megatron(w, vdom, vsmp)
    assert np.array_equal(dom, vdom) and np.array_equal(smp, vsmp)


def test_exact_schedule_lazy_and_shuffled(backend):
    weights, _ = EXACT_CASES["pile_like"]
    n = 5000
    ref_dom, ref_smp = build_exact_blending_indices(weights, n)
    sched = BlendSchedule([(0, weights)], mode="exact")
    idx = np.random.default_rng(0).permutation(n)
    dom, smp = sched.lookup(idx[:100])  # small first request, then the rest (the cache grows)
    assert np.array_equal(dom, ref_dom[idx[:100]]) and np.array_equal(smp, ref_smp[idx[:100]])
    dom, smp = sched.lookup(idx)
    assert dom.dtype == np.int64 and np.array_equal(dom, ref_dom[idx]) and np.array_equal(smp, ref_smp[idx])
    assert np.array_equal(sched.realised_counts(n), np.bincount(ref_dom, minlength=22))
    with pytest.raises(BlendError, match="single segment"):
        sched.append_segment(10, weights)
    with pytest.raises(BlendError, match="single segment"):
        BlendSchedule([(0, weights), (10, weights)], mode="exact")


# ------------------------------------------------------------------------------------------- quantisation


def largest_remainder_reference(weights: list[float], period: int) -> list[int]:
    w = [Fraction(float(x)) for x in weights]
    total = sum(w)
    quotas = [x * period / total for x in w]
    base = [int(q) for q in quotas]
    order = sorted(range(len(w)), key=lambda d: (-(quotas[d] - base[d]), d))
    for d in order[: period - sum(base)]:
        base[d] += 1
    return base


@pytest.mark.parametrize(
    "weights,period",
    [
        ([1.0, 1.0, 1.0], 1000),
        ([0.0, 2.0, 1.0, 0.0], 7),
        ((RNG.random(22) + 0.01).tolist(), 2**20),
        ((RNG.random(300) + 0.05).tolist(), 100_000),
        ([1e-3, 1.0, 1e-3], 2000),
    ],
)
def test_quantize_largest_remainder(weights, period):
    counts = quantize_weights(weights, period)
    assert counts.dtype == np.int64 and int(counts.sum()) == period
    assert counts.tolist() == largest_remainder_reference(weights, period)
    assert np.array_equal(quantize_weights(np.asarray(weights) * 4.0, period), counts)  # scale-free
    w = validate_weights(weights)
    assert np.all(np.abs(counts - w * period) < 1.0)
    assert np.all(counts[w == 0] == 0)


def test_quantize_ties_go_to_lower_index():
    assert quantize_weights([1, 1, 1], 1000).tolist() == [334, 333, 333]
    with pytest.raises(BlendError, match="raise the period"):
        quantize_weights([1, 1, 1], 2)  # one positive weight would get no slot
    assert quantize_weights([1, 1, 1, 1], 6).tolist() == [2, 2, 1, 1]


# ---------------------------------------------------------------------------------------------- periodic


PERIODIC_CASES = [
    ((RNG.random(7) + 0.02).tolist(), 1000),
    ([0.0, 0.25, 0.5, 0.0, 0.25], 1000),
    (((RNG.random(22) ** 3) + 0.02).tolist(), 1000),
    (((RNG.random(22) ** 3) + 1e-3).tolist(), 2**15),
    ([1.0], 64),
]


@pytest.mark.parametrize("weights,period", PERIODIC_CASES)
def test_periodic_period_counts_and_prefix_bound(weights, period, backend):
    blend = PeriodicBlend(weights, period)
    d_count = len(weights)
    assert blend.num_domains == d_count and blend.period == period
    assert np.array_equal(np.bincount(blend.table, minlength=d_count), blend.counts)  # (a) exactly m_d
    # rank[s] = earlier occurrences of table[s] in the period
    pc = prefix_counts(blend.table.astype(np.int64), d_count)
    assert np.array_equal(blend.rank, pc[np.arange(period), blend.table])
    # (b) every prefix of three periods: floor(m t / P) <= c(t) <= ceil(m t / P), so |c(t) - m t / P| < 1
    dom, _ = blend.lookup(np.arange(3 * period))
    c = prefix_counts(dom, d_count)
    t = np.arange(3 * period + 1, dtype=np.int64)[:, None]
    m = blend.counts[None, :]
    assert np.all(c >= (m * t) // period)
    assert np.all(c <= -((-m * t) // period))
    # against the requested weights
    w = blend.weights[None, :]
    q = blend.max_quantisation_error()[None, :]
    assert np.all(np.abs(c - w * t) <= 1 + t * q + 1e-9)
    assert np.all(blend.max_quantisation_error() < 1.0 / period)


@pytest.mark.parametrize("weights,period", PERIODIC_CASES[:3])
def test_periodic_lookup_contract_and_order(weights, period):
    blend = PeriodicBlend(weights, period)
    n = 4 * period + 17
    seq = np.arange(n, dtype=np.int64)
    dom, idx = blend.lookup(seq)
    assert dom.dtype == np.int64 and idx.dtype == np.int64
    # contract: d = table[i mod P], index = (i div P) * m_d + rank[i mod P]
    assert np.array_equal(dom, blend.table[seq % period])
    assert np.array_equal(idx, (seq // period) * blend.counts[dom] + blend.rank[seq % period])
    # within-domain indices are 0, 1, 2, ... in global order
    for d in range(len(weights)):
        assert np.array_equal(idx[dom == d], np.arange(int((dom == d).sum())))
    perm = np.random.default_rng(5).permutation(n)
    pdom, pidx = blend.lookup(perm)
    assert np.array_equal(pdom, dom[perm]) and np.array_equal(pidx, idx[perm])
    rdom, ridx = blend.lookup_range(123, n - 200)
    assert np.array_equal(rdom, dom[123 : n - 77]) and np.array_equal(ridx, idx[123 : n - 77])
    gdom, gidx = blend.lookup(seq[:60].reshape(3, 4, 5))
    assert gdom.shape == (3, 4, 5) and np.array_equal(gidx.ravel(), idx[:60])
    for k in (0, 1, period - 1, period, 3 * period + 5):
        assert np.array_equal(blend.realised_counts(k), np.bincount(dom[:k], minlength=len(weights)))
    big = np.array([10**15 + 3, 2**62 + 11], dtype=np.int64)
    bdom, bidx = blend.lookup(big)
    assert np.array_equal(bdom, blend.table[big % period])
    assert np.array_equal(bidx, (big // period) * blend.counts[bdom] + blend.rank[big % period])


def test_periodic_default_period_and_native_fallback_agree(monkeypatch):
    weights = (RNG.random(22) ** 3 + 1e-3).tolist()
    blend = PeriodicBlend(weights)
    assert blend.period == 2**20 and int(blend.counts.sum()) == 2**20
    assert np.array_equal(np.bincount(blend.table, minlength=22), blend.counts)
    probe = np.random.default_rng(3).integers(0, 10**12, size=20000)
    dom, idx = blend.lookup(probe)
    assert np.array_equal(dom, blend.table[probe % 2**20])
    if _native.helpers is None:
        return
    monkeypatch.setenv("MEGATRON_DOREMI_NO_NATIVE", "1")
    slow = PeriodicBlend(weights, 2**17)
    monkeypatch.delenv("MEGATRON_DOREMI_NO_NATIVE")
    fast = PeriodicBlend(weights, 2**17)
    assert np.array_equal(slow.table, fast.table) and np.array_equal(slow.rank, fast.rank)


@needs_native
@pytest.mark.parametrize(
    "weights,period",
    [
        *PERIODIC_CASES[:3],
        ((RNG.random(300) + 0.05).tolist(), 30_011),
        ((RNG.random(40) + 0.1).tolist(), 12_345),
    ],
)
def test_native_and_fallback_identical(weights, period, monkeypatch):
    probe = np.random.default_rng(9).integers(0, 50 * period, size=5000)
    segments = [(0, weights), (period // 3, weights[::-1]), (5 * period + 7, weights)]
    results = []
    for env in ("0", "1"):
        monkeypatch.setenv("MEGATRON_DOREMI_NO_NATIVE", env)
        blend = PeriodicBlend(weights, period)
        sched = BlendSchedule(segments, period=period)
        results.append(
            (
                blend.table,
                blend.rank,
                *blend.lookup(probe),
                *blend.lookup_range(period - 3, 2 * period),
                *sched.lookup(probe),
                *sched.lookup_range(period // 3 - 5, 3 * period),
                *build_exact_blending_indices(weights, 2000),
            )
        )
    for a, b in zip(*results, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)


# ---------------------------------------------------------------------------------------------- schedules


def test_schedule_indices_continue_across_segments(backend):
    period = 1000
    rng = np.random.default_rng(11)
    segments = [
        (0, (rng.random(6) + 0.05).tolist()),
        (250, [0.0, 1.0, 1.0, 0.0, 0.5, 0.5]),  # shorter than a period
        (250 + 2 * period + 333, (rng.random(6) + 0.05).tolist()),  # longer, not a multiple
        (3000 + 2 * period + 1, [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]),
        (3000 + 2 * period + 2, (rng.random(6) + 0.05).tolist()),  # one-sample segment
    ]
    sched = BlendSchedule(segments, period=period)
    n = segments[-1][0] + 2 * period + 5
    dom, idx = sched.lookup(np.arange(n))
    for d in range(6):  # no reuse, no gaps, in global order
        assert np.array_equal(idx[dom == d], np.arange(int((dom == d).sum())))
    starts = [s for s, _ in segments] + [n]
    first = PeriodicBlend(segments[0][1], period)  # the first segment is the plain periodic blend
    assert np.array_equal(dom[:250], first.table[:250])
    for k, (s, w) in enumerate(segments):  # later ones repeat their own (lagged) table: m_d per whole period
        m = quantize_weights(w, period)
        seg = dom[s : starts[k + 1]]
        for p0 in range(0, len(seg) - period + 1, period):
            assert np.array_equal(np.bincount(seg[p0 : p0 + period], minlength=6), m)
            assert np.array_equal(seg[p0 : p0 + period], seg[:period])
    assert np.all(dom[250:2583] != 0) and np.all(np.isin(dom[5001:5002], [0, 5]))
    perm = np.random.default_rng(2).permutation(n)
    pdom, pidx = sched.lookup(perm)
    assert np.array_equal(pdom, dom[perm]) and np.array_equal(pidx, idx[perm])
    for first, count in ((0, n), (240, 30), (2500, 3000), (n - 10, 500)):
        rdom, ridx = sched.lookup_range(first, count)
        full_dom, full_idx = sched.lookup(np.arange(first, first + count))
        assert np.array_equal(rdom, full_dom) and np.array_equal(ridx, full_idx)
    for k in (0, 250, 251, 4000, n):
        assert np.array_equal(sched.realised_counts(k), np.bincount(dom[:k], minlength=6))
    # appending segment by segment gives the same schedule
    grown = BlendSchedule(segments[:1], period=period)
    for s, w in segments[1:]:
        grown.append_segment(s, w)
    gdom, gidx = grown.lookup(perm)
    assert np.array_equal(gdom, dom[perm]) and np.array_equal(gidx, idx[perm])


def test_short_segments_carry_their_rounding(backend):
    """Steps of an online mixer: 200 segments of 16 samples. Without the carried lag every segment would round
    to 4 of each domain (800 each); with it each domain gets its requested share."""
    w = np.array([0.2439, 0.2528, 0.2691, 0.2342])
    sched = BlendSchedule([(16 * t, w) for t in range(200)])
    counts = sched.realised_counts(3200)
    assert np.abs(counts - w * 3200).max() < 1.5 and counts.tolist() == [781, 809, 861, 749]


def _random_schedule(rng: np.random.Generator) -> tuple[BlendSchedule, list, int, int]:
    num, period = int(rng.integers(2, 8)), int(rng.choice([16, 64, 1000, 4096]))
    segments, start = [], 0
    for _ in range(int(rng.integers(1, 60))):
        w = rng.dirichlet(np.ones(num) * rng.choice([0.3, 1.0, 10.0]))
        if rng.random() < 0.2:
            w[rng.integers(num)] = 0.0
        try:
            quantize_weights(w, period)
        except BlendError:  # a weight too small for this period
            w = np.ones(num)
        segments.append((start, w))
        start += int(rng.choice([1, 3, 16, 17, 100, period, 2 * period + 5]))
    return BlendSchedule(segments, period=period), segments, start, period


def test_changing_weights_track_the_cumulative_target_at_every_prefix(backend):
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(60):
        sched, segments, total, period = _random_schedule(rng)
        dom, idx = sched.lookup(np.arange(total))
        num = sched.num_domains
        seg_of = np.searchsorted([s for s, _ in segments[1:]], np.arange(total), side="right")
        per_sample = np.array([quantize_weights(w, period) for _, w in segments])[seg_of] / period
        target = np.cumsum(per_sample, axis=0)
        realised = np.cumsum(np.eye(num)[dom], axis=0)
        worst = max(worst, float(np.abs(realised - target).max()))
        for d in range(num):  # still no reuse and no gaps
            assert np.array_equal(np.sort(idx[dom == d]), np.arange(int((dom == d).sum())))
            zero = [k for k, (_, w) in enumerate(segments) if w[d] == 0]
            assert not np.any(np.isin(seg_of[dom == d], zero))  # a zero weight is never sampled
    assert worst < 2.0, worst  # measured 1.04 over these cases


@needs_native
def test_lagged_tables_native_and_fallback_identical(monkeypatch):
    rng = np.random.default_rng(3)
    for _ in range(20):
        state = rng.bit_generator.state
        results = []
        for env in ("0", "1"):
            rng.bit_generator.state = state
            monkeypatch.setenv("MEGATRON_DOREMI_NO_NATIVE", env)
            sched, _, total, _ = _random_schedule(rng)
            results.append(sched.lookup(np.arange(total)))
        assert np.array_equal(results[0][0], results[1][0]) and np.array_equal(results[0][1], results[1][1])


def test_schedule_many_segments_evicts_and_rebuilds_identically():
    period = 256
    rng = np.random.default_rng(4)
    sched = BlendSchedule([(0, rng.random(5) + 0.1)], period=period)
    for k in range(1, 60):
        sched.append_segment(k * 700, rng.random(5) + 0.1)
    n = 60 * 700 + 1000
    dom, idx = sched.lookup(np.arange(n))
    built = sum(t.built for t in sched._tables)
    assert built <= 4 * period + period  # LRU keeps memory bounded
    for d in range(5):
        assert np.array_equal(idx[dom == d], np.arange(int((dom == d).sum())))
    perm = np.random.default_rng(6).permutation(n)
    pdom, pidx = sched.lookup(perm)
    assert np.array_equal(pdom, dom[perm]) and np.array_equal(pidx, idx[perm])


@pytest.mark.parametrize("mode", ["periodic", "exact"])
def test_schedule_state_dict_round_trip(mode):
    names = ["books", "code", "web", "wiki"]
    segs = (
        [(0, [0.1, 0.2, 0.3, 0.4])]
        if mode == "exact"
        else [(0, [0.1, 0.2, 0.3, 0.4]), (777, [1, 1, 1, 1e-2])]
    )
    sched = BlendSchedule(segs, period=1000, mode=mode, names=names)
    if mode == "periodic":
        sched.append_segment(5000, [3.0, 0.0, 1.0, 1.0 / 3.0])
    state = json.loads(json.dumps(sched.state_dict()))
    assert state["mode"] == mode and state["period"] == 1000 and state["names"] == names
    assert [s for s, _ in state["segments"]] == ([0] if mode == "exact" else [0, 777, 5000])
    again = BlendSchedule.from_state_dict(state)
    probe = np.random.default_rng(8).integers(0, 9000, size=4000)
    a, b = sched.lookup(probe), again.lookup(probe)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert again.num_domains == 4 and again.names == names
    with pytest.raises(BlendError, match="missing key 'segments'"):
        BlendSchedule.from_state_dict({"mode": mode, "period": 1000})
    with pytest.raises(BlendError, match="mode"):
        BlendSchedule.from_state_dict({**state, "mode": "fancy"})


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "weights,names,pattern",
    [
        ([0.5, -0.1, 0.6], None, r"index 1 is negative"),
        ([0.5, -0.1], ["a", "b"], r"'b' \(index 1\) is negative"),
        ([0.5, float("nan")], ["a", "b"], r"'b' .*not finite"),
        ([float("inf"), 1.0], None, r"index 0 .*not finite"),
        ([0.0, 0.0], None, r"all weights are zero"),
        ([], None, r"empty"),
        ([[0.5, 0.5]], None, r"1-D"),
        (["x", 1.0], None, r"numbers"),
        ([0.5, 0.5], ["a", "b", "c"], r"2 weights for 3 domain names"),
        ([0.2, 0.3, 0.5], ["a", "b", "a"], r"duplicate domain names: 'a'"),
    ],
)
def test_bad_weights_raise(weights, names, pattern):
    with pytest.raises(BlendError, match=pattern):
        validate_weights(weights, names)
    if names is None:
        with pytest.raises(BlendError, match=pattern):
            PeriodicBlend(weights, 1000)
        with pytest.raises(BlendError, match=pattern):
            build_exact_blending_indices(weights, 10)
    with pytest.raises(BlendError, match=pattern):
        BlendSchedule([(0, weights)], period=1000, names=names)


def test_validate_weights_normalises_like_megatron():
    w = [3.0, 1.0, 0.0, 7.5]
    arr = np.array(w, dtype=np.float64)
    assert validate_weights(w).tolist() == (arr / np.sum(arr)).tolist()
    assert np.isclose(validate_weights([1e308, 1e308]).sum(), 1.0)
    assert isinstance(BlendError("x"), ValueError)


def test_positive_weight_quantised_to_zero_raises():
    with pytest.raises(BlendError, match=r"index 1 \(weight 1e-05\).*raise the period to at least 100000"):
        quantize_weights([1.0 - 1e-5, 1e-5], 1000)
    with pytest.raises(BlendError, match=r"'rare'.*raise the period"):
        quantize_weights([1.0, 1e-7], 2**20, names=["big", "rare"])
    with pytest.raises(BlendError, match="raise the period"):
        PeriodicBlend([1.0, 1.0, 1.0], 2)
    with pytest.raises(BlendError, match="segment 1 .*raise the period"):
        BlendSchedule([(0, [1.0, 1.0]), (10, [1.0, 1e-9])], period=1000)
    assert quantize_weights([1.0 - 1e-5, 1e-5], 100_000).tolist() == [99_999, 1]


@pytest.mark.parametrize(
    "segments,pattern",
    [
        ([], r"at least one segment"),
        ([(5, [1.0, 1.0])], r"first segment must start at sample 0"),
        ([(0, [1.0, 1.0]), (0, [1.0, 2.0])], r"segment 1: start 0 must be greater than .* 0"),
        ([(0, [1.0, 1.0]), (100, [1.0, 2.0]), (50, [1.0, 1.0])], r"segment 2: start 50 must be greater"),
        ([(0.0, [1.0, 1.0])], r"start must be an integer"),
        ([(0, [1.0, 1.0]), (10, [1.0, 1.0, 1.0])], r"3 weights but the schedule has 2 domains"),
        ([(0, [1.0, 1.0], 3)], r"pair"),
    ],
)
def test_bad_segments_raise(segments, pattern):
    with pytest.raises(BlendError, match=pattern):
        BlendSchedule(segments, period=100)


def test_bad_append_period_mode_and_indices_raise():
    sched = BlendSchedule([(0, [1.0, 1.0])], period=100)
    sched.append_segment(10, [1.0, 3.0])
    with pytest.raises(BlendError, match="start 10 must be greater than the previous segment's start 10"):
        sched.append_segment(10, [1.0, 1.0])
    with pytest.raises(BlendError, match="start 5 must be greater"):
        sched.append_segment(5, [1.0, 1.0])
    with pytest.raises(BlendError, match="negative"):
        sched.append_segment(20, [1.0, -1.0])
    assert sched.num_segments == 2  # failed appends leave the schedule unchanged
    for period in (0, -3, 2**31, 1.5, True):
        with pytest.raises(BlendError, match="period"):
            PeriodicBlend([1.0], period)
    with pytest.raises(BlendError, match="mode"):
        BlendSchedule([(0, [1.0])], mode="megatron")
    with pytest.raises(BlendError, match=">= 0"):
        sched.lookup(np.array([3, -1]))
    with pytest.raises(BlendError, match="integers"):
        sched.lookup(np.array([1.0, 2.0]))
    with pytest.raises(BlendError, match="num_samples"):
        build_exact_blending_indices([1.0], -1)
    dom, idx = sched.lookup([])
    assert dom.shape == (0,) and idx.dtype == np.int64
