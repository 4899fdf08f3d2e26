"""Build script: the pybind11 index builders (always) and, later, the CUDA loss op.

Install with ``pip install --no-build-isolation -e .`` so the extension builds
against the torch/numpy already in the environment.
"""

from __future__ import annotations

import os

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

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

# Room for the CUDA per-domain loss extension (issue: fused per-domain
# cross-entropy): it is added here only when a CUDA build of torch and nvcc
# are both present, otherwise the op is JIT-compiled on first use or the CPU
# path is used.

setup(
    name="megatron-doremi",
    version="0.1.0",
    description="DoReMi / RegMix data-mixture optimisation on a DeepSpeed ZeRO-3 pretraining stack",
    packages=find_packages(include=["megatron_doremi", "megatron_doremi.*"]),
    python_requires=">=3.10",
    install_requires=[
        "numpy>=1.24",
        "tokenizers>=0.15",
        "transformers>=4.40",
        "tqdm>=4.60",
    ],
    extras_require={
        "parquet": ["pyarrow>=12"],
        "plot": ["matplotlib>=3.6"],
        "test": ["pytest>=7", "pyarrow>=12", "ruff>=0.4"],
    },
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    zip_safe=False,
)
