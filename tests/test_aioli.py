"""Aioli mixer: the algorithm on a synthetic loss model, restricted mode, state round trip, config errors.

The synthetic "model" has four domains whose held-out losses respond linearly to the trained-on proportions
(the law Aioli assumes, plus measurement noise): ``noise`` never improves, ``trivial`` is already learned (a
tiny response), ``markov`` and ``grammar`` are structured and help each other a little.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_doremi.mixers.aioli import AioliMixer, aioli_update, build_aioli_mixer, estimate_mixing_law
from megatron_doremi.mixers.base import MixerError

NAMES = ("noise", "trivial", "markov", "grammar")
TRUE_LAW = np.array(
    [
        [0.0, 0.0, 0.0, 0.0],  # noise: nothing to learn
        [0.0, 0.02, 0.0, 0.0],  # trivial: already learned
        [0.0, 0.0, 1.0, 0.2],  # markov
        [0.0, 0.0, 0.2, 0.8],  # grammar
    ]
)


class _Mixture:
    def __init__(self, names=NAMES, weights=None) -> None:
        self.names = list(names)
        self.weights = [1.0 / len(names)] * len(names) if weights is None else list(weights)

    def with_weights(self, w):
        if isinstance(w, dict):
            if set(w) != set(self.names):
                raise ValueError(f"weights must name exactly the domains {self.names}")
            w = [w[n] for n in self.names]
        total = float(sum(w))
        return _Mixture(self.names, [float(x) / total for x in w])


def simulate(mixer: AioliMixer, steps: int, seed: int = 0, noise: float = 0.002, rate: float = 0.01):
    """Run ``steps`` steps of the synthetic model under ``mixer``; returns the sampling weights of every step."""
    rng = np.random.default_rng(seed)
    loss = np.array([4.8, 0.1, 3.0, 2.5])
    trained = []
    for step in range(steps):
        if mixer.heldout_request(step):
            measured = loss + rng.normal(0.0, noise, size=4)
            mixer.observe_heldout(step, {"loss_sum": measured * 1000.0, "token_count": np.full(4, 1000.0)})
        w = mixer.sampling_weights()
        trained.append(w)
        decay = 1.0 / (1.0 + step / 200.0)  # diminishing returns, as in training
        loss = loss - rate * decay * TRUE_LAW @ w
        mixer.observe(step + 1, {})
    return np.array(trained)


def test_estimate_recovers_the_law_from_perturbed_blocks():
    p = np.array([0.1, 0.2, 0.3, 0.4])
    f = 0.6
    q = f * np.eye(4) + (1 - f) * p[:, None]  # columns q_j
    drop = TRUE_LAW @ q
    assert np.allclose(estimate_mixing_law(drop, p, f), TRUE_LAW, atol=1e-12)


def test_eg_step_moves_toward_domains_whose_columns_lower_the_loss():
    p = np.full(4, 0.25)
    new, used = aioli_update(p, TRUE_LAW, eta=0.5)
    assert np.abs(used).max() == pytest.approx(1.0)  # normalised by the largest entry
    assert new[2] > new[3] > new[1] > new[0] - 1e-12 and new.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_proportions_move_toward_the_structured_domains(seed):
    mixer = AioliMixer(NAMES, lp_rounds=2, lp_steps=2, update_steps=16, eta=0.5, seed=seed)
    assert mixer.round_steps == 2 * 4 * 2 + 16
    simulate(mixer, 10 * mixer.round_steps, seed=seed)
    p = mixer.weights
    assert mixer.num_updates == 10
    assert p[2] + p[3] > 0.85, p  # from 0.5 at the start
    assert min(p[2], p[3]) > max(p[0], p[1]) + 0.15, p


def test_schedule_perturbs_every_domain_once_per_sweep_then_trains_on_p():
    mixer = AioliMixer(NAMES, lp_rounds=2, lp_steps=3, update_steps=5, one_hot_factor=0.5, prior_steps=4)
    trained = simulate(mixer, 4 + 2 * mixer.round_steps)
    assert np.array_equal(trained[:4], np.full((4, 4), 0.25))  # prior phase
    starts = [mixer.heldout_request(s) for s in range(4 + mixer.round_steps + 1)]
    assert [s for s, x in enumerate(starts) if x] == [4 + 3 * b for b in range(9)] + [4 + 29]
    for sweep in range(2):
        peaks = {int(np.argmax(trained[4 + 3 * (4 * sweep + k)])) for k in range(4)}
        assert peaks == {0, 1, 2, 3}  # each domain once per sweep
    first = trained[4 + 24 : 4 + 29]  # the update part of round 0: p after one EG step
    assert np.array_equal(first, np.tile(first[0], (5, 1))) and not np.allclose(first[0], 0.25)


def test_update_steps_zero_chains_rounds_on_one_measurement():
    mixer = AioliMixer(NAMES, lp_rounds=1, lp_steps=1, update_steps=0)
    trained = simulate(mixer, 13)
    assert mixer.num_updates == 3  # at steps 4, 8, 12: each the end of one round and the start of the next
    assert mixer.updated_at == 12
    assert all(np.max(w) > 0.75 for w in trained)  # every step is a perturbed one


def test_restricted_mode_starts_exactly_at_the_prior(tmp_path: Path):
    from megatron_doremi.mixers.weights_io import write_domain_weights_json

    prior = [0.4, 0.3, 0.2, 0.1]
    path = tmp_path / "domain_weights.json"
    write_domain_weights_json(path, NAMES, prior, [0.25] * 4)
    mixer = build_aioli_mixer({"type": "aioli", "prior_weights": str(path), "prior_steps": 6}, _Mixture())
    assert mixer.restricted
    expected = np.array(prior) / np.sum(prior)
    trained = simulate(mixer, 6 + mixer.round_steps)
    assert np.array_equal(trained[:6], np.tile(expected, (6, 1)))  # exactly the prior, bit for bit
    assert np.array_equal(mixer.initial_weights, expected)
    assert not any(mixer.heldout_request(s) for s in range(6)) and mixer.heldout_request(6)
    assert mixer.num_updates == 1 and not np.allclose(mixer.weights, expected)  # then corrected online


def test_state_round_trip_continues_bit_identically():
    kw = {"lp_rounds": 1, "lp_steps": 2, "update_steps": 3, "ema": 0.5}
    ref = AioliMixer(NAMES, **kw)
    simulate(ref, 60, seed=4)
    a = AioliMixer(NAMES, **kw)
    # run 27 steps (inside a perturbed block), save through JSON, continue in a fresh mixer with the same synthetic losses
    rng = np.random.default_rng(4)
    loss = np.array([4.8, 0.1, 3.0, 2.5])
    b = a
    for step in range(60):
        if step == 27:
            state = json.loads(json.dumps(a.state_dict()))
            b = AioliMixer(NAMES, **kw)
            b.load_state_dict(state)
            assert b.state_dict() == a.state_dict()
        if b.heldout_request(step):
            measured = loss + rng.normal(0.0, 0.002, size=4)
            b.observe_heldout(step, {"loss_sum": measured * 1000.0, "token_count": np.full(4, 1000.0)})
        w = b.sampling_weights()
        loss = loss - 0.01 / (1.0 + step / 200.0) * TRUE_LAW @ w
        b.observe(step + 1, {})
    assert b.state_dict() == ref.state_dict()
    assert b.num_updates == ref.num_updates == 5  # rounds of 11 steps: updates at 8, 19, 30, 41, 52


def test_state_of_other_domains_or_types_is_rejected():
    state = AioliMixer(NAMES).state_dict()
    with pytest.raises(MixerError, match="domains"):
        AioliMixer(NAMES[:3]).load_state_dict(state)
    with pytest.raises(MixerError, match="not 'aioli'"):
        AioliMixer(NAMES).load_state_dict({**state, "type": "odm"})
    with pytest.raises(MixerError, match="'drop'"):
        AioliMixer(NAMES).load_state_dict({**state, "drop": ["x"] * 16})


def test_missing_heldout_tokens_is_a_clear_error():
    mixer = AioliMixer(NAMES)
    with pytest.raises(MixerError, match=r"no held-out tokens for domain\(s\) \['trivial'\]"):
        mixer.observe_heldout(0, {"loss_sum": np.ones(4), "token_count": np.array([1.0, 0.0, 1.0, 1.0])})
    with pytest.raises(MixerError, match="no block boundary"):
        mixer.observe_heldout(1, {"loss_sum": np.ones(4), "token_count": np.ones(4)})


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ({"lp_step": 2}, r"unknown key\(s\) \['lp_step'\]"),
        ({"lp_rounds": 0}, r"mixer.lp_rounds \(aioli\): must be an integer >= 1"),
        ({"lp_steps": 1.5}, r"mixer.lp_steps \(aioli\): must be an integer >= 1"),
        ({"update_steps": -1}, r"mixer.update_steps \(aioli\): must be an integer >= 0"),
        ({"eta": 0}, r"mixer.eta \(aioli\): must be a number in \(0.0, inf\)"),
        ({"ema": 1.0}, r"mixer.ema \(aioli\): must be a number in \[0.0, 1.0\)"),
        ({"one_hot_factor": 0.0}, r"mixer.one_hot_factor \(aioli\): must be a number in \(0.0, 1.0\]"),
        ({"one_hot_factor": 1.5}, "one_hot_factor"),
        ({"normalize": "yes"}, r"mixer.normalize \(aioli\): must be true or false"),
        ({"heldout_samples": 0}, r"mixer.heldout_samples \(aioli\): must be an integer >= 1"),
        ({"prior_weights": [1, 1, 1, 1], "initial_weights": "mixture"}, "either prior_weights"),
        ({"prior_weights": {"noise": 1.0}}, "mixer.prior_weights: weights must name exactly"),
        ({"prior_weights": "/nonexistent/domain_weights.json"}, "mixer.prior_weights"),
        ({"initial_weights": "reference"}, "mixer.initial_weights: expected null"),
    ],
)
def test_bad_options_are_clear_errors(spec, needle):
    with pytest.raises(MixerError, match=needle):
        build_aioli_mixer({"type": "aioli", **spec}, _Mixture())


def test_registered_in_the_mixer_factory():
    from megatron_doremi.training.mixer_factory import MIXER_BUILDERS

    assert "aioli" in MIXER_BUILDERS


# ---- in the real trainer (CPU, DeepSpeed; slow) ------------------------------------------------------------------

TRAIN_STEPS = 24
AIOLI_SPEC = {"type": "aioli", "lp_rounds": 1, "lp_steps": 2, "update_steps": 4, "heldout_samples": 16}


def _train_config(mixture: Path, run_dir: Path, **extra) -> dict:
    from tests.test_doremi_train import base_config

    cfg = base_config(mixture, mixer=dict(AIOLI_SPEC), output_dir=str(run_dir))
    cfg["schedule"]["train_iters"] = TRAIN_STEPS
    cfg["eval"] = {"eval_iters": 0}
    cfg.update(extra)
    return cfg


def _weights_log(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in open(run_dir / "aioli_weights.jsonl")]
    return [{k: v for k, v in r.items() if k != "timestamp"} for r in rows]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict:
    """Synthetic shards and one uninterrupted single-rank aioli run with checkpoints."""
    from tests.test_doremi_train import _train, _write, write_synthetic

    root = tmp_path_factory.mktemp("aioli")
    mixture = write_synthetic(root)
    run_dir = root / "full"
    cfg = _train_config(mixture, run_dir, checkpoint={"save": str(run_dir / "ckpt"), "save_interval": 6})
    _train(_write(root / "full.json", cfg))
    return {"root": root, "mixture": mixture, "full": run_dir}


@pytest.mark.slow
def test_trainer_run_logs_aioli_weights_and_domain_weights(synthetic):
    run_dir = synthetic["full"]
    rows = _weights_log(run_dir)
    assert [r["step"] for r in rows] == [0, 8, 20]  # p_0, then the end of each round's perturbed sweep
    assert rows[0]["domain_weights"] == [0.25] * 4
    assert all(len(r["mixing_law"]) == 4 for r in rows[1:]) and rows[1]["heldout_loss"] is not None
    assert np.abs(np.array(rows[-1]["domain_weights"]) - 0.25).max() > 0.01  # the proportions moved
    done = json.loads((run_dir / "domain_weights.json").read_text())
    assert done["mixer"] == "aioli" and done["num_updates"] == 2
    assert list(done["final"]["weights"].values()) == rows[-1]["domain_weights"]
    assert (run_dir / "domain_weights.png").exists()
    metrics = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    first_block = metrics[0]["domain_weights"]  # step 1 trains on a perturbed mixture (f = 0.75)
    assert max(first_block.values()) == pytest.approx(0.75 + 0.25 * 0.25)


@pytest.mark.slow
def test_two_ranks_compute_bit_identical_aioli_weights(synthetic, tmp_path):
    from tests.test_doremi_train import DS, _mixer_dumps, _train, _write

    run_dir = tmp_path / "two"
    cfg = _train_config(synthetic["mixture"], run_dir, debug={"dump_mixer": True},
                        deepspeed_config=str(DS / "zero3.json"))  # fmt: skip
    cfg["schedule"]["micro_batch_size"] = 8
    _train(_write(tmp_path / "two.json", cfg), ranks=2)
    r0, r1 = _mixer_dumps(run_dir, 0), _mixer_dumps(run_dir, 1)
    assert sorted(r0) == sorted(r1) == list(range(1, TRAIN_STEPS + 1))
    for step in r0:
        assert r0[step] == r1[step], f"ranks differ at step {step}"  # hex floats: bit-identical
    rows = _weights_log(run_dir)
    assert [r["step"] for r in rows] == [0, 8, 20]
    assert [float.fromhex(h) for h in r0[TRAIN_STEPS]["proportions"]] == rows[-1]["domain_weights"]


@pytest.mark.slow
def test_sigkill_and_resume_reproduce_the_weights_log_exactly(synthetic, tmp_path):
    from tests.conftest import sigkill_when
    from tests.test_doremi_train import REPO, _train, _write

    run_dir = tmp_path / "killed"
    ckpt = {"save": str(run_dir / "ckpt"), "load": str(run_dir / "ckpt"), "save_interval": 4}
    cfg_path = _write(tmp_path / "killed.json", _train_config(synthetic["mixture"], run_dir, checkpoint=ckpt,
                                                              debug={"step_sleep_s": 0.3}))  # fmt: skip
    cmd = [sys.executable, "-m", "megatron_doremi.train", "--config", str(cfg_path)]
    latest, log = run_dir / "ckpt" / "latest", run_dir / "aioli_weights.jsonl"

    def at_update() -> bool:  # checkpoint 20 saved and the update of step 20 logged after it, step 21 running
        return latest.exists() and latest.read_text() == "global_step20" and '"step": 20,' in log.read_text()

    sigkill_when(cmd, at_update, 240, cwd=REPO)
    assert latest.read_text() == "global_step20"  # the resume repeats the update of step 20
    _write(cfg_path, _train_config(synthetic["mixture"], run_dir, checkpoint=ckpt))
    out = _train(cfg_path)
    assert "resumed from" in out.stderr
    assert _weights_log(run_dir) == _weights_log(synthetic["full"])  # bit-identical, no duplicated steps
    done = json.loads((run_dir / "domain_weights.json").read_text())
    ref = json.loads((synthetic["full"] / "domain_weights.json").read_text())
    assert done["average"] == ref["average"] and done["final"] == ref["final"]


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"split": "100,0,0"}, "needs held-out data, but data.split '100,0,0' has no validation part"),
        ({"blend_mode": "exact"}, 'data.blend_mode "exact" supports fixed weights only'),
    ],
)
def test_aioli_config_without_heldout_data_is_a_config_error(tmp_path, data, needle):
    from megatron_doremi.training.config import ConfigError, validate_run_config
    from tests.test_doremi_train import write_synthetic

    mixture = write_synthetic(tmp_path, docs=4, doc_len=20)
    cfg = _train_config(mixture, tmp_path / "run")
    cfg["data"].update(data)
    with pytest.raises(ConfigError, match=needle):
        validate_run_config(cfg, "run.json")


@pytest.mark.slow
def test_real_training_moves_weight_to_the_structured_domains(synthetic, tmp_path):
    from tests.test_doremi_train import _train, _write

    run_dir = tmp_path / "long"
    cfg = _train_config(synthetic["mixture"], run_dir)
    cfg["mixer"] = {"type": "aioli", "lp_rounds": 1, "lp_steps": 4, "eta": 0.5, "heldout_samples": 32}
    cfg["schedule"]["train_iters"] = 320  # rounds of 64 steps: 5 updates
    _train(_write(tmp_path / "long.json", cfg))
    final = json.loads((run_dir / "domain_weights.json").read_text())["final"]["weights"]
    assert final["markov"] + final["grammar"] > 0.7, final  # 0.5 at the start; measured 0.86
    assert min(final["markov"], final["grammar"]) > max(final["noise"], final["trivial"]) + 0.1, final


def test_restricted_mode_from_a_run_config_reads_a_domain_weights_file(tmp_path):
    from megatron_doremi.data.mixture import Mixture
    from megatron_doremi.mixers.weights_io import write_domain_weights_json
    from megatron_doremi.training.config import ConfigError, validate_run_config
    from megatron_doremi.training.mixer_factory import build_mixer
    from tests.test_doremi_train import write_synthetic

    mixture = write_synthetic(tmp_path, docs=4, doc_len=20)
    names = Mixture.load(str(mixture)).names
    prior = {"noise": 0.1, "trivial": 0.2, "markov": 0.3, "grammar": 0.4}
    weights_file = tmp_path / "domain_weights.json"
    write_domain_weights_json(weights_file, names, [prior[n] for n in names], [0.25] * 4)
    cfg = _train_config(mixture, tmp_path / "run")
    cfg["mixer"] = {"type": "aioli", "prior_weights": str(weights_file), "prior_steps": 10}
    run = validate_run_config(cfg, "run.json")
    mixer = build_mixer(run.mixer, Mixture.load(str(mixture)))
    w = np.array([prior[n] for n in names])
    assert np.array_equal(mixer.sampling_weights(), w / w.sum()) and mixer.restricted
    write_domain_weights_json(weights_file, ["a", "b", "c", "d"], [0.25] * 4, [0.25] * 4)
    with pytest.raises(ConfigError, match="prior_weights"):
        validate_run_config(cfg, "run.json")
