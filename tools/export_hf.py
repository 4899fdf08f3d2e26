#!/usr/bin/env python
"""Export a megatron_doremi DeepSpeed checkpoint (ZeRO 0-3 shards) to HF format: safetensors + config + tokenizer.

    python tools/export_hf.py --checkpoint runs/main/checkpoints --output runs/main/hf [--tokenizer DIR] [--dtype auto]

``--checkpoint``: a save directory (its ``latest`` tag is used) or a ``global_step<N>`` directory. Runs in one
process without GPUs or torch.distributed. The result loads with ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="save dir with 'latest', or a global_step<N> dir")
    p.add_argument("--output", required=True, help="output directory (replaced atomically)")
    p.add_argument(
        "--tokenizer", default=None, help="tokenizer dir or tokenizer.json (default: the run config's)"
    )
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument(
        "--max-position-embeddings",
        type=int,
        default=None,
        help="the export's max_position_embeddings (default: the model config's if set, else the trained seq_length)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from megatron_doremi.training.export import export_hf

    try:
        out = export_hf(
            args.checkpoint,
            args.output,
            tokenizer=args.tokenizer,
            dtype=args.dtype,
            max_position_embeddings=args.max_position_embeddings,
        )
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"exported {args.checkpoint} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
