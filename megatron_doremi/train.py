"""Train on a fixed (or mixer-driven) domain mixture with DeepSpeed.

    deepspeed --num_gpus 8 --module megatron_doremi.train --config run.json [--set schedule.lr=1e-4 ...]
    torchrun --nproc_per_node 8 -m megatron_doremi.train --config run.json
    srun python -m megatron_doremi.train --config run.json        # one task per GPU; SLURM_* mapped to RANK etc.
    python -m megatron_doremi.train --config run.json             # a single process

The run config and the DeepSpeed config (batch identity, ZeRO stage, files, output paths) are checked before any
process group or model is created; errors print ``error: ...`` naming the key. Exit statuses
(:mod:`megatron_doremi.training.exit_codes`): OK; CONFIG_ERROR (invalid config, nothing started); LOCKED (the
run directory is held by another live run); DIVERGED (past a ``train.*`` divergence limit: ``diverged.json`` in
the run directory says why, the last complete checkpoint is kept); REQUEUE (75: stopped on a signal
(SIGTERM/SIGUSR1) or ``checkpoint.exit_duration_mins`` after a complete checkpoint: rerun to resume); FAILED (any
other error, e.g. a checkpoint that cannot be resumed: the message names the file or key).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from megatron_doremi.training import exit_codes

STATUS_FILE_ENV = "MEGATRON_DOREMI_EXIT_STATUS_FILE"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_doremi.train", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="run config JSON or YAML (see docs/training.md)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, dotted key, JSON value (repeatable): --set schedule.train_iters=100",
    )
    p.add_argument("--verbose", action="store_true", help="keep DeepSpeed's INFO logs and print tracebacks")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def check_config(config: str, overrides: Sequence[str]):
    """Load and fully validate the run config and its DeepSpeed config for this launch (no process group yet)."""
    import torch

    from megatron_doremi.training.config import load_run_config
    from megatron_doremi.training.dist import setup_env
    from megatron_doremi.training.ds_config import resolve_deepspeed_config
    from megatron_doremi.training.model import model_hidden_size
    from megatron_doremi.training.preflight import check_output_paths

    cfg = load_run_config(config, overrides)
    check_output_paths(cfg)
    denv = setup_env()
    resolve_deepspeed_config(cfg, denv.world_size, torch.cuda.is_available(), model_hidden_size(cfg.model))
    return cfg


def _report_status(status: int) -> int:
    """Rank 0 writes ``status`` to ``$MEGATRON_DOREMI_EXIT_STATUS_FILE`` when set (for launchers that replace the
    ranks' exit status by their own, like torchrun: the sbatch templates read it to requeue); returns it."""
    path = os.environ.get(STATUS_FILE_ENV)
    if path and os.environ.get("RANK", "0") == "0":
        from megatron_doremi.atomic_io import atomic_write_text

        try:
            atomic_write_text(path, f"{status}\n")
        except OSError as exc:
            print(f"warning: cannot write the exit status to {path} ({exc.strerror})", file=sys.stderr)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    from megatron_doremi.install_check import check_installed

    args = build_parser().parse_args(argv)
    problems = check_installed()
    if problems:
        for line in problems:
            print(f"error: {line}", file=sys.stderr)
        return _report_status(exit_codes.FAILED)
    try:
        cfg = check_config(args.config, args.overrides)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return _report_status(exit_codes.CONFIG_ERROR)
    from megatron_doremi.training.divergence import DivergenceError
    from megatron_doremi.training.engine import Trainer
    from megatron_doremi.training.run_lock import RunLockedError, release_all

    trainer = None
    try:
        trainer = Trainer(cfg, verbose=args.verbose)
        summary = trainer.train()
        # stopped on a signal or the time limit after a complete checkpoint: rerunning resumes exactly
        status = exit_codes.REQUEUE if summary.get("stopped") else exit_codes.OK
    except RunLockedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        release_all()
        return _report_status(exit_codes.LOCKED)
    except DivergenceError as exc:  # every rank stops at the same step: the teardown below is collective
        print(f"error: {exc}; see {os.path.join(cfg.output_dir, 'diverged.json')}", file=sys.stderr)
        status = exit_codes.DIVERGED
    except (ValueError, OSError) as exc:
        release_all()  # the other ranks may be anywhere: no collective teardown, just exit
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return _report_status(exit_codes.FAILED)
    trainer.close()
    return _report_status(status)


def _exit(status: int) -> None:
    """Exit with ``status``; after an error with the process group still up, skip the interpreter's teardown
    (its static destructors can abort the process and replace the status)."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    _exit(main())
