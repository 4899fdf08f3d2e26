"""Model construction: an HF causal LM from a config dict or a local directory, ZeRO-3 aware; apex detection.

Under ZeRO stage 3 the model is built inside ``deepspeed.zero.Init`` (through transformers' own
``HfDeepSpeedConfig`` hook, which also makes ``from_pretrained`` load weights into partitioned parameters), so no
rank ever holds the full fp32 model. Parameters are created in fp32; DeepSpeed casts to bf16 on GPU when the
DeepSpeed config enables it (the shipped configs do, via ``"auto"``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = ["ApexStatus", "build_model", "detect_apex", "hf_config", "model_hidden_size", "param_groups"]


@dataclass(frozen=True)
class ApexStatus:
    """Whether NVIDIA apex's fused kernels are usable, and why (for the log)."""

    available: bool
    reason: str


def detect_apex() -> ApexStatus:
    """Detect a real NVIDIA apex with its CUDA extensions (the PyPI ``apex`` is an unrelated project)."""
    if importlib.util.find_spec("apex") is None:
        return ApexStatus(False, "apex is not installed")
    try:
        from apex.normalization.fused_layer_norm import fused_rms_norm_affine  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable"
        return ApexStatus(
            False,
            f"an 'apex' package is installed but it is not NVIDIA apex (apex.normalization unavailable: {exc}); "
            "the PyPI 'apex' is a different project",
        )
    if importlib.util.find_spec("fused_layer_norm_cuda") is None:
        return ApexStatus(
            False, "NVIDIA apex is installed without its CUDA extensions (no fused_layer_norm_cuda)"
        )
    if not torch.cuda.is_available():
        return ApexStatus(False, "NVIDIA apex is installed but CUDA is not available")
    return ApexStatus(True, "NVIDIA apex fused RMSNorm")


def _fused_rmsnorm_forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    from apex.normalization.fused_layer_norm import fused_rms_norm_affine

    eps = getattr(self, "variance_epsilon", getattr(self, "eps", 1e-6))
    return fused_rms_norm_affine(hidden_states, self.weight, (hidden_states.shape[-1],), eps)


def use_apex_norms(model: torch.nn.Module) -> int:
    """Route every ``*RMSNorm`` module with a ``weight`` through apex's fused kernel; returns how many."""
    count = 0
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm") and isinstance(
            getattr(module, "weight", None), torch.Tensor
        ):
            module.forward = types.MethodType(_fused_rmsnorm_forward, module)
            count += 1
    return count


def hf_config(model_spec: dict[str, Any] | str) -> Any:
    """A transformers ``PretrainedConfig`` from an HF config dict (needs ``model_type``) or a local model dir."""
    from transformers import AutoConfig

    if isinstance(model_spec, str):
        return AutoConfig.from_pretrained(model_spec, local_files_only=True)
    spec = dict(model_spec)
    model_type = spec.pop("model_type")
    for key in ("architectures", "transformers_version", "torch_dtype", "dtype"):
        spec.pop(key, None)
    return AutoConfig.for_model(model_type, **spec)


def model_hidden_size(model_spec: dict[str, Any] | str) -> int | None:
    """``hidden_size`` (or ``n_embd``/``d_model``) of the model config, if it has one."""
    config = hf_config(model_spec)
    for key in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


class _ZeroConfigRef:
    """What transformers' ZeRO-3 hook needs from its DeepSpeed config object (no accelerate dependency)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def is_zero3(self) -> bool:
        return True


@contextlib.contextmanager
def _hf_zero3(ds_config: dict[str, Any]) -> Iterator[None]:
    """Make transformers see ZeRO-3 as enabled while the model is built (then unset, so later HF calls in the
    same process, e.g. the export, build plain models)."""
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    ref = _ZeroConfigRef(ds_config)  # strong reference: transformers keeps only a weakref
    set_hf_deepspeed_config(ref)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del ref


def build_model(
    model_spec: dict[str, Any] | str,
    ds_config: dict[str, Any],
    seed: int = 1234,
    activation_checkpointing: bool = False,
    fused_lm_head: bool = False,
) -> torch.nn.Module:
    """Build the causal LM (fp32 parameters; partitioned at creation under ZeRO-3).

    ``model_spec`` is an HF config dict (random init with ``seed``) or a local directory (``from_pretrained``).
    ``fused_lm_head``: the model returns its final hidden states as ``.logits`` and the trainer's loss runs the
    lm_head GEMM fused with the per-domain loss (:mod:`megatron_doremi.training.lm_head_loss`).
    """
    from transformers import AutoModelForCausalLM

    from megatron_doremi.training.ds_config import zero_stage

    stage = zero_stage(ds_config)
    torch.manual_seed(seed)
    config = hf_config(model_spec)
    if stage == 3:
        with _hf_zero3(ds_config):
            # transformers builds the model under deepspeed.zero.Init (parameters partitioned as they are created,
            # RoPE buffers kept in fp32) and runs its weight init on gathered parameters, rank 0 broadcasting.
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        if isinstance(model_spec, str):
            n = load_pretrained_partitioned(model, model_spec)
            logger.info("model: loaded %d tensors of %s into ZeRO-3 partitions", n, model_spec)
        else:
            logger.info("model: %s from config, built under ZeRO-3 Init", type(model).__name__)
    elif isinstance(model_spec, str):
        model = AutoModelForCausalLM.from_pretrained(model_spec, dtype=torch.float32, local_files_only=True)
        logger.info("model: loaded %s (from_pretrained)", model_spec)
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        logger.info("model: %s from config", type(model).__name__)
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    apex = detect_apex()
    if apex.available:
        n = use_apex_norms(model)
        logger.info("apex: using %s for %d norm layers; optimizer: DeepSpeed's fused Adam", apex.reason, n)
    else:
        logger.info("apex: not used (%s); torch RMSNorm path", apex.reason)
    if fused_lm_head:
        from megatron_doremi.training.lm_head_loss import enable_fused_lm_head

        enable_fused_lm_head(model)
    return model


def _checkpoint_tensors(path: str) -> dict[str, Any]:
    """name -> lazily readable tensor of an HF model directory (safetensors, sharded or not, or pytorch_model.bin)."""
    import glob
    import os

    from megatron_doremi.json_files import read_json_file

    index = os.path.join(path, "model.safetensors.index.json")
    weight_map = read_json_file(index, "safetensors index")["weight_map"] if os.path.isfile(index) else {}
    files = sorted(set(weight_map.values()))
    files = [os.path.join(path, f) for f in files] or sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if files:
        from safetensors import safe_open

        out: dict[str, Any] = {}
        for f in files:
            handle = safe_open(f, framework="pt")
            for key in handle.keys():
                out[key] = (handle, key)
        return out
    bins = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
    if not bins:
        raise FileNotFoundError(f"{path}: no *.safetensors or pytorch_model*.bin weights")
    out = {}
    for f in bins:
        out.update(torch.load(f, map_location="cpu", weights_only=True))
    return out


def load_pretrained_partitioned(model: torch.nn.Module, path: str) -> int:
    """Copy the weights of HF directory ``path`` into a ZeRO-3 partitioned ``model``; returns tensors loaded.

    Each parameter is gathered in turn, filled on rank 0 and re-partitioned (DeepSpeed broadcasts it), so only
    one full parameter is in memory at a time. Tied parameters are loaded once.
    """
    import deepspeed

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    tensors = _checkpoint_tensors(path) if rank == 0 else {}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    params = list(model.named_parameters())  # shared parameters appear once

    def source(name: str) -> Any:
        entry = tensors.get(name)
        if entry is None and tied and name == "lm_head.weight":
            entry = tensors.get("model.embed_tokens.weight")
        return entry

    # Rank 0 checks names and shapes first and tells everyone, so a bad checkpoint fails on all ranks alike.
    problems: list[str] = []
    if rank == 0:
        for name, param in params:
            entry = source(name)
            want = tuple(getattr(param, "ds_shape", param.shape))
            if entry is None:
                problems.append(f"no weight for parameter {name!r}")
                continue
            got = (
                tuple(entry[0].get_slice(entry[1]).get_shape())
                if isinstance(entry, tuple)
                else tuple(entry.shape)
            )
            if got != want:
                problems.append(f"{name} has shape {got}, the model expects {want}")
    if torch.distributed.is_initialized():
        box = [problems]
        torch.distributed.broadcast_object_list(box, src=0)
        problems = box[0]
    if problems:
        raise ValueError(f"{path}: weights do not fit the model config: {'; '.join(problems[:5])}")
    loaded = 0
    for name, param in params:
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if rank == 0:
                entry = source(name)
                value = entry[0].get_tensor(entry[1]) if isinstance(entry, tuple) else entry
                param.data.copy_(value.to(param.dtype))
        loaded += 1
    return loaded


def _numel(p: torch.nn.Parameter) -> int:
    shape = getattr(p, "ds_shape", None)
    return int(torch.Size(shape).numel()) if shape is not None else p.numel()


def _ndim(p: torch.nn.Parameter) -> int:
    shape = getattr(p, "ds_shape", None)
    return len(shape) if shape is not None else p.dim()


def param_groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    """Optimizer groups: weight decay on matrices (ndim >= 2), none on norms and biases (ZeRO-3 safe)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if _ndim(p) >= 2 else no_decay).append(p)
    groups = [{"params": decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def count_parameters(model: torch.nn.Module) -> int:
    """Total parameters (full sizes even when ZeRO-3 partitioned)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += _numel(p)
    return total
