#!/usr/bin/env python
"""Plot DoReMi domain weights over steps from ``doremi_weights.jsonl`` into a PNG.

    python tools/plot_domain_weights.py --input run/doremi_weights.jsonl --output run/domain_weights.png

Exit status: 0 on success, 1 for a missing/malformed input (``error: FILE:LINE: ...`` on stderr), 2 for bad usage.
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_doremi.mixers.weights_io import DomainWeightsError, plot_domain_weights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="doremi_weights.jsonl written by a DoReMi proxy run")
    parser.add_argument(
        "--output", default=None, help="PNG path (default: domain_weights.png next to the input)"
    )
    args = parser.parse_args(argv)
    output = args.output or os.path.join(os.path.dirname(os.path.abspath(args.input)), "domain_weights.png")
    try:
        plot_domain_weights(args.input, output)
    except (DomainWeightsError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
