#!/usr/bin/env python
"""Train a byte-level BPE tokenizer locally (HF tokenizers); see ``--help``.

Thin wrapper around :func:`megatron_doremi.data.tokenizer.main`.
"""

from __future__ import annotations

import sys

from megatron_doremi.data.tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
