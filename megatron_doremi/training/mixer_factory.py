"""Build the run's mixer from the run config's ``mixer`` section (a registry later issues extend)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from megatron_doremi.data.mixture import Mixture, MixtureError
from megatron_doremi.mixers.base import Mixer, MixerError

__all__ = ["MIXER_BUILDERS", "build_mixer", "register_mixer"]

MixerBuilder = Callable[[dict[str, Any], Mixture], Mixer]
MIXER_BUILDERS: dict[str, MixerBuilder] = {}


def register_mixer(name: str, builder: MixerBuilder) -> None:
    """Make ``{"type": name, ...}`` buildable; ``builder(spec, mixture)`` validates its own keys."""
    MIXER_BUILDERS[name] = builder


def _static(spec: dict[str, Any], mixture: Mixture) -> Mixer:
    from megatron_doremi.mixers.static import StaticMixer

    unknown = set(spec) - {"type", "weights"}
    if unknown:
        raise MixerError(f"mixer: unknown key(s) {sorted(unknown)} for type 'static' (known: weights)")
    weights = spec.get("weights")
    if weights is None:
        return StaticMixer(mixture.names, mixture.weights)
    try:
        resolved = mixture.with_weights(weights).weights
    except MixtureError as exc:
        raise MixerError(f"mixer.weights: {exc}") from None
    return StaticMixer(mixture.names, resolved)


register_mixer("static", _static)


def build_mixer(spec: dict[str, Any], mixture: Mixture) -> Mixer:
    """The mixer named by ``spec["type"]`` for ``mixture``'s domains (MixerError naming the key if unknown)."""
    kind = spec.get("type", "static")
    if kind not in MIXER_BUILDERS:
        raise MixerError(f"mixer.type {kind!r} is not known; available: {', '.join(sorted(MIXER_BUILDERS))}")
    return MIXER_BUILDERS[kind](spec, mixture)
