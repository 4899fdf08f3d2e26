"""Offline heuristic weights (proportional, temperature, UniMax) and the online ODM (Exp3) mixer."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from megatron_doremi.data.mixture import Mixture
from megatron_doremi.mixers.base import MixerError
from megatron_doremi.mixers.heuristics import (
    HeuristicError,
    domain_token_counts,
    heuristic_weights,
    main,
    proportional_weights,
    temperature_weights,
    unimax_weights,
)
from megatron_doremi.mixers.odm import ODMMixer, build_odm_mixer

# ---- heuristics -----------------------------------------------------------------------------------------------------


def test_proportional_is_token_share():
    w = proportional_weights([100, 300, 600])
    assert w.dtype == np.float64
    np.testing.assert_allclose(w, [0.1, 0.3, 0.6], rtol=0, atol=1e-15)


def test_temperature_limits():
    tokens = np.array([10, 1000, 50, 0, 7000])
    np.testing.assert_allclose(temperature_weights(tokens, 1.0), proportional_weights(tokens), rtol=1e-12)
    hot = temperature_weights(tokens, 1e9)  # -> uniform over the non-empty domains
    np.testing.assert_allclose(hot, [0.25, 0.25, 0.25, 0.0, 0.25], atol=1e-6)
    # T = 0.5 squares the shares: [1, 3] -> [1, 9] / 10
    np.testing.assert_allclose(temperature_weights([1, 3], 0.5), [0.1, 0.9], rtol=1e-12)
    # monotone flattening: the largest share shrinks as T grows
    shares = [temperature_weights(tokens, t).max() for t in (1, 2, 5, 100)]
    assert all(a > b for a, b in zip(shares, shares[1:]))


def test_unimax_hand_example_respects_cap():
    # budget 3000, cap 2 epochs: smallest domain gets min(1000, 200) = 200, the next min(1400, 2000) = 1400,
    # the last the remaining 1400.
    tokens = np.array([10000, 100, 1000])
    w = unimax_weights(tokens, budget_tokens=3000, max_epochs=2)
    np.testing.assert_allclose(w * 3000, [1400, 200, 1400], rtol=1e-12)
    assert np.all(w * 3000 <= 2 * tokens + 1e-9)


def test_unimax_uniform_when_no_cap_binds():
    w = unimax_weights([1000, 5000, 1000], budget_tokens=3000, max_epochs=4)
    np.testing.assert_allclose(w, [1 / 3] * 3, rtol=1e-12)


def test_unimax_budget_over_capacity_is_an_error():
    with pytest.raises(HeuristicError, match="max_epochs"):
        unimax_weights([100, 100], budget_tokens=1000, max_epochs=2)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: proportional_weights([1, -1]), "finite and >= 0"),
        (lambda: proportional_weights([0, 0]), "empty"),
        (lambda: temperature_weights([1, 2], 0.0), "temperature"),
        (lambda: heuristic_weights("temperature", [1, 2]), "--temperature"),
        (lambda: heuristic_weights("unimax", [1, 2], budget_tokens=10), "--max-epochs"),
        (lambda: heuristic_weights("magic", [1, 2]), "unknown method"),
    ],
)
def test_heuristic_bad_inputs(call, match):
    with pytest.raises(HeuristicError, match=match):
        call()


def _mixture_file(tmp_path, make_shard, sizes):
    spec = {"domains": {}}
    for name, n in sizes.items():
        prefix = make_shard(name, [np.arange(n) % 50])
        spec["domains"][name] = {"prefixes": [prefix], "weight": 1}
    path = tmp_path / "mixture.json"
    path.write_text(json.dumps(spec))
    return path


def test_cli_writes_domain_weights(tmp_path, make_shard, capsys):
    mix_path = _mixture_file(tmp_path, make_shard, {"a": 100, "b": 1000, "c": 10000})
    tokens = domain_token_counts(Mixture.from_json(mix_path))
    assert tokens.tolist() == [100, 1000, 10000]
    out = tmp_path / "w.json"
    rc = main(
        ["--mixture", str(mix_path), "--method", "unimax", "--budget-tokens", "3000", "--max-epochs", "2"]
        + ["--out", str(out)]
    )
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["method"] == "unimax" and doc["domain_names"] == ["a", "b", "c"]
    np.testing.assert_allclose(
        [doc["average"]["weights"][n] for n in "abc"], np.array([200, 1400, 1400]) / 3000
    )
    assert doc["final"] == doc["average"]
    mix = Mixture.from_dict(doc["average"]["mixture"])
    np.testing.assert_allclose(mix.weights, np.array([200, 1400, 1400]) / 3000)
    assert Mixture.from_data_path(doc["average"]["data_path"]).names == ("a", "b", "c")
    rc = main(["--mixture", str(mix_path), "--method", "temperature", "--out", str(tmp_path / "x.json")])
    assert rc == 1 and "needs --temperature" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


# ---- ODM ------------------------------------------------------------------------------------------------------------


def _stats(losses, counts):
    losses = np.asarray(losses, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    return {"loss_sum": losses * counts, "excess_sum": losses * counts, "token_count": counts}


def _stream(mixer: ODMMixer, steps: range, seed: int = 0) -> list[bool]:
    """Synthetic training stream: domain 0 is hardest; tokens per domain follow the sampling weights."""
    rng = np.random.default_rng(seed)
    changed = []
    base = np.array([4.0, 2.0, 2.5])
    for step in steps:
        noise = rng.normal(0, 0.05, size=3)
        counts = np.round(mixer.sampling_weights() * 1000)
        changed.append(mixer.observe(step, _stats(base + noise, counts)))
    return changed


def test_odm_starts_uniform_and_moves_toward_high_loss():
    m = ODMMixer(["hard", "easy", "mid"])
    np.testing.assert_array_equal(m.sampling_weights(), [1 / 3] * 3)
    changed = _stream(m, range(1, 201))
    # ε_t = 1/K (all exploration: uniform) while t <= K ln K; the weights move from then on
    k_ln_k = 3 * math.log(3)
    assert changed == [t > k_ln_k for t in range(1, 201)]
    w = m.sampling_weights()
    assert w[0] > 1 / 3 and w[0] > w[2] > w[1], w
    assert math.isclose(w.sum(), 1.0, rel_tol=0, abs_tol=1e-12)
    eps = min(1 / 3, math.sqrt(math.log(3) / (3 * 200)))
    assert m.epsilon == eps and np.all(w >= eps - 1e-15)  # exploration floor
    avg = m.average_weights
    assert avg[0] > 1 / 3 and avg[0] > avg[2] > avg[1]


def test_odm_deterministic_and_exact_state_round_trip():
    a, b = ODMMixer(["x", "y", "z"], alpha=0.8), ODMMixer(["x", "y", "z"], alpha=0.8)
    _stream(a, range(1, 31))
    _stream(b, range(1, 31))
    assert a.sampling_weights().tobytes() == b.sampling_weights().tobytes()
    state = json.loads(json.dumps(a.state_dict()))
    c = ODMMixer(["x", "y", "z"], alpha=0.8)
    c.load_state_dict(state)
    assert c.state_dict() == a.state_dict()
    _stream(a, range(31, 61), seed=5)
    _stream(c, range(31, 61), seed=5)
    for attr in ("weights", "average_weights", "rewards"):
        assert getattr(a, attr).tobytes() == getattr(c, attr).tobytes(), attr
    assert a.epsilon == c.epsilon


def test_odm_observe_return_value_and_schedule():
    m = ODMMixer(["a", "b"], update_interval=2, warmup_steps=2)
    s = _stats([3.0, 1.0], [10, 10])
    # updates at steps 4, 6, 8; the first (t = 1 <= K ln K) keeps uniform weights, so only 6 and 8 change them
    assert [m.observe(t, s) for t in range(1, 9)] == [False, False, False, False, False, True, False, True]
    before = m.sampling_weights()
    assert m.observe(10, _stats([3.0, 1.0], [0, 0])) is False  # nothing seen: no update
    np.testing.assert_array_equal(before, m.sampling_weights())
    # a domain without tokens keeps its reward
    r = m.rewards
    m.observe(12, _stats([5.0, 1.0], [0, 10]))
    assert m.rewards[0] == r[0] and m.rewards[1] != r[1]


def test_odm_single_domain_and_errors():
    m = ODMMixer(["only"])
    m.observe(1, _stats([2.0], [5]))
    np.testing.assert_array_equal(m.sampling_weights(), [1.0])
    with pytest.raises(MixerError, match="alpha"):
        ODMMixer(["a", "b"], alpha=1.0)
    with pytest.raises(MixerError, match="update_interval"):
        ODMMixer(["a", "b"], update_interval=0)
    other = ODMMixer(["a", "c"])
    with pytest.raises(MixerError, match="domains"):
        ODMMixer(["a", "b"]).load_state_dict(other.state_dict())
    with pytest.raises(MixerError, match="token_count"):
        ODMMixer(["a", "b"]).observe(1, {"loss_sum": np.ones(2)})
    with pytest.raises(MixerError, match="2 values"):
        ODMMixer(["a", "b"]).observe(1, _stats([1, 2, 3], [1, 1, 1]))


def test_build_odm_mixer_from_spec():
    mixture = Mixture.from_dict(
        {"domains": {"b": {"prefixes": ["p/b"], "weight": 1}, "a": {"prefixes": ["p/a"], "weight": 3}}}
    )
    m = build_odm_mixer({"type": "odm", "alpha": 0.5}, mixture)
    assert m.name == "odm" and m.domain_names == ("a", "b") and m.alpha == 0.5
    with pytest.raises(MixerError, match="unknown key"):
        build_odm_mixer({"type": "odm", "eta": 1}, mixture)
