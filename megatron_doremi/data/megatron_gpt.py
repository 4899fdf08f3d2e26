"""Megatron-LM's GPTDataset sample order, for ``data.packing: "megatron"``.

Megatron-Core (``megatron/core/datasets/gpt_dataset.py``) turns the sequences ``[lo, hi)`` of one shard prefix
(its split) into samples with three indices, all drawn from one ``numpy.random.RandomState(seed)`` in this order:

* *document index*: the split's sequence ids repeated ``E`` times (int32) and shuffled together, where ``E`` is
  the smallest number of epochs whose tokens reach ``num_samples * L + 1``. When ``E > 1`` and the last epoch
  would contribute fewer than ``int(0.8 * samples_per_epoch)`` samples, the first ``E - 1`` epochs are
  shuffled together and the last one separately after them ("separate final epoch").
* *sample index* ``[S + 1, 2]``: (document-index position, token offset) of every sample start ``j * L`` in the
  stream of those sequences, ``S = (E * T - 1) // L`` (``T`` tokens per epoch); sample ``j`` is the ``L + 1``
  tokens from start ``j``.
* *shuffle index* ``[S]``: ``arange(S)`` shuffled (uint32, int64 past 2^32 - 2); with a separate final epoch
  the samples before the final epoch's and the final epoch's are shuffled as two ranges.

Sample ``i`` of the dataset is the sample ``shuffle_index[i]``. ``num_samples`` comes from the blend (see
:func:`megatron_num_samples`): ``ceil(ceil(target * w) * 1.005)`` for a weighted blend, ``target`` for a
single unweighted prefix, one epoch (``None``) for unweighted blends, with ``target`` the split's sample count
(train: ``train_iters * global_batch_size``). Megatron-Core splits a prefix by *sequences* (one per document
unless preprocessing split sentences), so this mode does too.

The indices can also be read from a Megatron ``--data-cache-path`` (:func:`find_cached_indices`), which gives
a run's exact order whatever Megatron version built it. Lookups past ``S`` wrap around (Megatron would stop
with an IndexError there), with one warning.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from megatron_doremi._native import helpers, native_enabled
from megatron_doremi.data.indexed import IndexedDataset
from megatron_doremi.data.sequences import DataError, build_sample_index_ordered

logger = logging.getLogger(__name__)

__all__ = [
    "MEGATRON_SURPLUS",
    "MegatronIndices",
    "MegatronSequences",
    "build_megatron_indices",
    "find_cached_indices",
    "megatron_num_samples",
]

MEGATRON_SURPLUS = 0.005  # Megatron-Core's mid_level_dataset_surplus default (older versions: a 1.005 factor)
SEPARATE_FINAL_EPOCH_THRESHOLD = 0.80


@dataclass
class MegatronIndices:
    """A GPTDataset's three indices (dtypes as Megatron's: int32, int32/int64, uint32/int64)."""

    document_index: np.ndarray  # [E * n] sequence ids
    sample_index: np.ndarray  # [S + 1, 2] (document-index position, offset)
    shuffle_index: np.ndarray  # [S]
    num_epochs: int
    separate_final_epoch: bool
    source: str = "built"  # "built" or the cache file it came from

    @property
    def num_samples(self) -> int:
        return int(self.sample_index.shape[0]) - 1


def megatron_num_samples(
    weights: Sequence[float] | None, num_prefixes: int, target: int | None
) -> list[int | None]:
    """Samples Megatron-Core's builder asks of each prefix's GPTDataset for one split.

    ``weights``: the blend's normalised weights in data-path order, or None for a data path without weights;
    ``target``: the split's requested samples (None: one epoch). A single prefix without a weight gets
    ``target`` itself; an unweighted blend gets one epoch per prefix; a weighted one
    ``ceil(ceil(target * w) * (1 + 0.005))`` (``_get_size_per_split_per_dataset`` with the default surplus).
    """
    if weights is None:
        return [target] if num_prefixes == 1 else [None] * num_prefixes
    if target is None:
        raise DataError("a weighted Megatron blend needs a sample count for every split it builds")
    return [int(math.ceil(math.ceil(target * float(w)) * (1 + MEGATRON_SURPLUS))) for w in weights]


def _num_epochs(tokens_per_epoch: int, seq_length: int, num_samples: int | None) -> int:
    if num_samples is None:
        return 1
    needed = num_samples * seq_length + 1
    return max(1, -(-needed // tokens_per_epoch))


def _shuffled_range(start: int, stop: int, total: int, rs: np.random.RandomState) -> np.ndarray:
    dtype = np.int64 if total >= np.iinfo(np.uint32).max - 1 else np.uint32
    out = np.arange(start, stop, dtype=dtype)
    rs.shuffle(out)
    return out


def build_megatron_indices(
    sequence_lengths: np.ndarray,
    lo: int,
    hi: int,
    seq_length: int,
    num_samples: int | None,
    seed: int,
) -> MegatronIndices:
    """GPTDataset's document, sample and shuffle indices for sequences ``[lo, hi)`` of a shard.

    ``sequence_lengths``: the shard's int32 sequence lengths (all of them; ids in the indices are shard-wide).
    """
    if seq_length <= 0:
        raise DataError(f"seq_length must be > 0, got {seq_length}")
    lengths = np.asarray(sequence_lengths)
    tokens_per_epoch = int(lengths[lo:hi].sum(dtype=np.int64))
    if hi <= lo or tokens_per_epoch <= 1:
        raise DataError(f"sequences [{lo}, {hi}) hold {tokens_per_epoch} tokens: too few for any sample")
    epochs = _num_epochs(tokens_per_epoch, seq_length, num_samples)
    separate = False
    if epochs > 1:
        assert num_samples is not None
        before_final = ((epochs - 1) * tokens_per_epoch - 1) // seq_length
        per_epoch = (tokens_per_epoch - 1) // seq_length
        separate = num_samples - before_final < int(SEPARATE_FINAL_EPOCH_THRESHOLD * per_epoch)
    rs = np.random.RandomState(seed)
    ids = np.arange(lo, hi, dtype=np.int32)
    if separate:
        first = np.tile(ids, epochs - 1)
        rs.shuffle(first)
        last = ids.copy()
        rs.shuffle(last)
        document_index = np.concatenate([first, last])
    else:
        document_index = np.tile(ids, epochs)
        rs.shuffle(document_index)
    total = (epochs * tokens_per_epoch - 1) // seq_length
    sample_index = build_sample_index_ordered(
        lengths.astype(np.int64), document_index.astype(np.int64), seq_length, total
    )
    if max(len(document_index), int(lengths.max())) <= np.iinfo(np.int32).max:
        sample_index = sample_index.astype(np.int32)
    if separate:
        head = ((epochs - 1) * tokens_per_epoch - 1) // seq_length
        shuffle_index = np.concatenate(
            [_shuffled_range(0, head, total, rs), _shuffled_range(head, total, total, rs)]
        )
    else:
        shuffle_index = _shuffled_range(0, total, total, rs)
    return MegatronIndices(document_index, sample_index, shuffle_index, epochs, separate)


# ---- Megatron's --data-cache-path ---------------------------------------------------------------------------------


def default_cache_dir(prefix: str) -> str:
    """Where Megatron-Core caches a prefix's indices when no ``--data-cache-path`` is given."""
    return os.path.join(prefix, "cache", "GPTDataset_indices")


def _same_path(a: str, b: str) -> bool:
    return a == b or os.path.realpath(a) == os.path.realpath(b)


def find_cached_indices(
    cache_dir: str, prefix: str, split: str, seed: int, seq_length: int, num_samples: int | None
) -> MegatronIndices | None:
    """Megatron's cached ``{hash}-GPTDataset-{split}-*.npy`` for this prefix and split, or None if absent.

    Candidates are found through their ``description.txt`` (dataset_path, index_split, random_seed,
    sequence_length); several candidates are told apart by ``num_samples``. Raises DataError on an ambiguous
    or unreadable cache, naming the files.
    """
    candidates = []
    for desc_path in sorted(
        glob.glob(os.path.join(glob.escape(cache_dir), f"*-GPTDataset-{split}-description.txt"))
    ):
        try:
            with open(desc_path, encoding="utf-8") as fh:
                desc = json.load(fh)
        except (OSError, ValueError) as exc:
            raise DataError(f"{desc_path}: cannot read Megatron's index description ({exc})") from None
        if not isinstance(desc, dict) or not isinstance(desc.get("dataset_path"), str):
            continue
        if (
            _same_path(desc["dataset_path"], prefix)
            and desc.get("index_split") == split
            and desc.get("random_seed") == seed
            and desc.get("sequence_length") == seq_length
        ):
            candidates.append((desc_path, desc))
    if not candidates:
        return None
    if len(candidates) > 1:
        matching = [c for c in candidates if c[1].get("num_samples") == num_samples]
        if len(matching) != 1:
            listing = ", ".join(f"{p} (num_samples {d.get('num_samples')})" for p, d in candidates)
            raise DataError(
                f"{cache_dir}: several cached Megatron {split} indices for {prefix} and none (or more than one) "
                f"with num_samples {num_samples}: {listing}; point data.data_cache_path at one run's cache"
            )
        candidates = matching
    desc_path, desc = candidates[0]
    if desc.get("num_samples") != num_samples:
        logger.warning(
            "%s: cached Megatron indices were built for num_samples %s, this run computes %s; using the cache "
            "(it is the order that Megatron run used)",
            desc_path,
            desc.get("num_samples"),
            num_samples,
        )
    stem = desc_path[: -len("description.txt")]
    arrays = []
    for kind in ("document_index", "sample_index", "shuffle_index"):
        path = f"{stem}{kind}.npy"
        try:
            arrays.append(np.load(path, mmap_mode="r", allow_pickle=False))
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: cannot load Megatron's cached {kind} ({exc})") from None
    doc, sample, shuffle = arrays
    if doc.ndim != 1 or sample.ndim != 2 or sample.shape[1] != 2 or shuffle.ndim != 1:
        raise DataError(f"{stem}*.npy: unexpected index shapes {doc.shape}, {sample.shape}, {shuffle.shape}")
    if len(shuffle) != len(sample) - 1:
        raise DataError(
            f"{stem}*.npy: shuffle index has {len(shuffle)} entries for {len(sample) - 1} samples"
        )
    return MegatronIndices(
        doc, sample, shuffle, num_epochs=-1, separate_final_epoch=False, source=stem + "*.npy"
    )


# ---- the dataset --------------------------------------------------------------------------------------------------


class MegatronSequences:
    """One prefix's split in Megatron-LM's GPTDataset order; the same interface as ``DomainSequences``.

    Args:
        name: domain name.
        shard: the prefix's opened shard.
        split: "train", "valid" or "test".
        seq_range: [lo, hi) sequence range of the split (Megatron-Core's split of the prefix).
        seq_length: L; samples hold L + 1 tokens.
        seed: Megatron's ``--seed`` (``random_seed``).
        num_samples: the GPTDataset's requested samples (None: one epoch); see :func:`megatron_num_samples`.
        cache_dir: a Megatron ``--data-cache-path`` to read the indices from when it has them.
    """

    def __init__(
        self,
        name: str,
        shard: IndexedDataset,
        split: str,
        seq_range: tuple[int, int],
        seq_length: int,
        seed: int,
        num_samples: int | None,
        cache_dir: str | None = None,
    ) -> None:
        lo, hi = int(seq_range[0]), int(seq_range[1])
        if not 0 <= lo <= hi <= len(shard):
            raise DataError(f"{shard.prefix}: sequence range [{lo}, {hi}) outside its {len(shard)} sequences")
        self.name, self.split, self.seq_length, self.seed = name, split, int(seq_length), int(seed)
        self.dtype = shard.dtype
        self.num_documents = hi - lo
        lengths = shard.sequence_lengths
        self.num_tokens = int(lengths[lo:hi].sum(dtype=np.int64))
        if (self.num_tokens - 1) // self.seq_length <= 0:
            raise DataError(
                f"domain {name!r} {split} split: {hi - lo} sequences with {self.num_tokens} tokens cannot give one "
                f"sample of seq_length {self.seq_length}; add data, lower seq_length or change the split"
            )
        directory = cache_dir or default_cache_dir(shard.prefix)
        indices = None
        if os.path.isdir(directory):
            indices = find_cached_indices(
                directory, shard.prefix, split, self.seed, self.seq_length, num_samples
            )
        if indices is None:
            indices = build_megatron_indices(lengths, lo, hi, self.seq_length, num_samples, self.seed)
        else:
            logger.info("domain %r (%s): Megatron indices from %s", name, split, indices.source)
        self.indices = indices
        order = np.asarray(indices.document_index, dtype=np.int64)
        if len(order) and (int(order.min()) < lo or int(order.max()) >= hi):
            raise DataError(
                f"{indices.source}: the document index uses sequences outside this run's {split} split [{lo}, {hi}) "
                f"of {shard.prefix}; was the Megatron run's --split different?"
            )
        self._order = order - lo  # positions into this split's sequences
        seq_starts = np.zeros(len(shard) + 1, dtype=np.int64)
        np.cumsum(lengths, dtype=np.int64, out=seq_starts[1:])
        self._seq_start = seq_starts[lo:hi].copy()
        self._seq_len = lengths[lo:hi].astype(np.int64)
        self._seq_shard = np.zeros(hi - lo, dtype=np.int32)
        self._tokens = [np.ascontiguousarray(shard.tokens)]
        self.samples_per_epoch = indices.num_samples
        self._warned_wrap = False

    def __len__(self) -> int:
        """Megatron's ``len(GPTDataset)``: the samples its indices hold."""
        return self.samples_per_epoch

    def positions(self, ks: np.ndarray) -> np.ndarray:
        """Megatron sample ids (``shuffle_index[k]``) of dataset indices ``ks`` (wrapping past ``len``)."""
        ks = np.asarray(ks, dtype=np.int64).reshape(-1)
        if len(ks) and ks.min() < 0:
            raise IndexError(f"domain {self.name!r}: negative sample index {int(ks.min())}")
        if len(ks) and int(ks.max()) >= len(self):
            if not self._warned_wrap:
                logger.warning(
                    "domain %r (%s): sample %d is past Megatron's %d samples for this dataset; wrapping around "
                    "(Megatron itself would stop here: raise train_iters' share or use the default packing)",
                    self.name,
                    self.split,
                    int(ks.max()),
                    len(self),
                )
                self._warned_wrap = True
            ks = ks % len(self)
        return np.asarray(self.indices.shuffle_index[ks], dtype=np.int64)

    def get_batch(
        self, ks: np.ndarray, out_dtype: np.dtype | None = None, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Samples ``ks`` as a [len(ks), L+1] array (shard dtype unless ``out_dtype``), like DomainSequences."""
        j = self.positions(ks)
        width = self.seq_length + 1
        if out is None:
            out = np.empty((len(j), width), dtype=out_dtype or self.dtype)
        elif out.shape != (len(j), width) or not out.flags["C_CONTIGUOUS"]:
            raise ValueError(f"out must be C-contiguous with shape {(len(j), width)}, got {out.shape}")
        if not len(j):
            return out
        start = np.asarray(self.indices.sample_index[j], dtype=np.int64)
        start_doc = np.ascontiguousarray(start[:, 0])
        start_off = np.ascontiguousarray(start[:, 1])
        if native_enabled():
            helpers.gather_samples(
                self._tokens,
                self._order,
                self._seq_shard,
                self._seq_start,
                self._seq_len,
                start_doc,
                start_off,
                out,
            )
            return out
        tokens = self._tokens[0]
        for row, (pos, off) in enumerate(zip(start_doc.tolist(), start_off.tolist())):
            filled = 0
            while filled < width:
                seq = int(self._order[pos])
                take = min(int(self._seq_len[seq]) - off, width - filled)
                begin = int(self._seq_start[seq]) + off
                out[row, filled : filled + take] = tokens[begin : begin + take]
                filled += take
                pos += 1
                off = 0
        return out

    def __getitem__(self, k: int) -> np.ndarray:
        return self.get_batch(np.array([k], dtype=np.int64))[0]
