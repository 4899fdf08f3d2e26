"""Mixture spec: which shard prefixes make up each domain, and the domain weights.

Two equivalent input forms load into one :class:`Mixture`:

* JSON: ``{"domains": {"wiki": {"prefixes": ["data/wiki_text_document"], "weight": 0.3}, ...}}``
* Megatron's ``--data-path 0.3 data/wiki_text_document 0.7 data/c4_text_document`` (the domain name is the
  prefix's base name with a trailing ``_text_document`` removed).

Domains are sorted by name and weights normalised to sum to 1 (float64). Output weights are always
written in both forms (:meth:`Mixture.to_json_dict`, :meth:`Mixture.to_data_path`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


class MixtureError(ValueError):
    """A mixture spec that cannot be used; the message names the key or position at fault."""


@dataclass(frozen=True)
class Domain:
    """One data domain: a name, its shard prefixes (``.bin``/``.idx`` without suffix) and its raw weight."""

    name: str
    prefixes: tuple[str, ...]
    weight: float


def _check_weight(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MixtureError(f"{where}: weight must be a number, got {value!r}")
    weight = float(value)
    if not math.isfinite(weight):
        raise MixtureError(f"{where}: weight must be finite, got {value!r}")
    if weight < 0:
        raise MixtureError(f"{where}: weight must be >= 0, got {value!r}")
    return weight


class Mixture:
    """Domains sorted by name with normalised float64 weights.

    Attributes:
        domains: the domains, sorted by name (raw weights kept in ``Domain.weight``).
        names: domain names in order.
        weights: normalised weights, float64 array of shape [num_domains], summing to 1.
    """

    def __init__(self, domains: Sequence[Domain], source: str = "mixture") -> None:
        if not domains:
            raise MixtureError(f"{source}: no domains given")
        seen: set[str] = set()
        for dom in domains:
            if not dom.name or not isinstance(dom.name, str):
                raise MixtureError(f"{source}: domain names must be non-empty strings, got {dom.name!r}")
            if dom.name in seen:
                raise MixtureError(f"{source}: duplicate domain name {dom.name!r}")
            seen.add(dom.name)
            if not dom.prefixes:
                raise MixtureError(f"{source}: domain {dom.name!r} has no prefixes")
            _check_weight(dom.weight, f"{source}: domain {dom.name!r}")
        self.domains: tuple[Domain, ...] = tuple(sorted(domains, key=lambda d: d.name))
        raw = np.array([d.weight for d in self.domains], dtype=np.float64)
        total = float(raw.sum())
        if total <= 0:
            raise MixtureError(f"{source}: all domain weights are zero; at least one must be > 0")
        self.weights: np.ndarray = raw / total
        self.names: tuple[str, ...] = tuple(d.name for d in self.domains)
        self.source = source

    def __len__(self) -> int:
        return len(self.domains)

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}={w:.4f}" for n, w in zip(self.names, self.weights))
        return f"Mixture({parts})"

    @property
    def num_domains(self) -> int:
        return len(self.domains)

    def index(self, name: str) -> int:
        """Position of domain ``name``; MixtureError if absent."""
        try:
            return self.names.index(name)
        except ValueError:
            raise MixtureError(f"unknown domain {name!r}; known: {', '.join(self.names)}") from None

    def with_weights(self, weights: Sequence[float] | Mapping[str, float]) -> Mixture:
        """The same domains with new weights (a sequence in ``names`` order, or a name -> weight mapping)."""
        if isinstance(weights, Mapping):
            missing = set(self.names) - set(weights)
            extra = set(weights) - set(self.names)
            if missing or extra:
                raise MixtureError(
                    f"weights must name exactly the mixture's domains; missing {sorted(missing)}, unknown {sorted(extra)}"
                )
            values = [weights[n] for n in self.names]
        else:
            values = list(weights)
            if len(values) != self.num_domains:
                raise MixtureError(f"expected {self.num_domains} weights (one per domain), got {len(values)}")
        doms = [
            Domain(d.name, d.prefixes, _check_weight(v, f"domain {d.name!r}"))
            for d, v in zip(self.domains, values)
        ]
        return Mixture(doms, source=self.source)

    # ---- loading -------------------------------------------------------------------------------------------------

    @classmethod
    def from_dict(
        cls, spec: Mapping[str, Any], source: str = "mixture", base_dir: str | None = None
    ) -> Mixture:
        """Load ``{"domains": {name: {"prefixes": [...], "weight": w}}}``; relative prefixes resolve against base_dir."""
        if not isinstance(spec, Mapping) or "domains" not in spec:
            raise MixtureError(f'{source}: expected an object with key "domains"')
        doms_spec = spec["domains"]
        if not isinstance(doms_spec, Mapping) or not doms_spec:
            raise MixtureError(
                f'{source}: "domains" must be a non-empty object of name -> {{prefixes, weight}}'
            )
        domains = []
        for name, entry in doms_spec.items():
            where = f"{source}: domains.{name}"
            if not isinstance(entry, Mapping):
                raise MixtureError(f"{where}: expected an object with keys 'prefixes' and 'weight'")
            prefixes = entry.get("prefixes", entry.get("prefix"))
            if isinstance(prefixes, str):
                prefixes = [prefixes]
            if (
                not isinstance(prefixes, list)
                or not prefixes
                or not all(isinstance(p, str) for p in prefixes)
            ):
                raise MixtureError(f"{where}.prefixes: expected a non-empty list of shard prefixes")
            if "weight" not in entry:
                raise MixtureError(f"{where}.weight: missing")
            weight = _check_weight(entry["weight"], f"{where}.weight")
            if base_dir is not None:
                prefixes = [
                    p if os.path.isabs(p) else os.path.normpath(os.path.join(base_dir, p)) for p in prefixes
                ]
            domains.append(Domain(str(name), tuple(prefixes), weight))
        return cls(domains, source=source)

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> Mixture:
        """Load a mixture JSON file; relative prefixes are resolved against the file's directory."""
        from megatron_doremi.json_files import read_json_file

        path = Path(path)
        spec = read_json_file(
            path, "mixture file", MixtureError, duplicate_hint=" (duplicate domain names are not allowed)"
        )
        return cls.from_dict(spec, source=str(path), base_dir=str(path.parent))

    @classmethod
    def from_data_path(cls, data_path: str | Sequence[str], source: str = "--data-path") -> Mixture:
        """Load Megatron's ``w1 p1 w2 p2 ...`` (a single prefix without weight means weight 1).

        Several prefixes with the same derived domain name are grouped into one domain whose weight is the sum.
        """
        tokens = data_path.split() if isinstance(data_path, str) else list(data_path)
        if not tokens:
            raise MixtureError(f"{source}: empty")
        if len(tokens) == 1:
            pairs = [(1.0, tokens[0])]
        else:
            if len(tokens) % 2:
                raise MixtureError(
                    f"{source}: expected pairs 'weight prefix', got an odd number ({len(tokens)}) of items"
                )
            pairs = []
            for k in range(0, len(tokens), 2):
                try:
                    w = float(tokens[k])
                except ValueError:
                    raise MixtureError(
                        f"{source}: item {k + 1} should be a weight, got {tokens[k]!r}"
                    ) from None
                pairs.append((_check_weight(w, f"{source}: item {k + 1}"), tokens[k + 1]))
        grouped: dict[str, tuple[float, list[str]]] = {}
        for w, prefix in pairs:
            name = domain_name_from_prefix(prefix)
            old_w, old_p = grouped.get(name, (0.0, []))
            grouped[name] = (old_w + w, old_p + [prefix])
        return cls([Domain(n, tuple(p), w) for n, (w, p) in grouped.items()], source=source)

    @classmethod
    def load(cls, spec: str | os.PathLike[str] | Mapping[str, Any] | Sequence[str]) -> Mixture:
        """Load from a JSON path, a dict, or a Megatron data-path string/list."""
        if isinstance(spec, Mapping):
            return cls.from_dict(spec)
        if isinstance(spec, (str, os.PathLike)) and str(spec).endswith(".json"):
            return cls.from_json(spec)
        return cls.from_data_path(spec)  # type: ignore[arg-type]

    # ---- output --------------------------------------------------------------------------------------------------

    def to_json_dict(self) -> dict[str, Any]:
        """The JSON form with normalised weights."""
        return {
            "domains": {
                d.name: {"prefixes": list(d.prefixes), "weight": float(w)}
                for d, w in zip(self.domains, self.weights)
            }
        }

    def to_data_path(self) -> str:
        """Megatron's ``--data-path`` string; a multi-prefix domain's weight is split by equal shares."""
        items = []
        for d, w in zip(self.domains, self.weights):
            for p in d.prefixes:
                items.append(f"{w / len(d.prefixes):.10g} {p}")
        return " ".join(items)


def domain_name_from_prefix(prefix: str) -> str:
    """``data/wiki_text_document`` -> ``wiki`` (Megatron's output suffix removed)."""
    base = os.path.basename(prefix.rstrip("/"))
    for suffix in ("_text_document", "_document"):
        if base.endswith(suffix) and len(base) > len(suffix):
            return base[: -len(suffix)]
    return base
