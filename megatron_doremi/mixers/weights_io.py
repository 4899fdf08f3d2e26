"""DoReMi outputs in the run directory: ``doremi_weights.jsonl``, ``domain_weights.json``, ``domain_weights.png``.

* :class:`DomainWeightsLog` appends one JSON line per α update (``DoReMiMixer.history_record``); reopening for a
  resumed run drops lines past the resumed step so a killed-and-resumed run never duplicates steps.
* :func:`write_domain_weights_json` writes the averaged (ᾱ, what step 3 trains on) and final (α_T) weights, each as
  a ``{name: w}`` map and, when the shard prefixes are known, in both mixture forms (``Mixture.from_dict`` and
  ``Mixture.from_data_path`` load them).
* :func:`plot_domain_weights` draws α and ᾱ over steps (matplotlib Agg, no pyplot global state).

Only rank 0 should call these. Every final file is written under a temporary name and ``os.replace``d.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import IO, Any

import numpy as np

from megatron_doremi.atomic_io import atomic_write

__all__ = [
    "DomainWeightsError",
    "DomainWeightsLog",
    "plot_domain_weights",
    "read_domain_weights_log",
    "write_domain_weights_json",
]

logger = logging.getLogger("megatron_doremi.mixers.weights_io")

_RECORD_LISTS = ("domain_weights", "avg_domain_weights", "perdomain_scores")
_RESERVED = ("domain_names", "average", "final")


class DomainWeightsError(ValueError):
    """A malformed weights log/record or bad output arguments; the message names the file:line or key."""


# ---- doremi_weights.jsonl -------------------------------------------------------------------------------------------


def _check_record(rec: Any, where: str) -> dict[str, Any]:
    """Validate one jsonl record (keys and list lengths); DomainWeightsError naming ``where``."""
    if not isinstance(rec, dict):
        raise DomainWeightsError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    step = rec.get("step")
    if isinstance(step, bool) or not isinstance(step, int):
        raise DomainWeightsError(f"{where}: 'step' must be an integer, got {step!r}")
    names = rec.get("domain_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise DomainWeightsError(f"{where}: 'domain_names' must be a non-empty list of strings")
    for key in _RECORD_LISTS:
        values = rec.get(key)
        if (
            not isinstance(values, list)
            or len(values) != len(names)
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        ):
            raise DomainWeightsError(f"{where}: '{key}' must be a list of {len(names)} numbers")
    return rec


def read_domain_weights_log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All records of a ``doremi_weights.jsonl``, validated (same domains on every line, steps increasing)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except OSError as exc:
        raise DomainWeightsError(f"{path}: cannot read ({exc.strerror})") from None
    records: list[dict[str, Any]] = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DomainWeightsError(f"{where}: invalid JSON ({exc.msg})") from None
        rec = _check_record(rec, where)
        if records:
            if rec["domain_names"] != records[0]["domain_names"]:
                raise DomainWeightsError(f"{where}: domain_names differ from the first line's")
            if rec["step"] <= records[-1]["step"]:
                raise DomainWeightsError(
                    f"{where}: step {rec['step']} does not follow step {records[-1]['step']}"
                )
        records.append(rec)
    return records


class DomainWeightsLog:
    """Append-only ``doremi_weights.jsonl`` writer (line-buffered, flushed after every record).

    Use :meth:`open` (``resume_step=None`` starts a new file; an int keeps only lines with ``step <= resume_step``),
    then :meth:`append` each ``DoReMiMixer.history_record(step, time.time())`` after an update; :meth:`close` at
    the end (also a context manager).
    """

    def __init__(self, path: str | os.PathLike[str], fh: IO[str]) -> None:
        self.path = os.fspath(path)
        self._fh: IO[str] | None = fh
        self.last_step: int | None = None

    @classmethod
    def open(cls, path: str | os.PathLike[str], resume_step: int | None = None) -> DomainWeightsLog:
        """Open for appending; on resume, atomically drop records past ``resume_step`` (and a torn last line)."""
        path = os.fspath(path)
        kept: list[str] = []
        last_step: int | None = None
        if resume_step is not None and os.path.exists(path):
            with open(path, encoding="utf-8") as fh:
                lines = fh.read().splitlines()
            dropped = 0
            for lineno, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    rec = _check_record(json.loads(line), f"{path}:{lineno}")
                except json.JSONDecodeError as exc:
                    if lineno == len(lines):  # a write torn by the kill: the step is re-run after the resume
                        logger.warning("%s:%d: dropping a torn last line (%s)", path, lineno, exc.msg)
                        continue
                    raise DomainWeightsError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
                if rec["step"] > resume_step:
                    dropped += 1
                    continue
                kept.append(line)
                last_step = rec["step"]
            if dropped:
                logger.info("%s: dropped %d record(s) after the resumed step %d", path, dropped, resume_step)
        atomic_write(path, lambda fh: fh.write("".join(line + "\n" for line in kept)))
        log = cls(path, open(path, "a", encoding="utf-8", buffering=1))
        log.last_step = last_step
        return log

    def append(self, record: Mapping[str, Any]) -> None:
        """Write one record as a JSON line and flush; steps must increase."""
        if self._fh is None:
            raise DomainWeightsError(f"{self.path}: log is closed")
        rec = _check_record(dict(record), f"{self.path}: record")
        if self.last_step is not None and rec["step"] <= self.last_step:
            raise DomainWeightsError(
                f"{self.path}: record step {rec['step']} does not follow step {self.last_step}"
            )
        self._fh.write(json.dumps(rec, allow_nan=False) + "\n")
        self._fh.flush()
        self.last_step = rec["step"]

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> DomainWeightsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- domain_weights.json --------------------------------------------------------------------------------------------


def _weights_block(
    names: Sequence[str],
    weights: Sequence[float] | np.ndarray,
    prefixes: Mapping[str, Sequence[str]] | None,
    key: str,
) -> dict[str, Any]:
    values = [float(v) for v in np.asarray(weights, dtype=np.float64).reshape(-1)]
    if len(values) != len(names):
        raise DomainWeightsError(f"{key}: expected {len(names)} weights (one per domain), got {len(values)}")
    if not all(math.isfinite(v) and v >= 0 for v in values) or sum(values) <= 0:
        raise DomainWeightsError(f"{key}: weights must be finite, >= 0 and not all zero, got {values}")
    block: dict[str, Any] = {"weights": dict(zip(names, values))}
    if prefixes is not None:
        from megatron_doremi.data.mixture import Domain, Mixture, MixtureError

        try:
            mix = Mixture([Domain(n, tuple(prefixes[n]), w) for n, w in zip(names, values)], source=key)
        except MixtureError as exc:
            raise DomainWeightsError(f"{key}: {exc}") from None
        block["mixture"] = mix.to_json_dict()
        block["data_path"] = mix.to_data_path()
    return block


def write_domain_weights_json(
    path: str | os.PathLike[str],
    domain_names: Sequence[str],
    average_weights: Sequence[float] | np.ndarray,
    final_weights: Sequence[float] | np.ndarray,
    prefixes: Mapping[str, Sequence[str]] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write ``domain_weights.json`` atomically.

    Layout: ``{"domain_names", "average": B, "final": B, **extra}`` with ``B = {"weights": {name: w}}`` plus, when
    ``prefixes`` (name -> shard prefixes, every domain) is given, ``"mixture"`` (``Mixture.from_dict`` input,
    normalised) and ``"data_path"`` (Megatron ``--data-path`` string; its domain names derive from the prefixes).
    """
    names = [str(n) for n in domain_names]
    if not names or len(set(names)) != len(names):
        raise DomainWeightsError(f"domain_names must be non-empty and unique, got {names}")
    if prefixes is not None:
        missing = [n for n in names if n not in prefixes]
        unknown = sorted(set(prefixes) - set(names))
        if missing or unknown:
            raise DomainWeightsError(
                f"prefixes must name exactly the domains; missing {missing}, unknown {unknown}"
            )
        for n in names:
            p = prefixes[n]
            if isinstance(p, str) or not p or not all(isinstance(x, str) and x for x in p):
                raise DomainWeightsError(
                    f"prefixes[{n!r}]: expected a non-empty list of shard prefixes, got {p!r}"
                )
    extra = dict(extra or {})
    clash = [k for k in _RESERVED if k in extra]
    if clash:
        raise DomainWeightsError(f"extra: keys {clash} are reserved")
    doc = {
        "domain_names": names,
        "average": _weights_block(names, average_weights, prefixes, "average_weights"),
        "final": _weights_block(names, final_weights, prefixes, "final_weights"),
        **extra,
    }
    text = json.dumps(doc, indent=2, allow_nan=False) + "\n"
    atomic_write(os.fspath(path), lambda fh: fh.write(text))


# ---- domain_weights.png ---------------------------------------------------------------------------------------------


def plot_domain_weights(jsonl_path: str | os.PathLike[str], png_path: str | os.PathLike[str]) -> None:
    """Plot α_t (left) and ᾱ_t (right) against step, one line per domain, from ``jsonl_path`` into ``png_path``."""
    records = read_domain_weights_log(jsonl_path)
    if not records:
        raise DomainWeightsError(f"{os.fspath(jsonl_path)}: no records (no domain-weight update was logged)")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = records[0]["domain_names"]
    steps = [r["step"] for r in records]
    fig = Figure(figsize=(12, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, key, title in zip(
        axes, ("domain_weights", "avg_domain_weights"), ("domain weights α_t", "average domain weights ᾱ_t")
    ):
        values = np.array([r[key] for r in records], dtype=np.float64)
        for d, name in enumerate(names):
            ax.plot(steps, values[:, d], label=name, marker="." if len(steps) < 50 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("weight")
    axes[1].legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
    fig.tight_layout()
    atomic_write(
        os.fspath(png_path), lambda fh: fig.savefig(fh, format="png", bbox_inches="tight"), mode="wb"
    )
