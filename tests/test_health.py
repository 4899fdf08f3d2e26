"""Health figures: TFLOP/s per GPU and MFU from the one FLOPs formula, the peak table, nulls on CPU.

The GPU arithmetic runs here with torch.cuda's device name / memory query replaced (no GPU on this machine); the
real-GPU figures are checked on a GPU host (see the report of issue 12), not here.
"""

from __future__ import annotations

import pytest
import torch

from megatron_doremi.training import health
from megatron_doremi.training.flops import flops_per_token, matmul_params
from megatron_doremi.training.health import HealthMeter, peak_bf16_tflops


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA GH200 480GB", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA A10", 125.0),
        ("NVIDIA B200", 2250.0),
        ("AMD Instinct MI300X", 1307.4),
    ],
)
def test_peak_table(name, tflops):
    assert peak_bf16_tflops(name)[0] == tflops


def test_unknown_devices_have_no_peak():
    assert peak_bf16_tflops("Tesla V100-SXM2-32GB") is None  # no bf16
    assert peak_bf16_tflops("NVIDIA GeForce GTX 1080") is None


def test_cpu_figures_are_null_except_the_data_wait():
    meter = HealthMeter(torch.device("cpu"), 6e6, 4096, world_size=2, peak_tflops=100.0)
    fig = meter.step(step_time_s=2.0, data_time_s=0.5)
    assert fig == {
        "tflops_per_gpu": None,
        "mfu": None,
        "max_memory_allocated_gb": None,
        "data_wait_fraction": 0.25,
    }
    meter.step(step_time_s=1.0, data_time_s=0.1)
    summary = meter.summary()
    assert summary["tflops_per_gpu"] is None and summary["mfu"] is None and summary["device"] == "cpu"
    assert summary["steps_measured"] == 1 and summary["data_wait_fraction"] == pytest.approx(0.1)


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(health.torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(health.torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**30)
    return torch.device("cuda", 0)


def test_gpu_figures_from_the_flops_formula(fake_gpu):
    hf = {"vocab_size": 32000, "hidden_size": 768, "num_hidden_layers": 12, "tie_word_embeddings": False}

    class Run:
        seq_length, global_batch_size = 2048, 64

    meter = HealthMeter.for_model(fake_gpu, 160_000_000, hf, Run, world_size=8)
    per_token = flops_per_token(matmul_params(160_000_000, hf), 12, 768, 2048)
    fig = meter.step(step_time_s=1.5, data_time_s=0.03)
    expected = per_token * 64 * 2048 / 1.5 / 8 / 1e12
    assert fig["tflops_per_gpu"] == pytest.approx(expected)
    assert fig["mfu"] == pytest.approx(expected / 989.0)
    assert fig["max_memory_allocated_gb"] == 3.0 and fig["data_wait_fraction"] == pytest.approx(0.02)
    meter.step(step_time_s=1.0, data_time_s=0.0)  # the first step (warm-up) is not in the totals
    meter.step(step_time_s=3.0, data_time_s=0.0)
    summary = meter.summary()
    assert summary["tflops_per_gpu"] == pytest.approx(per_token * 64 * 2048 * 2 / 4.0 / 8 / 1e12)
    assert summary["peak_source"] == "table (H100/H800 SXM)" and summary["steps_measured"] == 2


def test_peak_override_and_unknown_gpu(fake_gpu, monkeypatch):
    meter = HealthMeter(fake_gpu, 1e9, 1000, 1, peak_tflops=500.0)
    assert meter.step(1.0, 0.0)["mfu"] == pytest.approx(1e12 / 1e12 / 500.0)
    assert meter.summary()["peak_source"] == "health.peak_tflops"
    monkeypatch.setattr(health.torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    meter = HealthMeter(fake_gpu, 1e9, 1000, 1)
    fig = meter.step(1.0, 0.0)
    assert fig["tflops_per_gpu"] == pytest.approx(1.0) and fig["mfu"] is None  # no peak: no MFU, not a guess
