"""Held-out per-domain losses for online mixers that ask for them (Aioli), and the loop's hook that feeds them.

A mixer with ``heldout_request(step)`` / ``observe_heldout(step, stats)`` (:mod:`megatron_doremi.mixers.aioli`)
is asked, before every optimizer step (``step`` = completed steps), whether it needs the held-out losses now. If
so, every rank evaluates the same fixed validation samples (each domain's first ``heldout_samples``) through
:func:`~megatron_doremi.training.evaluation.evaluate_domains` (the same ``domain_cross_entropy`` op and rank
split as the run's evaluation; one fp64 all-reduce), so every rank passes identical numbers to its mixer and
gets identical proportions. Changed sampling weights become a blend schedule segment at the next unconsumed
sample (``MixtureDataLoader.set_weights``); an EG update is appended to rank 0's weights log.

The hook runs before the step's batch is drawn, after any checkpoint of the previous step, so a resumed run
repeats it from the same restored state: the weights trajectory is that of an uninterrupted run.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from megatron_doremi.training.config import ConfigError

__all__ = ["check_heldout_config", "heldout_stats", "update_from_heldout"]


def check_heldout_config(source: str, data: Mapping[str, Any], mixer: Mapping[str, Any]) -> None:
    """ConfigError unless a mixer that needs held-out losses has validation data and a changeable blend."""
    from megatron_doremi.data.sequences import parse_split

    kind = mixer.get("type")
    if data.get("blend_mode") == "exact":
        raise ConfigError(
            f'{source}: mixer.type {kind!r} changes the sampling weights during the run; data.blend_mode "exact" '
            'supports fixed weights only (use "periodic")'
        )
    if data.get("train_path") is not None:
        if not data.get("valid_path"):
            raise ConfigError(
                f"{source}: mixer.type {kind!r} needs held-out data: set data.valid_path (with the training "
                "domains) next to data.train_path"
            )
        return
    try:
        valid = parse_split(data["split"])[1]
    except Exception as exc:  # noqa: BLE001 - the split's own check reports it elsewhere
        raise ConfigError(f"{source}: data.split: {exc}") from None
    if valid <= 0:
        raise ConfigError(
            f"{source}: mixer.type {kind!r} needs held-out data, but data.split {data['split']!r} has no "
            'validation part (e.g. "90,5,5")'
        )


def heldout_stats(trainer: Any, num_samples: int) -> dict[str, np.ndarray]:
    """Collective: global per-domain ``loss_sum`` and ``token_count`` (fp64 [D]) on the validation split."""
    from megatron_doremi.training.evaluation import evaluate_domains

    datasets = trainer.datasets.get("valid")
    names = [ds.name for ds in datasets] if datasets else []
    if names != list(trainer.names):
        raise ConfigError(
            f"mixer {trainer.mixer.name!r} needs held-out data for the training domains {list(trainer.names)}; "
            f"the validation split has {names or 'none'} (check data.split / data.valid_path)"
        )
    engine = trainer.engine
    engine.eval()

    def forward(input_ids: Any, **extra: Any) -> Any:
        return engine(input_ids=input_ids, use_cache=False, **extra).logits

    try:
        result = evaluate_domains(
            forward,
            datasets,
            names,
            num_samples,
            trainer.cfg.eval_micro_batch_size,
            trainer.rank,
            trainer.world_size,
            trainer.device,
        )
    finally:
        engine.train()
    # per-domain means of the all-reduced sums (identical on every rank); a domain without tokens gives 0 / 0
    doms = [result["domains"][n] for n in names]
    count = np.array([float(d["tokens"]) for d in doms], dtype=np.float64)
    loss = np.array([0.0 if d["loss"] is None else float(d["loss"]) for d in doms], dtype=np.float64)
    return {"loss_sum": loss * count, "token_count": count}


def heldout_samples(trainer: Any) -> int:
    """Validation samples per domain per measurement: ``mixer.heldout_samples``, else the run's eval samples,
    else one global batch."""
    n = getattr(trainer.mixer, "heldout_samples", None)
    return int(n or trainer.eval_num_samples() or trainer.cfg.global_batch_size)


def update_from_heldout(trainer: Any) -> None:
    """Collective, at the start of every step: feed the mixer held-out losses when it asks for them."""
    mixer = trainer.mixer
    request = getattr(mixer, "heldout_request", None)
    if request is None or not request(trainer.step):
        return
    stats = heldout_stats(trainer, heldout_samples(trainer))
    if mixer.observe_heldout(trainer.step, stats):
        trainer.loader.set_weights(mixer.sampling_weights())
    log = getattr(trainer, "_weights_log", None)
    if log is None or getattr(mixer, "updated_at", None) != trainer.step:
        return
    # A run resumed from the checkpoint of this very step may find this update's record already written by the
    # killed attempt (the hook runs after the save): the same state gave the same record, keep that one.
    if log.last_step is None or log.last_step < trainer.step:
        log.append(mixer.history_record(trainer.step, time.time()))
