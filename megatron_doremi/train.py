"""Train on a fixed (or mixer-driven) domain mixture with DeepSpeed.

    deepspeed --num_gpus 8 --module megatron_doremi.train --config run.json [--set schedule.lr=1e-4 ...]
    torchrun --nproc_per_node 8 -m megatron_doremi.train --config run.json
    srun python -m megatron_doremi.train --config run.json        # one task per GPU; SLURM_* mapped to RANK etc.
    python -m megatron_doremi.train --config run.json             # a single process

The run config and the DeepSpeed config (batch identity, ZeRO stage, files) are checked before any process
group or model is created; errors print ``error: ...`` naming the key and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_doremi.train", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="run config JSON (see docs/training.md)")
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

    cfg = load_run_config(config, overrides)
    denv = setup_env()
    resolve_deepspeed_config(cfg, denv.world_size, torch.cuda.is_available(), model_hidden_size(cfg.model))
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = check_config(args.config, args.overrides)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from megatron_doremi.training.engine import Trainer

    try:
        Trainer(cfg, verbose=args.verbose).train()
    except (ValueError, OSError) as exc:
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
