"""Mixture spec: which shard prefixes make up each domain, and the domain weights.

Equivalent input forms load into one :class:`Mixture`:

* JSON: ``{"domains": {"wiki": {"prefixes": ["data/wiki_text_document"], "weight": 0.3}, ...}}``
* Megatron's ``--data-path`` in every form it accepts: ``w1 p1 w2 p2 ...``, a single prefix, or prefixes
  without weights (``p1 p2 ...``: weighted by size, see below), as a string or a list; and a
  ``--data-args-path`` file holding such a string (any whitespace). Each prefix is one domain, named after its
  base name with a trailing ``_text_document`` removed; prefixes whose base names clash (``a/web``, ``b/web``)
  keep enough of their path to differ (``a/web``, ``b/web``) and are never merged.

JSON domains are sorted by name; data-path domains keep the data path's order (Megatron's dataset order, on
which its exact blend's tie-breaking depends). Weights are normalised to sum to 1 (float64, ``w / sum(w)`` as
Megatron's ``normalize``). A data path without weights gets each prefix's token count as a provisional weight
and ``weights_from_sizes = True``: the data layer then replaces it by the samples per epoch of the prefix's train
split, as Megatron-Core weighs an unweighted blend. Output weights are written in both forms
(:meth:`Mixture.to_json_dict`, :meth:`Mixture.to_data_path`); the data path splits a multi-prefix domain's
weight over its prefixes in proportion to their tokens.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


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

    def __init__(
        self,
        domains: Sequence[Domain],
        source: str = "mixture",
        *,
        keep_order: bool = False,
        weights_from_sizes: bool = False,
    ) -> None:
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
        self.domains: tuple[Domain, ...] = tuple(
            domains if keep_order else sorted(domains, key=lambda d: d.name)
        )
        self.keep_order = keep_order
        #: True for a data path without weights: the weights are provisional (token counts) until the data
        #: layer sets Megatron's (the samples per epoch of each prefix's train split)
        self.weights_from_sizes = weights_from_sizes
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
        return Mixture(doms, source=self.source, keep_order=self.keep_order)

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
        """Load Megatron's ``--data-path`` (``w1 p1 w2 p2 ...``, ``p``, or ``p1 p2 ...`` without weights).

        Parsed as Megatron's ``get_blend_from_list``: an odd number of items, or items none of which at the
        weight positions is a number, are prefixes without weights (each weighted by its size: see the module
        docstring; the shards must exist). One domain per prefix, in data-path order; a prefix given twice is
        one domain with the summed weight.
        """
        tokens = data_path.split() if isinstance(data_path, str) else [str(t).strip() for t in data_path]
        tokens = [t for t in tokens if t]
        if not tokens:
            raise MixtureError(f"{source}: empty")
        weights: list[float] | None = None
        prefixes = tokens
        if len(tokens) % 2 == 0:
            parsed = [_parse_number(tokens[k]) for k in range(0, len(tokens), 2)]
            if all(v is not None for v in parsed):
                weights = [_check_weight(v, f"{source}: item {2 * i + 1}") for i, v in enumerate(parsed)]
                prefixes = tokens[1::2]
            elif any(v is not None for v in parsed):
                k = 2 * next(i for i, v in enumerate(parsed) if v is None)
                raise MixtureError(
                    f"{source}: item {k + 1} should be a weight, got {tokens[k]!r} (give a weight before every "
                    "prefix, or no weights at all)"
                )
        bad = [p for p in prefixes if _parse_number(p) is not None]
        if bad:
            raise MixtureError(
                f"{source}: {bad[0]!r} is a number where a shard prefix was expected; expected pairs "
                "'weight prefix' (got an odd number of items?)"
            )
        sizes = weights is None
        if sizes:
            weights = [float(prefix_token_count(p, source)) for p in prefixes]
        assert weights is not None
        merged: dict[str, float] = {}
        for w, prefix in zip(weights, prefixes):
            if prefix in merged:
                logger.warning(
                    "%s: prefix %s is given twice; using it once with the summed weight", source, prefix
                )
            merged[prefix] = merged.get(prefix, 0.0) + w
        names = domain_names_from_prefixes(list(merged))
        doms = [Domain(names[p], (p,), w) for p, w in merged.items()]
        return cls(doms, source=source, keep_order=True, weights_from_sizes=sizes)

    @classmethod
    def from_data_args_file(cls, path: str | os.PathLike[str]) -> Mixture:
        """Load a Megatron ``--data-args-path`` file: a data path split over any whitespace (newlines too)."""
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise MixtureError(f"{os.fspath(path)}: cannot read the data-args file ({exc})") from None
        return cls.from_data_path(text.split(), source=os.fspath(path))

    @classmethod
    def load(cls, spec: str | os.PathLike[str] | Mapping[str, Any] | Sequence[str]) -> Mixture:
        """Load from a JSON path, a dict, or a Megatron data-path string/list."""
        if isinstance(spec, Mapping):
            return cls.from_dict(spec)
        if isinstance(spec, (str, os.PathLike)) and str(spec).endswith(".json"):
            return cls.from_json(spec)
        if isinstance(spec, (str, os.PathLike)) and os.path.isfile(spec):
            return cls.from_data_args_file(spec)  # a prefix is never a file itself (only prefix.bin/.idx)
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

    def to_data_path(self, prefix_tokens: Mapping[str, int] | None = None) -> str:
        """Megatron's ``--data-path`` string (exact weights, ``repr`` precision).

        A multi-prefix domain's weight is split over its prefixes in proportion to their tokens
        (``prefix_tokens``, else read from each shard's ``.idx``), so Megatron samples the domain as this project
        does. ``Mixture.from_data_path`` of the result has one domain per prefix with those weights.
        """
        items = []
        for d, w in zip(self.domains, self.weights):
            if len(d.prefixes) == 1:
                items.append(f"{float(w)!r} {d.prefixes[0]}")
                continue
            counts = [
                int(prefix_tokens[p])
                if prefix_tokens is not None and p in prefix_tokens
                else prefix_token_count(p, f"domain {d.name!r}")
                for p in d.prefixes
            ]
            total = sum(counts)
            for p, n in zip(d.prefixes, counts):
                share = float(w) * n / total if total > 0 else float(w) / len(d.prefixes)
                items.append(f"{share!r} {p}")
        return " ".join(items)


def _parse_number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def prefix_token_count(prefix: str, where: str = "mixture") -> int:
    """Tokens in shard ``prefix`` (from its ``.idx``); MixtureError naming the file when it cannot be read."""
    from megatron_doremi.data.indexed import IndexedDataset, IndexedDatasetError

    try:
        return IndexedDataset(prefix).num_tokens
    except IndexedDatasetError as exc:
        raise MixtureError(f"{where}: shard {prefix}: {exc}") from None


def domain_name_from_prefix(prefix: str) -> str:
    """``data/wiki_text_document`` -> ``wiki`` (Megatron's output suffix removed)."""
    base = os.path.basename(prefix.rstrip("/"))
    for suffix in ("_text_document", "_document"):
        if base.endswith(suffix) and len(base) > len(suffix):
            return base[: -len(suffix)]
    return base


def domain_names_from_prefixes(prefixes: Sequence[str]) -> dict[str, str]:
    """Distinct domain names for distinct prefixes: :func:`domain_name_from_prefix`, and where two prefixes
    give the same name, as many parent directories as it takes to tell them apart (``a/web``, ``b/web``)."""
    names: dict[str, str] = {}
    for prefix in prefixes:
        base = domain_name_from_prefix(prefix)
        clashes = [q for q in prefixes if q != prefix and domain_name_from_prefix(q) == base]
        if not clashes:
            names[prefix] = base
            continue
        parts = os.path.normpath(prefix).split(os.sep)[:-1]
        others = [os.path.normpath(q).split(os.sep)[:-1] for q in clashes]
        depth = 1
        while depth <= len(parts) and any(o[-depth:] == parts[-depth:] for o in others):
            depth += 1
        names[prefix] = "/".join([*parts[-depth:], base]) if parts else base
    if len(set(names.values())) != len(names):  # e.g. "a/x_text_document" and "a/x_document"
        names = {p: p for p in prefixes}
    return names
