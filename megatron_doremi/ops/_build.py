"""Loading the fused domain-loss extensions: a prebuilt module if setup.py built one, else a JIT build.

* CPU: ``csrc/domain_loss.cpp`` -> module ``megatron_doremi._domain_loss_cpu`` (prebuilt) or a JIT build named
  ``megatron_doremi_domain_loss_cpu``.
* CUDA: ``csrc/domain_loss_cuda_binding.cpp`` + ``csrc/domain_loss_cuda.cu`` -> ``megatron_doremi._domain_loss_cuda``
  (prebuilt) or a JIT build named ``megatron_doremi_domain_loss_cuda`` (needs a CUDA build of torch and nvcc).

JIT builds go to ``$TORCH_EXTENSIONS_DIR`` when set, else ``~/.cache/megatron_doremi/torch_extensions/<tag>``
(tag = python, torch and CUDA versions), guarded by torch's file lock so concurrent ranks build once. Each loader
tries once per process: on failure it logs one warning that says why and which slower path is used instead,
and returns None. ``MEGATRON_DOREMI_NO_NATIVE=1`` (read at call time) disables both extensions.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import sys
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "CSRC_DIR",
    "CPU_FLAGS",
    "NVCC_FLAGS",
    "build_dir",
    "load_cpu_extension",
    "load_cuda_extension",
    "native_disabled",
]

CSRC_DIR = Path(__file__).resolve().parents[2] / "csrc"
# -fopenmp: at::parallel_for is only parallel when the including file is compiled with OpenMP (torch's CPU
# build uses the OpenMP backend; the extension then shares torch's libgomp at run time).
CPU_FLAGS = ["-O3", "-fopenmp"]
CPU_LDFLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3", "-lineinfo"]


def native_disabled() -> bool:
    """True when ``MEGATRON_DOREMI_NO_NATIVE=1`` asks for the pure-torch paths."""
    return os.environ.get("MEGATRON_DOREMI_NO_NATIVE", "0") == "1"


def build_dir() -> Path:
    """Directory for JIT builds (created): ``$TORCH_EXTENSIONS_DIR`` or a versioned one under ~/.cache."""
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    if env:
        path = Path(env)
    else:
        cuda = torch.version.cuda or "cpu"
        tag = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__}_cu{cuda}"
        path = Path.home() / ".cache" / "megatron_doremi" / "torch_extensions" / tag.replace("+", "-")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _import_prebuilt(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _jit(name: str, sources: list[Path], **kwargs: object) -> ModuleType:
    from torch.utils.cpp_extension import load

    missing = [str(s) for s in sources if not s.is_file()]
    if missing:
        raise FileNotFoundError(f"sources missing: {missing}")
    directory = build_dir() / name
    directory.mkdir(parents=True, exist_ok=True)
    return load(
        name=name,
        sources=[str(s) for s in sources],
        build_directory=str(directory),
        verbose=os.environ.get("MEGATRON_DOREMI_BUILD_VERBOSE", "0") == "1",
        **kwargs,
    )


@functools.cache
def _load_cpu_cached() -> ModuleType | None:
    module = _import_prebuilt("megatron_doremi._domain_loss_cpu")
    if module is not None:
        return module
    name = "megatron_doremi_domain_loss_cpu"
    try:
        return _jit(name, [CSRC_DIR / "domain_loss.cpp"], extra_cflags=CPU_FLAGS, extra_ldflags=CPU_LDFLAGS)
    except Exception as exc:  # any build failure means: use the fallback
        logger.warning(
            "fused domain loss: could not build the CPU extension from %s (%s: %s); using the chunked torch path "
            "(correct, slower). Set MEGATRON_DOREMI_BUILD_VERBOSE=1 for the compiler output.",
            CSRC_DIR / "domain_loss.cpp",
            type(exc).__name__,
            str(exc).strip().splitlines()[-1] if str(exc).strip() else "",
        )
        return None


@functools.cache
def _load_cuda_cached() -> ModuleType | None:
    module = _import_prebuilt("megatron_doremi._domain_loss_cuda")
    if module is not None:
        return module
    name = "megatron_doremi_domain_loss_cuda"
    reason = None
    if torch.version.cuda is None:
        reason = "this torch build has no CUDA support"
    else:
        from torch.utils.cpp_extension import CUDA_HOME

        if CUDA_HOME is None:
            reason = "nvcc / CUDA_HOME not found"
    if reason is None:
        try:
            return _jit(
                name,
                [CSRC_DIR / "domain_loss_cuda_binding.cpp", CSRC_DIR / "domain_loss_cuda.cu"],
                extra_cflags=["-O3"],
                extra_cuda_cflags=NVCC_FLAGS,
            )
        except Exception as exc:  # any build failure means: use the fallback
            text = str(exc).strip()
            reason = f"{type(exc).__name__}: {text.splitlines()[-1] if text else ''}"
    logger.warning(
        "fused domain loss: CUDA extension unavailable (%s); using the chunked torch path on the GPU (correct, "
        "slower, no in-kernel fusion). Set MEGATRON_DOREMI_BUILD_VERBOSE=1 for the compiler output.",
        reason,
    )
    return None


def load_cpu_extension() -> ModuleType | None:
    """The CPU kernels module (``forward``/``backward``), or None (disabled or the build failed; warned once)."""
    return None if native_disabled() else _load_cpu_cached()


def load_cuda_extension() -> ModuleType | None:
    """The CUDA kernels module (``forward``/``backward``), or None (disabled or unavailable; warned once)."""
    return None if native_disabled() else _load_cuda_cached()
