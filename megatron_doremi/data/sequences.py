"""Per-domain document splits and the project's own packing into (L+1)-token samples.

Each shard prefix of a domain is split into train/valid/test on its own by contiguous document ranges, with
Megatron-Core's rounding (:func:`split_document_ranges`); a domain's split is the union of its prefixes' splits.
Each split is then an endless stream of epochs: epoch ``e`` lays the split's documents end to
end in a seeded order, cuts the stream into ``S = (T - 1) // L`` samples where sample ``j`` is tokens
``[j*L, j*L + L]`` (L+1 tokens, crossing document boundaries; the tokens after the last full sample of an epoch
are not used), and visits the samples in a seeded shuffled order. Both orders are keyed Feistel permutations
(:class:`Permutation`): computed with sequential memory access, and the sample shuffle is evaluated per lookup
instead of being stored. Sample ``k`` of the domain is sample
``shuffle_e[k mod S]`` of epoch ``e = k div S``, so any ``k >= 0`` is valid and a domain that runs out simply
continues into a new epoch with its own document order and shuffle.

All randomness comes from ``numpy.random.default_rng([seed, crc32(domain), split_id, epoch, purpose])``, so the
indices are identical on every rank, across resumes and with or without the native extension (the native code
only builds the sample index and copies tokens). Megatron-LM's own sample order (``packing: "megatron"``) is
:mod:`megatron_doremi.data.megatron_gpt`.
"""

from __future__ import annotations

import logging
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from megatron_doremi._native import helpers, native_enabled
from megatron_doremi.data.indexed import IndexedDataset

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "valid", "test")
_SPLIT_IDS = {name: i for i, name in enumerate(SPLIT_NAMES)}
_DOC_ORDER, _SAMPLE_SHUFFLE = 0, 1


class DataError(ValueError):
    """Data that cannot be packed as asked (too small, bad split...); the message names the domain and split."""


def parse_split(split: str | Sequence[float]) -> tuple[float, float, float]:
    """``"969,30,1"`` (or ``"98/1/1"``, or 1-3 numbers) -> fractions (train, valid, test).

    Normalised as Megatron-Core's ``parse_and_normalize_split`` does (float64 ``w / sum(w)``), so the split
    boundaries below are Megatron's to the last bit.
    """
    if isinstance(split, str):
        parts = [p for p in split.replace("/", ",").split(",") if p.strip()]
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise DataError(
                f"split {split!r}: expected up to three comma-separated numbers like '969,30,1'"
            ) from None
    else:
        values = [float(v) for v in split]
    if not 1 <= len(values) <= 3:
        raise DataError(f"split {split!r}: expected 1 to 3 numbers (train, valid, test)")
    values += [0.0] * (3 - len(values))
    if any(not np.isfinite(v) or v < 0 for v in values) or sum(values) <= 0:
        raise DataError(f"split {split!r}: numbers must be finite, >= 0 and not all zero")
    arr = np.array(values, dtype=np.float64)
    normalised = (arr / np.sum(arr)).tolist()
    return (normalised[0], normalised[1], normalised[2])


def split_bookends(split: str | Sequence[float]) -> dict[str, tuple[float, float] | None]:
    """Megatron-Core's split matrix: ``[start, end)`` fractions per split (cumulative sums), None when empty."""
    fractions = parse_split(split)
    cumulative = [0.0]
    for frac in fractions:
        cumulative.append(cumulative[-1] + frac)
    return {
        name: (cumulative[i], cumulative[i + 1]) if cumulative[i + 1] > cumulative[i] else None
        for i, name in enumerate(SPLIT_NAMES)
    }


def split_document_ranges(num_documents: int, split: str | Sequence[float]) -> dict[str, tuple[int, int]]:
    """Contiguous [start, end) ranges per split, as Megatron-Core's builder computes them.

    Each bookend is rounded on its own: ``int(round(fraction * float(n)))`` with Python's round-half-even on
    the cumulative fractions of :func:`split_bookends`. A split with a zero fraction gets an empty range at
    its start. (The old ``get_train_valid_test_split_`` arithmetic, which rounds sizes and then shifts them,
    differs by one document for many counts.)
    """
    n = float(num_documents)
    out: dict[str, tuple[int, int]] = {}
    for name, bookend in split_bookends(split).items():
        if bookend is None:
            start = out[SPLIT_NAMES[SPLIT_NAMES.index(name) - 1]][1] if name != "train" else 0
            out[name] = (start, start)
        else:
            out[name] = (int(round(bookend[0] * n)), int(round(bookend[1] * n)))
    return out


def build_sample_index(doc_lengths: np.ndarray, seq_length: int, num_samples: int) -> np.ndarray:
    """int64 [num_samples + 1, 2]: (document position, token offset) of each sample start ``j * seq_length``.

    ``doc_lengths`` are token counts in epoch order; the stream must hold ``num_samples * seq_length + 1`` tokens.
    """
    doc_lengths = np.ascontiguousarray(doc_lengths, dtype=np.int64)
    if native_enabled():
        return helpers.build_sample_index(doc_lengths, int(seq_length), int(num_samples))
    ends = np.cumsum(doc_lengths)
    starts = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    doc = np.searchsorted(ends, starts, side="right")
    if num_samples >= 0 and len(doc) and doc[-1] >= len(doc_lengths):
        raise IndexError("sample start beyond the end of the token stream")
    offset = starts - (ends[doc] - doc_lengths[doc])
    return np.stack([doc, offset], axis=1).astype(np.int64)


_U64 = np.uint64


def _splitmix64(z: np.ndarray) -> np.ndarray:
    z = z + _U64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
    return z ^ (z >> _U64(31))


class Permutation:
    """A keyed pseudo-random permutation of [0, n), evaluated on demand (O(1) memory).

    A 4-round balanced Feistel network over 2h bits (2^(2h) >= n) with splitmix64 round functions, restricted
    to [0, n) by cycle walking. The native extension and this numpy code give identical results.
    """

    def __init__(self, n: int, rng: np.random.Generator) -> None:
        if n <= 0:
            raise ValueError(f"permutation size must be > 0, got {n}")
        self.n = int(n)
        self.keys = rng.integers(0, np.iinfo(np.uint64).max, size=4, dtype=np.uint64, endpoint=True)
        bits = max(int(self.n - 1).bit_length(), 1)
        self._half = _U64(max((bits + 1) // 2, 1))
        self._mask = _U64((1 << int(self._half)) - 1)

    def _once(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self._half, x & self._mask
        for key in self.keys:
            left, right = right, left ^ (_splitmix64(right ^ key) & self._mask)
        return (left << self._half) | right

    def __call__(self, xs: np.ndarray) -> np.ndarray:
        """The permuted positions of ``xs`` (int64 in [0, n))."""
        xs = np.ascontiguousarray(xs, dtype=np.int64)
        if native_enabled():
            return helpers.feistel_apply(self.n, self.keys, xs)
        if len(xs) and (xs.min() < 0 or xs.max() >= self.n):
            raise IndexError(f"permutation of [0, {self.n}) applied to an index outside it")
        x = self._once(xs.astype(np.uint64))
        pending = np.nonzero(x >= _U64(self.n))[0]
        while len(pending):
            x[pending] = self._once(x[pending])
            pending = pending[x[pending] >= _U64(self.n)]
        return x.astype(np.int64)

    def materialise(self) -> np.ndarray:
        """int64 [n]: the permutation applied to 0..n-1."""
        if native_enabled():
            return helpers.feistel_permutation(self.n, self.keys)
        return self(np.arange(self.n, dtype=np.int64))


def build_sample_index_ordered(
    doc_lengths: np.ndarray, order: np.ndarray, seq_length: int, num_samples: int
) -> np.ndarray:
    """:func:`build_sample_index` over the documents visited in ``order`` (no gathered copy when native)."""
    if native_enabled():
        return helpers.build_sample_index_ordered(
            np.ascontiguousarray(doc_lengths, dtype=np.int64),
            np.ascontiguousarray(order, dtype=np.int64),
            int(seq_length),
            int(num_samples),
        )
    return build_sample_index(np.asarray(doc_lengths)[order], seq_length, num_samples)


def build_epoch_indices(
    doc_lengths: np.ndarray,
    seq_length: int,
    num_samples: int,
    doc_rng: np.random.Generator | None,
    sample_rng: np.random.Generator | None,
) -> tuple[np.ndarray, np.ndarray, Permutation | None]:
    """One epoch's indices: document order [n_docs], sample index [S+1, 2] and the sample shuffle.

    ``doc_rng``/``sample_rng`` None keep the natural order. This is the whole per-epoch cost of packing
    (measured by benchmarks/bench_sequences.py); the sample shuffle is evaluated lazily per lookup.
    """
    n = len(doc_lengths)
    order = Permutation(n, doc_rng).materialise() if doc_rng is not None else np.arange(n, dtype=np.int64)
    sample_index = build_sample_index_ordered(doc_lengths, order, seq_length, num_samples)
    shuffle = Permutation(num_samples, sample_rng) if sample_rng is not None else None
    return order, sample_index, shuffle


def _per_shard_ranges(
    shards: Sequence[IndexedDataset], doc_range: tuple[int, int] | Sequence[tuple[int, int]]
) -> list[tuple[int, int]]:
    """``doc_range`` as one checked [lo, hi) document range per shard."""
    counts = [s.num_documents for s in shards]
    if len(doc_range) == 2 and all(isinstance(v, (int, np.integer)) for v in doc_range):
        lo, hi = int(doc_range[0]), int(doc_range[1])  # type: ignore[arg-type]
        if not 0 <= lo <= hi <= sum(counts):
            raise DataError(f"document range [{lo}, {hi}) outside the shards' {sum(counts)} documents")
        out, base = [], 0
        for n in counts:
            out.append((min(max(lo - base, 0), n), min(max(hi - base, 0), n)))
            base += n
        return out
    ranges = [(int(a), int(b)) for a, b in doc_range]  # type: ignore[misc]
    if len(ranges) != len(shards):
        raise DataError(f"got {len(ranges)} document ranges for {len(shards)} shards")
    for shard, n, (lo, hi) in zip(shards, counts, ranges):
        if not 0 <= lo <= hi <= n:
            raise DataError(f"{shard.prefix}: document range [{lo}, {hi}) outside its {n} documents")
    return ranges


@dataclass
class _Epoch:
    order: np.ndarray  # int64 [n_docs] document visited at each epoch position
    sample_index: np.ndarray  # int64 [S + 1, 2] (epoch position, token offset) of each sample start
    shuffle: Permutation | None  # epoch sample visited at each position (None: natural order)

    def samples(self, positions: np.ndarray) -> np.ndarray:
        return positions if self.shuffle is None else self.shuffle(positions)


class DomainSequences:
    """Endless packed samples of one domain's split.

    Args:
        name: domain name (also seeds the RNG, so domains get independent orders).
        shards: the domain's opened shards, in prefix order; they must share a token dtype.
        split: which split this is ("train", "valid" or "test"); seeds the RNG.
        doc_range: per shard, its [start, end) document range (a list, one pair per shard, as
            :func:`split_document_ranges` gives for each prefix); a single pair is a range over the
            concatenation of the shards' documents.
        seq_length: L; samples hold L + 1 tokens.
        seed: global data seed.
        shuffle: shuffle documents and samples per epoch (evaluation may keep the natural order).
    """

    def __init__(
        self,
        name: str,
        shards: Sequence[IndexedDataset],
        split: str,
        doc_range: tuple[int, int] | Sequence[tuple[int, int]],
        seq_length: int,
        seed: int,
        shuffle: bool = True,
    ) -> None:
        if seq_length <= 0:
            raise DataError(f"seq_length must be > 0, got {seq_length}")
        if not shards:
            raise DataError(f"domain {name!r}: no shards")
        dtypes = {s.dtype for s in shards}
        if len(dtypes) != 1:
            raise DataError(f"domain {name!r}: shards have different token dtypes {sorted(map(str, dtypes))}")
        self.name = name
        self.split = split
        self.seq_length = int(seq_length)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.dtype = shards[0].dtype
        self._tokens = [np.ascontiguousarray(s.tokens) for s in shards]

        shard_ids, starts, lengths = [], [], []
        for sid, (shard, (lo, hi)) in enumerate(zip(shards, _per_shard_ranges(shards, doc_range))):
            offsets = shard.document_token_offsets()
            starts.append(offsets[lo:hi])
            lengths.append(offsets[lo + 1 : hi + 1] - offsets[lo:hi])
            shard_ids.append(np.full(hi - lo, sid, dtype=np.int32))
        self._doc_shard = np.concatenate(shard_ids)
        self._doc_start = np.concatenate(starts).astype(np.int64)
        self._doc_len = np.concatenate(lengths).astype(np.int64)
        self.num_documents = int(len(self._doc_len))
        self.num_tokens = int(self._doc_len.sum())
        self.samples_per_epoch = max((self.num_tokens - 1) // self.seq_length, 0)
        if self.samples_per_epoch <= 0:
            raise DataError(
                f"domain {name!r} {split} split: {self.num_documents} documents with {self.num_tokens} tokens cannot "
                f"give one sample of seq_length {self.seq_length} (needs >= {self.seq_length + 1} tokens); "
                "add data, lower seq_length or change the split"
            )
        self._key = zlib.crc32(name.encode("utf-8"))
        self._epochs: OrderedDict[int, _Epoch] = OrderedDict()
        self._warned_wrap = False

    def __len__(self) -> int:
        """Samples in one epoch (any index >= 0 is valid; indices past this wrap into later epochs)."""
        return self.samples_per_epoch

    def _rng(self, epoch: int, purpose: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self._key, _SPLIT_IDS.get(self.split, 3), epoch, purpose])

    def epoch(self, e: int) -> _Epoch:
        """The (cached) document order, sample index and sample shuffle of epoch ``e``."""
        cached = self._epochs.get(e)
        if cached is not None:
            self._epochs.move_to_end(e)
            return cached
        if e > 0 and not self._warned_wrap:
            logger.info(
                "domain %r (%s) starts epoch %d with a new document order and shuffle",
                self.name,
                self.split,
                e,
            )
            self._warned_wrap = True
        built = _Epoch(
            *build_epoch_indices(
                self._doc_len,
                self.seq_length,
                self.samples_per_epoch,
                self._rng(e, _DOC_ORDER) if self.shuffle else None,
                self._rng(e, _SAMPLE_SHUFFLE) if self.shuffle else None,
            )
        )
        self._epochs[e] = built
        while len(self._epochs) > 2:
            self._epochs.popitem(last=False)
        return built

    def get_batch(
        self, ks: np.ndarray, out_dtype: np.dtype | None = None, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Samples ``ks`` (int64, any values >= 0) as a [len(ks), L+1] array (shard dtype unless ``out_dtype``).

        ``out``: an optional C-contiguous [len(ks), L+1] buffer to fill (reusing one avoids page faults on
        fresh allocations in tight loops).
        """
        ks = np.asarray(ks, dtype=np.int64).reshape(-1)
        if len(ks) and ks.min() < 0:
            raise IndexError(f"domain {self.name!r}: negative sample index {int(ks.min())}")
        if out is None:
            out = np.empty((len(ks), self.seq_length + 1), dtype=out_dtype or self.dtype)
        elif out.shape != (len(ks), self.seq_length + 1) or not out.flags["C_CONTIGUOUS"]:
            raise ValueError(
                f"out must be C-contiguous with shape {(len(ks), self.seq_length + 1)}, got {out.shape}"
            )
        if not len(ks):
            return out
        epochs = ks // self.samples_per_epoch
        for e in np.unique(epochs):
            rows = np.nonzero(epochs == e)[0]
            ep = self.epoch(int(e))
            j = ep.samples(ks[rows] % self.samples_per_epoch)
            start_doc = ep.sample_index[j, 0]
            start_off = ep.sample_index[j, 1]
            if len(rows) == len(ks):
                self._gather(ep, start_doc, start_off, out)
            else:
                part = np.empty((len(rows), out.shape[1]), dtype=out.dtype)
                self._gather(ep, start_doc, start_off, part)
                out[rows] = part
        return out

    def __getitem__(self, k: int) -> np.ndarray:
        return self.get_batch(np.array([k], dtype=np.int64))[0]

    def _gather(self, ep: _Epoch, start_doc: np.ndarray, start_off: np.ndarray, out: np.ndarray) -> None:
        if native_enabled():
            helpers.gather_samples(
                self._tokens,
                ep.order,
                self._doc_shard,
                self._doc_start,
                self._doc_len,
                np.ascontiguousarray(start_doc),
                np.ascontiguousarray(start_off),
                out,
            )
            return
        width = out.shape[1]
        for row, (pos, off) in enumerate(zip(start_doc.tolist(), start_off.tolist())):
            filled = 0
            while filled < width:
                doc = int(ep.order[pos])
                take = min(int(self._doc_len[doc]) - off, width - filled)
                begin = int(self._doc_start[doc]) + off
                out[row, filled : filled + take] = self._tokens[self._doc_shard[doc]][begin : begin + take]
                filled += take
                pos += 1
                off = 0
