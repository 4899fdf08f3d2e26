"""DoReMi proxy sampling weights decoupled from the reference's training weights; reference tokenizer digests."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_doremi.data.blending import BlendSchedule
from megatron_doremi.data.loader import MixtureDataLoader, build_domain_datasets
from megatron_doremi.data.mixture import Mixture
from megatron_doremi.mixers.base import MixerError
from megatron_doremi.mixers.doremi import DoReMiMixer
from megatron_doremi.training.config import ConfigError
from megatron_doremi.training.mixer_factory import build_mixer
from tests.conftest import random_documents

REF = [0.7, 0.2, 0.1]


@pytest.fixture
def mixture(make_shard):
    rng = np.random.default_rng(0)
    doms = {n: {"prefixes": [make_shard(n, random_documents(rng, 60, 20, 60, vocab=50))], "weight": w}
            for n, w in zip(("a", "b", "c"), REF)}  # fmt: skip
    return Mixture.from_dict({"domains": doms})


def _domain_counts(mixture, weights, steps=40, gbs=32):
    data = build_domain_datasets(mixture, 8, "90,5,5", seed=3)
    loader = MixtureDataLoader(data["train"], BlendSchedule([(0, weights)], period=1000), gbs, gbs)
    counts = np.zeros(3)
    for _ in range(steps):
        for mb in loader.next_batch():
            counts += np.bincount(mb["domain_id"].numpy(), minlength=3)
    return counts / counts.sum()


def _doremi(mixture, **keys):
    return build_mixer({"type": "doremi", "reference": None, **keys}, mixture)


def test_proxy_samples_by_sampling_weights_and_the_reference_by_reference_weights(mixture, caplog):
    proxy = _doremi(mixture, reference_weights=REF)  # sampling_weights default: uniform
    reference = build_mixer({"type": "static", "weights": REF}, mixture)  # step 1 trains on reference_weights
    assert proxy.sampling_weights().tolist() == pytest.approx([1 / 3] * 3)
    assert proxy.reference_weights.tolist() == pytest.approx(REF)
    np.testing.assert_allclose(_domain_counts(mixture, proxy.sampling_weights()), [1 / 3] * 3, atol=0.01)
    np.testing.assert_allclose(_domain_counts(mixture, reference.sampling_weights()), REF, atol=0.01)
    skewed = _doremi(mixture, reference_weights=REF, sampling_weights={"a": 1, "b": 1, "c": 2})
    np.testing.assert_allclose(
        _domain_counts(mixture, skewed.sampling_weights()), [0.25, 0.25, 0.5], atol=0.01
    )


def test_loss_multipliers_divide_by_the_proxy_sampling_weights(mixture):
    s = [0.5, 0.3, 0.2]
    m = _doremi(mixture, reference_weights=REF, sampling_weights=s, initial_weights=[0.2, 0.2, 0.6])
    ratio = np.array([0.2, 0.2, 0.6]) / np.array(s)
    np.testing.assert_allclose(m.loss_multipliers(), ratio / ratio.sum(), rtol=1e-12)
    uniform = _doremi(mixture, reference_weights=REF)  # uniform s and α_0: multipliers uniform
    np.testing.assert_allclose(uniform.loss_multipliers(), [1 / 3] * 3, rtol=1e-12)


def test_sampling_weight_forms_and_errors(mixture):
    assert _doremi(
        mixture, reference_weights=REF, sampling_weights="reference"
    ).sampling_weights().tolist() == (pytest.approx(REF))
    assert _doremi(mixture, sampling_weights="mixture").sampling_weights().tolist() == pytest.approx(REF)
    assert _doremi(mixture, sampling_weights="uniform").sampling_weights().tolist() == pytest.approx(
        [1 / 3] * 3
    )
    m = _doremi(mixture, sampling_weights=[2, 1, 1], initial_weights="sampling")
    assert m.weights.tolist() == pytest.approx([0.5, 0.25, 0.25])
    for bad, needle in (
        ("tokens", "mixer.sampling_weights: expected null"),
        ([1, 2], "sampling_weights"),
        ({"a": 1, "q": 1}, "sampling_weights"),
        ([1, 0, 1], "sampling_weights must all be > 0"),
    ):
        with pytest.raises(MixerError, match=needle):
            _doremi(mixture, sampling_weights=bad)
    _doremi(mixture, reference_weights=[1, 0, 1])  # a reference weight of 0 is fine: it enters no formula


def test_config_validation_of_sampling_weights(tmp_path, mixture):
    from megatron_doremi.training.config import validate_run_config

    base = {
        "model": {"model_type": "llama", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
                  "num_hidden_layers": 1, "num_attention_heads": 2},
        "data": {"mixture": None, "split": "90,5,5"},
        "schedule": {"seq_length": 8, "micro_batch_size": 2, "global_batch_size": 4, "train_iters": 1,
                     "lr": 1e-3},
    }  # fmt: skip
    mix_file = tmp_path / "mix.json"
    mix_file.write_text(
        json.dumps({"domains": {d.name: {"prefixes": d.prefixes, "weight": 1} for d in mixture.domains}})
    )
    base["data"]["mixture"] = str(mix_file)
    ok = validate_run_config(
        {**base, "mixer": {"type": "doremi", "reference": None, "sampling_weights": [1, 2, 1]}}
    )
    assert ok.mixer["sampling_weights"] == [1, 2, 1]
    with pytest.raises(ConfigError, match="sampling_weights"):
        validate_run_config({**base, "mixer": {"type": "doremi", "reference": None, "sampling_weights": "x"}})


def test_old_checkpoint_state_without_sampling_weights_resumes_with_s_equal_reference():
    old = DoReMiMixer(["a", "b"], reference_weights=[0.7, 0.3], sampling_weights=[0.7, 0.3])
    state = json.loads(json.dumps(old.state_dict()))
    del state["hparams"]["sampling_weights"]  # a state saved before the key existed: s was reference_weights
    DoReMiMixer(["a", "b"], reference_weights=[0.7, 0.3], sampling_weights=[0.7, 0.3]).load_state_dict(state)
    with pytest.raises(MixerError, match="sampling_weights"):
        DoReMiMixer(["a", "b"], reference_weights=[0.7, 0.3]).load_state_dict(state)


# ---- the reference's tokenizer --------------------------------------------------------------------------------


def _fake_ds_reference(root, tokenizer_path, digest=None):
    tag = root / "ckpt" / "global_step5"
    tag.mkdir(parents=True)
    (root / "ckpt" / "latest").write_text("global_step5")
    model = {"model_type": "llama", "vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 1,
             "num_attention_heads": 2, "max_position_embeddings": 64}  # fmt: skip
    (tag / "hf_config.json").write_text(json.dumps(model))
    (tag / "run_config.json").write_text(
        json.dumps({"tokenizer": tokenizer_path, "schedule": {"train_iters": 5}})
    )
    if digest is not None:
        (tag / "tokenizer_digest.json").write_text(json.dumps(digest))
    return str(root / "ckpt"), model


def _tok(path, content):
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(json.dumps({"model": content}))
    return str(path)


def test_deepspeed_reference_tokenizer_digest_is_checked(tmp_path):
    from megatron_doremi.training.reference import check_reference, parse_reference_spec, tokenizer_digest

    ref_tok = _tok(tmp_path / "ref_tok", "reference")
    same, other = _tok(tmp_path / "same", "reference"), _tok(tmp_path / "other", "proxy")
    # the digest saved with the checkpoint decides, even after the reference's tokenizer file changed
    ckpt, model = _fake_ds_reference(tmp_path / "a", ref_tok, tokenizer_digest(ref_tok))
    spec = parse_reference_spec(ckpt, "t")
    check_reference(spec, model, ["x"], 32, "t", tokenizer=same)
    with pytest.raises(ConfigError, match="must share the tokenizer"):
        check_reference(spec, model, ["x"], 32, "t", tokenizer=other)
    _tok(tmp_path / "ref_tok", "changed later")
    check_reference(spec, model, ["x"], 32, "t", tokenizer=same)
    # an older checkpoint without the digest: its run config's tokenizer path is compared when it exists
    ckpt_b, _ = _fake_ds_reference(tmp_path / "b", _tok(tmp_path / "ref_b", "reference"))
    spec_b = parse_reference_spec(ckpt_b, "t")
    check_reference(spec_b, model, ["x"], 32, "t", tokenizer=same)
    with pytest.raises(ConfigError, match="must share the tokenizer"):
        check_reference(spec_b, model, ["x"], 32, "t", tokenizer=other)
    # no tokenizer on the proxy side: nothing to compare
    check_reference(spec_b, model, ["x"], 32, "t", tokenizer=None)


def test_initial_score_is_the_lambda_of_a_domain_not_yet_seen():
    import math

    def stats(excess, counts):
        return {"excess_sum": np.array(excess, float), "token_count": np.array(counts, float)}

    log_v = math.log(50304)
    ours, theirs = DoReMiMixer(["a", "b"]), DoReMiMixer(["a", "b"], initial_score=log_v)
    for m in (ours, theirs):
        m.observe(1, stats([1.0, 0.0], [10, 0]))  # b absent from the first batch
    assert ours.scores.tolist() == [0.1, 0.0] and theirs.scores.tolist() == [0.1, log_v]
    assert ours.weights[1] < 0.5 < theirs.weights[1]  # log|V| pushes the unseen domain up
    state = json.loads(json.dumps(theirs.state_dict()))
    with pytest.raises(MixerError, match="initial_score"):
        DoReMiMixer(["a", "b"]).load_state_dict(state)
    old = json.loads(json.dumps(ours.state_dict()))
    del old["hparams"]["initial_score"]  # saved before the key existed: λ_0 was 0
    DoReMiMixer(["a", "b"]).load_state_dict(old)
    with pytest.raises(MixerError, match="initial_score"):
        DoReMiMixer(["a", "b"], initial_score=float("inf"))
