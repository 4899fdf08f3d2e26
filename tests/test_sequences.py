import numpy as np
import pytest

from megatron_doremi.data.indexed import IndexedDataset
from megatron_doremi.data.sequences import (
    DataError,
    DomainSequences,
    Permutation,
    build_sample_index,
    parse_split,
    split_document_ranges,
)
from tests.conftest import random_documents


def test_split_ranges_cover_documents_contiguously():
    ranges = split_document_ranges(1000, "98,1,1")
    assert ranges == {"train": (0, 980), "valid": (980, 990), "test": (990, 1000)}
    ranges = split_document_ranges(7, "2/1")
    assert ranges["train"][0] == 0 and ranges["test"] == (7, 7)
    assert ranges["train"][1] == ranges["valid"][0]
    assert parse_split("1") == (1.0, 0.0, 0.0)
    for bad in ("a,b", "1,2,3,4", "-1,1", "0,0,0"):
        with pytest.raises(DataError):
            parse_split(bad)


@pytest.mark.parametrize("native", [True, False])
def test_sample_index_matches_a_direct_scan(native, monkeypatch):
    if not native:
        monkeypatch.setenv("MEGATRON_DOREMI_NO_NATIVE", "1")
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 50, size=500)
    lengths[:3] = 0  # empty documents are skipped
    L = 37
    S = (int(lengths.sum()) - 1) // L
    idx = build_sample_index(lengths, L, S)
    assert idx.shape == (S + 1, 2) and idx.dtype == np.int64
    starts = np.concatenate([[0], np.cumsum(lengths)])
    for j in range(S + 1):
        doc, off = idx[j]
        assert 0 <= off < lengths[doc]
        assert starts[doc] + off == j * L


def test_sample_index_native_equals_fallback(monkeypatch):
    lengths = np.random.default_rng(1).integers(0, 3000, size=20000)
    native = build_sample_index(lengths, 2048, (int(lengths.sum()) - 1) // 2048)
    monkeypatch.setenv("MEGATRON_DOREMI_NO_NATIVE", "1")
    fallback = build_sample_index(lengths, 2048, (int(lengths.sum()) - 1) // 2048)
    np.testing.assert_array_equal(native, fallback)


def _domain(make_shard, docs, L=16, split=(0, None), seed=7, shuffle=True, name="web"):
    shard = IndexedDataset(make_shard(name, docs))
    hi = len(docs) if split[1] is None else split[1]
    return DomainSequences(name, [shard], "train", (split[0], hi), L, seed, shuffle=shuffle)


def test_samples_are_windows_of_the_epoch_stream(make_shard):
    docs = random_documents(np.random.default_rng(2), 60, 1, 40)
    ds = _domain(make_shard, docs, L=16)
    ep = ds.epoch(0)
    # the epoch's document order must be a permutation of the documents; rebuild its stream from `docs`
    order = ep.order.tolist()
    assert sorted(order) == list(range(len(docs)))
    assert order != list(range(len(docs)))  # shuffled
    order_stream = np.concatenate([docs[i] for i in order])
    S = len(ds)
    assert S == (sum(len(d) for d in docs) - 1) // 16
    batch = ds.get_batch(np.arange(S))
    for k in range(S):
        j = int(ep.samples(np.array([k]))[0])
        np.testing.assert_array_equal(batch[k], order_stream[j * 16 : j * 16 + 17])
    assert sorted(ep.samples(np.arange(S)).tolist()) == list(range(S))  # each window once per epoch


def test_epochs_wrap_with_new_order_and_are_deterministic(make_shard):
    docs = random_documents(np.random.default_rng(3), 40, 5, 30)
    a = _domain(make_shard, docs, name="a")
    b = _domain(make_shard, docs, name="a")
    S = len(a)
    ks = np.arange(3 * S)
    np.testing.assert_array_equal(
        a.get_batch(ks), b.get_batch(ks[::-1])[::-1]
    )  # any query order, same answer
    assert not np.array_equal(a.epoch(0).samples(np.arange(S)), a.epoch(1).samples(np.arange(S)))
    assert not np.array_equal(a.epoch(0).order, a.epoch(1).order)
    c = DomainSequences("a", [IndexedDataset(make_shard("a", docs))], "train", (0, 40), 16, seed=8)
    assert not np.array_equal(a.get_batch(np.arange(S)), c.get_batch(np.arange(S)))


def test_native_and_fallback_reads_agree(make_shard, monkeypatch):
    docs = random_documents(np.random.default_rng(4), 80, 1, 50)
    ds = _domain(make_shard, docs, L=24)
    ks = np.random.default_rng(5).integers(0, 4 * len(ds), size=300)
    native = ds.get_batch(ks, out_dtype=np.int64)
    monkeypatch.setenv("MEGATRON_DOREMI_NO_NATIVE", "1")
    fresh = _domain(make_shard, docs, L=24)
    np.testing.assert_array_equal(native, fresh.get_batch(ks, out_dtype=np.int64))
    np.testing.assert_array_equal(native[0], fresh[int(ks[0])])


def test_domain_too_small_for_one_sample_is_named(make_shard):
    with pytest.raises(
        DataError,
        match=r"domain 'tiny' train split: 2 documents with 10 tokens cannot give one sample of seq_length 16",
    ):
        _domain(make_shard, [np.arange(5), np.arange(5)], L=16, name="tiny")


def test_split_ranges_select_documents(make_shard):
    docs = [np.full(20, i) for i in range(10)]
    ds = _domain(make_shard, docs, L=8, split=(7, 10), shuffle=False)
    tokens = ds.get_batch(np.arange(len(ds)))
    assert set(np.unique(tokens).tolist()) <= {7, 8, 9}
    np.testing.assert_array_equal(tokens[0], [7] * 9)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_permutation_is_a_bijection_and_native_equals_numpy(n, monkeypatch):
    perm = Permutation(n, np.random.default_rng(n))
    native = perm.materialise()
    assert sorted(native.tolist()) == list(range(n))
    xs = np.random.default_rng(0).integers(0, n, size=50)
    np.testing.assert_array_equal(perm(xs), native[xs])
    monkeypatch.setenv("MEGATRON_DOREMI_NO_NATIVE", "1")
    np.testing.assert_array_equal(perm.materialise(), native)
    with pytest.raises(IndexError):
        perm(np.array([n]))
    if n >= 64:  # a real shuffle: few fixed points, not the identity
        assert (native == np.arange(n)).mean() < 0.1
