"""ODM: online data mixing as an Exp3 bandit over per-domain training loss (Albalak et al. 2023).

Each domain is an arm; its reward is the training loss on that domain (more loss = more left to learn). With
K domains, ``t`` completed updates and smoothed reward estimates R̂ (initially 0, so the first weights are
uniform):

    ε_t   = min(1/K, sqrt(ln K / (K t)))                       (ε_0 = 1/K)
    π_t   = (1 - K ε_t) softmax(ε_{t-1} R̂) + ε_t               (the sampling weights; every π_d >= ε_t)
    R̂_d  ← α R̂_d + (1 - α) ℓ_d / π_d      for every domain with tokens in the step (importance-weighted)

where ``ℓ_d = loss_sum_d / token_count_d`` over the step's global batch. The paper samples one domain per
batch; here a batch mixes domains by π, every domain present in the batch is observed, and the 1/π importance
weight keeps the paper's estimator (it damps domains that are already sampled often). Domains without tokens in
a step keep their reward. Since R̂ is a moving average (not Exp3's running sum) and ε_t decays like
1/sqrt(t), the weights sharpen early and flatten slowly back toward uniform later, as in the paper's algorithm.
Exploration is the ε_t floor on π (the loader's deterministic blend draws from π): no randomness, so every rank
computes the same bits from the same all-reduced statistics.

Options (run config ``mixer`` section, see :func:`build_odm_mixer`): ``alpha`` (smoothing, default 0.9, as in
the paper's code), ``update_interval`` (update every N steps, default 1), ``warmup_steps`` (no updates before,
default 0), ``importance_weighting`` (default true). Loss multipliers are all ones (ODM only changes sampling).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from megatron_doremi.mixers.base import Mixer, MixerError

__all__ = ["ODMMixer", "build_odm_mixer"]

_OPTIONS = ("alpha", "update_interval", "warmup_steps", "importance_weighting")


def _hex(values: np.ndarray) -> list[str]:
    return [float(v).hex() for v in values]


def _unhex(values: Any, length: int, key: str) -> np.ndarray:
    if not isinstance(values, list) or len(values) != length:
        raise MixerError(f"odm mixer state: {key!r} must be a list of {length} hex floats")
    try:
        return np.array(
            [float.fromhex(v) if isinstance(v, str) else float(v) for v in values], dtype=np.float64
        )
    except (TypeError, ValueError):
        raise MixerError(f"odm mixer state: {key!r} has a value that is not a float hex string") from None


class ODMMixer(Mixer):
    """Exp3 online data mixing over ``domain_names`` (the order of every [D] array).

    Args: ``alpha`` in [0, 1), ``update_interval`` >= 1, ``warmup_steps`` >= 0, ``importance_weighting``.
    """

    name = "odm"

    def __init__(
        self,
        domain_names: Sequence[str],
        *,
        alpha: float = 0.9,
        update_interval: int = 1,
        warmup_steps: int = 0,
        importance_weighting: bool = True,
    ) -> None:
        super().__init__(domain_names)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (0.0 <= float(alpha) < 1.0):
            raise MixerError(f"odm mixer: alpha must be a number in [0, 1), got {alpha!r}")
        for key, value, low in (("update_interval", update_interval, 1), ("warmup_steps", warmup_steps, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < low:
                raise MixerError(f"odm mixer: {key} must be an integer >= {low}, got {value!r}")
        if not isinstance(importance_weighting, (bool, np.bool_)):
            raise MixerError(
                f"odm mixer: importance_weighting must be true or false, got {importance_weighting!r}"
            )
        self.alpha = float(alpha)
        self.update_interval = int(update_interval)
        self.warmup_steps = int(warmup_steps)
        self.importance_weighting = bool(importance_weighting)
        k = self.num_domains
        self._rewards = np.zeros(k, dtype=np.float64)
        self._updates = 0  # t: completed reward updates
        self._eps_prev = self._epsilon(0)
        self._weights = np.full(k, 1.0 / k, dtype=np.float64)
        self._weight_sum = (
            self._weights.copy()
        )  # running sum of π over all weight vectors incl. the initial one
        self._num_weights = 1

    # ---- algorithm -----------------------------------------------------------------------------------------------

    def _epsilon(self, t: int) -> float:
        k = self.num_domains
        if t <= 0 or k == 1:
            return 1.0 / k
        return min(1.0 / k, math.sqrt(math.log(k) / (k * t)))

    def _policy(self, eps_prev: float, eps: float) -> np.ndarray:
        k = self.num_domains
        z = eps_prev * self._rewards
        z = z - z.max()
        e = np.exp(z)
        pi = (1.0 - k * eps) * (e / e.sum()) + eps
        return pi / pi.sum()

    def is_update_step(self, step: int) -> bool:
        """Whether ``observe(step, ...)`` updates rewards and weights."""
        return step > self.warmup_steps and (step - self.warmup_steps) % self.update_interval == 0

    def observe(self, step: int, per_domain_stats: dict[str, np.ndarray]) -> bool:
        """Update R̂ from ``loss_sum``/``token_count`` of step ``step``; True when the sampling weights changed."""
        if not self.is_update_step(step):
            return False
        loss_sum = self._stat(per_domain_stats, "loss_sum")
        count = self._stat(per_domain_stats, "token_count")
        seen = count > 0
        if not np.any(seen):
            return False
        loss = np.zeros_like(loss_sum)
        loss[seen] = loss_sum[seen] / count[seen]
        reward = loss / self._weights if self.importance_weighting else loss
        self._rewards = np.where(
            seen, self.alpha * self._rewards + (1.0 - self.alpha) * reward, self._rewards
        )
        self._updates += 1
        eps = self._epsilon(self._updates)
        new = self._policy(self._eps_prev, eps)
        self._eps_prev = eps
        changed = not np.array_equal(new, self._weights)
        self._weights = new
        self._weight_sum += new
        self._num_weights += 1
        return changed

    def _stat(self, stats: Mapping[str, Any], key: str) -> np.ndarray:
        if key not in stats:
            raise MixerError(f"odm mixer: per-domain stats lack {key!r} (have {sorted(stats)})")
        arr = np.asarray(stats[key], dtype=np.float64).reshape(-1)
        if arr.shape != (self.num_domains,):
            raise MixerError(f"odm mixer: stats[{key!r}] must have {self.num_domains} values, got {arr.size}")
        if not np.all(np.isfinite(arr)):
            raise MixerError(f"odm mixer: stats[{key!r}] has non-finite values {arr.tolist()}")
        return arr

    # ---- views ---------------------------------------------------------------------------------------------------

    def sampling_weights(self) -> np.ndarray:
        return self._weights.copy()

    @property
    def weights(self) -> np.ndarray:
        """π, float64 [D] (the current sampling weights)."""
        return self._weights.copy()

    @property
    def average_weights(self) -> np.ndarray:
        """Mean of π over every weight vector so far, including the initial uniform one; float64 [D]."""
        avg = self._weight_sum / self._num_weights
        return avg / avg.sum()

    @property
    def rewards(self) -> np.ndarray:
        """R̂, float64 [D]."""
        return self._rewards.copy()

    @property
    def epsilon(self) -> float:
        """The exploration rate of the current weights."""
        return self._eps_prev

    def log_dict(self) -> dict[str, Any]:
        return {
            "odm_epsilon": self._eps_prev,
            "odm_rewards": dict(zip(self.domain_names, self._rewards.tolist())),
        }

    # ---- state ---------------------------------------------------------------------------------------------------

    def _hparams(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "update_interval": self.update_interval,
            "warmup_steps": self.warmup_steps,
            "importance_weighting": self.importance_weighting,
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-able; floats as hex strings so the round trip is bit-exact."""
        return {
            "type": self.name,
            "domain_names": list(self.domain_names),
            "hparams": self._hparams(),
            "updates": self._updates,
            "eps_prev": float(self._eps_prev).hex(),
            "rewards": _hex(self._rewards),
            "weights": _hex(self._weights),
            "weight_sum": _hex(self._weight_sum),
            "num_weights": self._num_weights,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, Mapping):
            raise MixerError("odm mixer state: expected an object")
        self._check_state_domains(dict(state))
        if state.get("type", self.name) != self.name:
            raise MixerError(f"odm mixer state: saved by mixer type {state.get('type')!r}, not 'odm'")
        k = self.num_domains
        for key in ("updates", "num_weights"):
            v = state.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise MixerError(f"odm mixer state: {key!r} must be an integer >= 0, got {v!r}")
        try:
            eps_prev = (
                float.fromhex(state["eps_prev"])
                if isinstance(state.get("eps_prev"), str)
                else float(state["eps_prev"])
            )
        except (KeyError, TypeError, ValueError):
            raise MixerError("odm mixer state: 'eps_prev' must be a float hex string") from None
        rewards = _unhex(state.get("rewards"), k, "rewards")
        weights = _unhex(state.get("weights"), k, "weights")
        weight_sum = _unhex(state.get("weight_sum"), k, "weight_sum")
        self._updates = int(state["updates"])
        self._num_weights = int(state["num_weights"])
        self._eps_prev = eps_prev
        self._rewards, self._weights, self._weight_sum = rewards, weights, weight_sum


def build_odm_mixer(spec: Mapping[str, Any], mixture: Any) -> ODMMixer:
    """Builder for the trainer's mixer registry: ``{"type": "odm", "alpha": 0.9, ...}`` over ``mixture.names``.

    Signature matches ``training.mixer_factory.register_mixer`` (``builder(spec, mixture)``).
    """
    unknown = set(spec) - {"type", *_OPTIONS}
    if unknown:
        raise MixerError(
            f"mixer: unknown key(s) {sorted(unknown)} for type 'odm' (known: {', '.join(_OPTIONS)})"
        )
    kwargs = {k: spec[k] for k in _OPTIONS if k in spec}
    return ODMMixer(mixture.names, **kwargs)
