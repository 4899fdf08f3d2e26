"""DoReMi (Group-DRO) mixer: exponentiated-gradient domain weights from per-domain excess loss.

The mixer sees only the global per-domain statistics of each optimizer step (see :mod:`.base`); the engine computes
them (proxy and reference token losses, clipped excess, one all-reduce). The rule, exactly DESIGN section 4:

* ``s`` = the proxy's sampling weights (default uniform, as the authors' proxy samples), ``α_0`` = initial
  weights, both normalised float64 [D]. ``reference_weights`` (what the reference model trained on) is recorded,
  and is what ``initial_weights="reference"`` means; it enters no formula.
* After step ``t``: ``λ_d = excess_sum_d / token_count_d``; a domain with ``token_count_d == 0`` keeps its previous
  ``λ_d`` (initially ``initial_score``, default 0; the authors' code starts at log|V|). With
  ``use_reference=False`` (the ``reference: null`` debug mode) ``loss_sum`` replaces
  ``excess_sum``.
* If ``t`` is an update step (``t > warmup_step``, ``(t - warmup_step) % update_step == 0``, fewer than
  ``update_times`` updates so far): ``z = log α + η λ``; ``α' = softmax(z)``; ``α = (1 - ε) α' + ε / D``.
* ``ᾱ`` = mean of ``α_0 .. α_n`` after ``n`` updates.
* Loss multipliers for step ``t`` come from ``α_{t-1}``: ``(α_d / s_d) / Σ_e (α_e / s_e)``; the engine normalises by
  ``Σ weight`` over the global batch's tokens. With ``resample=True`` the loss is not reweighted (multipliers 1) and
  the loader samples with ``α_t`` instead; :meth:`DoReMiMixer.observe` then returns True on every update.
* Non-finite ``excess_sum``/``loss_sum``/``token_count`` (or a negative count) skips the step's λ and α update with a
  warning (counted in ``num_skipped``); α is never poisoned.

Determinism: all arithmetic is scalar Python float64 (``math.log``/``math.exp``/``math.fsum``, fixed element order), so
identical inputs give identical bits on every rank, independent of numpy's SIMD code paths. State round-trips exactly
through JSON (floats stored as ``float.hex`` strings).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from megatron_doremi.mixers.base import Mixer, MixerError, normalize_weights

__all__ = ["DoReMiMixer"]

logger = logging.getLogger("megatron_doremi.mixers.doremi")

_STATE_VERSION = 1

WeightsArg = Sequence[float] | np.ndarray | Mapping[str, float] | None


def _hex_list(values: Sequence[float]) -> list[str]:
    return [float(v).hex() for v in values]


def _from_hex_list(values: Any, length: int, key: str) -> list[float]:
    if not isinstance(values, list) or len(values) != length:
        raise MixerError(f"doremi mixer state: {key!r} must be a list of {length} hex floats")
    try:
        return [float.fromhex(v) if isinstance(v, str) else float(v) for v in values]
    except (TypeError, ValueError):
        raise MixerError(f"doremi mixer state: {key!r} has a value that is not a float hex string") from None


def _check_int(value: Any, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < minimum:
        raise MixerError(f"doremi mixer: {key} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_bool(value: Any, key: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise MixerError(f"doremi mixer: {key} must be true or false, got {value!r}")
    return bool(value)


def _check_float(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise MixerError(f"doremi mixer: {key} must be a number, got {value!r}")
    return float(value)


class DoReMiMixer(Mixer):
    """DoReMi step-2 mixer over ``domain_names`` (the order of every [D] array it takes or returns).

    Args (keyword): ``sampling_weights`` s (the proxy samples with them; default uniform), ``reference_weights``
    (the reference model's training weights, recorded; default uniform), ``initial_weights`` α_0 (default uniform),
    ``step_size`` η > 0, ``smoothing`` ε in [0, 1], ``warmup_step`` >= 0, ``update_step`` >= 1, ``update_times``
    (None = unlimited, else >= 0), ``resample``, ``use_reference``. Weights may be a [D] sequence in domain order or
    a ``{name: weight}`` mapping naming every domain. Invalid values raise :class:`MixerError` naming the key.
    """

    name = "doremi"

    def __init__(
        self,
        domain_names: Sequence[str],
        *,
        reference_weights: WeightsArg = None,
        sampling_weights: WeightsArg = None,
        initial_weights: WeightsArg = None,
        step_size: float = 1.0,
        smoothing: float = 1e-3,
        warmup_step: int = 0,
        update_step: int = 1,
        update_times: int | None = None,
        resample: bool = False,
        use_reference: bool = True,
        initial_score: float = 0.0,
    ) -> None:
        super().__init__(domain_names)
        if len(set(self.domain_names)) != self.num_domains:
            raise MixerError(f"doremi mixer: domain_names must be unique, got {list(self.domain_names)}")
        k = self.num_domains
        self.step_size = _check_float(step_size, "step_size")
        if not math.isfinite(self.step_size) or self.step_size <= 0:
            raise MixerError(f"doremi mixer: step_size (eta) must be finite and > 0, got {step_size!r}")
        self.smoothing = _check_float(smoothing, "smoothing")
        if not (0.0 <= self.smoothing <= 1.0):  # also rejects nan
            raise MixerError(f"doremi mixer: smoothing (epsilon) must be in [0, 1], got {smoothing!r}")
        self.warmup_step = _check_int(warmup_step, "warmup_step", 0)
        self.update_step = _check_int(update_step, "update_step", 1)
        self.update_times = None if update_times is None else _check_int(update_times, "update_times", 0)
        self.resample = _check_bool(resample, "resample")
        self.use_reference = _check_bool(use_reference, "use_reference")
        self.initial_score = _check_float(initial_score, "initial_score")
        if not math.isfinite(self.initial_score):
            raise MixerError(f"doremi mixer: initial_score must be finite, got {initial_score!r}")
        self._ref: list[float] = self._resolve_weights(reference_weights, "reference_weights")
        self._s: list[float] = self._resolve_weights(sampling_weights, "sampling_weights")
        self._init: list[float] = self._resolve_weights(initial_weights, "initial_weights")
        if not self.resample and min(self._s) <= 0.0:
            raise MixerError(
                "doremi mixer: sampling_weights must all be > 0 when reweighting the loss (multiplier α/s); "
                f"got {self._s} (drop the domain from the mixture, or use resample)"
            )
        if not self.use_reference:
            logger.warning(
                "\n"
                + "!" * 100
                + "\n!! DoReMi mixer WITHOUT a reference model (reference: null): the domain scores are "
                "the proxy's own loss,\n!! not the excess loss over a reference. This is a DEBUG mode, NOT DoReMi; "
                "do not use its weights.\n" + "!" * 100
            )
        # Mutable state.
        self._alpha: list[float] = list(self._init)
        self._alpha_sum: list[float] = list(self._init)  # α_0 + α_1 + ... + α_n
        self._alpha_count: int = 1  # n + 1
        self._scores: list[float] = [self.initial_score] * k  # λ (kept per domain across steps)
        self._excess: list[float | None] = [None] * k  # last valid step's mean score input per domain
        self.num_updates: int = 0
        self.num_skipped: int = 0
        self.last_update_step: int | None = None
        self.last_observed_step: int | None = None

    # ---- construction helpers -----------------------------------------------------------------------------------

    def _resolve_weights(self, weights: WeightsArg, key: str) -> list[float]:
        k = self.num_domains
        if weights is None:
            return [1.0 / k] * k
        if isinstance(weights, Mapping):
            missing = [n for n in self.domain_names if n not in weights]
            unknown = sorted(str(n) for n in weights if n not in self.domain_names)
            if missing or unknown:
                raise MixerError(
                    f"doremi mixer: {key} must name exactly the domains {list(self.domain_names)}; "
                    f"missing {missing}, unknown {unknown}"
                )
            weights = [weights[n] for n in self.domain_names]
        try:
            arr = normalize_weights(weights, k, f"doremi mixer: {key}")
        except (TypeError, ValueError) as exc:
            if isinstance(exc, MixerError):
                raise
            raise MixerError(f"doremi mixer: {key}: expected {k} numbers, got {weights!r}") from None
        return [float(v) for v in arr]

    # ---- the Mixer interface ------------------------------------------------------------------------------------

    def sampling_weights(self) -> np.ndarray:
        """float64 [D]: α_t in resample mode, else the proxy's sampling weights s."""
        return np.array(self._alpha if self.resample else self._s, dtype=np.float64)

    def loss_multipliers(self) -> np.ndarray:
        """float64 [D] for the next step: ``(α_d / s_d) / Σ_e(α_e / s_e)`` with the current α (ones when resampling)."""
        if self.resample:
            return np.ones(self.num_domains, dtype=np.float64)
        ratio = [a / s for a, s in zip(self._alpha, self._s)]
        total = math.fsum(ratio)
        return np.array([r / total for r in ratio], dtype=np.float64)

    def is_update_step(self, step: int) -> bool:
        """Whether ``observe(step, ...)`` would update α (given valid statistics and the current update count)."""
        if step <= self.warmup_step or (step - self.warmup_step) % self.update_step:
            return False
        return self.update_times is None or self.num_updates < self.update_times

    def observe(self, step: int, per_domain_stats: dict[str, np.ndarray]) -> bool:
        """Take step ``step``'s global stats; update λ, and α on update steps. True iff resampling and α changed.

        ``per_domain_stats``: ``excess_sum`` (or ``loss_sum`` when ``use_reference`` is False) and ``token_count``,
        float64 [D], summed over the global batch. ``step`` must increase from call to call.
        """
        step = int(step)
        if self.last_observed_step is not None and step <= self.last_observed_step:
            raise MixerError(
                f"doremi mixer: observe(step={step}) after step {self.last_observed_step}; steps must increase"
            )
        key = "excess_sum" if self.use_reference else "loss_sum"
        sums = self._stat(per_domain_stats, key)
        counts = self._stat(per_domain_stats, "token_count")
        self.last_observed_step = step
        update = self.is_update_step(step)
        bad = [
            n
            for n, s, c in zip(self.domain_names, sums, counts)
            if not (math.isfinite(s) and math.isfinite(c)) or c < 0
        ]
        if bad:
            self.num_skipped += 1
            logger.warning(
                "doremi mixer: step %d has non-finite or negative %s/token_count for domain(s) %s; "
                "%s (skipped so far: %d)",
                step,
                key,
                bad,
                "skipping this domain-weight update, α unchanged" if update else "scores not updated",
                self.num_skipped,
            )
            return False
        for d, (s, c) in enumerate(zip(sums, counts)):
            if c > 0:
                value = s / c
                self._scores[d] = value
                self._excess[d] = value
            else:
                self._excess[d] = None
        if not update:
            return False
        self._update()
        self.last_update_step = step
        return self.resample

    def _update(self) -> None:
        """One exponentiated-gradient step with smoothing; scalar float64 in a fixed order."""
        k = self.num_domains
        eta, eps = self.step_size, self.smoothing
        # softmax(log α + η λ), shifted by max λ first (so η λ cannot overflow) and normalised by the sum rather
        # than by subtracting a log-sum-exp: with λ ~ 1e15 and tied domains, z - lse loses every digit of log α
        lam_max = max(self._scores)
        z = [
            (math.log(a) if a > 0.0 else -math.inf) + eta * (lam - lam_max)
            for a, lam in zip(self._alpha, self._scores)
        ]
        zmax = max(z)  # finite: α has a positive entry and λ is finite
        unnorm = [math.exp(v - zmax) for v in z]
        total = math.fsum(unnorm)
        new = [(1.0 - eps) * (u / total) + eps / k for u in unnorm]
        self._alpha = new
        self._alpha_sum = [acc + a for acc, a in zip(self._alpha_sum, new)]
        self._alpha_count += 1
        self.num_updates += 1

    def _stat(self, stats: Mapping[str, Any], key: str) -> list[float]:
        if key not in stats:
            raise MixerError(f"doremi mixer: per-domain stats lack {key!r} (got keys {sorted(stats)})")
        arr = np.asarray(stats[key], dtype=np.float64).reshape(-1)
        if arr.shape != (self.num_domains,):
            raise MixerError(
                f"doremi mixer: stats[{key!r}] must have {self.num_domains} values (one per domain), got {arr.size}"
            )
        return [float(v) for v in arr]

    # ---- read-only views ----------------------------------------------------------------------------------------

    @property
    def weights(self) -> np.ndarray:
        """α_t, float64 [D] (a copy)."""
        return np.array(self._alpha, dtype=np.float64)

    @property
    def average_weights(self) -> np.ndarray:
        """ᾱ = (α_0 + ... + α_n) / (n + 1), float64 [D]: the weights DoReMi step 3 trains on."""
        return np.array([a / self._alpha_count for a in self._alpha_sum], dtype=np.float64)

    @property
    def scores(self) -> np.ndarray:
        """λ, float64 [D]: the latest per-domain score (mean clipped excess loss per token)."""
        return np.array(self._scores, dtype=np.float64)

    @property
    def reference_weights(self) -> np.ndarray:
        """The reference model's training weights (recorded), float64 [D]."""
        return np.array(self._ref, dtype=np.float64)

    @property
    def proxy_sampling_weights(self) -> np.ndarray:
        """s, float64 [D]: the proxy's sampling weights and the denominator of the loss multipliers α/s."""
        return np.array(self._s, dtype=np.float64)

    @property
    def initial_weights(self) -> np.ndarray:
        return np.array(self._init, dtype=np.float64)

    def log_dict(self) -> dict[str, Any]:
        """Fields for the step's metrics line: ``{name: value}`` maps of α_t, ᾱ, λ and the step's mean excess."""
        names = self.domain_names
        return {
            "domain_weights": dict(zip(names, self._alpha)),
            "avg_domain_weights": {n: float(v) for n, v in zip(names, self.average_weights)},
            "perdomain_scores": dict(zip(names, self._scores)),
            "excess": dict(zip(names, self._excess)),
            "doremi_updates": self.num_updates,
            "doremi_skipped": self.num_skipped,
        }

    def history_record(self, step: int, timestamp: float) -> dict[str, Any]:
        """One ``doremi_weights.jsonl`` line: lists in ``domain_names`` order (``excess`` None for absent domains)."""
        return {
            "step": int(step),
            "timestamp": float(timestamp),
            "domain_names": list(self.domain_names),
            "domain_weights": list(self._alpha),
            "avg_domain_weights": [float(v) for v in self.average_weights],
            "perdomain_scores": list(self._scores),
            "excess": list(self._excess),
        }

    # ---- checkpoint state -----------------------------------------------------------------------------------------

    def _hparams(self) -> dict[str, Any]:
        return {
            "step_size": self.step_size.hex(),
            "smoothing": self.smoothing.hex(),
            "warmup_step": self.warmup_step,
            "update_step": self.update_step,
            "update_times": self.update_times,
            "resample": self.resample,
            "use_reference": self.use_reference,
            "reference_weights": _hex_list(self._ref),
            "sampling_weights": _hex_list(self._s),
            "initial_weights": _hex_list(self._init),
            "initial_score": self.initial_score.hex(),
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-able; floats as ``float.hex`` strings so a JSON round trip is exact (plain floats under ``info``)."""
        return {
            "type": self.name,
            "version": _STATE_VERSION,
            "domain_names": list(self.domain_names),
            "hparams": self._hparams(),
            "weights": _hex_list(self._alpha),
            "weights_sum": _hex_list(self._alpha_sum),
            "weights_count": self._alpha_count,
            "scores": _hex_list(self._scores),
            "excess": [None if v is None else float(v).hex() for v in self._excess],
            "num_updates": self.num_updates,
            "num_skipped": self.num_skipped,
            "last_update_step": self.last_update_step,
            "last_observed_step": self.last_observed_step,
            "info": {
                "domain_weights": list(self._alpha),
                "avg_domain_weights": self.average_weights.tolist(),
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; MixerError naming the domain list or hyper-parameter that differs."""
        if not isinstance(state, Mapping):
            raise MixerError(f"doremi mixer state must be an object, got {type(state).__name__}")
        if state.get("type") != self.name:
            raise MixerError(f"checkpointed mixer is {state.get('type')!r}, this run uses {self.name!r}")
        if state.get("version") != _STATE_VERSION:
            raise MixerError(f"doremi mixer state version {state.get('version')!r} is not {_STATE_VERSION}")
        self._check_state_domains(state)
        saved = state.get("hparams")
        if not isinstance(saved, Mapping):
            raise MixerError("doremi mixer state: missing 'hparams'")
        mine = self._hparams()
        if "sampling_weights" not in saved:  # saved before sampling_weights existed: s was reference_weights
            saved = {**saved, "sampling_weights": saved.get("reference_weights")}
        if "initial_score" not in saved:  # saved before initial_score existed: λ_0 was 0
            saved = {**saved, "initial_score": (0.0).hex()}
        for key, value in mine.items():
            if saved.get(key) != value:
                raise MixerError(
                    f"doremi mixer: {key} differs from the checkpoint's ({_show(saved.get(key))} in the checkpoint, "
                    f"{_show(value)} in this run); resume with the same {key} or start a new run"
                )
        k = self.num_domains
        alpha = _from_hex_list(state.get("weights"), k, "weights")
        alpha_sum = _from_hex_list(state.get("weights_sum"), k, "weights_sum")
        scores = _from_hex_list(state.get("scores"), k, "scores")
        excess_raw = state.get("excess")
        if not isinstance(excess_raw, list) or len(excess_raw) != k:
            raise MixerError(f"doremi mixer state: 'excess' must be a list of {k} values")
        excess = [None if v is None else _from_hex_list([v], 1, "excess")[0] for v in excess_raw]
        count = state.get("weights_count")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise MixerError(f"doremi mixer state: 'weights_count' must be an integer >= 1, got {count!r}")
        if not all(math.isfinite(v) and v >= 0 for v in alpha + alpha_sum) or not all(
            map(math.isfinite, scores)
        ):
            raise MixerError("doremi mixer state: non-finite or negative weights/scores")
        self._alpha, self._alpha_sum, self._alpha_count = alpha, alpha_sum, count
        self._scores, self._excess = scores, excess
        self.num_updates = int(state.get("num_updates", 0))
        self.num_skipped = int(state.get("num_skipped", 0))
        lu, lo = state.get("last_update_step"), state.get("last_observed_step")
        self.last_update_step = None if lu is None else int(lu)
        self.last_observed_step = None if lo is None else int(lo)


def _show(value: Any) -> str:
    """Hex floats in hyper-parameters shown as decimals in error messages."""
    if isinstance(value, str):
        try:
            return repr(float.fromhex(value))
        except ValueError:
            return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return repr(value)
