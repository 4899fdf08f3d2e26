"""Build the run's mixer from the run config's ``mixer`` section (a registry of ``type`` -> builder).

Types: ``static`` (fixed weights), ``doremi`` (DoReMi step 2, see :func:`doremi_kwargs`), ``odm`` (online data
mixing, :mod:`megatron_doremi.mixers.odm`), ``aioli`` (Aioli, :mod:`megatron_doremi.mixers.aioli`; needs
held-out data, measured by :mod:`.mixer_eval`). Builders see only the spec and the mixture (names, weights), never
the engine; the DoReMi reference model itself is the trainer's business (:mod:`.reference`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from megatron_doremi.data.mixture import Mixture, MixtureError
from megatron_doremi.mixers.base import Mixer, MixerError

__all__ = [
    "DOREMI_DEFAULTS",
    "MIXER_BUILDERS",
    "build_mixer",
    "check_mixer_spec",
    "doremi_kwargs",
    "register_mixer",
]

MixerBuilder = Callable[[dict[str, Any], Mixture], Mixer]
MIXER_BUILDERS: dict[str, MixerBuilder] = {}

#: the ``doremi`` mixer keys and their defaults (``reference`` has none: it must be given, null = debug mode)
DOREMI_DEFAULTS: dict[str, Any] = {
    "step_size": 1.0,
    "smoothing": 1e-3,
    "reference_weights": None,
    "sampling_weights": None,
    "initial_weights": None,
    "warmup_step": 0,
    "update_step": 1,
    "update_times": None,
    "resample": False,
    "initial_score": 0.0,
}


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


def _weights_arg(value: Any, key: str, mixture: Mixture, allow: tuple[str, ...] = ()) -> Any:
    """``null``/"uniform" -> None (the mixer's uniform default), "mixture" -> the mixture's weights,
    a name in ``allow`` ("reference", "sampling") -> itself (resolved by the caller), lists/maps unchanged."""
    if value is None or value == "uniform":
        return None
    if value == "mixture":
        return [float(w) for w in mixture.weights]
    if isinstance(value, str) and value in allow:
        return value
    if isinstance(value, str):
        choices = ", ".join(['"uniform"', '"mixture"', *(f'"{a}"' for a in allow)])
        raise MixerError(
            f"mixer.{key}: expected null, {choices}, a list in domain order or {{name: weight}}, got {value!r}"
        )
    return value


def doremi_kwargs(spec: dict[str, Any], mixture: Mixture) -> dict[str, Any]:
    """``DoReMiMixer`` keyword arguments from a ``{"type": "doremi", ...}`` spec (MixerError naming the key).

    ``reference_weights`` (the weights the reference model was trained on; recorded, checked against the
    reference checkpoint): null or "uniform" (default), "mixture" (the mixture's weights), a list in domain order
    or ``{name: w}``. ``sampling_weights`` (s: the proxy samples domains with them, and the loss multipliers are
    α/s): the same forms plus "reference" (= reference_weights); default uniform, as the authors' proxy runs.
    ``initial_weights`` (α_0): the same forms plus "reference" and "sampling"; default uniform.
    ``initial_score``: λ_0 of every domain (default 0; the authors' code uses log(vocab size)).
    """
    known = {"type", "reference", *DOREMI_DEFAULTS}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise MixerError(
            f"mixer: unknown key(s) {unknown} for type 'doremi' (known: {', '.join(sorted(known - {'type'}))})"
        )
    if "reference" not in spec:
        raise MixerError(
            'mixer.reference is required for type \'doremi\': {"checkpoint": "<step 1 checkpoint dir>"}, or '
            "null to run without a reference model (a debug mode, not DoReMi)"
        )
    s = {**DOREMI_DEFAULTS, **spec}
    ref = _weights_arg(s["reference_weights"], "reference_weights", mixture)
    sampling = _weights_arg(s["sampling_weights"], "sampling_weights", mixture, ("reference",))
    if isinstance(sampling, str):  # "reference"
        sampling = ref
    init = _weights_arg(s["initial_weights"], "initial_weights", mixture, ("reference", "sampling"))
    if isinstance(init, str):
        init = ref if init == "reference" else sampling
    return {
        "reference_weights": ref,
        "sampling_weights": sampling,
        "initial_weights": init,
        "step_size": s["step_size"],
        "smoothing": s["smoothing"],
        "warmup_step": s["warmup_step"],
        "update_step": s["update_step"],
        "update_times": s["update_times"],
        "resample": s["resample"],
        "initial_score": s["initial_score"],
        "use_reference": spec["reference"] is not None,
    }


def _doremi(spec: dict[str, Any], mixture: Mixture) -> Mixer:
    from megatron_doremi.mixers.doremi import DoReMiMixer

    return DoReMiMixer(mixture.names, **doremi_kwargs(spec, mixture))


def _odm(spec: dict[str, Any], mixture: Mixture) -> Mixer:
    from megatron_doremi.mixers.odm import build_odm_mixer

    return build_odm_mixer(spec, mixture)


def _aioli(spec: dict[str, Any], mixture: Mixture) -> Mixer:
    from megatron_doremi.mixers.aioli import build_aioli_mixer

    return build_aioli_mixer(spec, mixture)


register_mixer("static", _static)
register_mixer("doremi", _doremi)
register_mixer("odm", _odm)
register_mixer("aioli", _aioli)


def build_mixer(spec: dict[str, Any], mixture: Mixture) -> Mixer:
    """The mixer named by ``spec["type"]`` for ``mixture``'s domains (MixerError naming the key if unknown)."""
    kind = spec.get("type", "static")
    if kind not in MIXER_BUILDERS:
        raise MixerError(f"mixer.type {kind!r} is not known; available: {', '.join(sorted(MIXER_BUILDERS))}")
    return MIXER_BUILDERS[kind](spec, mixture)


def check_mixer_spec(spec: dict[str, Any], mixture: Mixture) -> Mixer:
    """Validate ``spec`` against ``mixture`` by building the mixer (without side effects such as the DoReMi
    debug-mode warning, which the real build prints); returns the throw-away mixer."""
    if spec.get("type") == "doremi":
        from megatron_doremi.mixers.doremi import DoReMiMixer

        kwargs = doremi_kwargs(spec, mixture)
        kwargs["use_reference"] = True
        return DoReMiMixer(mixture.names, **kwargs)
    return build_mixer(spec, mixture)
