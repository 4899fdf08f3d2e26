"""benchmarks/bench_domain_loss.py: every variant scores fresh, identical logits (the in-place one included)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_domain_loss.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_domain_loss", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_variants_get_fresh_logits_and_inplace_is_restored():
    bench = _load()
    cpu = torch.device("cpu")
    logits, labels, dom, ref, scale = bench.make_inputs(8, 4, 33, torch.float32, cpu)
    pristine = logits.clone()
    for impl in bench.IMPLS:
        fwd, fwd_bwd, setup, own = bench.variants(impl, logits, labels, dom, ref, scale)
        assert own.data_ptr() != logits.data_ptr()
        bench.time_ms(fwd_bwd, cpu, warmup=1, repeats=2, setup=setup)
        if impl == "fused-inplace":
            assert not torch.equal(own, pristine)  # the in-place backward really wrote the gradient into it
        setup()
        assert torch.equal(own, pristine), impl  # restored before every timed call
        assert torch.equal(logits, pristine), f"{impl} modified the shared input"


def test_fused_linear_table_runs_on_cpu(capsys):
    bench = _load()
    rows = bench.linear_table(16, 8, 8, [37], ["fp32"], torch.device("cpu"), warmup=0, repeats=1)
    assert {r["impl"] for r in rows} == {"logits+op", "fused-linear"}
    assert all(r["fwd_bwd_ms"] > 0 for r in rows)
    assert "fused-linear" in capsys.readouterr().out
