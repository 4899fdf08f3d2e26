"""Blending: which domain, and which sample of it, global sample ``i`` of the mixture is.

Two modes answer the same question, ``i -> (d(i), k(i))`` with ``k`` the index within domain ``d``:

*Exact* (:func:`build_exact_blending_indices`) is Megatron-LM's ``build_blending_indices`` bit for bit: for
``i = 0 .. N-1`` pick the first ``d`` maximising ``w_d * max(i, 1) - c_d`` (float64), emit ``(d, c_d)`` and
increment ``c_d``. It costs O(N * D) time and O(N) memory, and must be computed sequentially from 0. Like
Megatron's, on an exact tie it takes the lowest index, which can be a zero-weight domain (e.g. weights
``[0, 1, 1]`` emit domain 0 at sample 2); use it only to reproduce an existing Megatron run.

*Periodic* (the default, :class:`PeriodicBlend`) quantises ``w`` to integer counts ``m_d`` summing to a period
``P`` (largest remainder, :func:`quantize_weights`), lays one period out once and answers any ``i`` in O(1):
``d(i) = table[i mod P]``, ``k(i) = (i div P) * m_d + rank[i mod P]``. Memory is O(P) (1-2 bytes of table and
4 of rank per slot), nothing is cached on disk and every rank computes the same integers.

The period is laid out by earliest-deadline-first scheduling, in integer arithmetic. Domain ``d``'s ``k``-th
occurrence (``k = 1 .. m_d``) is a unit job with release slot ``floor((k-1) P / m_d)`` and deadline slot
``ceil(k P / m_d) - 1``; slot ``i`` takes the released job with the smallest ``(deadline, d)``.
Bound (proved, and asserted/tested): for every prefix ``t >= 0`` and domain ``d``, with ``c_d(t)`` the count of
``d`` among samples ``[0, t)``::

    floor(m_d t / P) <= c_d(t) <= ceil(m_d t / P),   hence   |c_d(t) - (m_d / P) t| < 1.

Proof: any such schedule meets the bound iff each job runs inside its window; a set of unit jobs with integer
windows is schedulable iff every slot interval ``[a, b]`` contains at most ``b - a + 1`` whole windows (Hall), and
EDF finds a schedule whenever one exists. Domain ``d`` has at most ``floor((b+1) m_d / P) - ceil(a m_d / P) <=
(b - a + 1) m_d / P`` windows inside ``[a, b]``; summing over ``d`` gives ``b - a + 1``. Job ``m_d`` has deadline
``P - 1`` and job ``m_d + 1`` is released at ``P``, so a period holds exactly ``m_d`` of ``d`` and repeats.
Against the requested weights: ``|c_d(t) - w_d t| < 1 + t |m_d / P - w_d| < 1 + t / P`` (largest remainder keeps
``|m_d - w_d P| < 1``). Megatron's greedy stays within about one sample of ``w_d t``; the periodic mode trades the
``t |m_d / P - w_d|`` drift (at most ~95 samples per domain over 10^8 samples with ``P = 2^20``) for O(P) memory
and O(1) lookups; raise ``period`` to shrink it.

*Changing weights* (:class:`BlendSchedule`): piecewise-constant segments ``(start, weights)``. Segment ``k`` has its
own period table and per-domain offsets equal to the samples of each domain used by the segments before it, so
each domain's within-domain indices run 0, 1, 2, ... in global order with no reuse and no gaps. Indices past a
domain's size are for the domain dataset to wrap into a new epoch. Rounding is carried across segments: segment
``k``'s table is laid out with a per-domain *lag* ``e_d`` (integer, units of 1/P samples) = what the domain is
owed at the segment's start, ``sum_j<k m_jd len_j - P * (its samples so far)``; job ``c`` of ``d`` then has the
window ``[floor((c P - e_d) / m_d), ceil(((c + 1) P - e_d) / m_d) - 1]`` clamped into the period. Without it,
segments as short as a training step (online mixers, DoReMi's resample variant) would each round to the same
floor/ceil counts and the realised mixture would drift from the requested one by up to one sample per domain per
segment (e.g. a weight of 0.27 in 16-sample steps realising 4/16 = 0.25 forever). With it the realised counts
track ``sum_j m_jd len_j / P`` (tested to within 2 samples over hundreds of short segments). The first segment
has no lag, so a single-segment schedule is exactly the periodic blend above.

Native code (``megatron_doremi._helpers``, ``csrc/blending.cpp``) runs the loops when available; the numpy /
Python fallbacks here give identical results.
"""

from __future__ import annotations

import heapq
import logging
from collections import Counter, OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from megatron_doremi import _native

logger = logging.getLogger(__name__)

__all__ = [
    "BlendError",
    "BlendSchedule",
    "PeriodicBlend",
    "build_exact_blending_indices",
    "quantize_weights",
    "validate_weights",
]

DEFAULT_PERIOD = 2**20
MAX_PERIOD = 2**31 - 1
_MIN_BUILD = 1 << 14  # smallest lazily built table prefix (slots)
_EXACT_CHUNK = 1 << 16  # smallest exact-mode extension (samples)


class BlendError(ValueError):
    """Invalid blending input: bad weights, period, segments, state or indices."""


# ------------------------------------------------------------------------------------------------- validation


def _label(d: int, names: Sequence[str] | None) -> str:
    return f"{names[d]!r} (index {d})" if names is not None else f"index {d}"


def _checked_weights(weights: Any, names: Sequence[str] | None) -> np.ndarray:
    """The weights as a validated, unnormalised float64 copy (see :func:`validate_weights`)."""
    try:
        arr = np.array(weights, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise BlendError(f"weights must be a 1-D sequence of numbers: {exc}") from None
    if arr.ndim != 1:
        raise BlendError(f"weights must be a 1-D sequence of numbers, got an array of shape {arr.shape}")
    if arr.size == 0:
        raise BlendError("weights are empty: need at least one domain")
    if names is not None:
        names = list(names)
        if len(names) != arr.size:
            raise BlendError(f"got {arr.size} weights for {len(names)} domain names")
        dups = sorted(str(n) for n, k in Counter(names).items() if k > 1)
        if dups:
            raise BlendError(f"duplicate domain names: {', '.join(repr(n) for n in dups)}")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        d = int(bad[0])
        raise BlendError(
            f"weight of domain {_label(d, names)} is {arr[d]} (not finite; NaN/inf); weights must be finite and >= 0"
        )
    neg = np.flatnonzero(arr < 0)
    if neg.size:
        d = int(neg[0])
        raise BlendError(
            f"weight of domain {_label(d, names)} is negative ({arr[d]!r}); weights must be >= 0"
        )
    if not np.any(arr > 0):
        raise BlendError("all weights are zero: at least one domain needs a positive weight")
    return arr


def validate_weights(weights: Any, names: Sequence[str] | None = None) -> np.ndarray:
    """Check domain weights and return a normalised float64 copy (``w / w.sum()``, as Megatron normalises).

    Raises :class:`BlendError` naming the problem: not 1-D, empty, count != ``len(names)``, duplicate names,
    a non-finite or negative weight (naming the domain), or all weights zero.
    """
    arr = _checked_weights(weights, names)
    with np.errstate(over="ignore"):
        total = np.sum(arr)
    if not np.isfinite(total):  # huge weights: rescale first so the sum does not overflow
        arr = arr / arr.max()
        total = np.sum(arr)
    return arr / total


def _check_period(period: Any) -> int:
    if isinstance(period, bool) or not isinstance(period, (int, np.integer)):
        raise BlendError(f"period must be an integer, got {period!r}")
    p = int(period)
    if not 1 <= p <= MAX_PERIOD:
        raise BlendError(f"period must be in [1, {MAX_PERIOD}], got {p}")
    return p


def _check_count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise BlendError(f"{what} must be an integer, got {value!r}")
    if int(value) < 0:
        raise BlendError(f"{what} must be >= 0, got {int(value)}")
    return int(value)


def _domain_dtype(num_domains: int) -> np.dtype:
    """uint8 for <= 255 domains, uint16 for <= 65535, else uint32 (exact-mode domain index)."""
    if num_domains <= 255:
        return np.dtype(np.uint8)
    if num_domains <= 65535:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


def _table_dtype(num_domains: int) -> np.dtype:
    if num_domains <= 255:
        return np.dtype(np.uint8)
    if num_domains <= 65535:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def _as_indices(global_indices: Any) -> np.ndarray:
    """Global sample indices as a contiguous int64 array (any shape); BlendError unless integers >= 0."""
    arr = np.asarray(global_indices)
    if arr.size == 0:
        return np.zeros(arr.shape, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        raise BlendError(f"global indices must be integers, got dtype {arr.dtype}")
    if arr.dtype == np.uint64 and int(arr.max()) > np.iinfo(np.int64).max:
        raise BlendError(f"global index {int(arr.max())} does not fit in int64")
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    lo = int(arr.min())
    if lo < 0:
        raise BlendError(f"global indices must be >= 0, got {lo}")
    return arr


# ---------------------------------------------------------------------------------------------- exact mode


def _exact_fill(w: np.ndarray, start: int, counts: np.ndarray, dom: np.ndarray, smp: np.ndarray) -> None:
    """Megatron's greedy for samples ``[start, start + len(smp))`` resuming from ``counts`` (int64, updated)."""
    if _native.native_enabled():
        _native.helpers.blend_exact(w, start, counts, dom, smp)
        return
    n = len(smp)
    if len(w) > 32:  # numpy per sample: w * x - c rounds like the C++ (a product, then a subtraction)
        c = counts.astype(np.float64)
        for k in range(n):
            x = max(float(start + k), 1.0)
            d = int(np.argmax(w * x - c))  # first maximum, like Megatron's strict ">" scan
            dom[k] = d
            smp[k] = int(c[d])
            c[d] += 1.0
        counts[:] = c.astype(np.int64)
        return
    wl = w.tolist()  # few domains: plain Python floats are faster (same IEEE double arithmetic)
    cl = [float(v) for v in counts.tolist()]
    out_d = [0] * n
    out_s = [0] * n
    rng_d = range(1, len(wl))
    for k in range(n):
        x = max(float(start + k), 1.0)
        best, best_err = 0, wl[0] * x - cl[0]
        for d in rng_d:
            err = wl[d] * x - cl[d]
            if err > best_err:
                best, best_err = d, err
        out_d[k] = best
        out_s[k] = int(cl[best])
        cl[best] += 1.0
    dom[:] = out_d
    smp[:] = out_s
    counts[:] = [int(v) for v in cl]


def _warn_zero_weights(w: np.ndarray) -> None:
    if np.any(w == 0):
        logger.warning(
            "exact (Megatron) blending with zero-weight domains %s: like Megatron's greedy it can still pick a "
            "zero-weight domain on an exact tie; use the periodic mode to exclude them",
            np.flatnonzero(w == 0).tolist(),
        )


def build_exact_blending_indices(weights: Any, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Megatron-LM's ``build_blending_indices``, bit for bit.

    Returns ``(domain_index, sample_index)`` of length ``num_samples``: domain_index uint8 for <= 255 domains,
    else uint16 (uint32 past 65535); sample_index int64. Weights are normalised by :func:`validate_weights`.
    O(N * D) time, O(N) memory.
    """
    w = validate_weights(weights)
    n = _check_count(num_samples, "num_samples")
    _warn_zero_weights(w)
    dom = np.empty(n, dtype=_domain_dtype(len(w)))
    smp = np.empty(n, dtype=np.int64)
    _exact_fill(w, 0, np.zeros(len(w), dtype=np.int64), dom, smp)
    return dom, smp


# ------------------------------------------------------------------------------------------- periodic mode


def quantize_weights(weights: Any, period: int, names: Sequence[str] | None = None) -> np.ndarray:
    """Integer counts ``m_d`` (int64) summing exactly to ``period``, by largest remainder.

    Quotas ``P w_d / sum(w)`` and their remainders are computed exactly (rational arithmetic on the float64
    weights as given, so scaling the weights changes nothing), ties go to the lower domain index; a zero weight
    always gets 0. Raises :class:`BlendError` if a positive weight would get 0 slots, saying how large the
    period must be.
    """
    w = _checked_weights(weights, names)
    p = _check_period(period)
    ratios = [float(x).as_integer_ratio() for x in w]
    den = max(q for _, q in ratios)  # powers of two: the largest is a common denominator
    nums = [a * (den // q) for a, q in ratios]
    total = sum(nums)
    base = [(a * p) // total for a in nums]
    rem = [(a * p) % total for a in nums]
    left = p - sum(base)  # == sum(rem) / total: an integer below the number of nonzero remainders
    for d in sorted(range(len(w)), key=lambda i: (-rem[i], i))[:left]:
        base[d] += 1
    counts = np.array(base, dtype=np.int64)
    lost = [d for d in range(len(w)) if nums[d] > 0 and counts[d] == 0]
    if lost:
        need = max(-(-total // nums[d]) for d in lost)
        shown = ", ".join(f"{_label(d, names)} (weight {w[d] / w.sum():.3g})" for d in lost[:5])
        more = f" and {len(lost) - 5} more" if len(lost) > 5 else ""
        raise BlendError(
            f"period {p} is too small: {shown}{more} would get 0 samples per period although its weight is "
            f"positive; raise the period to at least {need} (e.g. period=2**{max(need - 1, 1).bit_length()})"
        )
    return counts


def _build_table_py(
    counts: np.ndarray, lag: np.ndarray, period: int, limit: int, table: np.ndarray, rank: np.ndarray
) -> None:
    """Pure-Python EDF (same as blend_period_table in csrc/blending.cpp), with per-domain lags.

    Domain ``d`` is owed ``lag[d] / period`` samples when the period starts (all zeros: the plain period table):
    job ``k`` (0-based) is released at ``max(0, floor((k P - lag) / m))`` and due at
    ``min(P - 1, max(release, ceil(((k + 1) P - lag) / m) - 1))``. A slot with no released job (only possible
    with a lag) takes the earliest-released one early. Every domain gets exactly ``m_d`` slots per period.
    """
    m = [int(x) for x in counts]
    e = [int(x) for x in lag]

    def release(d: int, k: int) -> int:
        return max(0, (k * period - e[d]) // m[d])

    def deadline(d: int, k: int) -> int:
        return min(period - 1, max(release(d, k), -((e[d] - (k + 1) * period) // m[d]) - 1))

    c = [0] * len(m)
    ready: list[tuple[int, int]] = []
    pending: list[tuple[int, int]] = []
    for d in range(len(m)):
        if m[d] > 0:
            heapq.heappush(pending, (release(d, 0), d))
    tab = [0] * limit
    rk = [0] * limit
    lagged = any(e)
    for i in range(limit):
        while pending and pending[0][0] <= i:
            _, d = heapq.heappop(pending)
            heapq.heappush(ready, (deadline(d, c[d]), d))
        if not ready:
            _, d = heapq.heappop(pending)
            heapq.heappush(ready, (deadline(d, c[d]), d))
        if ready[0][0] < i and not lagged:
            raise RuntimeError("period schedule missed a deadline (internal error)")
        _, d = heapq.heappop(ready)
        tab[i] = d
        rk[i] = c[d]
        c[d] += 1
        if c[d] < m[d]:
            heapq.heappush(pending, (release(d, c[d]), d))
    table[:] = tab
    rank[:] = rk


def _build_table(
    counts: np.ndarray, period: int, limit: int, lag: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The first ``limit`` slots of the period: (domain table, rank = earlier occurrences in the period).

    ``lag`` (int64 [D], units of 1/period samples, or None = zeros): what each domain is owed when the period
    starts (see :class:`BlendSchedule`); all zeros gives the plain EDF table.
    """
    table = np.empty(limit, dtype=_table_dtype(len(counts)))
    rank = np.empty(limit, dtype=np.int32)
    counts = np.ascontiguousarray(counts, dtype=np.int64)
    if lag is not None:
        lag = np.ascontiguousarray(lag, dtype=np.int64) if np.any(lag) else None
    if _native.native_enabled():
        _native.helpers.blend_period_table(counts, period, table, rank, lag)
    else:
        zeros = np.zeros(len(counts), dtype=np.int64)
        _build_table_py(counts, zeros if lag is None else lag, period, limit, table, rank)
    if limit == period:  # invariant (a): a full period holds exactly m_d of each domain
        got = np.bincount(table, minlength=len(counts))
        if not np.array_equal(got, counts):
            raise RuntimeError("period table does not hold exactly m_d of each domain (internal error)")
    return table, rank


class _Table:
    """A lazily built prefix (up to ``cap`` slots) of the period table of integer ``counts``."""

    def __init__(self, counts: np.ndarray, period: int, cap: int, lag: np.ndarray | None = None) -> None:
        self.counts = counts
        self.period = period
        self.cap = cap
        self.lag = lag
        self.arrays: tuple[np.ndarray, np.ndarray] | None = None  # (table, rank), swapped as one object

    @property
    def table(self) -> np.ndarray | None:
        return None if self.arrays is None else self.arrays[0]

    @property
    def rank(self) -> np.ndarray | None:
        return None if self.arrays is None else self.arrays[1]

    @property
    def built(self) -> int:
        arrays = self.arrays
        return 0 if arrays is None else len(arrays[1])

    @property
    def nbytes(self) -> int:
        arrays = self.arrays
        return 0 if arrays is None else arrays[0].nbytes + arrays[1].nbytes

    def ensure(self, slots: int) -> tuple[np.ndarray, np.ndarray]:
        """(table, rank) with at least ``slots`` (<= cap) slots, growing geometrically."""
        arrays = self.arrays
        if arrays is not None and slots <= len(arrays[1]):
            return arrays
        if slots > self.cap:
            raise RuntimeError(f"need {slots} slots of a table capped at {self.cap} (internal error)")
        target = min(self.cap, max(slots, 2 * self.built, _MIN_BUILD))
        self.arrays = arrays = _build_table(self.counts, self.period, target, self.lag)
        return arrays

    def shrink(self, cap: int) -> None:
        """Lower the cap (the segment got an end); drops slots past it."""
        self.cap = min(self.cap, cap)
        arrays = self.arrays
        if arrays is not None and len(arrays[1]) > self.cap:
            self.arrays = (arrays[0][: self.cap].copy(), arrays[1][: self.cap].copy())

    def drop(self) -> None:
        self.arrays = None

    def lag_or_zero(self) -> np.ndarray:
        return np.zeros(len(self.counts), dtype=np.int64) if self.lag is None else self.lag

    def prefix_counts(self, n: int) -> np.ndarray:
        """Per-domain count (int64) among the first ``n`` local samples."""
        q, r = divmod(n, self.period)
        table, _ = self.ensure(r)
        part = np.bincount(table[:r], minlength=len(self.counts)) if r else 0
        return q * self.counts + part

    def lookup(self, idx: np.ndarray, start: int, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(domain, index) int64 of global indices ``idx`` (1-D int64, all >= start) in this segment."""
        n = len(idx)
        dom = np.empty(n, dtype=np.int64)
        out = np.empty(n, dtype=np.int64)
        if n == 0:
            return dom, out
        jmax = int(idx.max()) - start
        table, rank = self.ensure(self.period if jmax >= self.period else jmax + 1)
        if _native.native_enabled():
            _native.helpers.blend_lookup(table, rank, self.counts, offsets, self.period, start, idx, dom, out)
        else:
            q, r = np.divmod(idx - start, self.period)
            dom[:] = table[r]
            out[:] = offsets[dom] + q * self.counts[dom] + rank[r]
        return dom, out

    def lookup_range(
        self, first: int, count: int, start: int, offsets: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Same as :meth:`lookup` of ``first, first + 1, ..., first + count - 1``."""
        if count == 0:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
        j0 = first - start
        r0 = j0 % self.period
        table, rank = self.ensure(self.period if r0 + count > self.period else r0 + count)
        if not _native.native_enabled():
            return self.lookup(np.arange(first, first + count, dtype=np.int64), start, offsets)
        dom = np.empty(count, dtype=np.int64)
        out = np.empty(count, dtype=np.int64)
        _native.helpers.blend_lookup_range(
            table, rank, self.counts, offsets, self.period, start, first, dom, out
        )
        return dom, out


def _reshape(dom: np.ndarray, out: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    return dom.reshape(shape), out.reshape(shape)


class PeriodicBlend:
    """Default mode: the EDF greedy over one period of P samples on the quantised counts.

    O(P) memory (``table``: domain per slot, uint8/uint16/int32; ``rank``: int32 earlier occurrences of that
    domain in the period), O(1) per lookup. Attributes: ``weights`` (float64, normalised), ``counts`` (int64
    ``m_d``, sum ``period``), ``period``, ``num_domains``.
    """

    def __init__(
        self, weights: Any, period: int = DEFAULT_PERIOD, *, names: Sequence[str] | None = None
    ) -> None:
        self.period = _check_period(period)
        self.weights = validate_weights(weights, names)
        self.counts = quantize_weights(weights, self.period, names=names)
        self.num_domains = len(self.weights)
        self._tab = _Table(self.counts, self.period, self.period)
        self._tab.ensure(self.period)
        self._zero = np.zeros(self.num_domains, dtype=np.int64)

    @property
    def table(self) -> np.ndarray:
        """Domain of each slot of the period (length ``period``)."""
        return self._tab.table

    @property
    def rank(self) -> np.ndarray:
        """Earlier occurrences of the slot's domain within the period (int32, length ``period``)."""
        return self._tab.rank

    @property
    def nbytes(self) -> int:
        """Bytes held by the tables (table, rank, counts)."""
        return self._tab.nbytes + self.counts.nbytes

    def lookup(self, global_indices: Any) -> tuple[np.ndarray, np.ndarray]:
        """Global sample indices (ints >= 0, any order/shape) -> (domain int64, index within domain int64)."""
        idx = _as_indices(global_indices)
        dom, out = self._tab.lookup(idx.ravel(), 0, self._zero)
        return _reshape(dom, out, idx.shape)

    def lookup_range(self, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`lookup` of the consecutive indices ``first .. first + count - 1`` (no index array needed)."""
        first = _check_count(first, "first")
        count = _check_count(count, "count")
        return self._tab.lookup_range(first, count, 0, self._zero)

    def realised_counts(self, n: int) -> np.ndarray:
        """Per-domain sample count (int64) among global samples ``[0, n)``."""
        return self._tab.prefix_counts(_check_count(n, "n"))

    def max_quantisation_error(self) -> np.ndarray:
        """``|m_d / P - w_d|`` per domain: the drift per sample of domain ``d``'s share."""
        return np.abs(self.counts / self.period - self.weights)


# ---------------------------------------------------------------------------------------------------- schedule


class _ExactState:
    """Exact-mode results for samples ``[0, len)``, extended on demand (O(N) memory)."""

    def __init__(self, weights: np.ndarray) -> None:
        _warn_zero_weights(weights)
        self.w = weights
        self.counts = np.zeros(len(weights), dtype=np.int64)
        self.dom = np.empty(0, dtype=_domain_dtype(len(weights)))
        self.smp = np.empty(0, dtype=np.int64)

    def ensure(self, n: int) -> None:
        have = len(self.smp)
        if n <= have:
            return
        target = max(n, 2 * have, _EXACT_CHUNK)
        dom = np.empty(target, dtype=self.dom.dtype)
        smp = np.empty(target, dtype=np.int64)
        dom[:have] = self.dom
        smp[:have] = self.smp
        _exact_fill(self.w, have, self.counts, dom[have:], smp[have:])
        self.dom, self.smp = dom, smp


class BlendSchedule:
    """Piecewise-constant domain weights over global samples, with per-segment period tables.

    ``segments``: ``[(start_sample, weights), ...]``, first start 0, starts strictly increasing, the same number
    of domains in each. Segment ``k`` covers ``[s_k, s_{k+1})``; for local ``j = i - s_k``:
    ``d = table_k[j mod P]``, ``index = offset_k[d] + (j div P) * m_kd + rank_k[j mod P]`` where ``offset_k`` is the
    number of samples of each domain used by segments ``< k``. Tables are built lazily (a closed segment needs
    at most ``min(length, P)`` slots) and the least recently used are dropped past ``4 * P`` slots in all; they
    are rebuilt identically when needed.

    ``mode="exact"``: one segment, Megatron's greedy computed on demand from sample 0 up to the largest index
    looked up (O(N * D) time and O(N) memory for N = that index; cached in this object only).

    Lookups update lazy caches: share one object between threads only under a lock (processes are fine).
    """

    def __init__(
        self,
        segments: Sequence[tuple[int, Sequence[float]]],
        period: int = DEFAULT_PERIOD,
        mode: str = "periodic",
        *,
        names: Sequence[str] | None = None,
    ) -> None:
        if mode not in ("periodic", "exact"):
            raise BlendError(f"mode must be 'periodic' or 'exact', got {mode!r}")
        self.mode = mode
        self.period = _check_period(period)
        self.names = list(names) if names is not None else None
        try:
            segments = [tuple(s) for s in segments]
        except TypeError:
            raise BlendError("segments must be a sequence of (start_sample, weights) pairs") from None
        if not segments:
            raise BlendError("a blend schedule needs at least one segment (0, weights)")
        if mode == "exact" and len(segments) != 1:
            raise BlendError(f"exact mode supports a single segment, got {len(segments)}")
        self.num_domains = 0
        self._starts: list[int] = []
        self._raw: list[np.ndarray] = []
        self._weights: list[np.ndarray] = []
        self._tables: list[_Table] = []
        self._offsets: list[np.ndarray] = []
        self._lru: OrderedDict[int, int] = OrderedDict()  # segment -> built slots, oldest first
        self._lru_slots = 0
        self._starts_arr: np.ndarray | None = None
        self._exact: _ExactState | None = None
        for k, seg in enumerate(segments):
            if len(seg) != 2:
                raise BlendError(f"segment {k} must be a (start_sample, weights) pair, got {seg!r}")
            self._append(seg[0], seg[1], k)

    # -- building

    def _append(self, start: Any, weights: Any, k: int) -> None:
        if isinstance(start, bool) or not isinstance(start, (int, np.integer)):
            raise BlendError(f"segment {k}: start must be an integer sample index, got {start!r}")
        start = int(start)
        if not self._starts and start != 0:
            raise BlendError(f"segment {k}: the first segment must start at sample 0, got {start}")
        if self._starts and start <= self._starts[-1]:
            raise BlendError(
                f"segment {k}: start {start} must be greater than the previous segment's start {self._starts[-1]}"
            )
        try:
            w = validate_weights(weights, self.names)
        except BlendError as exc:
            raise BlendError(f"segment {k} (start {start}): {exc}") from None
        if self._starts and len(w) != self.num_domains:
            raise BlendError(
                f"segment {k} (start {start}): has {len(w)} weights but the schedule has {self.num_domains} domains"
            )
        raw = np.array(weights, dtype=np.float64)
        if self.mode == "exact":
            self._exact = _ExactState(w)
        else:
            try:
                counts = quantize_weights(raw, self.period, self.names)
            except BlendError as exc:
                raise BlendError(f"segment {k} (start {start}): {exc}") from None
            lag = np.zeros(len(w), dtype=np.int64)
            if self._tables:
                prev = self._tables[-1]
                length = start - self._starts[-1]
                used = prev.prefix_counts(length)
                offsets = self._offsets[-1] + used
                # owed samples (units of 1/P) carried over: the previous lag + target - realised; whole periods
                # realise exactly m_d, so only the last partial period (r slots) contributes
                q, r = divmod(length, self.period)
                lag = prev.lag_or_zero() + prev.counts * r - self.period * (used - q * prev.counts)
                prev.shrink(min(length, self.period))
                self._touch(len(self._tables) - 1)
            else:
                offsets = np.zeros(len(w), dtype=np.int64)
            self._tables.append(_Table(counts, self.period, self.period, lag if np.any(lag) else None))
            self._offsets.append(offsets)
        self.num_domains = len(w)
        self._starts.append(start)
        self._starts_arr = None
        self._raw.append(raw)
        self._weights.append(w)

    def use_megatron_weights(self, weights: Any, tolerance: float = 1e-9) -> bool:
        """Exact mode: run the greedy on ``weights`` as given (Megatron's BlendedDataset weights, bit for bit).

        Megatron normalises a blend's weights twice (builder and BlendedDataset), this project's chain
        (mixture, mixer, schedule) three times; the last bits can differ and change a tie. The data layer
        knows Megatron's exact weights and hands them over here. Applied only when they agree with this
        schedule's weights within ``tolerance`` and nothing was looked up yet; returns whether it applied.
        """
        if self.mode != "exact" or self._exact is None or len(self._exact.smp):
            return False
        w = np.array(weights, dtype=np.float64).reshape(-1)
        if w.shape != self._exact.w.shape or not np.all(np.abs(w - self._exact.w) <= tolerance):
            return False
        self._exact = _ExactState(w)
        return True

    def append_segment(self, start: int, weights: Any) -> None:
        """Sample with ``weights`` from global sample ``start`` (> the last segment's start) on."""
        if self.mode == "exact":
            raise BlendError("exact mode supports a single segment; use mode='periodic' for changing weights")
        self._append(start, weights, len(self._starts))

    # -- queries

    @property
    def segments(self) -> list[tuple[int, np.ndarray]]:
        """``[(start, normalised float64 weights), ...]``."""
        return [(s, w.copy()) for s, w in zip(self._starts, self._weights, strict=True)]

    @property
    def num_segments(self) -> int:
        return len(self._starts)

    def weights_at(self, i: int) -> np.ndarray:
        """Normalised weights in force at global sample ``i``."""
        k = int(np.searchsorted(self._starts, _check_count(i, "i"), side="right")) - 1
        return self._weights[k].copy()

    def _touch(self, k: int) -> None:
        """Mark segment k's table as most recently used; drop the oldest tables past 4 * period slots."""
        size = self._tables[k].built
        self._lru_slots += size - self._lru.pop(k, 0)
        self._lru[k] = size
        while self._lru_slots > 4 * self.period and len(self._lru) > 1:
            old, old_size = next(iter(self._lru.items()))
            if old == k:
                break
            self._tables[old].drop()
            del self._lru[old]
            self._lru_slots -= old_size

    def _segment_lookup(self, k: int, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        res = self._tables[k].lookup(idx, self._starts[k], self._offsets[k])
        self._touch(k)
        return res

    def lookup(self, global_indices: Any) -> tuple[np.ndarray, np.ndarray]:
        """Global sample indices (ints >= 0, any order/shape) -> (domain int64, index within domain int64)."""
        idx = _as_indices(global_indices)
        flat = idx.ravel()
        if flat.size == 0:
            return _reshape(np.empty(0, np.int64), np.empty(0, np.int64), idx.shape)
        if self.mode == "exact":
            self._exact.ensure(int(flat.max()) + 1)
            return _reshape(self._exact.dom[flat].astype(np.int64), self._exact.smp[flat], idx.shape)
        if len(self._starts) == 1 or int(flat.min()) >= self._starts[-1]:
            dom, out = self._segment_lookup(len(self._starts) - 1, flat)
            return _reshape(dom, out, idx.shape)
        if self._starts_arr is None:
            self._starts_arr = np.asarray(self._starts, dtype=np.int64)
        seg = np.searchsorted(self._starts_arr, flat, side="right") - 1
        order = np.argsort(seg, kind="stable")
        ks, first = np.unique(seg[order], return_index=True)
        bounds = [*first.tolist(), len(order)]
        dom = np.empty(flat.size, dtype=np.int64)
        out = np.empty(flat.size, dtype=np.int64)
        for g, k in enumerate(ks.tolist()):
            pos = order[bounds[g] : bounds[g + 1]]
            dom[pos], out[pos] = self._segment_lookup(k, flat[pos])
        return _reshape(dom, out, idx.shape)

    def lookup_range(self, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`lookup` of the consecutive indices ``first .. first + count - 1``."""
        first = _check_count(first, "first")
        count = _check_count(count, "count")
        k = int(np.searchsorted(self._starts, first, side="right")) - 1
        if self.mode == "exact" or (k + 1 < len(self._starts) and first + count > self._starts[k + 1]):
            return self.lookup(np.arange(first, first + count, dtype=np.int64))
        res = self._tables[k].lookup_range(first, count, self._starts[k], self._offsets[k])
        self._touch(k)
        return res

    def realised_counts(self, n: int) -> np.ndarray:
        """Per-domain sample count (int64) among global samples ``[0, n)``."""
        n = _check_count(n, "n")
        if self.mode == "exact":
            self._exact.ensure(n)
            return np.bincount(self._exact.dom[:n], minlength=self.num_domains).astype(np.int64)
        k = int(np.searchsorted(self._starts, n, side="right")) - 1
        k = max(k, 0)
        res = self._offsets[k] + self._tables[k].prefix_counts(n - self._starts[k])
        self._touch(k)
        return res

    # -- state

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable: ``{"mode", "period", "segments": [[start, [w, ...]], ...]}`` (+ ``"names"``)."""
        state: dict[str, Any] = {
            "mode": self.mode,
            "period": self.period,
            "segments": [
                [s, [float(x) for x in raw]] for s, raw in zip(self._starts, self._raw, strict=True)
            ],
        }
        if self.names is not None:
            state["names"] = list(self.names)
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> BlendSchedule:
        """Rebuild a schedule from :meth:`state_dict` (identical lookups); BlendError on a malformed state."""
        if not isinstance(state, dict):
            raise BlendError(f"blend schedule state must be a dict, got {type(state).__name__}")
        for key in ("mode", "period", "segments"):
            if key not in state:
                raise BlendError(f"blend schedule state is missing key {key!r}")
        segments = state["segments"]
        if not isinstance(segments, list):
            raise BlendError("blend schedule state key 'segments' must be a list of [start, weights]")
        return cls(
            [tuple(s) if isinstance(s, (list, tuple)) else s for s in segments],
            period=state["period"],
            mode=state["mode"],
            names=state.get("names"),
        )
