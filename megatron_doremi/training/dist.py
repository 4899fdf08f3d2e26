"""Distributed launch environment: deepspeed / torchrun / srun / a plain single process, all the same to the loop.

* ``deepspeed`` and ``torchrun`` export RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT: used as they are.
* ``srun python -m megatron_doremi.train`` (one task per GPU, no launcher) exports only SLURM_* variables: they
  are mapped RANK=SLURM_PROCID, LOCAL_RANK=SLURM_LOCALID, WORLD_SIZE=SLURM_NTASKS, MASTER_ADDR = the first host of
  SLURM_JOB_NODELIST (``scontrol show hostnames`` when available, else :func:`expand_nodelist`), MASTER_PORT =
  $MASTER_PORT or 29500.
* The CUDA device is ``LOCAL_RANK`` modulo the devices this process sees (:func:`local_device_index`), so
  ``--gpus-per-task=1`` (one visible GPU per task) works as well as ``--gpus-per-node=8``.
* A plain ``python -m megatron_doremi.train`` is rank 0 of 1 on 127.0.0.1 and a free port.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import shutil
import socket
import subprocess
from collections.abc import MutableMapping
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "DistEnv",
    "NodeListError",
    "all_reduce_max",
    "all_reduce_sum",
    "barrier",
    "expand_nodelist",
    "hostnames",
    "init_distributed",
    "local_device_index",
    "setup_env",
]


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job."""

    rank: int
    local_rank: int
    world_size: int
    launcher: str  # "torchrun/deepspeed", "srun" or "single"


class NodeListError(ValueError):
    """A SLURM node list that is not valid hostlist syntax; the message quotes it."""


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets: ``"a[1,2],b"`` -> ``["a[1,2]", "b"]``."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            if depth:
                raise NodeListError(f"node list {text!r}: nested '[' at column {i + 1}")
            depth = 1
        elif ch == "]":
            if not depth:
                raise NodeListError(f"node list {text!r}: ']' without '[' at column {i + 1}")
            depth = 0
        elif ch == "," and not depth:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise NodeListError(f"node list {text!r}: unclosed '['")
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def _expand_brackets(ranges: str, nodelist: str) -> list[str]:
    """``"01-03,7"`` -> ``["01", "02", "03", "7"]`` (a range keeps the zero padding of its lower bound)."""
    out: list[str] = []
    for part in ranges.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise NodeListError(f"node list {nodelist!r}: bad range {part!r} in [{ranges}]")
        if not sep:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise NodeListError(f"node list {nodelist!r}: descending range {part!r}")
        out.extend(f"{n:0{len(lo)}d}" for n in range(int(lo), int(hi) + 1))
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM hostlist in Python, in SLURM's order (the last bracket group varies fastest).

    ``"gpu[01-03,7],cpu5"`` -> gpu01 gpu02 gpu03 gpu7 cpu5; ``"rack[1-2]-node[01-02]"`` -> rack1-node01,
    rack1-node02, rack2-node01, rack2-node02; zero padding of range bounds is kept (``[008-010]``), suffixes after a
    bracket too (``node[1-2]-ib``). NodeListError on unbalanced or nested brackets and bad ranges.
    """
    hosts: list[str] = []
    for item in _split_top_level(nodelist):
        parts = re.split(r"(\[[^\]]*\])", item)
        choices = [
            _expand_brackets(p[1:-1], nodelist) if p.startswith("[") else [p] for p in parts if p != ""
        ]
        hosts.extend("".join(combo) for combo in itertools.product(*choices))
    return hosts


def hostnames(nodelist: str, use_scontrol: bool = True) -> list[str]:
    """The hosts of a SLURM node list: ``scontrol show hostnames`` when it is on PATH (SLURM's own parser),
    else (or when it fails) :func:`expand_nodelist`."""
    if use_scontrol and nodelist and shutil.which("scontrol"):
        try:
            proc = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30
            )
            hosts = proc.stdout.split()
            if proc.returncode == 0 and hosts:
                return hosts
            logger.warning(
                "scontrol show hostnames %r failed (%s); parsing it here", nodelist, proc.stderr.strip()
            )
        except (OSError, subprocess.SubprocessError) as exc:
            logger.warning("scontrol show hostnames %r failed (%s); parsing it here", nodelist, exc)
    return expand_nodelist(nodelist)


def local_device_index(local_rank: int, device_count: int) -> int:
    """The CUDA device index of a rank: ``local_rank`` modulo the devices this process sees.

    Covers ``--gpus-per-node=8`` (8 visible, index = local rank), ``--gpus-per-task=1`` (each task sees one GPU:
    index 0 whatever SLURM_LOCALID is) and a site-set CUDA_VISIBLE_DEVICES (indices are into that list).
    """
    if device_count < 1:
        raise RuntimeError("no CUDA device visible to this process (CUDA_VISIBLE_DEVICES empty?)")
    return local_rank % device_count


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
            nodes = hostnames(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")))
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
        count = torch.cuda.device_count()
        index = local_device_index(denv.local_rank, count)
        if index != denv.local_rank:
            logger.info("local rank %d sees %d CUDA device(s): using cuda:%d", denv.local_rank, count, index)
        torch.cuda.set_device(index)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=accel.communication_backend_name(), dist_init_required=True)
    return denv


def device() -> torch.device:
    """The device this rank computes on (the CUDA device :func:`init_distributed` selected, or cpu)."""
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


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """In-place maximum over all ranks (no-op without a process group); returns ``tensor``."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
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
