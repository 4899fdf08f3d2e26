"""Shared fixtures: small token shards written with the project's own writer."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_doremi.data.indexed import IndexedDatasetWriter


def write_shard(prefix: str, documents: list[np.ndarray], dtype: np.dtype = np.uint16) -> str:
    """Write ``documents`` (1-D int arrays) as a Megatron shard at ``prefix``; returns the prefix."""
    with IndexedDatasetWriter(prefix, np.dtype(dtype)) as writer:
        for doc in documents:
            writer.add_document(np.asarray(doc))
    return prefix


def random_documents(
    rng: np.random.Generator, n: int, low: int, high: int, vocab: int = 1000
) -> list[np.ndarray]:
    """``n`` documents of random lengths in [low, high) with random token ids < vocab."""
    return [rng.integers(0, vocab, size=int(rng.integers(low, high))) for _ in range(n)]


@pytest.fixture
def make_shard(tmp_path):
    """Factory: make_shard(name, documents, dtype=uint16) -> prefix inside tmp_path."""

    def _make(name: str, documents: list[np.ndarray], dtype: np.dtype = np.uint16) -> str:
        return write_shard(str(tmp_path / f"{name}_text_document"), documents, dtype)

    return _make
