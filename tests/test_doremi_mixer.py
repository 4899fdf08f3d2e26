"""DoReMi mixer core (update rule, schedule, modes, state) and its outputs (jsonl, domain_weights.json, plot)."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_doremi.data.mixture import Mixture
from megatron_doremi.mixers.base import MixerError
from megatron_doremi.mixers.doremi import DoReMiMixer
from megatron_doremi.mixers.weights_io import (
    DomainWeightsError,
    DomainWeightsLog,
    plot_domain_weights,
    read_domain_weights_log,
    write_domain_weights_json,
)

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-12


def stats(excess, counts, loss=None):
    return {
        "loss_sum": np.asarray(excess if loss is None else loss, dtype=np.float64),
        "excess_sum": np.asarray(excess, dtype=np.float64),
        "token_count": np.asarray(counts, dtype=np.float64),
    }


def close(a, b, tol=TOL):
    return len(a) == len(b) and all(abs(float(x) - float(y)) <= tol for x, y in zip(a, b))


# ---- the update rule against plain math -------------------------------------------------------------------------


def test_update_rule_two_domains_hand_computed():
    m = DoReMiMixer(["a", "b"], step_size=0.5, smoothing=0.1)
    # step 1: λ = [2/4, 0.5/5] = [0.5, 0.1]
    m.observe(1, stats([2.0, 0.5], [4, 5]))
    u0, u1 = 0.5 * math.exp(0.5 * 0.5), 0.5 * math.exp(0.5 * 0.1)
    a1 = [0.9 * u0 / (u0 + u1) + 0.1 / 2, 0.9 * u1 / (u0 + u1) + 0.1 / 2]
    assert close(m.scores, [0.5, 0.1])
    assert close(m.weights, a1)
    assert close(m.average_weights, [(0.5 + a1[0]) / 2, (0.5 + a1[1]) / 2])
    # step 2: λ = [0.3/3, 1.2/4] = [0.1, 0.3]
    m.observe(2, stats([0.3, 1.2], [3, 4]))
    u0, u1 = a1[0] * math.exp(0.5 * 0.1), a1[1] * math.exp(0.5 * 0.3)
    a2 = [0.9 * u0 / (u0 + u1) + 0.05, 0.9 * u1 / (u0 + u1) + 0.05]
    assert close(m.scores, [0.1, 0.3])
    assert close(m.weights, a2)
    assert close(m.average_weights, [(0.5 + a1[0] + a2[0]) / 3, (0.5 + a1[1] + a2[1]) / 3])
    assert m.num_updates == 2 and m.last_update_step == 2
    assert abs(sum(m.weights) - 1.0) < TOL


def test_update_rule_three_domains_absent_domain_and_multipliers():
    s = [0.2, 0.3, 0.5]
    m = DoReMiMixer(["x", "y", "z"], sampling_weights=s, initial_weights=[2.0, 1.0, 1.0], smoothing=1e-3)
    eps, k = 1e-3, 3

    def eg(alpha, lam):  # η = 1 (default)
        u = [alpha[0] * math.exp(lam[0]), alpha[1] * math.exp(lam[1]), alpha[2] * math.exp(lam[2])]
        tot = u[0] + u[1] + u[2]
        return [
            (1 - eps) * u[0] / tot + eps / k,
            (1 - eps) * u[1] / tot + eps / k,
            (1 - eps) * u[2] / tot + eps / k,
        ]

    def mult(alpha):
        r = [alpha[0] / s[0], alpha[1] / s[1], alpha[2] / s[2]]
        return [r[0] / (r[0] + r[1] + r[2]), r[1] / (r[0] + r[1] + r[2]), r[2] / (r[0] + r[1] + r[2])]

    a0 = [0.5, 0.25, 0.25]
    assert close(m.weights, a0) and close(m.sampling_weights(), s)
    assert close(m.loss_multipliers(), mult(a0))  # step 1 uses α_0
    lam1 = [1.0 / 10, 3.0 / 6, 0.6 / 2]
    m.observe(1, stats([1.0, 3.0, 0.6], [10, 6, 2]))
    a1 = eg(a0, lam1)
    assert close(m.scores, lam1) and close(m.weights, a1)
    assert close(m.loss_multipliers(), mult(a1))  # step 2 uses α_1, before observe(2)
    # step 2: domain z absent (count 0) keeps λ_z = 0.3
    lam2 = [0.8 / 4, 0.9 / 9, 0.3]
    m.observe(2, stats([0.8, 0.9, 0.0], [4, 9, 0]))
    a2 = eg(a1, lam2)
    assert close(m.scores, lam2) and close(m.weights, a2)
    assert m.log_dict()["excess"]["z"] is None
    assert close(m.loss_multipliers(), mult(a2))
    lam3 = [0.05, 0.9 / 9, 2.0 / 5]  # y absent now: keeps 0.1
    m.observe(3, stats([0.5, 0.0, 2.0], [10, 0, 5]))
    a3 = eg(a2, lam3)
    assert close(m.scores, lam3) and close(m.weights, a3)
    avg = [(a0[d] + a1[d] + a2[d] + a3[d]) / 4 for d in range(3)]
    assert close(m.average_weights, avg)
    assert close(m.sampling_weights(), s)  # reweight mode never changes sampling


@pytest.mark.parametrize(
    "bad",
    [
        stats([float("nan"), 1.0], [2, 2]),
        stats([1.0, 1.0], [float("inf"), 2]),
        stats([float("-inf"), 1.0], [2, 0]),
    ],
)
def test_nonfinite_stats_skip_the_update(bad, caplog):
    m = DoReMiMixer(["a", "b"])
    m.observe(1, stats([1.0, 3.0], [2, 4]))
    before_w, before_avg, before_s = m.weights.tolist(), m.average_weights.tolist(), m.scores.tolist()
    with caplog.at_level(logging.WARNING, logger="megatron_doremi.mixers.doremi"):
        assert m.observe(2, bad) is False
    assert "skipping" in caplog.text
    assert m.weights.tolist() == before_w and m.average_weights.tolist() == before_avg
    assert m.scores.tolist() == before_s
    assert m.num_updates == 1 and m.num_skipped == 1 and m.state_dict()["num_skipped"] == 1
    assert np.all(np.isfinite(m.weights))
    m.observe(3, stats([1.0, 1.0], [1, 1]))  # a later good step updates again
    assert m.num_updates == 2 and m.last_update_step == 3


@pytest.mark.parametrize("lam", [1e3, 1e15, 1e300, 1.7e308])
def test_alpha_stays_normalised_for_huge_tied_scores(lam):
    # two domains tie at a huge λ: z - logsumexp(z) used to lose log α's digits (λ = 1e15 gave Σα = 0.94..1.999)
    m = DoReMiMixer(["a", "b", "c"], step_size=1.0, smoothing=1e-3)
    m.observe(1, stats([lam, lam, -lam], [1, 1, 1]))
    w = m.weights
    assert np.all(np.isfinite(w)) and abs(math.fsum(w) - 1.0) < 1e-12
    assert abs(w[0] - w[1]) < 1e-15 and w[2] == pytest.approx(1e-3 / 3, rel=1e-9)
    m.observe(2, stats([lam, 0.0, 0.0], [1, 1, 1]))  # one domain then dominates: all its mass, still Σα = 1
    assert abs(math.fsum(m.weights) - 1.0) < 1e-12 and m.weights[0] == pytest.approx(1 - 2e-3 / 3, rel=1e-9)


def test_observe_rejects_bad_stats_shape_and_non_increasing_steps():
    m = DoReMiMixer(["a", "b"])
    with pytest.raises(MixerError, match="excess_sum"):
        m.observe(1, {"token_count": np.ones(2)})
    with pytest.raises(MixerError, match="token_count.*2 values"):
        m.observe(1, {"excess_sum": np.ones(2), "token_count": np.ones(3)})
    m.observe(5, stats([1, 1], [1, 1]))
    with pytest.raises(MixerError, match="steps must increase"):
        m.observe(5, stats([1, 1], [1, 1]))


# ---- schedule and modes ---------------------------------------------------------------------------------------------


def _updated_steps(m: DoReMiMixer, steps: int) -> list[int]:
    out = []
    for t in range(1, steps + 1):
        before = m.num_updates
        m.observe(t, stats([float(t), 1.0, 0.5], [3, 2, 1]))
        if m.num_updates != before:
            out.append(t)
            assert m.last_update_step == t
    return out


def test_schedule_warmup_update_step_update_times():
    names = ["a", "b", "c"]
    assert _updated_steps(DoReMiMixer(names), 5) == [1, 2, 3, 4, 5]
    assert _updated_steps(DoReMiMixer(names, warmup_step=3, update_step=2), 12) == [5, 7, 9, 11]
    assert _updated_steps(DoReMiMixer(names, warmup_step=3, update_step=2, update_times=2), 12) == [5, 7]
    assert _updated_steps(DoReMiMixer(names, update_step=4), 12) == [4, 8, 12]
    assert _updated_steps(DoReMiMixer(names, update_times=0), 4) == []
    # during warmup λ still follows the stats; α stays α_0
    m = DoReMiMixer(names, warmup_step=2)
    m.observe(1, stats([1.0, 2.0, 3.0], [1, 1, 1]))
    assert m.scores.tolist() == [1.0, 2.0, 3.0] and m.weights.tolist() == [1 / 3] * 3 and m.num_updates == 0


def test_resample_mode_samples_with_alpha_and_reweight_mode_does_not():
    rs = DoReMiMixer(["a", "b"], resample=True, warmup_step=1, sampling_weights=[0.7, 0.3])
    assert rs.sampling_weights().tolist() == [0.5, 0.5]  # α_0, not s
    assert rs.loss_multipliers().tolist() == [1.0, 1.0]
    flags = [rs.observe(t, stats([1.0, 0.2], [1, 1])) for t in range(1, 5)]
    assert flags == [False, True, True, True]
    assert rs.sampling_weights().tolist() == rs.weights.tolist() and rs.weights[0] > 0.5
    assert rs.loss_multipliers().tolist() == [1.0, 1.0]

    rw = DoReMiMixer(["a", "b"], sampling_weights=[0.7, 0.3])
    flags = [rw.observe(t, stats([1.0, 0.2], [1, 1])) for t in range(1, 4)]
    assert flags == [False, False, False] and rw.num_updates == 3
    assert close(rw.sampling_weights(), [0.7, 0.3])
    assert not close(rw.loss_multipliers(), [0.5, 0.5], 1e-3)


def test_no_reference_mode_uses_proxy_loss_and_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="megatron_doremi.mixers.doremi"):
        m = DoReMiMixer(["a", "b"], use_reference=False)
    assert "NOT DoReMi" in caplog.text
    m.observe(1, stats([0.0, 0.0], [2, 4], loss=[4.0, 2.0]))
    assert m.scores.tolist() == [2.0, 0.5]
    quiet = DoReMiMixer(["a", "b"])
    quiet.observe(1, stats([0.0, 0.0], [2, 4], loss=[4.0, 2.0]))
    assert quiet.scores.tolist() == [0.0, 0.0]


# ---- state ------------------------------------------------------------------------------------------------------


def _random_stats(seed: int, steps: int, k: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        counts = rng.integers(0, 50, size=k).astype(np.float64)
        counts[rng.random(k) < 0.2] = 0.0
        out.append(stats(rng.random(k) * counts * 3.0, counts))
    return out


@pytest.mark.parametrize(
    "kwargs", [{}, {"resample": True, "warmup_step": 2, "update_step": 3, "step_size": 0.3}]
)
def test_state_round_trip_continues_bit_identically(kwargs):
    names = ["a", "b", "c", "d"]
    seq = _random_stats(0, 30, 4)
    full = DoReMiMixer(names, **kwargs)
    traj_full = []
    for t, st in enumerate(seq, 1):
        traj_full.append((full.loss_multipliers().tolist(), full.observe(t, st), full.weights.tolist()))
    first = DoReMiMixer(names, **kwargs)
    traj = []
    for t, st in enumerate(seq[:13], 1):
        traj.append((first.loss_multipliers().tolist(), first.observe(t, st), first.weights.tolist()))
    saved = json.loads(json.dumps(first.state_dict()))
    resumed = DoReMiMixer(names, **kwargs)
    resumed.load_state_dict(saved)
    for t, st in enumerate(seq[13:], 14):
        traj.append((resumed.loss_multipliers().tolist(), resumed.observe(t, st), resumed.weights.tolist()))
    assert traj == traj_full  # exact float equality, every step
    assert resumed.average_weights.tolist() == full.average_weights.tolist()
    assert resumed.scores.tolist() == full.scores.tolist()
    assert resumed.state_dict() == full.state_dict()
    assert resumed.history_record(30, 0.0) == full.history_record(30, 0.0)


def test_state_mismatch_is_named():
    m = DoReMiMixer(["a", "b"], step_size=0.5)
    m.observe(1, stats([1.0, 2.0], [1, 1]))
    state = json.loads(json.dumps(m.state_dict()))
    with pytest.raises(MixerError, match="domains"):
        DoReMiMixer(["a", "c"], step_size=0.5).load_state_dict(state)
    with pytest.raises(MixerError, match="step_size.*0.5.*1.0"):
        DoReMiMixer(["a", "b"]).load_state_dict(state)
    with pytest.raises(MixerError, match="smoothing"):
        DoReMiMixer(["a", "b"], step_size=0.5, smoothing=0.0).load_state_dict(state)
    with pytest.raises(MixerError, match="reference_weights"):
        DoReMiMixer(["a", "b"], step_size=0.5, reference_weights=[1, 2]).load_state_dict(state)
    with pytest.raises(MixerError, match="static"):
        DoReMiMixer(["a", "b"], step_size=0.5).load_state_dict({**state, "type": "static"})


def test_accumulation_invariance_of_the_callers_sums():
    """Caller contract: per-domain float64 sums over the global batch; 4 micro-batches vs 1 give the same α."""
    rng = np.random.default_rng(1)
    k, n = 3, 4000
    excess = rng.random(n) * 2.0  # per-token clipped excess (float64)
    dom = rng.integers(0, k, size=n)

    def accumulate(chunks: int) -> dict[str, np.ndarray]:
        ex, cnt = [0.0] * k, [0.0] * k
        for idx in np.array_split(np.arange(n), chunks):  # micro-batches in order
            for i in idx:  # running sum in token order, carried across micro-batches
                ex[dom[i]] += excess[i]
                cnt[dom[i]] += 1.0
        return stats(ex, cnt)

    one, four = accumulate(1), accumulate(4)
    assert one["excess_sum"].tolist() == four["excess_sum"].tolist()
    m1, m4 = DoReMiMixer(["a", "b", "c"]), DoReMiMixer(["a", "b", "c"])
    m1.observe(1, one)
    m4.observe(1, four)
    assert m1.weights.tolist() == m4.weights.tolist()
    # summing per-micro-batch partial sums instead (what an engine does) agrees to rounding
    parts = [
        stats(np.bincount(dom[idx], excess[idx], k), np.bincount(dom[idx], None, k))
        for idx in np.array_split(np.arange(n), 4)
    ]
    summed = stats(sum(p["excess_sum"] for p in parts), sum(p["token_count"] for p in parts))
    m_sum = DoReMiMixer(["a", "b", "c"])
    m_sum.observe(1, summed)
    assert close(m_sum.weights, m1.weights)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"step_size": 0.0}, "step_size"),
        ({"step_size": -1.0}, "step_size"),
        ({"step_size": float("nan")}, "step_size"),
        ({"step_size": float("inf")}, "step_size"),
        ({"smoothing": -0.1}, "smoothing"),
        ({"smoothing": 1.5}, "smoothing"),
        ({"smoothing": float("nan")}, "smoothing"),
        ({"reference_weights": [0.5, 0.5, 0.1]}, "reference_weights"),
        ({"reference_weights": [1.0, -1.0]}, "reference_weights"),
        ({"sampling_weights": [1.0, 0.0]}, "sampling_weights"),
        ({"sampling_weights": [1.0, -1.0]}, "sampling_weights"),
        ({"initial_weights": [1.0]}, "initial_weights"),
        ({"initial_weights": [1.0, float("nan")]}, "initial_weights"),
        ({"initial_weights": {"a": 1.0, "q": 1.0}}, "initial_weights"),
        ({"warmup_step": -1}, "warmup_step"),
        ({"update_step": 0}, "update_step"),
        ({"update_times": -2}, "update_times"),
        ({"update_step": 1.5}, "update_step"),
        ({"resample": "yes"}, "resample"),
    ],
)
def test_bad_arguments_name_the_key(kwargs, key):
    with pytest.raises(MixerError, match=key):
        DoReMiMixer(["a", "b"], **kwargs)


def test_weights_by_name_and_zero_reference_weight_allowed_when_resampling():
    m = DoReMiMixer(
        ["a", "b"], initial_weights={"b": 3.0, "a": 1.0}, sampling_weights=[1.0, 0.0], resample=True
    )
    assert m.weights.tolist() == [0.25, 0.75]
    assert m.sampling_weights().tolist() == [0.25, 0.75]


# ---- outputs ------------------------------------------------------------------------------------------------------


def _run_and_log(path: Path, steps: range, mixer: DoReMiMixer, resume_step: int | None) -> None:
    seq = _random_stats(2, 40, mixer.num_domains)
    with DomainWeightsLog.open(path, resume_step=resume_step) as log:
        for t in steps:
            mixer.observe(t, seq[t - 1])
            if mixer.last_update_step == t:
                log.append(mixer.history_record(t, 1000.0 + t))


def test_jsonl_lines_and_truncation_on_resume(tmp_path):
    path = tmp_path / "doremi_weights.jsonl"
    names = ["a", "b", "c"]
    m = DoReMiMixer(names, update_step=2)
    _run_and_log(path, range(1, 11), m, None)
    lines = path.read_text().splitlines()
    assert len(lines) == 5
    rec = json.loads(lines[-1])
    assert set(rec) == {
        "step",
        "timestamp",
        "domain_names",
        "domain_weights",
        "avg_domain_weights",
        "perdomain_scores",
        "excess",
    }
    assert rec["step"] == 10 and rec["domain_names"] == names and rec["domain_weights"] == m.weights.tolist()
    assert [r["step"] for r in read_domain_weights_log(path)] == [2, 4, 6, 8, 10]

    # kill after step 10 having checkpointed at 6 (and a torn write): resume from 6 keeps 2, 4, 6
    with open(path, "a") as fh:
        fh.write('{"step": 12, "timest')
    state = None
    ref = DoReMiMixer(names, update_step=2)
    seq = _random_stats(2, 40, 3)
    for t in range(1, 7):
        ref.observe(t, seq[t - 1])
    state = json.loads(json.dumps(ref.state_dict()))
    resumed = DoReMiMixer(names, update_step=2)
    resumed.load_state_dict(state)
    _run_and_log(path, range(7, 13), resumed, 6)
    steps = [r["step"] for r in read_domain_weights_log(path)]
    assert steps == [2, 4, 6, 8, 10, 12]
    assert read_domain_weights_log(path)[4]["domain_weights"] == json.loads(lines[4])["domain_weights"]

    # a fresh run (no resume) starts the file over; out-of-order appends are refused
    with DomainWeightsLog.open(path, resume_step=None) as log:
        log.append(m.history_record(3, 0.0))
        with pytest.raises(DomainWeightsError, match="does not follow"):
            log.append(m.history_record(3, 0.0))
    assert len(path.read_text().splitlines()) == 1


def test_corrupt_jsonl_middle_line_is_an_error_on_resume(tmp_path):
    path = tmp_path / "w.jsonl"
    m = DoReMiMixer(["a", "b"])
    good = json.dumps(m.history_record(1, 0.0))
    path.write_text(good + "\n{oops\n" + good.replace('"step": 1', '"step": 2') + "\n")
    with pytest.raises(DomainWeightsError, match=r"w\.jsonl:2"):
        DomainWeightsLog.open(path, resume_step=5)
    assert path.read_text().count("\n") == 3  # untouched


def test_domain_weights_json_loads_back_in_both_forms(tmp_path):
    names = ["code", "web", "wiki"]
    avg, final = [0.2, 0.5, 0.3], [0.1, 0.6, 0.3]
    prefixes = {n: [f"data/{n}_text_document"] for n in names}
    path = tmp_path / "domain_weights.json"
    write_domain_weights_json(path, names, avg, final, prefixes, extra={"num_updates": 7, "step_size": 1.0})
    doc = json.loads(path.read_text())
    assert doc["domain_names"] == names and doc["num_updates"] == 7
    for key, w in (("average", avg), ("final", final)):
        assert doc[key]["weights"] == dict(zip(names, w))
        mix = Mixture.from_dict(doc[key]["mixture"])
        assert mix.names == tuple(names) and close(mix.weights, w)
        assert [d.prefixes for d in mix.domains] == [tuple(prefixes[n]) for n in names]
        dp = Mixture.from_data_path(doc[key]["data_path"])
        assert dp.names == tuple(names) and close(dp.weights, w, 1e-9)
    # without prefixes only the weight maps are written
    write_domain_weights_json(path, names, avg, final)
    doc = json.loads(path.read_text())
    assert set(doc["average"]) == {"weights"} and set(doc["final"]) == {"weights"}
    assert [p.name for p in tmp_path.iterdir()] == ["domain_weights.json"]  # no temp files left
    with pytest.raises(DomainWeightsError, match="missing"):
        write_domain_weights_json(path, names, avg, final, {"code": ["x"]})
    with pytest.raises(DomainWeightsError, match="final_weights"):
        write_domain_weights_json(path, names, avg, [0.5, 0.5])
    with pytest.raises(DomainWeightsError, match="reserved"):
        write_domain_weights_json(path, names, avg, final, extra={"average": 1})


def test_plot_png_and_cli_errors(tmp_path):
    path = tmp_path / "doremi_weights.jsonl"
    _run_and_log(path, range(1, 8), DoReMiMixer(["a", "b", "c"]), None)
    png = tmp_path / "domain_weights.png"
    plot_domain_weights(path, png)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["domain_weights.png", "doremi_weights.jsonl"]

    tool = str(REPO / "tools" / "plot_domain_weights.py")
    bad = tmp_path / "bad.jsonl"
    lines = path.read_text().splitlines()
    bad.write_text(lines[0] + "\n" + lines[1][:-5] + "\n")
    proc = subprocess.run(
        [sys.executable, tool, "--input", str(bad), "--output", str(tmp_path / "x.png")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1 and f"{bad}:2" in proc.stderr and proc.stderr.startswith("error:")
    assert not (tmp_path / "x.png").exists()
    proc = subprocess.run(
        [sys.executable, tool, "--input", str(tmp_path / "missing.jsonl")], capture_output=True, text=True
    )
    assert proc.returncode == 1 and "missing.jsonl" in proc.stderr
