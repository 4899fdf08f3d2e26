"""Per-domain evaluation of a checkpoint (DeepSpeed ``global_step<N>`` or an HF export) on a held-out split.

    python -m megatron_doremi.evaluate --config run.json --checkpoint runs/x/checkpoints [--split valid]
    deepspeed --num_gpus 8 --module megatron_doremi.evaluate --config run.json --checkpoint runs/x/hf

``--checkpoint`` is a checkpoint directory with a ``latest`` file, a ``global_step<N>`` directory, or an HF model
directory (``config.json`` + weights). Prints the per-domain table (loss, perplexity, token-weighted and uniform
averages, worst domain, bits per byte when the run has a ``tokenizer``) and writes it as JSON with ``--output``.
The whole split once per domain by default (``eval.eval_iters: "all"``), or ``eval.eval_iters`` x
``global_batch_size`` samples per domain, as in training (``--eval-iters`` overrides).

Downstream tasks (EleutherAI lm-eval-harness, ``pip install '.[eval]'``; one process; see
:mod:`megatron_doremi.downstream`)::

    python -m megatron_doremi.evaluate --hf runs/x/hf --lm-eval hellaswag,arc_easy [--config run.json --output eval.json]

writes ``lm_eval.json`` next to ``--output`` (else into the HF directory; ``--lm-eval-output`` names it) and, with
``--config``, the per-domain result gets the same numbers under ``"downstream"``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence


def _eval_iters(value: str) -> int | str:
    if value == "all":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected "all" or an integer, got {value!r}') from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_doremi.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--config", default=None, help="the run config the checkpoint was trained with")
    p.add_argument(
        "--checkpoint", default=None, help="checkpoint dir (with 'latest'), global_step<N> dir or HF dir"
    )
    p.add_argument("--hf", default=None, help="an HF model directory (export): the same as --checkpoint DIR")
    p.add_argument("--lm-eval", default=None, metavar="TASKS", help="comma-separated lm-eval task names")
    p.add_argument("--lm-eval-include", default=None, metavar="DIR", help="directory of extra task YAMLs")
    p.add_argument("--lm-eval-output", default=None, help="lm-eval result JSON (default: next to --output)")
    p.add_argument("--lm-eval-limit", type=int, default=None, help="at most N documents per task")
    p.add_argument("--lm-eval-batch-size", type=int, default=8)
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument(
        "--split", default="valid", choices=("valid", "test", "train"), help="which split (default valid)"
    )
    p.add_argument(
        "--eval-iters", type=_eval_iters, default=None, help='override eval.eval_iters ("all" or an integer)'
    )
    p.add_argument("--output", default=None, help="write the result JSON here")
    p.add_argument(
        "--dump-logits", default=None, help="save rank 0's first micro-batch per domain (input_ids, logits)"
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.hf and args.checkpoint:
        print("error: give --checkpoint or --hf, not both", file=sys.stderr)
        return 2
    ckpt = args.checkpoint or args.hf
    if ckpt is None or (args.config is None and not args.lm_eval):
        print(
            "error: per-domain evaluation needs --config and --checkpoint (or --hf); downstream tasks need "
            "--hf DIR --lm-eval TASKS",
            file=sys.stderr,
        )
        return 2
    result: dict | None = None
    rank = 0
    if args.config is not None:
        rc, result, rank = _per_domain(args, ckpt)
        if rc:
            return rc
    if args.lm_eval and rank == 0:
        return _downstream(args, ckpt, result)
    return 0


def _write_json(path: str, obj: dict) -> None:
    from megatron_doremi.atomic_io import atomic_write_text

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def _downstream(args: argparse.Namespace, ckpt: str, result: dict | None) -> int:
    """Rank 0: lm-eval on the HF directory ``ckpt``; ``lm_eval.json`` next to ``--output`` (and ``downstream``
    in the per-domain result)."""
    from megatron_doremi.downstream import LmEvalError, run_lm_eval

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print(
            "error: --lm-eval runs in one process (python -m megatron_doremi.evaluate ...)", file=sys.stderr
        )
        return 2
    if not os.path.isfile(os.path.join(ckpt, "config.json")):
        print(
            f"error: --lm-eval needs an HF model directory; export {ckpt} first (tools/export_hf.py)",
            file=sys.stderr,
        )
        return 2
    tasks = [t.strip() for t in args.lm_eval.split(",") if t.strip()]
    try:
        down = run_lm_eval(
            ckpt,
            tasks,
            include_path=args.lm_eval_include,
            num_fewshot=args.num_fewshot,
            limit=args.lm_eval_limit,
            batch_size=args.lm_eval_batch_size,
        )
    except LmEvalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = args.lm_eval_output or os.path.join(
        os.path.dirname(os.path.abspath(args.output)) if args.output else ckpt, "lm_eval.json"
    )
    _write_json(out, down)
    for task, metrics in down.get("tasks", {}).items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        print(f"lm-eval {task}: {shown}", flush=True)
    print(f"lm-eval results: {out}", flush=True)
    if result is not None and args.output:
        result["downstream"] = {"file": os.path.abspath(out), **down}
        _write_json(args.output, result)
    return 0


def _per_domain(args: argparse.Namespace, ckpt: str) -> tuple[int, dict | None, int]:
    """Per-domain evaluation (collective); (exit status, result on rank 0, rank)."""
    overrides = list(args.overrides)
    is_hf = os.path.isfile(os.path.join(ckpt, "config.json"))
    if is_hf:
        overrides.append(f"model={json.dumps(ckpt)}")
    if args.eval_iters is not None:
        overrides.append(f"eval.eval_iters={json.dumps(args.eval_iters)}")
    overrides += [
        "checkpoint.load=null",
        "checkpoint.save=null",
        "checkpoint.save_interval=0",
        "checkpoint.export_hf=null",
    ]
    try:
        from megatron_doremi.train import check_config
        from megatron_doremi.training.checkpoint import resolve_checkpoint

        cfg = check_config(args.config, overrides)
        load_dir, tag = (None, None) if is_hf else resolve_checkpoint(ckpt)
        if cfg.tokenizer is None and is_hf and os.path.isfile(os.path.join(ckpt, "tokenizer.json")):
            cfg.tokenizer = ckpt  # the export's own tokenizer gives bits per byte
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2, None, 0

    import torch

    from megatron_doremi.training.engine import Trainer
    from megatron_doremi.training.metrics import format_eval_table

    try:
        trainer = Trainer(cfg, for_training=False, verbose=args.verbose)
        if load_dir is not None:
            trainer.resume(load_dir, tag)
        dumped: dict[str, dict[str, torch.Tensor]] = {}

        def on_batch(d: int, batch: dict[str, torch.Tensor], logits: torch.Tensor) -> None:
            name = trainer.names[d]
            if args.dump_logits and trainer.rank == 0 and name not in dumped:
                dumped[name] = {
                    "input_ids": batch["input_ids"].clone(),
                    "logits": logits.detach().float().cpu(),
                }

        result = trainer.evaluate(args.split, on_batch=on_batch)
    except (ValueError, OSError) as exc:
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1, None, 0
    if result is None:
        print(
            f"error: the data has no {args.split!r} split (data.split={cfg.data['split']!r})", file=sys.stderr
        )
        return 1, None, trainer.rank
    if trainer.rank == 0:
        result["checkpoint"] = os.path.abspath(ckpt)
        print(
            format_eval_table(result, f"{args.split} evaluation of {ckpt} (step {result['step']})"),
            flush=True,
        )
        if args.output:
            _write_json(args.output, result)
        if args.dump_logits:
            tmp = args.dump_logits + ".tmp"
            torch.save(dumped, tmp)
            os.replace(tmp, args.dump_logits)
    return 0, result, trainer.rank


if __name__ == "__main__":
    sys.exit(main())
