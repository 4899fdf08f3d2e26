"""Aioli: online data mixing from a linear dynamic mixing law estimated during training (Chen et al. 2024).

Aioli's Linear Mixing Optimization view: over one round t the held-out loss of every domain i falls linearly in
the proportions p trained on, ``L_i(after) = L_i(before) - sum_j A_ij p_j``, and the proportions that minimise
the summed loss are followed by exponentiated-gradient (EG) steps ``p_j <- p_j exp(eta sum_i A_ij)`` (the
gradient of ``-sum_i L_i`` in p is ``sum_i A_ij``). Aioli estimates ``A`` online, in every round, from short
perturbed training blocks instead of trusting a fixed parameterisation.

This module's reading of the algorithm (choices where the paper leaves room are marked *choice*):

* Steps ``[0, prior_steps)`` train on the initial weights p_0 (``prior_weights`` in the paper's *restricted*
  setting: another method's mixture, e.g. DoReMi's ``domain_weights.json``; else ``initial_weights``, default
  uniform = stratified). Rounds of ``R = lp_rounds * D * lp_steps + update_steps`` steps follow.
* A round first runs ``lp_rounds`` sweeps; a sweep trains ``lp_steps`` steps on each perturbed mixture
  ``q_j = f e_j + (1 - f) p`` (``f = one_hot_factor``, δ in the brief; ``e_j`` the one-hot of domain j; p the
  round's proportions), the domains in a seeded random order per sweep (*choice*: seeded by ``seed``, round and
  sweep, so every rank and every resume draws the same order). These steps are ordinary training steps.
* The held-out per-domain loss ``l`` is measured at every block boundary (on the same fixed validation samples
  each time). A block perturbed toward j contributes ``dL[:, j] += l(before) - l(after)``; after the sweeps
  ``dL /= lp_rounds``. The law gives ``dL = A Q`` with ``Q = [q_1 .. q_D] = f I + (1 - f) p 1^T``, so
  ``A = dL Q^-1``, in closed form ``A_ij = (dL_ij - (1 - f) (dL p)_i) / f`` (elementwise numpy, no LAPACK: the
  same bits everywhere).
* *Choice* (normalisation): with ``normalize`` (default true) ``A`` is divided by its largest absolute entry, so
  ``eta`` bounds the change of every log-proportion by ``eta * D`` per round whatever the loss scale (a
  per-row normalisation would blow the noise of a domain that cannot improve up to full scale).
* *Choice* (smoothing): with ``ema`` = β in (0, 1), ``A <- β A_prev + (1 - β) A_new`` on the normalised
  estimates (none by default).
* EG step: ``p <- softmax(log p + eta A^T 1)``; the remaining ``update_steps`` steps of the round train on p.
  A domain with p_j = 0 stays at 0 (EG is multiplicative).

The mixer is a pure function of plain numbers: ``heldout_request(step)`` says whether the loop must measure the
held-out per-domain losses after ``step`` completed steps (before the next batch is drawn), and
``observe_heldout(step, {"loss_sum", "token_count"})`` takes those global (all-reduced) numbers and returns
True when the sampling weights changed (the loop appends a blend schedule segment). ``observe`` only tracks the
average of the weights actually trained on. Sampling weights = ``q_j`` during perturbed blocks, p otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from megatron_doremi.mixers.base import Mixer, MixerError, normalize_weights

__all__ = [
    "AIOLI_DEFAULTS",
    "AioliMixer",
    "aioli_kwargs",
    "aioli_update",
    "build_aioli_mixer",
    "estimate_mixing_law",
]

#: the ``aioli`` mixer keys and their defaults (``update_steps`` None = 3 x the perturbed part of a round)
AIOLI_DEFAULTS: dict[str, Any] = {
    "lp_rounds": 1,
    "lp_steps": 4,
    "update_steps": None,
    "eta": 0.3,
    "ema": None,
    "one_hot_factor": 0.75,
    "normalize": True,
    "initial_weights": None,
    "prior_weights": None,
    "prior_steps": 0,
    "seed": 0,
    "heldout_samples": None,
}


# ---- the pure algorithm ------------------------------------------------------------------------------------------


def estimate_mixing_law(loss_drop: np.ndarray, proportions: np.ndarray, one_hot_factor: float) -> np.ndarray:
    """A [D, D] from ``loss_drop[i, j]`` = mean drop of domain i's held-out loss over a block trained on
    ``q_j = f e_j + (1 - f) p``: the solution of ``loss_drop = A Q`` (see the module docstring)."""
    f = float(one_hot_factor)
    drop = np.asarray(loss_drop, dtype=np.float64)
    mixed = (drop * np.asarray(proportions, dtype=np.float64)[None, :]).sum(axis=1)  # (dL p)_i
    return (drop - (1.0 - f) * mixed[:, None]) / f


def aioli_update(
    proportions: np.ndarray,
    law: np.ndarray,
    eta: float,
    *,
    normalize: bool = True,
    previous_law: np.ndarray | None = None,
    ema: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One EG step: returns ``(p_new, A_used)`` where ``A_used`` is ``law`` normalised / smoothed as configured."""
    a = np.asarray(law, dtype=np.float64)
    if normalize:
        scale = float(np.abs(a).max())
        if scale > 0:
            a = a / scale
    if ema is not None and previous_law is not None:
        a = ema * previous_law + (1.0 - ema) * a
    p = np.asarray(proportions, dtype=np.float64)
    with np.errstate(divide="ignore"):
        logits = np.where(p > 0, np.log(p), -np.inf) + eta * a.sum(axis=0)
    logits = logits - logits.max()
    e = np.exp(logits)
    return e / e.sum(), a


# ---- the mixer ---------------------------------------------------------------------------------------------------


def _hex(values: np.ndarray) -> list[str]:
    return [float(v).hex() for v in np.asarray(values, dtype=np.float64).reshape(-1)]


def _unhex(values: Any, length: int, key: str) -> np.ndarray:
    if not isinstance(values, list) or len(values) != length:
        raise MixerError(f"aioli mixer state: {key!r} must be a list of {length} hex floats")
    try:
        return np.array([float.fromhex(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        raise MixerError(f"aioli mixer state: {key!r} has a value that is not a float hex string") from None


def _int_option(key: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < low:
        raise MixerError(f"mixer.{key} (aioli): must be an integer >= {low}, got {value!r}")
    return int(value)


def _float_option(key: str, value: Any, low: float, high: float, low_open: bool, high_open: bool) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float, np.floating))
    v = float(value) if ok else float("nan")
    ok = (
        ok
        and np.isfinite(v)
        and (v > low if low_open else v >= low)
        and (v < high if high_open else v <= high)
    )
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise MixerError(f"mixer.{key} (aioli): must be a number in {interval}, got {value!r}")
    return v


class AioliMixer(Mixer):
    """Aioli over ``domain_names`` (the order of every [D] array); options as in :data:`AIOLI_DEFAULTS`.

    ``initial_weights``: p_0 (None = uniform), a [D] sequence; ``prior_steps`` steps train on it before the
    first round. ``heldout_samples`` (validation samples per domain per measurement) is for the loop.
    """

    name = "aioli"
    weights_log_name = "aioli_weights.jsonl"

    def __init__(
        self,
        domain_names: Sequence[str],
        *,
        lp_rounds: int = 1,
        lp_steps: int = 4,
        update_steps: int | None = None,
        eta: float = 0.3,
        ema: float | None = None,
        one_hot_factor: float = 0.75,
        normalize: bool = True,
        initial_weights: Sequence[float] | np.ndarray | None = None,
        prior_steps: int = 0,
        seed: int = 0,
        heldout_samples: int | None = None,
        restricted: bool = False,
    ) -> None:
        super().__init__(domain_names)
        d = self.num_domains
        self.lp_rounds = _int_option("lp_rounds", lp_rounds, 1)
        self.lp_steps = _int_option("lp_steps", lp_steps, 1)
        self.perturb_steps = self.lp_rounds * d * self.lp_steps
        self.update_steps = (
            3 * self.perturb_steps if update_steps is None else _int_option("update_steps", update_steps, 0)
        )
        self.round_steps = self.perturb_steps + self.update_steps
        self.eta = _float_option("eta", eta, 0.0, float("inf"), True, True)
        self.ema = None if ema is None else _float_option("ema", ema, 0.0, 1.0, False, True)
        self.one_hot_factor = _float_option("one_hot_factor", one_hot_factor, 0.0, 1.0, True, False)
        if not isinstance(normalize, (bool, np.bool_)):
            raise MixerError(f"mixer.normalize (aioli): must be true or false, got {normalize!r}")
        self.normalize = bool(normalize)
        self.prior_steps = _int_option("prior_steps", prior_steps, 0)
        self.seed = _int_option("seed", seed, 0)
        self.heldout_samples = (
            None if heldout_samples is None else _int_option("heldout_samples", heldout_samples, 1)
        )
        self.restricted = bool(restricted)
        p0 = (
            np.full(d, 1.0 / d)
            if initial_weights is None
            else normalize_weights(initial_weights, d, "initial_weights")
        )
        self.initial_weights = p0.copy()
        self._p = p0.copy()  # the proportions (updated by EG at the end of every round)
        self._current = p0.copy()  # the sampling weights in force
        self._law: np.ndarray | None = None  # A after normalisation / smoothing, [D, D]
        self._drop = np.zeros((d, d))  # summed loss drops of this round's blocks
        self._before: np.ndarray | None = None  # held-out losses at the start of the running block
        self._weight_sum = np.zeros(d)  # sum over observed steps of the weights trained on
        self._weight_steps = 0
        self.num_updates = 0
        self.updated_at: int | None = None  # step of the latest EG update
        self.last_heldout: np.ndarray | None = None

    # ---- the round schedule --------------------------------------------------------------------------------

    def _position(self, step: int) -> tuple[int, int] | None:
        """(round, offset in round) of completed-step count ``step``; None before the first round."""
        if step < self.prior_steps:
            return None
        return divmod(step - self.prior_steps, self.round_steps)

    def heldout_request(self, step: int) -> bool:
        """Whether the loop must call :meth:`observe_heldout` after ``step`` completed steps (block boundaries)."""
        pos = self._position(step)
        if pos is None:
            return False
        _, off = pos
        return off % self.lp_steps == 0 and off // self.lp_steps <= self.lp_rounds * self.num_domains

    def block_domain(self, round_index: int, block: int) -> int:
        """The domain that block ``block`` of round ``round_index`` is perturbed toward."""
        d = self.num_domains
        sweep, k = divmod(block, d)
        rng = np.random.default_rng([self.seed, round_index, sweep])
        return int(rng.permutation(d)[k])

    def perturbed_weights(self, domain: int) -> np.ndarray:
        """``q_j = f e_j + (1 - f) p``."""
        q = (1.0 - self.one_hot_factor) * self._p
        q[domain] += self.one_hot_factor
        return q / q.sum()

    # ---- observing ---------------------------------------------------------------------------------------------

    def observe(self, step: int, per_domain_stats: dict[str, np.ndarray]) -> bool:
        """Count the step toward the average trained-on weights; sampling never changes here."""
        self._weight_sum += self._current
        self._weight_steps += 1
        return False

    def _heldout_losses(self, stats: Mapping[str, Any]) -> np.ndarray:
        arrays = []
        for key in ("loss_sum", "token_count"):
            if key not in stats:
                raise MixerError(f"aioli mixer: held-out stats lack {key!r} (have {sorted(stats)})")
            arr = np.asarray(stats[key], dtype=np.float64).reshape(-1)
            if arr.shape != (self.num_domains,) or not np.all(np.isfinite(arr)):
                raise MixerError(f"aioli mixer: held-out {key!r} must be {self.num_domains} finite values")
            arrays.append(arr)
        loss_sum, count = arrays
        empty = [n for n, c in zip(self.domain_names, count) if c <= 0]
        if empty:
            raise MixerError(
                f"aioli mixer: no held-out tokens for domain(s) {empty}; Aioli needs validation data for every "
                "domain (data.split with a validation part, or data.valid_path with the same domains)"
            )
        return loss_sum / count

    def observe_heldout(self, step: int, stats: Mapping[str, Any]) -> bool:
        """Held-out per-domain ``loss_sum``/``token_count`` (global) after ``step`` steps; True if weights changed."""
        if not self.heldout_request(step):
            raise MixerError(f"aioli mixer: held-out losses given at step {step}, which is no block boundary")
        losses = self._heldout_losses(stats)
        self.last_heldout = losses
        r, off = self._position(step)  # type: ignore[misc]
        blocks = self.lp_rounds * self.num_domains
        b = off // self.lp_steps
        old = self._current.copy()
        if self.update_steps == 0 and off == 0 and r > 0:  # the previous round ends where this one starts
            self._finish_block(r - 1, blocks - 1, losses)
            self._update(step)
        if b >= 1:
            self._finish_block(r, b - 1, losses)
        if b == blocks:
            self._update(step)
        else:
            self._current = self.perturbed_weights(self.block_domain(r, b))
            self._before = losses
        return not np.array_equal(old, self._current)

    def _finish_block(self, round_index: int, block: int, losses: np.ndarray) -> None:
        if self._before is None:
            raise MixerError("aioli mixer: a perturbed block ended without its starting held-out losses")
        self._drop[:, self.block_domain(round_index, block)] += self._before - losses
        self._before = None

    def _update(self, step: int) -> None:
        law = estimate_mixing_law(self._drop / self.lp_rounds, self._p, self.one_hot_factor)
        self._p, self._law = aioli_update(
            self._p, law, self.eta, normalize=self.normalize, previous_law=self._law, ema=self.ema
        )
        self._current = self._p.copy()
        self._drop = np.zeros_like(self._drop)
        self.num_updates += 1
        self.updated_at = step

    # ---- views ---------------------------------------------------------------------------------------------

    def sampling_weights(self) -> np.ndarray:
        return self._current.copy()

    @property
    def weights(self) -> np.ndarray:
        """The proportions p (what the run ends on, without the perturbations), float64 [D]."""
        return self._p.copy()

    @property
    def average_weights(self) -> np.ndarray:
        """Mean of the sampling weights over the observed training steps (perturbed blocks included)."""
        if self._weight_steps == 0:
            return self._current.copy()
        avg = self._weight_sum / self._weight_steps
        return avg / avg.sum()

    @property
    def law(self) -> np.ndarray | None:
        """The latest A (normalised / smoothed), [D, D], or None before the first update."""
        return None if self._law is None else self._law.copy()

    def phase(self, step: int) -> str:
        """What the step after ``step`` completed steps trains on: "prior", "perturb:<domain>" or "update"."""
        pos = self._position(step)
        if pos is None:
            return "prior"
        r, off = pos
        if off >= self.perturb_steps:
            return "update"
        return "perturb:" + self.domain_names[self.block_domain(r, off // self.lp_steps)]

    def log_dict(self) -> dict[str, Any]:
        return {"aioli_updates": self.num_updates}

    def history_record(self, step: int, timestamp: float) -> dict[str, Any]:
        """One ``aioli_weights.jsonl`` line (lists in ``domain_names`` order); ``perdomain_scores`` = A^T 1."""
        law = self._law
        return {
            "step": step,
            "timestamp": timestamp,
            "domain_names": list(self.domain_names),
            "domain_weights": self._p.tolist(),
            "avg_domain_weights": self.average_weights.tolist(),
            "perdomain_scores": ([0.0] * self.num_domains if law is None else law.sum(axis=0).tolist()),
            "heldout_loss": None if self.last_heldout is None else self.last_heldout.tolist(),
            "mixing_law": None if law is None else law.tolist(),
            "num_updates": self.num_updates,
        }

    def domain_weights_extra(self, step: int) -> dict[str, Any]:
        """Extra fields of the run's ``domain_weights.json``."""
        return {
            "mixer": self.name,
            "step": step,
            "num_updates": self.num_updates,
            "restricted": self.restricted,
            "initial_weights": dict(zip(self.domain_names, self.initial_weights.tolist())),
            "hparams": self._hparams(),
            "mixing_law": None if self._law is None else self._law.tolist(),
        }

    # ---- state ---------------------------------------------------------------------------------------------

    def _hparams(self) -> dict[str, Any]:
        return {
            "lp_rounds": self.lp_rounds,
            "lp_steps": self.lp_steps,
            "update_steps": self.update_steps,
            "eta": self.eta,
            "ema": self.ema,
            "one_hot_factor": self.one_hot_factor,
            "normalize": self.normalize,
            "prior_steps": self.prior_steps,
            "seed": self.seed,
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-able; floats as hex strings so the round trip is bit-exact."""
        return {
            "type": self.name,
            "domain_names": list(self.domain_names),
            "hparams": self._hparams(),
            "proportions": _hex(self._p),
            "current": _hex(self._current),
            "law": None if self._law is None else _hex(self._law),
            "drop": _hex(self._drop),
            "before": None if self._before is None else _hex(self._before),
            "weight_sum": _hex(self._weight_sum),
            "weight_steps": self._weight_steps,
            "num_updates": self.num_updates,
            "updated_at": self.updated_at,
            "last_heldout": None if self.last_heldout is None else _hex(self.last_heldout),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, Mapping):
            raise MixerError("aioli mixer state: expected an object")
        self._check_state_domains(dict(state))
        if state.get("type") != self.name:
            raise MixerError(f"aioli mixer state: saved by mixer type {state.get('type')!r}, not 'aioli'")
        d = self.num_domains
        for key in ("weight_steps", "num_updates"):
            v = state.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise MixerError(f"aioli mixer state: {key!r} must be an integer >= 0, got {v!r}")
        updated_at = state.get("updated_at")
        if updated_at is not None and (isinstance(updated_at, bool) or not isinstance(updated_at, int)):
            raise MixerError(
                f"aioli mixer state: 'updated_at' must be an integer or null, got {updated_at!r}"
            )

        def optional(key: str, length: int) -> np.ndarray | None:
            return None if state.get(key) is None else _unhex(state[key], length, key)

        p = _unhex(state.get("proportions"), d, "proportions")
        current = _unhex(state.get("current"), d, "current")
        drop = _unhex(state.get("drop"), d * d, "drop").reshape(d, d)
        weight_sum = _unhex(state.get("weight_sum"), d, "weight_sum")
        law, before, heldout = optional("law", d * d), optional("before", d), optional("last_heldout", d)
        self._p, self._current, self._drop, self._weight_sum = p, current, drop, weight_sum
        self._law = None if law is None else law.reshape(d, d)
        self._before, self.last_heldout = before, heldout
        self._weight_steps = int(state["weight_steps"])
        self.num_updates = int(state["num_updates"])
        self.updated_at = updated_at


# ---- the builder -------------------------------------------------------------------------------------------------


def _read_prior(value: Any, mixture: Any) -> Any:
    """``prior_weights``: a path to a ``domain_weights.json`` (its average weights) or mixture file, or a
    list / ``{name: w}`` mapping; returned as a list or mapping for ``mixture.with_weights``."""
    if not isinstance(value, str):
        return value
    from megatron_doremi.json_files import read_json_file

    doc = read_json_file(value, "mixer.prior_weights", MixerError)
    if isinstance(doc, dict):
        average = doc.get("average")
        if isinstance(average, dict) and isinstance(average.get("weights"), dict):
            return dict(average["weights"])
        domains = doc.get("domains")
        if isinstance(domains, dict) and all(isinstance(v, dict) and "weight" in v for v in domains.values()):
            return {n: v["weight"] for n, v in domains.items()}
        if doc and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in doc.values()):
            return doc
    raise MixerError(
        f"mixer.prior_weights: {value} is not a domain_weights.json (average.weights), a mixture file "
        "(domains.<name>.weight) or a {name: weight} object"
    )


def _resolve_weights(value: Any, key: str, mixture: Any) -> list[float] | None:
    from megatron_doremi.data.mixture import MixtureError

    if value is None or value == "uniform":
        return None
    if value == "mixture":
        return [float(w) for w in mixture.weights]
    if isinstance(value, str):
        raise MixerError(
            f'mixer.{key}: expected null, "uniform", "mixture", a list or {{name: weight}}, got {value!r}'
        )
    if not isinstance(value, (list, tuple, Mapping)):
        raise MixerError(f"mixer.{key}: expected a list in domain order or {{name: weight}}, got {value!r}")
    try:
        mixture.with_weights(value)  # validates names / count / values
    except (MixtureError, TypeError, ValueError) as exc:
        raise MixerError(f"mixer.{key}: {exc}") from None
    # the values as given, in domain order: the mixer normalises once, so p_0 is exactly w / sum(w)
    return (
        [float(value[n]) for n in mixture.names] if isinstance(value, Mapping) else [float(v) for v in value]
    )


def aioli_kwargs(spec: Mapping[str, Any], mixture: Any) -> dict[str, Any]:
    """``AioliMixer`` keyword arguments from a ``{"type": "aioli", ...}`` spec (MixerError naming the key)."""
    unknown = sorted(set(spec) - {"type", *AIOLI_DEFAULTS})
    if unknown:
        raise MixerError(
            f"mixer: unknown key(s) {unknown} for type 'aioli' (known: {', '.join(sorted(AIOLI_DEFAULTS))})"
        )
    s = {**AIOLI_DEFAULTS, **spec}
    if s["prior_weights"] is not None and s["initial_weights"] is not None:
        raise MixerError("mixer: give either prior_weights (restricted mode) or initial_weights, not both")
    if s["prior_weights"] is not None:
        initial = _resolve_weights(_read_prior(s["prior_weights"], mixture), "prior_weights", mixture)
        if initial is None:
            raise MixerError('mixer.prior_weights: expected a file, a list or {name: weight}, not "uniform"')
    else:
        initial = _resolve_weights(s["initial_weights"], "initial_weights", mixture)
    kwargs = {k: s[k] for k in AIOLI_DEFAULTS if k not in ("initial_weights", "prior_weights")}
    return {**kwargs, "initial_weights": initial, "restricted": s["prior_weights"] is not None}


def build_aioli_mixer(spec: Mapping[str, Any], mixture: Any) -> AioliMixer:
    """Builder for the trainer's mixer registry (``builder(spec, mixture)``) over ``mixture.names``."""
    return AioliMixer(mixture.names, **aioli_kwargs(spec, mixture))
