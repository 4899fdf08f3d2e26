"""Bits per byte against a hand computation on multi-byte UTF-8 text, and "all" evaluation coverage."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megatron_doremi.data.indexed import IndexedDataset
from megatron_doremi.data.sequences import DomainSequences
from megatron_doremi.data.token_bytes import byte_decoder, token_byte_lengths
from megatron_doremi.data.tokenizer import ENDOFTEXT, train_bpe_tokenizer
from megatron_doremi.training.evaluation import evaluate_domains, summarize_eval
from tests.conftest import write_shard

TEXTS = [
    "naïve café über straße déjà vu",
    "日本語のテキストです。漢字とかな",
    "emoji 🙂🚀 mixed with ascii words",
    "Ωmega ∑ summation → arrows ≠ equal",
    "plain english words are here too",
]
DOCS = ["Grüße aus Köln 🙂", "東京 tower ≥ 333m", "ascii only", "🚀🚀 ∑∑ naïve"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_bpe_tokenizer(TEXTS * 10, 300, tmp_path_factory.mktemp("tok"))


def test_byte_decoder_is_the_byte_level_alphabet():
    from tokenizers import pre_tokenizers

    assert set(byte_decoder()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert sorted(byte_decoder().values()) == list(range(256))


def test_token_bytes_sum_to_the_documents_utf8_bytes(tok):
    table = token_byte_lengths(tok, vocab_size=tok.get_vocab_size() + 5)
    assert table.shape == (tok.get_vocab_size() + 5,)
    assert table[tok.token_to_id(ENDOFTEXT)] == 0  # special: not part of the document text
    assert (table[-5:] == 0).all()  # model ids past the tokenizer
    split_char = False
    for doc in DOCS:
        ids = tok.encode(doc).ids
        assert tok.decode(ids) == doc
        assert int(table[ids].sum()) == len(doc.encode("utf-8"))
        naive = sum(len(tok.decode([i]).encode("utf-8")) for i in ids)
        split_char |= naive != len(doc.encode("utf-8"))
    assert split_char, "the test text should have a multi-byte character split over pieces"


def _domain(tmp_path, name, docs, tok, seq_length=None):
    eod = tok.token_to_id(ENDOFTEXT)
    # a first document [eod] makes the stream's first token (never a target) a 0-byte one
    token_docs = [np.array([eod])] + [np.array(tok.encode(d).ids + [eod]) for d in docs]
    n = sum(len(d) for d in token_docs)
    prefix = write_shard(str(tmp_path / f"{name}_text_document"), token_docs)
    shard = IndexedDataset(prefix)
    L = seq_length or n - 1
    ds = DomainSequences(name, [shard], "valid", (0, len(token_docs)), L, seed=1, shuffle=False)
    return ds, n


def test_bpb_hand_computation(tmp_path, tok):
    vocab = tok.get_vocab_size()
    ds_a, n_a = _domain(tmp_path, "a", DOCS[:2], tok)
    ds_b, n_b = _domain(tmp_path, "b", DOCS[2:], tok)

    def forward(input_ids, **_):  # uniform prediction: every target costs ln V nats
        return torch.zeros(*input_ids.shape, vocab)

    table = token_byte_lengths(tok)
    res = evaluate_domains(
        forward, [ds_a, ds_b], ["a", "b"], None, 1, 0, 1, torch.device("cpu"), token_bytes=table
    )
    for name, docs, n in (("a", DOCS[:2], n_a), ("b", DOCS[2:], n_b)):
        hand_bytes = sum(len(d.encode("utf-8")) for d in docs)
        dom = res["domains"][name]
        assert dom["tokens"] == n - 1 and dom["bytes"] == hand_bytes
        assert dom["bpb"] == pytest.approx((n - 1) * math.log(vocab) / (math.log(2) * hand_bytes), rel=1e-6)
    total_bytes = sum(len(d.encode("utf-8")) for d in DOCS)
    tw = res["token_weighted"]
    assert tw["bpb"] == pytest.approx(
        (n_a + n_b - 2) * math.log(vocab) / (math.log(2) * total_bytes), rel=1e-6
    )
    assert tw["weights"]["a"] == pytest.approx((n_a - 1) / (n_a + n_b - 2))


def test_token_weighted_average_uses_the_split_shares():
    # domain a: 10 of its 100 samples evaluated (scale 10), b: all 50 (scale 1); mean losses 1 and 3
    res = summarize_eval(
        ["a", "b"], np.array([40.0, 600.0]), np.array([40.0, 200.0]), split_scale=[10.0, 1.0]
    )
    assert res["token_weighted"]["weights"] == {"a": pytest.approx(400 / 600), "b": pytest.approx(200 / 600)}
    assert res["token_weighted"]["loss"] == pytest.approx((400 * 1 + 200 * 3) / 600)
    assert res["domains"]["a"]["bpb"] is None and res["token_weighted"]["bpb"] is None


@pytest.mark.parametrize("world_size", [1, 2])
def test_all_covers_each_sample_once(tmp_path, tok, world_size):
    ds, _ = _domain(tmp_path, f"c{world_size}", DOCS * 3, tok, seq_length=8)
    ds2, _ = _domain(tmp_path, f"d{world_size}", DOCS, tok, seq_length=8)
    datasets = [ds, ds2]
    seen: dict[int, list[tuple[int, ...]]] = {0: [], 1: []}
    tokens = np.zeros(2)

    def forward(input_ids, **_):
        return torch.zeros(*input_ids.shape, tok.get_vocab_size())

    def on_batch(d, batch, logits):
        seen[d].extend(tuple(r) for r in batch["input_ids"].tolist())

    for rank in range(world_size):  # each rank's share (the all-reduce is a no-op without a process group)
        res = evaluate_domains(
            forward, datasets, ["c", "d"], None, 3, rank, world_size, torch.device("cpu"), on_batch=on_batch
        )
        tokens += [res["domains"][n]["tokens"] for n in ("c", "d")]
    for d, dset in enumerate(datasets):
        expected = [tuple(r[:-1]) for r in dset.get_batch(np.arange(len(dset)), out_dtype=np.int64).tolist()]
        assert sorted(seen[d]) == sorted(expected)  # every sample of the split, exactly once
        assert tokens[d] == len(dset) * 8
    assert res["domains"]["c"]["samples"] == res["domains"]["c"]["split_samples"] == len(ds)


def test_megatron_packing_all_is_one_epoch_of_each_weighted_domain(make_shard):
    from megatron_doremi.data.loader import build_domain_datasets
    from megatron_doremi.data.mixture import Mixture
    from megatron_doremi.data.run_data import sample_targets
    from megatron_doremi.training.evaluation import epoch_samples
    from tests.conftest import random_documents

    rng = np.random.default_rng(0)
    doms = {n: {"prefixes": [make_shard(n, random_documents(rng, 80, 20, 60, vocab=50))], "weight": w}
            for n, w in (("a", 0.8), ("b", 0.2))}  # fmt: skip
    targets = sample_targets(10, 4, 0, "all")
    assert targets == {"train": 40, "valid": None, "test": None}
    data = build_domain_datasets(Mixture.from_dict({"domains": doms}), 8, "80,10,10", packing="megatron",
                                 num_samples=targets)  # fmt: skip
    for ds in data["valid"]:
        assert len(ds) == epoch_samples(ds) == (ds.num_tokens - 1) // 8


def test_sentencepiece_byte_fallback_counts_one_leading_space_per_document(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    from megatron_doremi.data.tokenizer import SentencePieceAdapter

    (tmp_path / "sp.txt").write_text("\n".join(TEXTS * 30))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "sp.txt"), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=400, byte_fallback=True, character_coverage=0.98, hard_vocab_limit=False,
                                   minloglevel=2)  # fmt: skip
    sp = SentencePieceAdapter(str(tmp_path / "sp.model"))
    table = token_byte_lengths(sp)
    for doc in DOCS:
        ids = sp.sp.encode(doc)
        assert sp.sp.decode(ids) == doc
        assert int(table[ids].sum()) == len(doc.encode("utf-8")) + 1  # the "▁" decoding strips
