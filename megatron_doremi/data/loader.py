"""Distributed, resumable mixture loader.

Global step ``t`` consumes global samples ``[t*B, (t+1)*B)`` of the blend; rank ``r`` of ``W`` takes the
contiguous slice ``[t*B + r*B/W, t*B + (r+1)*B/W)`` and splits it into micro-batches. Global sample ``i`` is
sample ``k`` of domain ``d`` where ``(d, k) = schedule.lookup(i)``. The loader's whole state is
``(consumed_samples, schedule)``, so a resumed run (with any world size that divides the batch) sees exactly the
samples an uninterrupted run would.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from megatron_doremi.data.blending import BlendSchedule
from megatron_doremi.data.indexed import IndexedDataset
from megatron_doremi.data.mixture import Mixture
from megatron_doremi.data.sequences import (
    SPLIT_NAMES,
    DataError,
    DomainSequences,
    parse_split,
    split_document_ranges,
)

__all__ = [
    "DataError",
    "MixtureDataLoader",
    "build_domain_datasets",
    "iter_eval_batches",
    "samples_to_batch",
]


def build_domain_datasets(
    mixture: Mixture,
    seq_length: int,
    split: str = "98,1,1",
    seed: int = 1234,
) -> dict[str, list[DomainSequences]]:
    """Open every domain's shards and build its train/valid/test :class:`DomainSequences`.

    Returns ``{"train": [...], "valid": [...], "test": [...]}`` with lists in ``mixture.names`` order; a split
    whose fraction is 0 is left out. Raises :class:`DataError` naming the domain when a split is too small to
    give one sample of ``seq_length``, and ``IndexedDatasetError`` naming the file for a missing/bad shard.
    """
    fractions = dict(zip(SPLIT_NAMES, parse_split(split)))
    out: dict[str, list[DomainSequences]] = {name: [] for name in SPLIT_NAMES if fractions[name] > 0}
    for domain in mixture.domains:
        shards = [IndexedDataset(prefix) for prefix in domain.prefixes]
        num_docs = sum(len(s.document_indices) - 1 for s in shards)
        ranges = split_document_ranges(num_docs, split)
        for split_name in out:
            lo, hi = ranges[split_name]
            if hi <= lo:
                raise DataError(
                    f"domain {domain.name!r}: the {split_name} split of its {num_docs} documents is empty "
                    f"(split {split!r}); add documents or change the split"
                )
            ds = DomainSequences(domain.name, shards, split_name, (lo, hi), seq_length, seed, shuffle=True)
            out[split_name].append(ds)
    return out


def samples_to_batch(samples: np.ndarray, domain_ids: np.ndarray) -> dict[str, torch.Tensor]:
    """[n, L+1] token samples -> ``input_ids`` = sample[:L], ``labels`` = sample[1:], ``domain_id`` (all int64)."""
    tokens = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.int64))
    return {
        "input_ids": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "domain_id": torch.from_numpy(np.ascontiguousarray(domain_ids, dtype=np.int64)),
    }


class MixtureDataLoader:
    """This rank's micro-batches of each global batch of the blended mixture.

    Args:
        datasets: one :class:`DomainSequences` per domain (the train split), in domain order.
        schedule: the blend schedule mapping global sample -> (domain, index within domain).
        global_batch_size: B, samples per optimizer step over all ranks.
        micro_batch_size: samples per forward/backward on one rank.
        rank, world_size: data-parallel position.
        consumed_samples: global samples already consumed (a multiple of B when resuming).
    """

    def __init__(
        self,
        datasets: Sequence[DomainSequences],
        schedule: BlendSchedule,
        global_batch_size: int,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        consumed_samples: int = 0,
    ) -> None:
        if schedule.num_domains != len(datasets):
            raise DataError(
                f"blend schedule has {schedule.num_domains} domains but {len(datasets)} datasets were given"
            )
        if global_batch_size <= 0 or micro_batch_size <= 0 or world_size <= 0:
            raise ValueError("global_batch_size, micro_batch_size and world_size must be > 0")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, {world_size})")
        per_rank, rem = divmod(global_batch_size, world_size)
        if rem or per_rank % micro_batch_size:
            raise ValueError(
                f"global_batch_size {global_batch_size} must equal micro_batch_size {micro_batch_size} x "
                f"gradient accumulation steps x world size {world_size}"
            )
        self.datasets = list(datasets)
        self.schedule = schedule
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.num_micro_batches = per_rank // micro_batch_size
        self.consumed_samples = int(consumed_samples)

    def global_sample_range(self, step_start: int | None = None) -> tuple[int, int]:
        """[start, end) of this rank's global samples for the batch starting at ``step_start`` (default: next)."""
        base = self.consumed_samples if step_start is None else step_start
        per_rank = self.global_batch_size // self.world_size
        return base + self.rank * per_rank, base + (self.rank + 1) * per_rank

    def read_samples(self, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Token samples [count, L+1] (int64) and domain ids [count] of global samples [first, first+count)."""
        domains, indices = self.schedule.lookup_range(first, count)
        width = self.datasets[0].seq_length + 1
        out = np.empty((len(domains), width), dtype=np.int64)
        for d in np.unique(domains):
            rows = np.nonzero(domains == d)[0]
            out[rows] = self.datasets[int(d)].get_batch(indices[rows], out_dtype=np.int64)
        return out, domains.astype(np.int64)

    def next_batch(self) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of the next global batch; advances ``consumed_samples`` by B."""
        lo, hi = self.global_sample_range()
        samples, domains = self.read_samples(lo, hi - lo)
        self.consumed_samples += self.global_batch_size
        mb = self.micro_batch_size
        return [samples_to_batch(samples[s : s + mb], domains[s : s + mb]) for s in range(0, hi - lo, mb)]

    def set_weights(self, weights: Sequence[float]) -> None:
        """Sample with new weights from the next unconsumed global sample on (appends a schedule segment).

        Called again before any sample of the last segment was consumed, it replaces that segment's weights.
        """
        segments = self.schedule.segments
        if segments[-1][0] == self.consumed_samples:
            state = self.schedule.state_dict()
            state["segments"][-1][1] = [float(w) for w in weights]
            self.schedule = BlendSchedule.from_state_dict(state)
        else:
            self.schedule.append_segment(self.consumed_samples, weights)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: consumed samples and the blend schedule."""
        return {"consumed_samples": self.consumed_samples, "schedule": self.schedule.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        schedule = BlendSchedule.from_state_dict(state["schedule"])
        if schedule.num_domains != len(self.datasets):
            raise DataError(
                f"checkpointed loader state has {schedule.num_domains} domains but the run has {len(self.datasets)}"
            )
        self.schedule = schedule
        self.consumed_samples = int(state["consumed_samples"])


def iter_eval_batches(
    dataset: DomainSequences,
    num_samples: int,
    micro_batch_size: int,
    domain_id: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[dict[str, torch.Tensor]]:
    """The first ``num_samples`` samples of ``dataset`` (capped at one epoch) in a fixed order, as micro-batches.

    Rank ``r`` of ``W`` yields micro-batches ``r, r+W, ...``; callers all-reduce sums and counts. Every rank sees
    the same number of micro-batch *slots*: a rank with no micro-batch left yields nothing, so callers must run
    their collectives after the loop, not inside it.
    """
    total = min(int(num_samples), len(dataset))
    starts = list(range(0, total, micro_batch_size))
    for mb_index in range(rank, len(starts), world_size):
        s = starts[mb_index]
        ks = np.arange(s, min(s + micro_batch_size, total), dtype=np.int64)
        samples = dataset.get_batch(ks, out_dtype=np.int64)
        yield samples_to_batch(samples, np.full(len(ks), domain_id, dtype=np.int64))
