"""The mixer interface: how a training loop asks "with which weights to sample, how to weight the loss".

A mixer sees only plain per-domain statistics (numpy arrays), never the engine or the model. The loop calls, for
every optimizer step ``t`` (1-based, counting completed steps):

1. ``loss_multipliers()`` before the step's first micro-batch: per-domain loss multipliers used for every
   micro-batch of the step (consistent under gradient accumulation);
2. the forward/backward/optimizer step;
3. ``observe(t, stats)`` with the step's per-domain statistics summed over the *global* batch (all micro-batches,
   all ranks; identical on every rank). If it returns True, the loop resamples with ``sampling_weights()`` from the
   next unconsumed sample on (``MixtureDataLoader.set_weights``).

``stats`` keys (fp64 arrays of shape [D]): ``loss_sum`` (token loss summed per domain), ``excess_sum`` (clipped
excess over a reference model; equals ``loss_sum`` when there is no reference), ``token_count`` (scored tokens).
Every rank computes the same answers from the same inputs, so mixers must be deterministic functions of their
state and the statistics (no wall clock, no unseeded randomness).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["Mixer", "MixerError", "normalize_weights"]


class MixerError(ValueError):
    """Invalid mixer configuration or state; the message names the key."""


def normalize_weights(
    weights: Sequence[float] | np.ndarray, num_domains: int, what: str = "weights"
) -> np.ndarray:
    """Validate and normalise domain weights to a float64 [D] array summing to 1 (MixerError naming ``what``)."""
    arr = np.asarray(weights, dtype=np.float64).reshape(-1)
    if arr.shape != (num_domains,):
        raise MixerError(f"{what}: expected {num_domains} values (one per domain), got {arr.size}")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise MixerError(f"{what}: values must be finite and >= 0, got {arr.tolist()}")
    total = float(arr.sum())
    if total <= 0:
        raise MixerError(f"{what}: all zero; at least one domain must have weight > 0")
    return arr / total


class Mixer(abc.ABC):
    """Base class. ``domain_names`` fixes the domain order of every array the mixer takes or returns."""

    #: registry name of the mixer (``mixer.type`` in the run config)
    name: str = "mixer"

    def __init__(self, domain_names: Sequence[str]) -> None:
        if not domain_names:
            raise MixerError("a mixer needs at least one domain")
        self.domain_names: tuple[str, ...] = tuple(domain_names)

    @property
    def num_domains(self) -> int:
        return len(self.domain_names)

    @abc.abstractmethod
    def sampling_weights(self) -> np.ndarray:
        """float64 [D], sums to 1: the weights to sample the next batches with."""

    def loss_multipliers(self) -> np.ndarray:
        """float64 [D]: per-domain multipliers of the token loss for the next step (default all ones)."""
        return np.ones(self.num_domains, dtype=np.float64)

    def observe(self, step: int, per_domain_stats: dict[str, np.ndarray]) -> bool:
        """Take the global per-domain statistics of completed step ``step``; True if sampling weights changed."""
        return False

    def log_dict(self) -> dict[str, Any]:
        """Extra JSON-able fields for the step's metrics line (default: nothing)."""
        return {}

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """JSON-able state, enough for :meth:`load_state_dict` to continue bit-identically."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; MixerError when it does not fit this mixer's domains."""

    def _check_state_domains(self, state: dict[str, Any]) -> None:
        names = tuple(state.get("domain_names", ()))
        if names != self.domain_names:
            raise MixerError(
                f"{self.name} mixer state is for domains {list(names)} but this run has {list(self.domain_names)}"
            )
