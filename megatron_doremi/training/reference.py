"""The DoReMi reference model (step 1's model) for the proxy run (step 2): loaded once, forward only, no grad.

``mixer.reference`` in the run config (see :func:`parse_reference_spec`)::

    "reference": {"checkpoint": "runs/ref/checkpoints", "model": null, "mode": "auto",
                  "allow_architecture_mismatch": false}          # or just "runs/ref/checkpoints"; null = debug mode

``checkpoint`` is a trainer checkpoint directory (its ``latest``), a ``global_step<N>`` directory, or an HF model
directory (``config.json`` + safetensors, e.g. step 1's ``export_hf``). ``model`` (optional) is the reference's HF
config (dict, ``.json`` file or HF directory); by default the checkpoint's own ``hf_config.json`` / ``config.json``.

**Checks before training** (:func:`check_reference`, run by the run-config validation, i.e. before any process
group or model exists): the checkpoint exists (the error names the path); its vocabulary equals the proxy's; its
architecture (:data:`ARCH_KEYS`) equals the proxy's unless ``allow_architecture_mismatch``; its
``max_position_embeddings`` covers ``seq_length``; a trainer checkpoint was trained on the same domain names.
A reference stopped before its ``train_iters`` only gives a warning. The reference may have trained on other
weights than the proxy samples with (``mixer.sampling_weights``; the authors' Pile setup: the reference on the Pile's
weights, the proxy uniform): the loss multipliers α/s use the proxy's own sampling weights.

**Modes** (:class:`ReferenceModel`): ``replicated`` - every rank holds the whole model (a plain module in eval
mode, ``requires_grad=False``, in the proxy's compute dtype: bf16/fp16 when its DeepSpeed config enables them);
rank 0 reads the fp32 weights (from the ZeRO shards, one tensor at a time, or from safetensors) and broadcasts
them. ``zero3`` - the model is built under ``deepspeed.zero.Init`` and wrapped in its own DeepSpeed ZeRO-3 engine
without optimizer (parameters partitioned over the ranks, gathered per layer in the forward; every rank runs the
same forwards). ``auto`` - ``zero3`` when the proxy runs ZeRO stage 3 and the reference has more than
:data:`AUTO_ZERO3_MIN_PARAMS` parameters, else ``replicated``.
"""

from __future__ import annotations

import contextlib
import glob
import io
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from megatron_doremi.training.config import ConfigError

logger = logging.getLogger("megatron_doremi.reference")

__all__ = [
    "ARCH_KEYS",
    "AUTO_ZERO3_MIN_PARAMS",
    "REFERENCE_MODES",
    "ReferenceInfo",
    "ReferenceModel",
    "check_reference",
    "parse_reference_spec",
    "tokenizer_digest",
]

REFERENCE_MODES = ("auto", "replicated", "zero3")
AUTO_ZERO3_MIN_PARAMS = 1_000_000_000
_SPEC_KEYS = ("checkpoint", "model", "mode", "allow_architecture_mismatch")
#: HF config keys that define the architecture (compared between reference and proxy when present in either).
ARCH_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "tie_word_embeddings",
    "rope_theta",
    "rms_norm_eps",
    "n_embd",
    "n_layer",
    "n_head",
    "d_model",
)


def parse_reference_spec(value: Any, source: str) -> dict[str, Any] | None:
    """Normalise ``mixer.reference`` (None, a checkpoint path, or an object) to a dict with every key; structural
    checks only (types, allowed values). ConfigError naming ``mixer.reference.<key>``."""
    if value is None:
        return None
    if isinstance(value, str):
        value = {"checkpoint": value}
    if not isinstance(value, dict):
        raise ConfigError(
            f"{source}: mixer.reference must be an object "
            '{"checkpoint": "runs/ref/checkpoints", ...}, a checkpoint path, or null (debug mode without a '
            f"reference), got {type(value).__name__}"
        )
    unknown = sorted(set(value) - set(_SPEC_KEYS))
    if unknown:
        raise ConfigError(
            f"{source}: mixer.reference: unknown key(s) {unknown} (known: {', '.join(_SPEC_KEYS)})"
        )
    spec = {"checkpoint": None, "model": None, "mode": "auto", "allow_architecture_mismatch": False, **value}
    ckpt = spec["checkpoint"]
    if not isinstance(ckpt, str) or not ckpt:
        raise ConfigError(
            f"{source}: mixer.reference.checkpoint must be the path of step 1's checkpoint directory "
            f"(or its HF export), got {ckpt!r}"
        )
    if spec["mode"] not in REFERENCE_MODES:
        raise ConfigError(
            f"{source}: mixer.reference.mode must be one of {', '.join(REFERENCE_MODES)}, got {spec['mode']!r}"
        )
    if not isinstance(spec["allow_architecture_mismatch"], bool):
        raise ConfigError(f"{source}: mixer.reference.allow_architecture_mismatch must be true or false")
    model = spec["model"]
    if model is not None and not isinstance(model, (dict, str)):
        raise ConfigError(
            f"{source}: mixer.reference.model must be an HF config object, a .json file or an HF model "
            f"directory, got {type(model).__name__}"
        )
    return spec


@dataclass
class ReferenceInfo:
    """A checked reference: where its weights are and what model they fit."""

    path: str  # as configured
    kind: str  # "deepspeed" (a trainer checkpoint) or "hf"
    load_dir: str | None  # deepspeed: the save directory
    tag: str | None  # deepspeed: global_step<N>
    model_config: dict[str, Any]  # HF config dict of the reference
    mode: str  # auto / replicated / zero3 (as configured)
    domain_names: list[str] | None  # the reference run's domains (trainer checkpoints)
    train_weights: list[float] | None  # the reference run's first sampling weights (trainer checkpoints)
    step: int | None
    train_iters: int | None

    @property
    def weights_dir(self) -> str:
        return os.path.join(self.load_dir, self.tag) if self.kind == "deepspeed" else self.path


def _read_json(path: str, what: str) -> dict[str, Any]:
    from megatron_doremi.json_files import read_json_file

    return read_json_file(path, what, ConfigError, require_object=True)


def _model_dict(spec: dict[str, Any] | str, source: str, key: str) -> dict[str, Any]:
    """An HF config dict (defaults filled by transformers) from a dict, a .json file or an HF directory."""
    from megatron_doremi.training.model import hf_config

    if isinstance(spec, str):
        if spec.endswith(".json"):
            if not os.path.isfile(spec):
                raise ConfigError(f"{source}: {key}: HF config file {spec!r} does not exist")
            spec = _read_json(spec, f"{source}: {key}")
        elif not os.path.isfile(os.path.join(spec, "config.json")):
            raise ConfigError(f"{source}: {key}: {spec!r} is not an HF model directory (no config.json)")
    try:
        return hf_config(spec).to_dict()
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds; report them with the key
        raise ConfigError(f"{source}: {key}: not a usable HF model config ({exc})") from None


def _arch_diff(a: dict[str, Any], b: dict[str, Any], keys: Sequence[str] = ARCH_KEYS) -> list[str]:
    out = []
    for key in keys:
        if key in a or key in b:
            if a.get(key) != b.get(key):
                out.append(f"{key} ({a.get(key)!r} vs {b.get(key)!r})")
    return out


def _tokenizer_file(path: str | None) -> str | None:
    """The ``tokenizer.json`` of a tokenizer path (a file or an HF directory), or None when there is none."""
    if not isinstance(path, str) or not path:
        return None
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    return path if os.path.isfile(path) else None


def tokenizer_digest(path: str | None) -> dict[str, str] | None:
    """``{"path", "sha256"}`` of a run's tokenizer file (saved with every checkpoint as
    ``tokenizer_digest.json``), None when the run has no tokenizer file."""
    file = _tokenizer_file(path)
    return None if file is None else {"path": os.path.abspath(file), "sha256": _file_digest(file)}


def _file_digest(path: str) -> str:
    import hashlib

    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def _locate(path: str, source: str) -> tuple[str, str | None, str | None]:
    """(kind, load_dir, tag) of a reference checkpoint path; ConfigError naming the path when unusable."""
    from megatron_doremi.training.checkpoint import CheckpointError, resolve_checkpoint

    if not os.path.exists(path):
        raise ConfigError(
            f"{source}: mixer.reference.checkpoint: reference checkpoint {path!r} does not exist "
            "(train the reference model first: DoReMi step 1, e.g. python -m megatron_doremi.pipeline)"
        )
    if os.path.isfile(os.path.join(path, "config.json")):
        return "hf", None, None
    try:
        load_dir, tag = resolve_checkpoint(path)
    except CheckpointError as exc:
        raise ConfigError(
            f"{source}: mixer.reference.checkpoint: {exc} (expected step 1's checkpoint.save directory, "
            "a global_step<N> directory inside it, or an HF export)"
        ) from None
    return "deepspeed", load_dir, tag


def check_reference(
    spec: dict[str, Any],
    proxy_model: dict[str, Any] | str,
    domain_names: Sequence[str],
    seq_length: int,
    source: str,
    warn: bool = True,
    tokenizer: str | None = None,
) -> ReferenceInfo:
    """Everything about the reference that can be checked without building it (see the module docstring).

    Raises ConfigError naming the key and path; with ``warn``, logs a warning for a reference that is usable but
    unfinished. ``tokenizer``: the proxy run's tokenizer path, compared
    with the reference run's when both tokenizer files exist.
    """
    path = spec["checkpoint"]
    kind, load_dir, tag = _locate(path, source)
    weights_dir = os.path.join(load_dir, tag) if kind == "deepspeed" else path
    domains = weights = None
    step = train_iters = None
    ref_tokenizer = None
    ref_digest: dict[str, Any] | None = None  # the digest saved with a trainer checkpoint
    if kind == "deepspeed":
        cfg_file = os.path.join(weights_dir, "hf_config.json")
        saved = _read_json(cfg_file, "reference model config") if os.path.isfile(cfg_file) else None
        state_file = os.path.join(weights_dir, "trainer_state.json")
        if os.path.isfile(state_file):
            state = _read_json(state_file, "reference trainer state")
            domains = state.get("domain_names")
            step = state.get("step")
            try:
                weights = [float(w) for w in state["loader"]["schedule"]["segments"][0][1]]
            except (KeyError, IndexError, TypeError, ValueError):
                weights = None
        run_file = os.path.join(weights_dir, "run_config.json")
        if os.path.isfile(run_file):
            run_cfg = _read_json(run_file, "reference run config")
            train_iters = (run_cfg.get("schedule") or {}).get("train_iters")
            ref_tokenizer = run_cfg.get("tokenizer")  # a path: compared when it still exists
        digest_file = os.path.join(weights_dir, "tokenizer_digest.json")
        if os.path.isfile(digest_file):
            ref_digest = _read_json(digest_file, "reference tokenizer digest")
    else:
        saved = _read_json(os.path.join(path, "config.json"), "reference model config")
        ref_tokenizer = path
    if spec.get("model") is not None:
        ref_cfg = _model_dict(spec["model"], source, "mixer.reference.model")
        if saved is not None:
            diff = _arch_diff(ref_cfg, _model_dict(saved, source, f"{weights_dir} model config"))
            if diff:
                raise ConfigError(
                    f"{source}: mixer.reference.model does not describe the checkpoint {weights_dir}: "
                    f"{', '.join(diff)} (configured vs saved)"
                )
    elif saved is not None:
        ref_cfg = _model_dict(saved, source, f"reference checkpoint {weights_dir}")
    else:
        raise ConfigError(
            f"{source}: mixer.reference: {weights_dir} has no hf_config.json (not saved by megatron_doremi?); "
            "give the reference's HF config as mixer.reference.model"
        )
    proxy_cfg = _model_dict(proxy_model, source, "model")
    if ref_cfg.get("vocab_size") != proxy_cfg.get("vocab_size"):
        raise ConfigError(
            f"{source}: the reference model {path} has vocab_size {ref_cfg.get('vocab_size')} but the proxy "
            f"model has {proxy_cfg.get('vocab_size')}: reference and proxy must share the tokenizer and vocabulary"
        )
    diff = _arch_diff(ref_cfg, proxy_cfg)
    if diff:
        if not spec.get("allow_architecture_mismatch"):
            raise ConfigError(
                f"{source}: the reference model {path} and the proxy model differ in {', '.join(diff)} "
                "(reference vs proxy); DoReMi trains both at the same size. Fix the configs, or set "
                "mixer.reference.allow_architecture_mismatch=true to use a different reference on purpose"
            )
        logger.warning("reference and proxy architectures differ (allowed): %s", ", ".join(diff))
    mine, theirs = _tokenizer_file(tokenizer), _tokenizer_file(ref_tokenizer)
    if mine and isinstance(ref_digest, dict) and isinstance(ref_digest.get("sha256"), str):
        theirs = str(ref_digest.get("path"))
        differs = _file_digest(mine) != ref_digest["sha256"]
    else:
        differs = bool(mine and theirs and _file_digest(mine) != _file_digest(theirs))
    if differs:
        raise ConfigError(
            f"{source}: the reference model {path} was trained with the tokenizer {theirs}, which differs from this "
            f"run's tokenizer {mine}: reference and proxy must share the tokenizer"
        )
    max_pos = ref_cfg.get("max_position_embeddings")
    if isinstance(max_pos, int) and max_pos < seq_length:
        raise ConfigError(
            f"{source}: the reference model's max_position_embeddings ({max_pos}) is smaller than "
            f"schedule.seq_length ({seq_length})"
        )
    if domains is not None and list(domains) != list(domain_names):
        raise ConfigError(
            f"{source}: the reference checkpoint {weights_dir} was trained on domains {list(domains)} but this "
            f"run's mixture has {list(domain_names)}: the reference and the proxy must use the same domains"
        )
    if warn and isinstance(step, int) and isinstance(train_iters, int) and step < train_iters:
        logger.warning(
            "the reference checkpoint %s is at step %d of its %d train_iters (unfinished run?)",
            weights_dir,
            step,
            train_iters,
        )
    return ReferenceInfo(
        path=path,
        kind=kind,
        load_dir=load_dir,
        tag=tag,
        model_config=ref_cfg,
        mode=spec.get("mode", "auto"),
        domain_names=None if domains is None else list(domains),
        train_weights=weights,
        step=step if isinstance(step, int) else None,
        train_iters=train_iters if isinstance(train_iters, int) else None,
    )


# ---- weights ------------------------------------------------------------------------------------------------------


Entry = tuple[tuple[int, ...], Callable[[], torch.Tensor]]


def _weight_entries(info: ReferenceInfo) -> dict[str, Entry]:
    """name -> (shape, read) for the reference's weights; ``read()`` gives one fp32 CPU tensor at a time."""
    if info.kind == "hf":
        from megatron_doremi.training.model import _checkpoint_tensors

        out: dict[str, Entry] = {}
        for name, entry in _checkpoint_tensors(info.path).items():
            if isinstance(entry, tuple):
                handle, key = entry
                shape = tuple(handle.get_slice(key).get_shape())
                out[name] = (shape, lambda h=handle, k=key: h.get_tensor(k).float())
            else:
                out[name] = (tuple(entry.shape), lambda t=entry: t.float())
        return out
    tag_dir = info.weights_dir
    if glob.glob(os.path.join(tag_dir, "*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            lazy = get_fp32_state_dict_from_zero_checkpoint(info.load_dir, tag=info.tag, lazy_mode=True)
        return {
            name: (tuple(t.shape), lambda t=t: (t.contiguous() if hasattr(t, "contiguous") else t).float())
            for name, t in lazy.items()
        }
    states = sorted(glob.glob(os.path.join(tag_dir, "mp_rank_*_model_states.pt")))
    if not states:
        raise ConfigError(f"reference checkpoint {tag_dir}: no DeepSpeed model or optimizer state files")
    module = torch.load(states[0], map_location="cpu", weights_only=False)["module"]
    return {name: (tuple(t.shape), lambda t=t: t.float()) for name, t in module.items()}


def _fill_parameters(
    model: torch.nn.Module, info: ReferenceInfo, rank: int, zero3: bool, device: torch.device
) -> int:
    """Copy the reference weights into ``model`` (rank 0 reads; broadcast or ZeRO-3 re-partition). Collective.

    Rank 0 checks every name and shape first and tells the other ranks, so a bad checkpoint fails everywhere."""
    import deepspeed

    distributed = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    params = list(model.named_parameters())
    entries: dict[str, Entry] = {}
    problems: list[str] = []
    if rank == 0:
        try:
            available = _weight_entries(info)
        except Exception as exc:  # noqa: BLE001 - reported on every rank below instead of hanging the others
            available = {}
            problems.append(f"cannot read the weights ({type(exc).__name__}: {exc})")
        for name, param in params if not problems else ():
            entry = available.get(name)
            if entry is None and tied and name == "lm_head.weight":
                entry = available.get("model.embed_tokens.weight")
            want = tuple(getattr(param, "ds_shape", param.shape))
            if entry is None:
                problems.append(f"no weight for parameter {name!r}")
            elif entry[0] != want:
                problems.append(f"{name} has shape {entry[0]}, the model expects {want}")
            else:
                entries[name] = entry
    if distributed:
        box = [problems]
        torch.distributed.broadcast_object_list(box, src=0)
        problems = box[0]
    if problems:
        raise ConfigError(
            f"reference checkpoint {info.weights_dir}: weights do not fit the reference model config: "
            + "; ".join(problems[:5])
        )
    for name, param in params:
        if zero3:
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if rank == 0:
                    param.data.copy_(entries[name][1]().to(param.dtype))
        else:
            with torch.no_grad():
                if rank == 0:
                    param.data.copy_(entries[name][1]().to(device=param.device, dtype=param.dtype))
                if distributed:
                    torch.distributed.broadcast(param.data, src=0)
    return len(params)


def _count_params(model_config: dict[str, Any]) -> int:
    """Parameters of the reference model, from a meta-device build (no memory)."""
    from transformers import AutoModelForCausalLM

    from megatron_doremi.training.model import hf_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(model_config))
    return sum(p.numel() for p in model.parameters())


class ReferenceModel:
    """The reference model of a proxy run: :meth:`token_loss` gives per-token losses [B, T] fp32 (no grad).

    Build it on every rank with :meth:`build` (a collective); every rank must then call :meth:`token_loss` for
    every micro-batch (a collective in ``zero3`` mode).
    """

    def __init__(self, module: Any, info: ReferenceInfo, mode: str, num_params: int) -> None:
        self.module = module  # a DeepSpeed engine (zero3) or a torch module (replicated)
        self.info = info
        self.mode = mode
        self.num_params = num_params

    @classmethod
    def build(
        cls,
        info: ReferenceInfo,
        proxy_ds_config: dict[str, Any],
        device: torch.device,
        rank: int,
        micro_batch_size: int,
        world_size: int,
    ) -> ReferenceModel:
        """Build and load the reference (collective). ``proxy_ds_config``: the proxy's resolved DeepSpeed config
        (its ZeRO stage, precision and parameter offload are reused)."""
        import deepspeed
        from transformers import AutoModelForCausalLM

        from megatron_doremi.training.ds_config import zero_stage
        from megatron_doremi.training.model import _hf_zero3, hf_config

        t0 = time.time()
        num_params = _count_params(info.model_config)
        mode = info.mode
        if mode == "auto":
            big = num_params > AUTO_ZERO3_MIN_PARAMS
            mode = "zero3" if zero_stage(proxy_ds_config) == 3 and big else "replicated"
        dtype = (
            torch.bfloat16
            if proxy_ds_config.get("bf16", {}).get("enabled")
            else torch.float16
            if proxy_ds_config.get("fp16", {}).get("enabled")
            else torch.float32
        )
        config = hf_config(info.model_config)
        torch.manual_seed(0)
        if mode == "zero3":
            zero = {
                k: v
                for k, v in (proxy_ds_config.get("zero_optimization") or {}).items()
                if k.startswith("stage3_") or k == "offload_param"
            }
            ds_config = {
                "train_micro_batch_size_per_gpu": micro_batch_size,
                "train_batch_size": micro_batch_size * world_size,
                "gradient_accumulation_steps": 1,
                "zero_optimization": {"stage": 3, **zero},
                "bf16": {"enabled": dtype == torch.bfloat16},
                "fp16": {"enabled": dtype == torch.float16},
                "steps_per_print": 10**9,
                "wall_clock_breakdown": False,
            }
            with _hf_zero3(ds_config):
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            _fill_parameters(model, info, rank, zero3=True, device=device)
            model.requires_grad_(False)
            engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config)
            engine.eval()
            module: Any = engine
        else:
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device)
            _fill_parameters(model, info, rank, zero3=False, device=device)
            model = model.to(dtype)
            model.requires_grad_(False)
            model.eval()
            module = model
        if getattr(config, "use_cache", None):
            (module.module if mode == "zero3" else module).config.use_cache = False
        logger.info(
            "reference: %.2fM parameters from %s (%s), %s, %s, loaded in %.1fs",
            num_params / 1e6,
            info.weights_dir,
            info.kind,
            mode,
            str(dtype).removeprefix("torch."),
            time.time() - t0,
        )
        return cls(module, info, mode, num_params)

    def token_loss(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        domain_id: torch.Tensor,
        num_domains: int,
        **model_inputs: torch.Tensor,
    ) -> torch.Tensor:
        """Per-token cross-entropy of the reference, [B, T] fp32 on the inputs' device (0 at ignored labels).

        ``model_inputs``: the batch's extra model arguments (``data.loader.model_inputs``)."""
        from megatron_doremi.ops.domain_loss import domain_cross_entropy

        with torch.no_grad():
            logits = self.module(input_ids=input_ids, use_cache=False, **model_inputs).logits
            out = domain_cross_entropy(logits, labels, domain_id, num_domains)
        return out.token_loss
