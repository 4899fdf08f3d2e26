"""nvcc builds the fused domain-loss CUDA kernels for sm_80 and sm_90, and the torch glue links against them.

Runs wherever nvcc is on PATH, GPU or not (the kernels file needs only CUDA headers; the glue needs only torch's
CPU headers). Whether the kernels are *correct* is tested on a GPU by tests/test_fused_domain_loss.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

from megatron_doremi.ops._build import CSRC_DIR, NVCC_FLAGS

NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: the CUDA compile check needs it")
ARCHS = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]


def _cuda_home() -> Path:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return Path(os.environ[var])
    out = subprocess.run([NVCC, "--dryrun", "x.cu"], capture_output=True, text=True).stderr
    match = re.search(r"TOP=(\S+)", out)
    assert match, f"cannot find the CUDA root from `nvcc --dryrun`: {out[:500]}"
    return Path(match.group(1)).resolve()


@pytest.fixture(scope="module")
def kernel_object(tmp_path_factory) -> tuple[Path, str]:
    obj = tmp_path_factory.mktemp("cuda") / "domain_loss_cuda.o"
    incs = [f"-I{p}" for p in include_paths()] + [f"-I{CSRC_DIR}"]
    cmd = [
        NVCC,
        "-std=c++20",  # torch's JIT flags for .cu files
        *COMMON_NVCC_FLAGS,
        *NVCC_FLAGS,
        *ARCHS,
        "-Xptxas",
        "-v",
        *incs,
        "-c",
        str(CSRC_DIR / "domain_loss_cuda.cu"),
    ]
    proc = subprocess.run([*cmd, "-o", str(obj)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"nvcc failed:\n{proc.stderr[-4000:]}"
    return obj, proc.stderr


def test_kernels_compile_for_sm80_and_sm90(kernel_object):
    obj, log = kernel_object
    assert obj.stat().st_size > 0
    for arch in ("sm_80", "sm_90"):
        assert f"for '{arch}'" in log, f"ptxas did not compile for {arch}"
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill", log)]
    assert all(n == 0 for n in spills), f"register spills: {spills}"
    if shutil.which("nm"):
        symbols = subprocess.run(["nm", "-C", str(obj)], capture_output=True, text=True).stdout
        for name in ("mdl_forward", "mdl_backward", "mdl_error_string"):
            assert name in symbols, f"{name} missing from the object"


def test_torch_glue_links_with_kernels(kernel_object, tmp_path):
    """The binding compiles against torch and resolves every launcher symbol from the kernels object."""
    from torch.utils.cpp_extension import load

    obj, _ = kernel_object
    lib = _cuda_home() / "lib64"
    if not (lib / "libcudart.so").exists():
        pytest.skip(f"no libcudart.so under {lib} to link against")
    module = load(
        name="mdl_cuda_glue_check",
        sources=[str(CSRC_DIR / "domain_loss_cuda_binding.cpp")],
        extra_include_paths=[str(CSRC_DIR)],
        extra_ldflags=[str(obj), f"-L{lib}", "-lcudart", f"-Wl,-rpath,{lib}"],
        build_directory=str(tmp_path),
        verbose=False,
    )
    assert hasattr(module, "forward") and hasattr(module, "backward")
    if shutil.which("nm"):  # the import (RTLD_NOW) already resolved them; make it explicit
        undefined = subprocess.run(["nm", "-u", module.__file__], capture_output=True, text=True).stdout
        assert "mdl_forward" not in undefined and "mdl_backward" not in undefined
    if not torch.cuda.is_available():
        cpu = torch.zeros(1, 2, 3)
        with pytest.raises(RuntimeError, match="CUDA"):
            module.backward(cpu, cpu.long()[..., 0], cpu[..., 0], cpu[:, 0, 0], -100, cpu, 0)


def test_backward_reads_16_bytes_per_load(tmp_path):
    """The backward kernels load each 16-byte vector into registers in one instruction (ld.global.v4), not as
    scalar loads through a reference into global memory (issue 13: 8 two-byte loads per vector for bf16)."""
    ptx = tmp_path / "domain_loss_cuda.ptx"
    incs = [f"-I{CSRC_DIR}"]
    cmd = [NVCC, "-std=c++20", "-O3", "-arch=sm_90", *incs, "-ptx", str(CSRC_DIR / "domain_loss_cuda.cu")]
    proc = subprocess.run([*cmd, "-o", str(ptx)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = ptx.read_text()
    entries = re.split(r"\.entry ", text)[1:]
    backward = [e for e in entries if "backward_kernel" in e.split("(")[0]]
    assert len(backward) == 3, "expected the fp32, fp16 and bf16 backward kernels"
    for body in backward:
        vec_loads = re.findall(r"ld\.global(?:\.nc)?\.v4\.\w+", body)
        assert len(vec_loads) >= 4, f"backward kernel without unrolled 16-byte loads: {vec_loads}"


def test_setup_default_arch_list_has_ptx():
    """Newer GPUs than the built ones JIT the PTX instead of failing with "no kernel image"."""
    text = (CSRC_DIR.parent / "setup.py").read_text()
    match = re.search(r'setdefault\("TORCH_CUDA_ARCH_LIST", "([^"]+)"\)', text)
    assert match and match.group(1).endswith("+PTX"), match
