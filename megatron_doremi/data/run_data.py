"""The ``data`` section of a run config: its Megatron options checked, and the run's datasets built from it.

Keys (defaults in ``training/config.py``): ``mixture`` (JSON file/object, ``--data-path`` string or list, or a
``--data-args-path`` file), ``split`` (``"969,30,1"``), ``packing`` (``"project"`` | ``"megatron"``),
``train_path`` / ``valid_path`` / ``test_path`` (Megatron's per-split data paths, instead of ``mixture`` +
``split``), ``data_cache_path`` (a Megatron ``--data-cache-path`` to read GPTDataset indices from),
``eod_mask_loss`` / ``reset_position_ids`` / ``reset_attention_mask`` and ``eod_token_id`` (else the
tokenizer's end-of-document token).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from megatron_doremi.data.loader import PACKINGS, BatchOptions, build_domain_datasets
from megatron_doremi.data.mixture import Mixture, MixtureError
from megatron_doremi.data.sequences import DataError

__all__ = ["DOCUMENT_FLAGS", "SPLIT_PATH_KEYS", "build_run_datasets", "check_data_options", "sample_targets"]

DOCUMENT_FLAGS = ("eod_mask_loss", "reset_position_ids", "reset_attention_mask")
SPLIT_PATH_KEYS = ("train_path", "valid_path", "test_path")


def check_data_options(data: dict[str, Any], tokenizer: str | None, check_files: bool) -> dict[str, Any]:
    """Check and normalise the Megatron options of a ``data`` section in place (DataError naming the key).

    Per-split paths: ``train_path`` becomes ``mixture`` (which must then be unset or the same);
    ``valid_path``/``test_path`` need ``train_path``. With a document flag on, ``eod_token_id`` is resolved
    from the tokenizer when not given.
    """
    if data.get("packing") not in PACKINGS:
        raise DataError(
            f"data.packing must be one of {', '.join(map(repr, PACKINGS))}, got {data.get('packing')!r}"
        )
    if any(data.get(k) is not None for k in SPLIT_PATH_KEYS):
        if data.get("train_path") is None:
            raise DataError(
                "data.valid_path/test_path need data.train_path (Megatron's --train/valid/test-data-path go "
                "together and replace data.mixture + data.split)"
            )
        if data.get("mixture") not in (None, data["train_path"]):
            raise DataError(
                "data.train_path and data.mixture are exclusive (as Megatron's --train-data-path and "
                "--data-path): give one of them"
            )
        data["mixture"] = data["train_path"]
    for key in DOCUMENT_FLAGS:
        if not isinstance(data.get(key), bool):
            raise DataError(f"data.{key} must be true or false, got {data.get(key)!r}")
    eod = data.get("eod_token_id")
    if eod is not None and (isinstance(eod, bool) or not isinstance(eod, int) or eod < 0):
        raise DataError(f"data.eod_token_id must be an integer >= 0 or null, got {eod!r}")
    if eod is None and any(data[k] for k in DOCUMENT_FLAGS) and check_files:
        data["eod_token_id"] = _tokenizer_eod(tokenizer)
    cache = data.get("data_cache_path")
    if cache is not None:
        if not isinstance(cache, str) or not cache:
            raise DataError(f"data.data_cache_path must be a directory path or null, got {cache!r}")
        if check_files and not os.path.isdir(cache):
            raise DataError(f"data.data_cache_path: directory {cache!r} does not exist")
    if check_files:
        for key in ("valid_path", "test_path"):
            if data.get(key) is not None:
                try:
                    Mixture.load(data[key])
                except MixtureError as exc:
                    raise DataError(f"data.{key}: {exc}") from None
    return data


def _tokenizer_eod(tokenizer: str | None) -> int:
    flags = "/".join(DOCUMENT_FLAGS)
    if tokenizer is None:
        raise DataError(
            f"data.{flags} need the EOD token id: set data.eod_token_id, or a top-level tokenizer whose "
            "end-of-document token it is"
        )
    from megatron_doremi.data.tokenizer import TokenizerError, load_tokenizer

    try:
        eod = load_tokenizer(tokenizer).eod_id()
    except TokenizerError as exc:
        raise DataError(f"data.{flags}: {exc}") from None
    if eod is None:
        raise DataError(
            f"data.{flags}: tokenizer {tokenizer} has no end-of-document token (eos, <|endoftext|>, </s>, <eos>); "
            "set data.eod_token_id"
        )
    return eod


def sample_targets(
    train_iters: int, global_batch_size: int, eval_interval: int, eval_iters: int | str
) -> dict[str, int | None]:
    """Samples Megatron-LM requests per split (``get_train_valid_test_num_samples``): train
    ``train_iters * B``; valid ``(train_iters // eval_interval + 1) * eval_iters * B`` (one evaluation when
    ``eval_interval`` is 0); test ``eval_iters * B``. ``eval_iters="all"``: valid and test are None (one epoch
    of each domain's split, every sample once)."""
    points = train_iters // eval_interval + 1 if eval_interval > 0 else 1
    if eval_iters == "all":
        return {"train": train_iters * global_batch_size, "valid": None, "test": None}
    return {
        "train": train_iters * global_batch_size,
        "valid": points * int(eval_iters) * global_batch_size,
        "test": int(eval_iters) * global_batch_size,
    }


def build_run_datasets(
    mixture: Mixture,
    data: Mapping[str, Any],
    seq_length: int,
    seed: int,
    targets: Mapping[str, int],
) -> tuple[Mixture, dict[str, list[Any]]]:
    """The run's datasets per split and its training mixture with resolved weights.

    A data path without weights is weighted, as Megatron-Core does, by the samples per epoch of each prefix's
    train split; every other mixture is returned unchanged.
    """
    split_mixtures = None
    if data.get("train_path") is not None:
        split_mixtures = {
            k: Mixture.load(data[f"{k}_path"]) if data.get(f"{k}_path") else None for k in ("valid", "test")
        }
    options = BatchOptions(
        **{k: bool(data.get(k, False)) for k in DOCUMENT_FLAGS}, eod_token_id=data.get("eod_token_id")
    )
    datasets = build_domain_datasets(
        mixture,
        seq_length,
        data["split"],
        seed,
        packing=data.get("packing", "project"),
        split_mixtures=split_mixtures,
        num_samples=targets,
        cache_dir=data.get("data_cache_path"),
        batch_options=options,
    )
    if mixture.weights_from_sizes:
        mixture = mixture.with_weights([len(ds) for ds in datasets["train"]])
    return mixture, datasets
