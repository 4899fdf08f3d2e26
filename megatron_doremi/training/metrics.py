"""Rank-0 observability: JSON-lines logs (resume-safe), progress bar, summary table (trackers: :mod:`.tracking`)."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["JsonlLog", "format_eval_table", "format_duration"]


class JsonlLog:
    """Append-only ``{"step": N, ...}`` lines. ``truncate_after(step)`` drops lines of later steps (atomic rewrite),
    so a run resumed from step N continues the file as if it had never been interrupted."""

    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def truncate_after(self, step: int) -> None:
        if not os.path.isfile(self.path):
            return
        kept = []
        with open(self.path) as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if isinstance(rec, dict) and int(rec.get("step", 0)) <= step:
                    kept.append(json.dumps(rec) + "\n")
        tmp = f"{self.path}.tmp.{os.getpid()}"
        with open(tmp, "w") as fh:
            fh.writelines(kept)
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record, allow_nan=True) + "\n")


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _num(value: Any, fmt: str) -> str:
    if value is None:
        width = "".join(c for c in fmt.split(".")[0] if c.isdigit())
        return "-".rjust(int(width) if width else 1)
    return format(value, fmt)


def format_eval_table(result: dict[str, Any], title: str = "evaluation") -> str:
    """A plain-text table of a :func:`summarize_eval` result (loss, perplexity, bits per byte, tokens)."""
    rows = [(name, d["loss"], d["ppl"], d.get("bpb"), d["tokens"]) for name, d in result["domains"].items()]
    width = max([len("token-weighted avg")] + [len(r[0]) for r in rows])
    lines = [title, f"  {'domain':<{width}}  {'loss':>8}  {'ppl':>10}  {'bpb':>7}  {'tokens':>10}"]
    for name, loss, ppl, bpb, tokens in rows:
        lines.append(
            f"  {name:<{width}}  {_num(loss, '8.4f')}  {_num(ppl, '10.2f')}  {_num(bpb, '7.4f')}  {tokens:>10d}"
        )
    tw, uni, worst = result["token_weighted"], result["uniform"], result["worst"]
    total = sum(r[4] for r in rows)
    for label, row, tokens in (
        ("token-weighted avg", tw, f"{total:>10d}"),
        ("uniform avg", uni, ""),
        (f"worst ({worst['domain']})", worst, ""),
    ):
        lines.append(
            f"  {label:<{width}}  {_num(row['loss'], '8.4f')}  {_num(row['ppl'], '10.2f')}  "
            f"{_num(row.get('bpb'), '7.4f')}  {tokens}".rstrip()
        )
    return "\n".join(lines)


def stderr_is_tty() -> bool:
    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
