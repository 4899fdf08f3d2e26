"""Distributed, resumable mixture loader.

Global step ``t`` consumes global samples ``[t*B, (t+1)*B)`` of the blend; rank ``r`` of ``W`` takes the
contiguous slice ``[t*B + r*B/W, t*B + (r+1)*B/W)`` and splits it into micro-batches. Global sample ``i`` is
sample ``k`` of domain ``d`` where ``(d, k) = schedule.lookup(i)``. The loader's whole state is
``(consumed_samples, schedule)``, so a resumed run (with any world size that divides the batch) sees exactly the
samples an uninterrupted run would. (Megatron's sampler gives rank ``r`` the ``r``-th slice of every micro-batch
instead: the same samples per global batch, in another assignment to ranks.)

Micro-batches hold ``input_ids``, ``labels`` and ``domain_id``; Megatron's document flags
(:class:`BatchOptions`: ``eod_mask_loss``, ``reset_position_ids``, ``reset_attention_mask``) add ``position_ids``
and/or ``attention_mask``, which :func:`model_inputs` hands to the model.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
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
    "DEFAULT_SPLIT",
    "PACKINGS",
    "BatchOptions",
    "DataError",
    "MixtureDataLoader",
    "build_domain_datasets",
    "iter_eval_batches",
    "megatron_blend_weights",
    "model_inputs",
    "samples_to_batch",
]

DEFAULT_SPLIT = "969,30,1"  # Megatron-LM's default --split
PACKINGS = ("project", "megatron")
IGNORE_INDEX = -100
_MODEL_INPUT_KEYS = ("position_ids", "attention_mask")


@dataclass(frozen=True)
class BatchOptions:
    """Megatron's per-document flags (all off by default: the batches are then exactly the plain ones).

    ``eod_mask_loss``: as Megatron's loss mask, positions whose *input* token is EOD get label ``-100`` (the
    token after a document's end is not predicted from it). ``reset_position_ids``: positions restart at 0
    after every EOD. ``reset_attention_mask``: a token cannot attend to anything up to and including the last
    EOD before it. ``eod_token_id`` is required when any flag is on.
    """

    eod_mask_loss: bool = False
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.active and self.eod_token_id is None:
            raise DataError(
                "eod_mask_loss / reset_position_ids / reset_attention_mask need the EOD token id: set "
                "data.eod_token_id or a tokenizer that has an end-of-document token"
            )

    @property
    def active(self) -> bool:
        return self.eod_mask_loss or self.reset_position_ids or self.reset_attention_mask


def _document_positions(input_ids: np.ndarray, eod: int) -> tuple[np.ndarray, np.ndarray]:
    """(segment [n, L]: EODs strictly before each position, position within its document [n, L])."""
    n, length = input_ids.shape
    is_eod = input_ids == eod
    segment = np.zeros((n, length), dtype=np.int64)
    np.cumsum(is_eod[:, :-1], axis=1, out=segment[:, 1:])
    t = np.broadcast_to(np.arange(length, dtype=np.int64), (n, length))
    starts = np.zeros((n, length), dtype=np.int64)
    starts[:, 1:] = np.where(is_eod[:, :-1], t[:, 1:], 0)
    np.maximum.accumulate(starts, axis=1, out=starts)
    return segment, t - starts


def samples_to_batch(
    samples: np.ndarray, domain_ids: np.ndarray, options: BatchOptions | None = None
) -> dict[str, torch.Tensor]:
    """[n, L+1] token samples -> ``input_ids`` = sample[:L], ``labels`` = sample[1:], ``domain_id`` (all int64).

    With ``options`` active (see :class:`BatchOptions`): ``labels`` -100 after EODs (``eod_mask_loss``),
    ``position_ids`` int64 [n, L] (``reset_position_ids``), and ``attention_mask``: with both resets an
    no mask (HF models derive the document-causal mask from the reset ``position_ids``), with
    only ``reset_position_ids`` an int64 [n, L] of ones (plain causal attention), with only
    ``reset_attention_mask`` a bool [n, 1, L, L] document-causal mask (True = may attend; needs the sdpa or
    flex attention implementation).
    """
    tokens = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.int64))
    batch = {
        "input_ids": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "domain_id": torch.from_numpy(np.ascontiguousarray(domain_ids, dtype=np.int64)),
    }
    if options is None or not options.active:
        return batch
    inputs = batch["input_ids"].numpy()
    eod = int(options.eod_token_id)  # type: ignore[arg-type]
    if options.eod_mask_loss:
        batch["labels"][torch.from_numpy(inputs == eod)] = IGNORE_INDEX
    if options.reset_position_ids or options.reset_attention_mask:
        segment, positions = _document_positions(inputs, eod)
        if options.reset_position_ids:
            batch["position_ids"] = torch.from_numpy(positions)
            if not options.reset_attention_mask:
                batch["attention_mask"] = torch.ones(inputs.shape, dtype=torch.int64)
        else:
            length = inputs.shape[1]
            causal = np.tril(np.ones((length, length), dtype=bool))
            same = segment[:, :, None] == segment[:, None, :]
            batch["attention_mask"] = torch.from_numpy(same & causal)[:, None]
    return batch


def model_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The extra keyword arguments for the model call from a micro-batch: ``position_ids`` and/or
    ``attention_mask`` when the batch has them (Megatron's reset flags), else ``{}``.

    Use it at every model call: ``model(input_ids=..., **model_inputs(batch))``; tensors are moved to the
    device of ``batch["input_ids"]``.
    """
    device = batch["input_ids"].device if "input_ids" in batch else None
    return {k: batch[k].to(device, non_blocking=True) for k in _MODEL_INPUT_KEYS if k in batch}


def megatron_blend_weights(mixture: Mixture, lengths: Sequence[int] | None = None) -> np.ndarray:
    """The weights Megatron's BlendedDataset runs its greedy on, bit for bit, in ``mixture`` order.

    A weighted blend is normalised twice (the builder's ``normalize`` and BlendedDataset's); an unweighted one
    (``mixture.weights_from_sizes``) is its datasets' sizes ``lengths`` normalised once.
    """

    def normalize(values: Any) -> np.ndarray:
        w = np.array(values, dtype=np.float64)
        return w / np.sum(w)

    if mixture.weights_from_sizes:
        if lengths is None:
            raise DataError("an unweighted blend's Megatron weights need its datasets' sizes")
        return normalize(list(lengths))
    return normalize(normalize([d.weight for d in mixture.domains]))


def _open_shards(mixture: Mixture) -> list[list[IndexedDataset]]:
    return [[IndexedDataset(prefix) for prefix in domain.prefixes] for domain in mixture.domains]


def _split_sources(
    mixture: Mixture, split: str, split_mixtures: Mapping[str, Mixture | None] | None
) -> dict[str, tuple[Mixture, str]]:
    """split name -> (mixture it comes from, split string applied to each prefix)."""
    if split_mixtures is None:
        fractions = dict(zip(SPLIT_NAMES, parse_split(split)))
        return {name: (mixture, split) for name in SPLIT_NAMES if fractions[name] > 0}
    out = {"train": (mixture, "1,0,0")}
    for name in ("valid", "test"):
        if split_mixtures.get(name) is not None:
            out[name] = (split_mixtures[name], {"valid": "0,1,0", "test": "0,0,1"}[name])
    return out


def build_domain_datasets(
    mixture: Mixture,
    seq_length: int,
    split: str = DEFAULT_SPLIT,
    seed: int = 1234,
    *,
    packing: str = "project",
    split_mixtures: Mapping[str, Mixture | None] | None = None,
    num_samples: Mapping[str, int | None] | None = None,
    cache_dir: str | None = None,
    batch_options: BatchOptions | None = None,
) -> dict[str, list[Any]]:
    """Open every domain's shards and build its train/valid/test datasets.

    Every shard prefix is split on its own (Megatron-Core's rounding, :func:`split_document_ranges`); a domain's
    split joins its prefixes' splits. ``packing="project"`` gives :class:`DomainSequences`;
    ``packing="megatron"`` gives Megatron-LM's GPTDataset order
    (:class:`~megatron_doremi.data.megatron_gpt.MegatronSequences`, one prefix per domain, sized from
    ``num_samples``: split -> requested samples, e.g. ``{"train": train_iters * global_batch_size, ...}``, and
    read from a Megatron ``cache_dir`` when it holds them). ``split_mixtures`` (per-split data paths, as
    Megatron's ``--train/valid/test-data-path``): valid/test come from their own mixtures' whole prefixes and
    ``split`` is not used; the train split is ``mixture``'s whole prefixes.

    Returns ``{"train": [...], "valid": [...], "test": [...]}``, lists in each split's mixture order; a split
    whose fraction is 0 (or that has no data path) is left out. Every dataset gets the attribute
    ``batch_options``; train datasets also ``blend_weight`` (Megatron's weight, see
    :func:`megatron_blend_weights`). Raises :class:`DataError` naming the domain when a split is too small
    to give one sample of ``seq_length``, and ``IndexedDatasetError`` naming the file for a missing/bad shard.
    """
    if packing not in PACKINGS:
        raise DataError(f"packing must be one of {', '.join(PACKINGS)}, got {packing!r}")
    options = batch_options or BatchOptions()
    targets = dict(num_samples or {})
    out: dict[str, list[Any]] = {}
    for split_name, (mix, split_string) in _split_sources(mixture, split, split_mixtures).items():
        shards = _open_shards(mix)
        datasets: list[Any] = []
        if packing == "megatron":
            weights = None if mix.weights_from_sizes else mix.weights
            sizes = _megatron_sizes(mix, weights, targets.get(split_name), split_name)
        for d, (domain, domain_shards) in enumerate(zip(mix.domains, shards)):
            if packing == "megatron":
                ds = _megatron_dataset(domain.name, domain_shards, split_name, split_string, seq_length, seed,
                                       sizes[d], cache_dir, split)  # fmt: skip
            else:
                ranges = [
                    split_document_ranges(s.num_documents, split_string)[split_name] for s in domain_shards
                ]
                if sum(hi - lo for lo, hi in ranges) <= 0:
                    num_docs = sum(s.num_documents for s in domain_shards)
                    raise DataError(
                        f"domain {domain.name!r}: the {split_name} split of its {num_docs} documents is empty "
                        f"(split {split!r}); add documents or change the split"
                    )
                ds = DomainSequences(
                    domain.name, domain_shards, split_name, ranges, seq_length, seed, shuffle=True
                )
            ds.batch_options = options
            datasets.append(ds)
        if split_name == "train":
            blend = megatron_blend_weights(mix, [len(ds) for ds in datasets])
            for ds, w in zip(datasets, blend.tolist()):
                ds.blend_weight = w
        out[split_name] = datasets
    return out


def _megatron_sizes(
    mix: Mixture, weights: np.ndarray | None, target: int | None, split_name: str = "train"
) -> list[int | None]:
    """Per-domain GPTDataset sizes; an evaluation split without a target (``eval_iters: "all"``) is one epoch
    of every domain."""
    from megatron_doremi.data.megatron_gpt import megatron_num_samples

    if target is None and split_name != "train":
        return [None] * mix.num_domains

    if weights is not None and target is None:
        raise DataError(
            "packing 'megatron' sizes a weighted blend from the run's sample counts (train_iters x "
            "global_batch_size, and the eval counts): pass num_samples"
        )
    return megatron_num_samples(None if weights is None else weights.tolist(), mix.num_domains, target)


def _megatron_dataset(
    name: str,
    shards: list[IndexedDataset],
    split_name: str,
    split_string: str,
    seq_length: int,
    seed: int,
    num_samples: int | None,
    cache_dir: str | None,
    split: str,
) -> Any:
    from megatron_doremi.data.megatron_gpt import MegatronSequences

    if len(shards) != 1:
        raise DataError(
            f"domain {name!r} has {len(shards)} prefixes: packing 'megatron' reproduces Megatron's order of one "
            "dataset per prefix; list each prefix as its own domain (a --data-path does) or use packing 'project'"
        )
    lo, hi = split_document_ranges(len(shards[0]), split_string)[split_name]
    if hi <= lo:
        raise DataError(
            f"domain {name!r}: the {split_name} split of its {len(shards[0])} sequences is empty (split "
            f"{split!r}); add documents or change the split"
        )
    return MegatronSequences(name, shards[0], split_name, (lo, hi), seq_length, seed, num_samples, cache_dir)


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
        datasets: Sequence[Any],
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
        self.options: BatchOptions | None = getattr(self.datasets[0], "batch_options", None)
        self._use_megatron_weights()

    def _use_megatron_weights(self) -> None:
        """Exact blend over datasets that know Megatron's blend weights: run the greedy on those, bit for bit."""
        weights = [getattr(ds, "blend_weight", None) for ds in self.datasets]
        if self.schedule.mode == "exact" and all(w is not None for w in weights):
            self.schedule.use_megatron_weights(weights)

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
        return [
            samples_to_batch(samples[s : s + mb], domains[s : s + mb], self.options)
            for s in range(0, hi - lo, mb)
        ]

    def set_weights(self, weights: Sequence[float]) -> None:
        """Sample with new weights from the next unconsumed global sample on (appends a schedule segment).

        Called again before any sample of the last segment was consumed, it replaces that segment's weights.
        """
        segments = self.schedule.segments
        if segments[-1][0] == self.consumed_samples:
            state = self.schedule.state_dict()
            state["segments"][-1][1] = [float(w) for w in weights]
            self.schedule = BlendSchedule.from_state_dict(state)
            self._use_megatron_weights()
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
        self._use_megatron_weights()
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
        yield samples_to_batch(
            samples, np.full(len(ks), domain_id, dtype=np.int64), getattr(dataset, "batch_options", None)
        )
