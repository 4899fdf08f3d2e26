"""Static mixer: sample with fixed weights, every loss multiplier 1 (DoReMi steps 1 and 3, baselines)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from megatron_doremi.mixers.base import Mixer, MixerError, normalize_weights

logger = logging.getLogger(__name__)

__all__ = ["StaticMixer"]


class StaticMixer(Mixer):
    """Fixed sampling weights ``weights`` (normalised, float64 [D]); never changes them."""

    name = "static"

    def __init__(self, domain_names: Sequence[str], weights: Sequence[float] | np.ndarray) -> None:
        super().__init__(domain_names)
        self._weights = normalize_weights(weights, self.num_domains, "mixer weights")

    def sampling_weights(self) -> np.ndarray:
        return self._weights.copy()

    def state_dict(self) -> dict[str, Any]:
        return {"type": self.name, "domain_names": list(self.domain_names), "weights": self._weights.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("type") != self.name:
            raise MixerError(f"checkpointed mixer is {state.get('type')!r}, this run uses {self.name!r}")
        self._check_state_domains(state)
        saved = normalize_weights(state["weights"], self.num_domains, "checkpointed mixer weights")
        if not np.array_equal(saved, self._weights):
            # The loader's checkpointed blend schedule keeps sampling with the saved weights; stay consistent.
            logger.warning(
                "static mixer: the checkpoint's weights %s differ from the config's %s; continuing with the "
                "checkpoint's (start a new run to change them)",
                np.round(saved, 4).tolist(),
                np.round(self._weights, 4).tolist(),
            )
            self._weights = saved
