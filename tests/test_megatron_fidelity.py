"""Megatron-LM fidelity: split boundaries, GPTDataset sample order, blend weights, end-to-end global batches.

The oracles here are written from Megatron-Core's documented algorithms (gpt_dataset.py, helpers.cpp's
build_sample_idx, blended_megatron_dataset_builder.py) with plain Python loops; a second set of tests runs
megatron-core itself when it is importable (``pip install --no-deps megatron-core``), and is skipped otherwise.
"""

from __future__ import annotations

import functools
import json
import math
import warnings

import numpy as np
import pytest

from megatron_doremi.data.blending import BlendSchedule
from megatron_doremi.data.indexed import IndexedDataset
from megatron_doremi.data.loader import MixtureDataLoader, build_domain_datasets, megatron_blend_weights
from megatron_doremi.data.megatron_gpt import (
    MegatronSequences,
    build_megatron_indices,
    find_cached_indices,
    megatron_num_samples,
)
from megatron_doremi.data.mixture import Mixture
from megatron_doremi.data.sequences import DataError, split_document_ranges
from tests.conftest import random_documents, write_shard

SPLITS = ("98,1,1", "90,5,5", "969,30,1", "1,1,1")


# ---- oracle: Megatron-Core's split ----------------------------------------------------------------------------------


def megatron_core_split(num_elements: int, split: str) -> list[tuple[int, int] | None]:
    """parse_and_normalize_split -> convert_split_vector_to_split_matrix -> int(round(b * float(n))) per bookend."""
    values = [float(x) for x in split.split(",")]
    values += [0.0] * (3 - len(values))
    arr = np.array(values, dtype=np.float64)
    vector = (arr / np.sum(arr)).tolist()
    expansion = functools.reduce(lambda acc, v: acc + [acc[-1] + v], vector, [0])
    out: list[tuple[int, int] | None] = []
    for lo, hi in zip(expansion[:-1], expansion[1:]):
        if hi <= lo:
            out.append(None)
        else:
            out.append((int(round(lo * float(num_elements))), int(round(hi * float(num_elements)))))
    return out


@pytest.mark.parametrize("split", SPLITS)
def test_split_boundaries_match_megatron_core_for_every_count(split):
    for n in [*range(1, 5001), 10**6 + 7, 123_456_789, 2**31 - 1, 5 * 10**9 + 3]:
        ours = split_document_ranges(n, split)
        ref = megatron_core_split(n, split)
        for name, bookends in zip(("train", "valid", "test"), ref):
            if bookends is not None:
                assert ours[name] == bookends, (n, split, name)
        assert ours["train"][0] == 0 and ours["test"][1] == n


def test_split_156_documents_is_megatron_cores_not_the_old_arithmetic():
    assert split_document_ranges(156, "98,1,1")["train"] == (0, 153)


def test_each_prefix_of_a_domain_is_split_on_its_own(tmp_path):
    rng = np.random.default_rng(0)
    a = write_shard(str(tmp_path / "a_text_document"), random_documents(rng, 100, 20, 40))
    b = write_shard(str(tmp_path / "b_text_document"), random_documents(rng, 50, 20, 40))
    mix = Mixture.from_dict({"domains": {"web": {"prefixes": [a, b], "weight": 1.0}}})
    data = build_domain_datasets(mix, 8, "80,10,10", seed=1)
    for split, docs in (("train", 80 + 40), ("valid", 10 + 5), ("test", 10 + 5)):
        ds = data[split][0]
        assert ds.num_documents == docs
        assert set(np.unique(ds._doc_shard).tolist()) == {0, 1}  # both prefixes give valid and test documents


# ---- oracle: GPTDataset's indices ------------------------------------------------------------------------------------


def oracle_indices(
    lengths: np.ndarray, lo: int, hi: int, seq_length: int, num_samples: int | None, seed: int
):
    """GPTDataset._build_document_sample_shuffle_indices as documented, with loops (RandomState calls as Megatron)."""
    tokens_per_epoch = int(sum(int(x) for x in lengths[lo:hi]))
    epochs = 1
    if num_samples is not None:
        total_tokens = tokens_per_epoch
        while total_tokens < num_samples * seq_length + 1:
            epochs += 1
            total_tokens += tokens_per_epoch
    separate = False
    if epochs > 1:
        before = ((epochs - 1) * tokens_per_epoch - 1) // seq_length
        from_final = num_samples - before
        per_epoch = (tokens_per_epoch - 1) // seq_length
        separate = from_final < int(0.80 * per_epoch)
    rs = np.random.RandomState(seed)

    def doc_index(n_epochs):
        arr = np.array([d for _ in range(n_epochs) for d in range(lo, hi)], dtype=np.int32)
        rs.shuffle(arr)
        return arr

    docs = np.concatenate([doc_index(epochs - 1), doc_index(1)]) if separate else doc_index(epochs)
    # build_sample_idx: walk the documents taking L + 1 tokens per sample, the next one starting L later
    total = (epochs * tokens_per_epoch - 1) // seq_length
    sample = [(0, 0)]
    pos, offset = 0, 0
    while len(sample) <= total:
        remaining = seq_length + 1
        while remaining != 0:
            doc_len = int(lengths[docs[pos]]) - offset
            remaining -= doc_len
            if remaining <= 0:
                offset += remaining + doc_len - 1
                remaining = 0
            else:
                pos += 1
                offset = 0
        sample.append((pos, offset))
    dtype = np.uint32 if total < np.iinfo(np.uint32).max - 1 else np.int64

    def shuffled(a, b):
        arr = np.arange(a, b, dtype=dtype)
        rs.shuffle(arr)
        return arr

    if separate:
        head = ((epochs - 1) * tokens_per_epoch - 1) // seq_length
        shuffle = np.concatenate([shuffled(0, head), shuffled(head, total)])
    else:
        shuffle = shuffled(0, total)
    return docs, np.array(sample, dtype=np.int64), shuffle, epochs, separate


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    rng = np.random.default_rng(5)
    docs = random_documents(rng, 400, 1, 200)
    docs[3] = np.array([], dtype=np.int64)  # an empty document
    return IndexedDataset(write_shard(str(tmp_path_factory.mktemp("m") / "m_text_document"), docs))


@pytest.mark.parametrize(
    "num_samples, seq_length",
    [(None, 64), (50, 64), (280, 64), (300, 64), (600, 64), (2000, 33), (10_000, 16), (1, 2000)],
)
def test_megatron_indices_equal_the_documented_algorithm(shard, num_samples, seq_length):
    lo, hi = 7, 390
    ours = build_megatron_indices(shard.sequence_lengths, lo, hi, seq_length, num_samples, 1234)
    docs, sample, shuffle, epochs, separate = oracle_indices(
        shard.sequence_lengths, lo, hi, seq_length, num_samples, 1234
    )
    assert ours.num_epochs == epochs and ours.separate_final_epoch == separate
    assert ours.document_index.dtype == np.int32 and np.array_equal(ours.document_index, docs)
    assert np.array_equal(ours.sample_index.astype(np.int64), sample)
    assert ours.shuffle_index.dtype == shuffle.dtype and np.array_equal(ours.shuffle_index, shuffle)
    if num_samples is not None:
        assert ours.num_samples >= num_samples


def test_the_parameter_grid_covers_both_final_epoch_cases(shard):
    seen = {
        build_megatron_indices(shard.sequence_lengths, 7, 390, 64, n, 1234).separate_final_epoch
        for n in (280, 600)
    }
    assert seen == {True, False}


def test_megatron_samples_are_the_tokens_megatron_reads(shard):
    L = 32
    ds = MegatronSequences("m", shard, "train", (7, 390), L, seed=9, num_samples=500)
    docs, sample, shuffle, _, _ = oracle_indices(shard.sequence_lengths, 7, 390, L, 500, 9)
    stream = np.concatenate([shard[int(d)] for d in docs]).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum([len(shard[int(d)]) for d in docs])])
    ks = np.arange(0, len(ds), 7)
    batch = ds.get_batch(ks, out_dtype=np.int64)
    for row, k in zip(batch, ks):
        j = int(shuffle[k])
        flat = starts[sample[j, 0]] + sample[j, 1]
        assert np.array_equal(row, stream[flat : flat + L + 1])


def test_megatron_sample_count_rule():
    assert megatron_num_samples(None, 1, 1000) == [1000]
    assert megatron_num_samples(None, 3, 1000) == [None, None, None]
    assert megatron_num_samples([0.25, 0.75], 2, 1000) == [
        int(math.ceil(math.ceil(1000 * 0.25) * 1.005)),
        int(math.ceil(math.ceil(1000 * 0.75) * 1.005)),
    ]
    with pytest.raises(DataError, match="sample count"):
        megatron_num_samples([1.0], 1, None)


def test_cached_megatron_indices_are_found_and_checked(shard, tmp_path):
    built = build_megatron_indices(shard.sequence_lengths, 7, 390, 64, 300, 1234)
    cache = tmp_path / "cache"
    cache.mkdir()
    desc = {"class": "GPTDataset", "dataset_path": shard.prefix, "num_samples": 300, "index_split": "train",
            "random_seed": 1234, "sequence_length": 64}  # fmt: skip
    (cache / "abc-GPTDataset-train-description.txt").write_text(json.dumps(desc, indent=4))
    # a reversed shuffle index proves the cache is what gets used
    np.save(cache / "abc-GPTDataset-train-document_index.npy", built.document_index)
    np.save(cache / "abc-GPTDataset-train-sample_index.npy", built.sample_index)
    np.save(cache / "abc-GPTDataset-train-shuffle_index.npy", built.shuffle_index[::-1].copy())
    found = find_cached_indices(str(cache), shard.prefix, "train", 1234, 64, 300)
    assert found is not None and np.array_equal(found.shuffle_index, built.shuffle_index[::-1])
    assert find_cached_indices(str(cache), shard.prefix, "valid", 1234, 64, 300) is None
    assert find_cached_indices(str(cache), shard.prefix, "train", 99, 64, 300) is None
    ds = MegatronSequences("m", shard, "train", (7, 390), 64, 1234, 300, cache_dir=str(cache))
    fresh = MegatronSequences("m", shard, "train", (7, 390), 64, 1234, 300)
    assert np.array_equal(ds.get_batch(np.array([0])), fresh.get_batch(np.array([len(fresh) - 1])))
    with pytest.raises(
        DataError, match="different"
    ):  # the cache's documents are outside another split's range
        MegatronSequences("m", shard, "train", (7, 200), 64, 1234, 300, cache_dir=str(cache))


def test_megatron_packing_needs_one_prefix_per_domain(tmp_path):
    rng = np.random.default_rng(0)
    a = write_shard(str(tmp_path / "a_text_document"), random_documents(rng, 50, 20, 40))
    b = write_shard(str(tmp_path / "b_text_document"), random_documents(rng, 50, 20, 40))
    mix = Mixture.from_dict({"domains": {"web": {"prefixes": [a, b], "weight": 1.0}}})
    with pytest.raises(DataError, match="one\\s+dataset per prefix"):
        build_domain_datasets(
            mix, 8, "90,5,5", packing="megatron", num_samples={"train": 10, "valid": 1, "test": 1}
        )


# ---- end to end: a Megatron data path gives Megatron's global batches ------------------------------------------------


def megatron_blend_oracle(raw_weights, sizes_per_epoch, target):
    """The builder's normalize, per-dataset num_samples, BlendedDataset's normalize and greedy (loops)."""
    w = np.array(raw_weights, dtype=np.float64)
    w1 = (w / np.sum(w)).tolist()
    num_samples = [int(math.ceil(math.ceil(target * x) * 1.005)) for x in w1]
    w2 = (np.array(w1) / np.sum(np.array(w1))).tolist()
    counts = [0] * len(w2)
    out = []
    for i in range(target):
        x = max(float(i), 1.0)
        best = max(range(len(w2)), key=lambda d: (w2[d] * x - counts[d], -d))
        out.append((best, counts[best]))
        counts[best] += 1
    return num_samples, out


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    rng = np.random.default_rng(11)
    root = tmp_path_factory.mktemp("dp")
    prefixes = [
        write_shard(str(root / f"{name}_text_document"), random_documents(rng, n, 5, 150, vocab=900))
        for name, n in (("zeta", 300), ("alpha", 120), ("mid", 200))
    ]
    return prefixes


def test_megatron_packing_and_exact_blend_give_megatrons_global_batches(data_path):
    L, gbs, iters, seed = 16, 12, 40, 1234
    raw = [0.5, 0.2, 0.3]
    text = " ".join(f"{w} {p}" for w, p in zip(raw, data_path))
    mix = Mixture.from_data_path(text)
    assert [d.prefixes[0] for d in mix.domains] == data_path  # data-path order, not sorted
    target = iters * gbs
    data = build_domain_datasets(
        mix, L, "90,8,2", seed, packing="megatron", num_samples={"train": target, "valid": 24, "test": 12}
    )
    num_samples, blend = megatron_blend_oracle(raw, None, target)
    schedule = BlendSchedule([(0, mix.weights / mix.weights.sum())], mode="exact")
    loader = MixtureDataLoader(data["train"], schedule, gbs, 4)
    for t in range(iters):
        batches = loader.next_batch()
        got = np.concatenate([np.concatenate([b["input_ids"], b["labels"][:, -1:]], axis=1) for b in batches])
        for row, i in zip(got, range(t * gbs, (t + 1) * gbs)):
            d, k = blend[i]
            shard = IndexedDataset(data_path[d])
            lo, hi = split_document_ranges(len(shard), "90,8,2")["train"]
            docs, sample, shuffle, _, _ = oracle_indices(
                shard.sequence_lengths, lo, hi, L, num_samples[d], seed
            )
            j = int(shuffle[k])
            stream = np.concatenate([shard[int(x)] for x in docs[sample[j, 0] : sample[j + 1, 0] + 1]])
            start = int(sample[j, 1])
            np.testing.assert_array_equal(row, stream[start : start + L + 1].astype(np.int64))
    for ds, n in zip(data["train"], num_samples):
        assert len(ds) >= n


def test_megatron_blend_weights_are_the_twice_normalised_raw_weights(data_path):
    mix = Mixture.from_data_path(f"0.3 {data_path[0]} 0.1 {data_path[1]} 0.6 {data_path[2]}")
    w = np.array([0.3, 0.1, 0.6])
    w1 = w / np.sum(w)
    assert megatron_blend_weights(mix).tolist() == (w1 / np.sum(w1)).tolist()
    unweighted = Mixture.from_data_path(" ".join(data_path))
    assert unweighted.weights_from_sizes
    assert megatron_blend_weights(unweighted, [3, 1, 4]).tolist() == (np.array([3.0, 1, 4]) / 8).tolist()


# ---- megatron-core itself (optional) ---------------------------------------------------------------------------------


def _megatron_core():
    warnings.filterwarnings("ignore")
    try:
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
        from megatron.core.datasets.utils import get_blend_from_list
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        pytest.skip("megatron-core is not importable (pip install --no-deps megatron-core)")
    return BlendedMegatronDatasetBuilder, GPTDataset, GPTDatasetConfig, get_blend_from_list


class _Tok:
    eod, pad, vocab_size = 0, -1, 1000
    special_tokens_dict: dict = {}
    unique_identifiers = {"class": "Tok"}


@pytest.fixture
def one_process_group():
    import torch.distributed as torch_dist

    from tests.conftest import free_port

    if torch_dist.is_initialized():
        yield
        return
    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        torch_dist.destroy_process_group()


@pytest.mark.parametrize("weighted", [True, False])
def test_against_megatron_core_builder(data_path, tmp_path, weighted, one_process_group):
    Builder, GPTDataset, GPTDatasetConfig, get_blend_from_list = _megatron_core()
    L, seed, split = 16, 77, "90,8,2"
    items = [x for w, p in zip([5, 2, 3], data_path) for x in (str(w), p)] if weighted else list(data_path)
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=L, blend=get_blend_from_list(items), split=split, tokenizer=_Tok(),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False, path_to_cache=str(tmp_path),
    )  # fmt: skip
    sizes = [480, 48, 12]
    train, _, _ = Builder(GPTDataset, sizes, lambda: True, config).build()
    mix = Mixture.from_data_path(items)
    data = build_domain_datasets(
        mix, L, split, seed, packing="megatron", num_samples=dict(zip(("train", "valid", "test"), sizes))
    )
    if not weighted:
        mix = mix.with_weights([len(ds) for ds in data["train"]])
    schedule = BlendSchedule([(0, mix.weights / mix.weights.sum())], mode="exact")
    loader = MixtureDataLoader(data["train"], schedule, 48, 48)
    ours = np.concatenate([np.concatenate([b["input_ids"] for b in loader.next_batch()]) for _ in range(10)])
    theirs = np.stack([train[i]["tokens"].numpy() for i in range(480)])
    np.testing.assert_array_equal(ours, theirs)
    # and Megatron's cache, read back, gives the same order
    cached = build_domain_datasets(
        mix,
        L,
        split,
        seed,
        packing="megatron",
        num_samples=dict(zip(("train", "valid", "test"), sizes)),
        cache_dir=str(tmp_path),
    )
    for a, b in zip(cached["train"], data["train"]):
        assert a.indices.source != "built" and np.array_equal(
            np.asarray(a.indices.shuffle_index), b.indices.shuffle_index
        )


def test_domain_weights_json_data_path_shares_multi_shard_domains_by_tokens(tmp_path):
    from megatron_doremi.mixers.weights_io import write_domain_weights_json

    big = write_shard(str(tmp_path / "big_text_document"), [np.arange(900) % 7])
    small = write_shard(str(tmp_path / "small_text_document"), [np.arange(100) % 7])
    code = write_shard(str(tmp_path / "code_text_document"), [np.arange(50) % 7])
    path = tmp_path / "domain_weights.json"
    write_domain_weights_json(
        path, ["code", "web"], [0.2, 0.8], [0.5, 0.5], prefixes={"web": [big, small], "code": [code]}
    )
    doc = json.loads(path.read_text())
    back = Mixture.from_data_path(doc["average"]["data_path"])
    got = {d.prefixes[0]: w for d, w in zip(back.domains, back.weights)}
    assert abs(got[big] - 0.72) < 1e-12 and abs(got[small] - 0.08) < 1e-12 and abs(got[code] - 0.2) < 1e-12
    same = Mixture.from_dict(doc["final"]["mixture"])
    assert same.names == ("code", "web") and np.allclose(same.weights, [0.5, 0.5], rtol=0, atol=1e-12)
