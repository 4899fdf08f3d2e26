"""Health figures of a training run: model TFLOP/s per GPU, MFU, peak accelerator memory, data-wait fraction.

Per step (in ``metrics.jsonl``, the trackers and, averaged, ``train_summary.json``):

* ``tflops_per_gpu`` = model FLOPs of the step (:func:`megatron_doremi.training.flops.flops_per_token` of the
  trained model times the global batch's tokens; a DoReMi reference model's forward is not counted) / step wall
  time / world size / 1e12;
* ``mfu`` = ``tflops_per_gpu`` / the device's dense bf16 peak (``health.peak_tflops`` when set, else
  :data:`PEAK_BF16_TFLOPS` by device name; null when neither knows the device);
* ``max_memory_allocated_gb``: ``torch.cuda.max_memory_allocated`` of this rank (rank 0's in the logs), GiB, the
  peak since the process started;
* ``data_wait_fraction``: the share of the step spent getting the batch (loader, token counts and their
  all-reduce) before the first forward; measured on CPU too.

On CPU ``tflops_per_gpu``, ``mfu`` and ``max_memory_allocated_gb`` are null: there is no GPU and no peak to divide
by, and nothing is estimated in their place.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from megatron_doremi.training.flops import flops_per_token, matmul_params

__all__ = ["PEAK_BF16_TFLOPS", "HealthMeter", "peak_bf16_tflops"]

#: (pattern matched against ``torch.cuda.get_device_name()``, dense bf16 TFLOP/s of one device, label); the first
#: match wins, so specific variants come before the family name. Sparse figures (2x) are not used.
PEAK_BF16_TFLOPS: list[tuple[str, float, str]] = [
    (r"GH200", 989.0, "GH200"),
    (r"H200", 989.0, "H200"),
    (r"H100.*PCIe", 756.0, "H100 PCIe"),
    (r"H100.*NVL", 835.0, "H100 NVL"),
    (r"H100|H800", 989.0, "H100/H800 SXM"),
    (r"\bH20\b", 148.0, "H20"),
    (r"GB200", 2500.0, "GB200"),
    (r"B200", 2250.0, "B200"),
    (r"B100", 1750.0, "B100"),
    (r"A100|A800", 312.0, "A100/A800"),
    (r"\bA30\b", 165.0, "A30"),
    (r"\bA40\b", 149.7, "A40"),
    (r"\bA10\b", 125.0, "A10"),
    (r"L40S", 362.0, "L40S"),
    (r"\bL40\b", 181.0, "L40"),
    (r"\bL4\b", 121.0, "L4"),
    (r"MI300X|MI325X", 1307.4, "MI300X/MI325X"),
    (r"MI250X", 383.0, "MI250X"),
]


def peak_bf16_tflops(device_name: str) -> tuple[float, str] | None:
    """``(dense bf16 TFLOP/s, table label)`` for a device name, or None when the table does not know it."""
    for pattern, tflops, label in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return tflops, label
    return None


class HealthMeter:
    """Turns per-step timings into health figures; keeps the run's totals for the summary.

    Args:
        device: the rank's compute device (figures other than the data-wait fraction are null unless cuda).
        flops_per_token: model FLOPs per trained token (forward + backward).
        tokens_per_step: tokens of one global batch (global_batch_size x seq_length).
        world_size: data-parallel ranks sharing the batch.
        peak_tflops: the device's dense bf16 peak (TFLOP/s) when known better than the table, else None.
    """

    def __init__(
        self,
        device: torch.device,
        flops_per_token: float,
        tokens_per_step: int,
        world_size: int,
        peak_tflops: float | None = None,
    ) -> None:
        self.device = device
        self.on_gpu = device.type == "cuda"
        self.flops_per_step = float(flops_per_token) * int(tokens_per_step)
        self.world_size = int(world_size)
        self.device_name = torch.cuda.get_device_name(device) if self.on_gpu else None
        self.peak_tflops: float | None = None
        self.peak_source: str | None = None
        if peak_tflops is not None:
            self.peak_tflops, self.peak_source = float(peak_tflops), "health.peak_tflops"
        elif self.device_name is not None:
            found = peak_bf16_tflops(self.device_name)
            if found is not None:
                self.peak_tflops, self.peak_source = found[0], f"table ({found[1]})"
        self._steps_seen = 0
        self._steps = 0  # the measured ones (after the first)
        self._step_time = self._data_time = 0.0

    @classmethod
    def for_model(
        cls,
        device: torch.device,
        num_params: int,
        hf_config: dict[str, Any],
        run_config: Any,
        world_size: int,
        peak_tflops: float | None = None,
    ) -> HealthMeter:
        """The meter of a trainer: FLOPs per token from the model's parameter count and HF config, tokens per step
        from the run config's global batch and sequence length."""
        per_token = flops_per_token(
            matmul_params(num_params, hf_config),
            int(hf_config.get("num_hidden_layers") or 0),
            int(hf_config.get("hidden_size") or 0),
            run_config.seq_length,
        )
        tokens = run_config.global_batch_size * run_config.seq_length
        return cls(device, per_token, tokens, world_size, peak_tflops)

    def tflops_per_gpu(self, step_time_s: float) -> float | None:
        if not self.on_gpu or step_time_s <= 0:
            return None
        return self.flops_per_step / step_time_s / self.world_size / 1e12

    def mfu(self, tflops: float | None) -> float | None:
        if tflops is None or not self.peak_tflops:
            return None
        return tflops / self.peak_tflops

    def max_memory_allocated_gb(self) -> float | None:
        if not self.on_gpu:
            return None
        return torch.cuda.max_memory_allocated(self.device) / 2**30

    def step(self, step_time_s: float, data_time_s: float) -> dict[str, float | None]:
        """The figures of one step (keys as in the module docstring). The first step of a process (warm-up:
        allocator, kernels, communicators) is left out of the run's totals."""
        if self._steps_seen > 0:
            self._steps += 1
            self._step_time += step_time_s
            self._data_time += data_time_s
        self._steps_seen += 1
        tflops = self.tflops_per_gpu(step_time_s)
        return {
            "tflops_per_gpu": tflops,
            "mfu": self.mfu(tflops),
            "max_memory_allocated_gb": self.max_memory_allocated_gb(),
            "data_wait_fraction": data_time_s / step_time_s if step_time_s > 0 else None,
        }

    def summary(self) -> dict[str, Any]:
        """Run totals over this process's steps after the first: time-weighted TFLOP/s per GPU and MFU, peak
        memory, data-wait fraction; the device and where its peak came from."""
        tflops = None
        if self._steps and self.on_gpu:
            tflops = self.flops_per_step * self._steps / self._step_time / self.world_size / 1e12
        return {
            "device": self.device_name or self.device.type,
            "peak_tflops": self.peak_tflops,
            "peak_source": self.peak_source,
            "steps_measured": self._steps,
            "tflops_per_gpu": tflops,
            "mfu": self.mfu(tflops),
            "max_memory_allocated_gb": self.max_memory_allocated_gb(),
            "data_wait_fraction": self._data_time / self._step_time if self._step_time > 0 else None,
        }
