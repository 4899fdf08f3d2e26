import json

import numpy as np
import pytest
import torch

from megatron_doremi.data.blending import BlendSchedule
from megatron_doremi.data.indexed import IndexedDatasetError
from megatron_doremi.data.loader import DataError, MixtureDataLoader, build_domain_datasets, iter_eval_batches
from megatron_doremi.data.mixture import Mixture
from tests.conftest import random_documents

L = 16


@pytest.fixture
def mixture(make_shard):
    rng = np.random.default_rng(0)
    prefixes = {
        name: make_shard(name, random_documents(rng, 120, 5, 60, vocab=500 + i))
        for i, name in enumerate("abc")
    }
    return Mixture.from_dict(
        {
            "domains": {
                n: {"prefixes": [p], "weight": w} for (n, p), w in zip(prefixes.items(), [0.5, 0.3, 0.2])
            }
        }
    )


def _loader(mixture, rank=0, world=1, consumed=0, gbs=12, mbs=2):
    data = build_domain_datasets(mixture, L, "90,5,5", seed=3)
    schedule = BlendSchedule([(0, mixture.weights)], period=1000)
    return MixtureDataLoader(data["train"], schedule, gbs, mbs, rank, world, consumed)


def _flatten(batches):
    return (
        torch.cat([b["input_ids"] for b in batches]),
        torch.cat([b["labels"] for b in batches]),
        torch.cat([b["domain_id"] for b in batches]),
    )


def test_micro_batches_are_aligned_and_shaped(mixture):
    loader = _loader(mixture)
    batches = loader.next_batch()
    assert loader.num_micro_batches == 6 and len(batches) == 6
    for b in batches:
        assert b["input_ids"].shape == (2, L) and b["labels"].shape == (2, L) and b["domain_id"].shape == (2,)
        assert b["input_ids"].dtype == torch.int64
        np.testing.assert_array_equal(b["input_ids"][:, 1:], b["labels"][:, :-1])  # labels = sample[1:L+1]
    assert loader.consumed_samples == 12


def test_two_ranks_see_disjoint_slices_of_the_single_rank_batch(mixture):
    single = _loader(mixture)
    r0, r1 = _loader(mixture, 0, 2), _loader(mixture, 1, 2)
    for _ in range(3):
        ids, labels, doms = _flatten(single.next_batch())
        ids0, _, d0 = _flatten(r0.next_batch())
        ids1, _, d1 = _flatten(r1.next_batch())
        torch.testing.assert_close(torch.cat([ids0, ids1]), ids)
        torch.testing.assert_close(torch.cat([d0, d1]), doms)
    # domain ids follow the blend: realised proportions near the weights
    loader = _loader(mixture, gbs=100, mbs=100)
    counts = np.bincount(_flatten(loader.next_batch())[2].numpy(), minlength=3)
    np.testing.assert_allclose(counts / 100, mixture.weights, atol=0.02)


def test_resume_from_state_is_exact_even_with_another_world_size(mixture):
    full = _loader(mixture)
    steps = [_flatten(full.next_batch())[0] for _ in range(8)]
    first = _loader(mixture)
    for _ in range(3):
        first.next_batch()
    first.set_weights([0.5, 0.5, 0.0])
    first.set_weights(
        [0.1, 0.1, 0.8]
    )  # replaces the unused segment; a segment must survive the checkpoint too
    assert first.schedule.num_segments == 2
    state = json.loads(json.dumps(first.state_dict()))
    after_switch = [_flatten(first.next_batch())[0] for _ in range(5)]
    for world in (1, 2):
        resumed = [_loader(mixture, r, world) for r in range(world)]
        for ld in resumed:
            ld.load_state_dict(state)
        for t in range(5):
            ids = torch.cat([_flatten(ld.next_batch())[0] for ld in resumed])
            torch.testing.assert_close(ids, after_switch[t])
    # and without the switch, resuming at step 3 reproduces the uninterrupted run
    plain = _loader(mixture, consumed=36)
    torch.testing.assert_close(_flatten(plain.next_batch())[0], steps[3])


def test_batch_size_identity_is_checked(mixture):
    with pytest.raises(ValueError, match="micro_batch_size 5"):
        _loader(mixture, gbs=12, mbs=5)
    with pytest.raises(ValueError, match="world size 5"):
        _loader(mixture, world=5, gbs=12, mbs=2)


def test_eval_batches_split_across_ranks(mixture):
    data = build_domain_datasets(mixture, L, "90,5,5", seed=3)
    valid = data["valid"][1]
    full = torch.cat([b["input_ids"] for b in iter_eval_batches(valid, 7, 2, domain_id=1)])
    assert full.shape[0] == min(7, len(valid))
    parts = [list(iter_eval_batches(valid, 7, 2, 1, rank=r, world_size=2)) for r in range(2)]
    mbs = [parts[i % 2][i // 2]["input_ids"] for i in range(len(parts[0]) + len(parts[1]))]
    torch.testing.assert_close(torch.cat(mbs), full)
    assert all((b["domain_id"] == 1).all() for p in parts for b in p)


def test_missing_prefix_and_tiny_domain_are_named(make_shard, tmp_path):
    mix = Mixture.from_data_path(f"1 {tmp_path}/nothing_text_document")
    with pytest.raises(IndexedDatasetError, match="nothing_text_document"):
        build_domain_datasets(mix, L)
    tiny = make_shard("tiny", [np.arange(10)] * 50)
    with pytest.raises(DataError, match="domain 'tiny': the valid split"):
        build_domain_datasets(Mixture.from_data_path(tiny), L, "99,1,0")
    with pytest.raises(DataError, match="cannot give one sample"):
        build_domain_datasets(Mixture.from_data_path(tiny), 1000, "1")
