"""Data fingerprints: what a domain's shards looked like when its weights were computed.

``data_fingerprint(mixture)`` -> ``{domain: {"tokens": int, "shards": [{"prefix", "bin_bytes", "idx_bytes",
"idx_sha256"}]}}``. ``regmix sample`` records it in ``manifest.json`` (``fingerprint``) and ``regmix search`` /
``regmix reuse`` copy it into ``domain_weights.json`` (``data_fingerprint``), so a later ``regmix reuse`` can tell
which domains changed. The ``.idx`` holds every document's length and offset, so adding, removing or resizing a
document changes its hash; an edit that keeps every document's length (same ``.bin`` size) is not detected: name
such domains with ``--changed``. Shards compare by content signature, not path (moving the data is no change).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from typing import Any

__all__ = ["data_fingerprint", "domain_changed", "shard_signature"]


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def shard_signature(prefix: str) -> dict[str, Any]:
    """``{"prefix", "bin_bytes", "idx_bytes", "idx_sha256"}`` of one shard (``prefix.bin`` / ``prefix.idx``)."""
    bin_path, idx_path = prefix + ".bin", prefix + ".idx"
    try:
        return {
            "prefix": os.path.abspath(prefix),
            "bin_bytes": os.path.getsize(bin_path),
            "idx_bytes": os.path.getsize(idx_path),
            "idx_sha256": _sha256(idx_path),
        }
    except OSError as exc:
        raise ValueError(f"{prefix}: cannot fingerprint the shard ({exc.strerror}: {exc.filename})") from None


def data_fingerprint(mixture: Any) -> dict[str, dict[str, Any]]:
    """The fingerprint of every domain of ``mixture`` (a :class:`~megatron_doremi.data.mixture.Mixture`)."""
    from megatron_doremi.data.indexed import IndexedDataset

    out: dict[str, dict[str, Any]] = {}
    for dom in mixture.domains:
        shards = [shard_signature(p) for p in dom.prefixes]
        tokens = sum(int(IndexedDataset(p).num_tokens) for p in dom.prefixes)
        out[dom.name] = {"tokens": tokens, "shards": shards}
    return out


def _content(entry: Mapping[str, Any]) -> list[tuple[Any, Any]]:
    return sorted((s.get("bin_bytes"), s.get("idx_sha256")) for s in entry.get("shards", []))


def domain_changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> str | None:
    """Why a domain's data differs between two fingerprint entries (None: the same data).

    Entries may be partial (an older manifest knows ``tokens`` and ``prefixes`` only): what both sides know is
    compared, content signatures first, then token counts, then the shard prefixes.
    """
    if old.get("shards") and new.get("shards") and all("idx_sha256" in s for s in old["shards"]):
        if _content(old) != _content(new):
            return "shard contents differ (.bin sizes or .idx hashes)"
        return None
    if (
        old.get("tokens") is not None
        and new.get("tokens") is not None
        and int(old["tokens"]) != int(new["tokens"])
    ):
        return f"token count {old['tokens']} -> {new['tokens']}"
    old_p = old.get("prefixes") or [s.get("prefix") for s in old.get("shards", [])]
    new_p = new.get("prefixes") or [s.get("prefix") for s in new.get("shards", [])]
    if old_p and new_p and sorted(map(os.path.abspath, old_p)) != sorted(map(os.path.abspath, new_p)):
        return "shard prefixes differ"
    return None
