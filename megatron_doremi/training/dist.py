"""Distributed launch environment: deepspeed / torchrun / srun / a plain single process, all the same to the loop.

* ``deepspeed`` and ``torchrun`` export RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT: used as they are.
* ``srun python -m megatron_doremi.train`` (one task per GPU, no launcher) exports only SLURM_* variables: they
  are mapped RANK=SLURM_PROCID, LOCAL_RANK=SLURM_LOCALID, WORLD_SIZE=SLURM_NTASKS, MASTER_ADDR = the first host of
  SLURM_JOB_NODELIST (expanded here, no ``scontrol`` needed), MASTER_PORT = $MASTER_PORT or 29500.
* A plain ``python -m megatron_doremi.train`` is rank 0 of 1 on 127.0.0.1 and a free port.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import MutableMapping
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

__all__ = ["DistEnv", "all_reduce_sum", "barrier", "expand_nodelist", "init_distributed", "setup_env"]


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job."""

    rank: int
    local_rank: int
    world_size: int
    launcher: str  # "torchrun/deepspeed", "srun" or "single"


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM node list: ``"gpu[01-03,7],cpu5"`` -> ``["gpu01", "gpu02", "gpu03", "gpu7", "cpu5"]``.

    Zero padding of range bounds is kept (``[008-010]`` -> 008, 009, 010). Nested brackets are not SLURM syntax.
    """
    hosts: list[str] = []
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,\[]*", nodelist):
        item = item.strip()
        if not item:
            continue
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", item)
        if not m:
            hosts.append(item)
            continue
        prefix, ranges, suffix = m.groups()
        for part in ranges.split(","):
            if "-" in part:
                lo, hi = part.split("-", 1)
                width = len(lo)
                for n in range(int(lo), int(hi) + 1):
                    hosts.append(f"{prefix}{n:0{width}d}{suffix}")
            else:
                hosts.append(f"{prefix}{part}{suffix}")
    return hosts


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def setup_env(env: MutableMapping[str, str] | None = None) -> DistEnv:
    """Fill RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT in ``env`` (default os.environ); see module doc."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        env.setdefault("LOCAL_RANK", "0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", "29500")
        launcher = "torchrun/deepspeed"
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        env["RANK"] = env["SLURM_PROCID"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        if "MASTER_ADDR" not in env:
            nodes = expand_nodelist(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")))
            env["MASTER_ADDR"] = nodes[0] if nodes else "127.0.0.1"
        env.setdefault("MASTER_PORT", "29500")
        launcher = "srun"
    else:
        env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"] = "0", "0", "1"
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
        launcher = "single"
    return DistEnv(int(env["RANK"]), int(env["LOCAL_RANK"]), int(env["WORLD_SIZE"]), launcher)


def init_distributed() -> DistEnv:
    """Map the launch environment, pick the device, and start torch.distributed through DeepSpeed."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    denv = setup_env()
    accel = get_accelerator()
    if accel.device_name() == "cuda":
        torch.cuda.set_device(denv.local_rank)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=accel.communication_backend_name(), dist_init_required=True)
    return denv


def device() -> torch.device:
    """The device this rank computes on (cuda:LOCAL_RANK or cpu)."""
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    if name == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over all ranks (no-op without a process group); returns ``tensor``."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def teardown(engine: object | None = None) -> None:
    """Collective, once at the end of a run: release DeepSpeed's engine, then destroy the process group.

    Exiting with a live process group leaves its C++ communication threads to static destructors, which on
    gloo occasionally abort the process after a finished run ("terminate called without an active exception").
    """
    import gc

    if engine is not None and hasattr(engine, "destroy"):
        try:
            engine.destroy()
        except Exception as exc:  # noqa: BLE001 - teardown must reach the process group
            logger.warning("DeepSpeed engine teardown failed: %s", exc)
    gc.collect()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
