#!/usr/bin/env python
"""Tokenize jsonl(.gz)/parquet into Megatron .bin/.idx shards; see ``--help``.

Thin wrapper around :func:`megatron_doremi.data.preprocess.main` (Megatron-LM's flags).
"""

from __future__ import annotations

import sys

from megatron_doremi.data.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
