"""Build script: the pybind11 index builders (always) and, later, the CUDA loss op.

Install with ``pip install --no-build-isolation -e .`` so the extension builds
against the torch/numpy already in the environment.
"""

from __future__ import annotations

import os
import runpy

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

_install_check = runpy.run_path(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "megatron_doremi", "install_check.py")
)

CXX_FLAGS = ["-O3", "-std=c++17"]
if os.environ.get("MEGATRON_DOREMI_NATIVE_ARCH", "0") == "1":
    CXX_FLAGS.append("-march=native")

ext_modules = [
    Pybind11Extension(
        "megatron_doremi._helpers",
        ["csrc/helpers.cpp", "csrc/blending.cpp", "csrc/sequences.cpp"],
        extra_compile_args=CXX_FLAGS,
        cxx_std=17,
    ),
]

cmdclass = {"build_ext": build_ext}

# The fused per-domain cross-entropy (megatron_doremi.ops): the CPU kernel always,
# the CUDA kernel when this torch is a CUDA build and nvcc (CUDA_HOME) is present.
# Without torch at build time both are JIT-compiled on first use instead
# (megatron_doremi/ops/_build.py), and if that fails a chunked-torch path is used.
# Set TORCH_CUDA_ARCH_LIST (e.g. "8.0;9.0+PTX") to choose the GPU architectures.
try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - torch is installed first in every documented path
    torch = None
if torch is not None and os.environ.get("MEGATRON_DOREMI_SKIP_OPS_BUILD", "0") != "1":
    ext_modules.append(
        CppExtension(
            "megatron_doremi._domain_loss_cpu",
            ["csrc/domain_loss.cpp"],
            extra_compile_args=["-O3", "-fopenmp"],
            extra_link_args=["-fopenmp"],
            optional=True,  # a failed build only warns: the op is then JIT-built on first use
        )
    )
    if torch.version.cuda and CUDA_HOME:
        # Without a visible GPU torch cannot infer the architectures (and fails on an empty list): default
        # to the targets the kernel is written for, Ampere and Hopper, plus PTX so that newer GPUs (sm_100, ...)
        # JIT-compile it instead of failing at launch with "no kernel image".
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        ext_modules.append(
            CUDAExtension(
                "megatron_doremi._domain_loss_cuda",
                ["csrc/domain_loss_cuda_binding.cpp", "csrc/domain_loss_cuda.cu"],
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
                optional=True,
            )
        )

    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}

setup(
    name="megatron-doremi",
    version="0.1.0",
    description="DoReMi / RegMix data-mixture optimisation on a DeepSpeed ZeRO-3 pretraining stack",
    packages=find_packages(include=["megatron_doremi", "megatron_doremi.*"]),
    python_requires=">=3.10",
    # minimum versions and why: megatron_doremi/install_check.py (also checked when the trainer starts)
    install_requires=_install_check["install_requires"](),
    extras_require={
        "parquet": ["pyarrow>=12"],
        "regmix": ["lightgbm>=4.0", "scipy>=1.10"],
        "tensorboard": ["tensorboard>=2.10"],
        "tiktoken": ["tiktoken>=0.7"],  # preprocess --tokenizer-type TikTokenizer
        "wandb": ["wandb>=0.31"],
        "mlflow": ["mlflow-skinny>=3.18"],  # the client: tracking server / file store; full mlflow works too
        "eval": [
            "lm-eval>=0.4.5",
            "accelerate>=0.26",
        ],  # downstream tasks: python -m megatron_doremi.evaluate --lm-eval
        "test": [
            "pytest>=7",
            "pyarrow>=12",
            "ruff>=0.4",
            "lightgbm>=4.0",
            "scipy>=1.10",
            "wandb>=0.31",  # the tracker tests run them offline (they skip without)
            "mlflow-skinny>=3.18",
            "tensorboard>=2.10",
            "sentencepiece>=0.2",  # the SentencePieceTokenizer preprocessing test
            "tiktoken>=0.7",  # the TikTokenizer preprocessing test
            "lm-eval>=0.4.5",  # the offline downstream test (a local task)
            "accelerate>=0.26",
            "megatron-core>=0.16",  # the Megatron-Core split/index oracles run against the real package
        ],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
