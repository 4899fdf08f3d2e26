"""HF export: consolidate a DeepSpeed (ZeRO 0-3) checkpoint into ``save_pretrained`` format, offline.

Runs in one process without torch.distributed: the fp32 master weights are gathered from the ZeRO shards with
DeepSpeed's ``zero_to_fp32`` reader, loaded into a freshly built model and written as safetensors + config (+ the
tokenizer when one is given), so ``AutoModelForCausalLM.from_pretrained(out)`` loads it.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
from typing import Any

import torch

from megatron_doremi.atomic_io import make_temp_dir, umask_tree
from megatron_doremi.json_files import read_json_file
from megatron_doremi.training.checkpoint import CheckpointError, resolve_checkpoint

logger = logging.getLogger(__name__)

__all__ = ["ExportError", "export_hf", "save_tokenizer"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ExportError(ValueError):
    """A checkpoint or tokenizer that cannot be exported; the message names the path."""


def _consolidated_state_dict(load_dir: str, tag: str) -> dict[str, torch.Tensor]:
    tag_dir = os.path.join(load_dir, tag)
    if glob.glob(os.path.join(tag_dir, "*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(load_dir, tag=tag)
    states = glob.glob(os.path.join(tag_dir, "mp_rank_*_model_states.pt"))
    if not states:
        raise ExportError(f"{tag_dir}: no DeepSpeed model/optimizer state files")
    return torch.load(sorted(states)[0], map_location="cpu", weights_only=False)["module"]


def save_tokenizer(tokenizer_path: str, out_dir: str) -> None:
    """Copy a local tokenizer (an HF tokenizer dir or a ``tokenizer.json``) into ``out_dir`` in HF format."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if os.path.isdir(tokenizer_path):
        tok = AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
    elif os.path.isfile(tokenizer_path):
        tok = PreTrainedTokenizerFast(tokenizer_file=tokenizer_path)
    else:
        raise ExportError(f"tokenizer {tokenizer_path!r} does not exist")
    tok.save_pretrained(out_dir)


_LEARNED_POSITIONS = ("wpe.weight", "embed_positions.weight", "position_embeddings.weight")


def _trained_positions(tag_dir: str) -> int | None:
    """The trained ``schedule.seq_length`` when the run's model config left ``max_position_embeddings`` unset
    (an inline model dict without it), else None (keep the saved config's)."""
    run_cfg = os.path.join(tag_dir, "run_config.json")
    if not os.path.isfile(run_cfg):
        return None
    cfg = read_json_file(run_cfg, "run config", ExportError, require_object=True)
    model, seq = cfg.get("model"), (cfg.get("schedule") or {}).get("seq_length")
    if isinstance(model, dict) and "max_position_embeddings" not in model and isinstance(seq, int):
        return seq
    return None


def export_hf(
    checkpoint: str,
    out_dir: str,
    tokenizer: str | None = None,
    dtype: str = "auto",
    hf_config: dict[str, Any] | None = None,
    max_position_embeddings: int | None = None,
) -> str:
    """Export ``checkpoint`` (a save dir with ``latest`` or a ``global_step<N>`` dir) to ``out_dir``.

    ``dtype``: "fp32", "bf16", "fp16" or "auto" (bf16 when the run trained in bf16, else fp32).
    ``hf_config`` defaults to the checkpoint's ``hf_config.json``. ``max_position_embeddings`` of the export:
    the argument when given, else the run's model config's when the user set it there, else the trained
    ``schedule.seq_length`` (not the architecture's default, which the model never saw positions up to). The output is written to a temp directory and
    renamed into place. Returns ``out_dir``.
    """
    from transformers import AutoModelForCausalLM

    from megatron_doremi.training.model import hf_config as make_hf_config

    load_dir, tag = resolve_checkpoint(checkpoint)
    tag_dir = os.path.join(load_dir, tag)
    if hf_config is None:
        cfg_path = os.path.join(tag_dir, "hf_config.json")
        if not os.path.isfile(cfg_path):
            raise ExportError(
                f"{tag_dir}: no hf_config.json (not saved by megatron_doremi?); pass the model config"
            )
        hf_config = read_json_file(cfg_path, "HF model config", ExportError)
    if dtype == "auto":
        run_cfg_path = os.path.join(tag_dir, "ds_config.json")
        bf16 = False
        if os.path.isfile(run_cfg_path):
            ds_config = read_json_file(run_cfg_path, "DeepSpeed config", ExportError, require_object=True)
            bf16 = bool((ds_config.get("bf16") or {}).get("enabled", False))
        dtype = "bf16" if bf16 else "fp32"
    if dtype not in _DTYPES:
        raise ExportError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {dtype!r}")
    if tokenizer is None:
        run_cfg = os.path.join(tag_dir, "run_config.json")
        if os.path.isfile(run_cfg):
            tokenizer = read_json_file(run_cfg, "run config", ExportError, require_object=True).get(
                "tokenizer"
            )

    state = _consolidated_state_dict(load_dir, tag)
    hf_config = dict(hf_config)
    positions = max_position_embeddings or _trained_positions(tag_dir)
    learned = any(k.endswith(_LEARNED_POSITIONS) for k in state)  # a position table fixes the size
    if positions and not learned:
        hf_config["max_position_embeddings"] = int(positions)
    config = make_hf_config(hf_config)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [
        k for k in missing if k not in tied and not (config.tie_word_embeddings and k == "lm_head.weight")
    ]
    if missing or unexpected:
        raise CheckpointError(
            f"{tag_dir}: state does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model = model.to(_DTYPES[dtype])
    model.config.use_cache = True

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = make_temp_dir(parent, ".export_tmp_")  # 0777 & ~umask, not mkdtemp's 0700
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer:
            save_tokenizer(tokenizer, tmp)
        with open(os.path.join(tmp, "megatron_doremi_export.json"), "w") as fh:
            json.dump({"checkpoint": os.path.abspath(tag_dir), "tag": tag, "dtype": dtype}, fh, indent=1)
        umask_tree(tmp)  # safetensors writes 0600: teammates must be able to read the export
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("exported %s (%s) to %s", tag_dir, dtype, out_dir)
    return out_dir
