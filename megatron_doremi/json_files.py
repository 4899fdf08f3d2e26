"""One reader for every JSON file the project takes (run and pipeline configs, mixtures, summaries, weights).

:func:`read_json_file` raises the caller's error class with a message naming the file, the line and what the file
was meant to be; a key repeated within one object is an error (``json.load`` would silently keep the last).
"""

from __future__ import annotations

import json
import os
from typing import Any

__all__ = ["read_json_file"]


def _reject_duplicates(path: str, what: str, error: type[Exception], hint: str):
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise error(f"{path}: duplicate key {key!r} in {what}{hint}")
            out[key] = value
        return out

    return hook


def read_json_file(
    path: str | os.PathLike[str],
    what: str,
    error: type[Exception] = ValueError,
    *,
    require_object: bool = False,
    duplicate_hint: str = "",
) -> Any:
    """The parsed contents of ``path`` (``what``: e.g. "run config", named in errors).

    Raises ``error`` when the file is missing or unreadable, is not valid UTF-8 JSON, repeats a key in an object
    (``duplicate_hint`` is appended to that message) or, with ``require_object``, is not a JSON object.
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise error(f"{path}: cannot read {what}: the file does not exist") from None
    except OSError as exc:
        raise error(f"{path}: cannot read {what} ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise error(f"{path}: cannot read {what} (not UTF-8 text)") from None
    try:
        data = json.loads(text, object_pairs_hook=_reject_duplicates(path, what, error, duplicate_hint))
    except json.JSONDecodeError as exc:
        raise error(
            f"{path}:{exc.lineno}: invalid JSON in {what} ({exc.msg} at column {exc.colno})"
        ) from None
    if require_object and not isinstance(data, dict):
        raise error(f"{path}: {what} must be a JSON object at the top level, got {type(data).__name__}")
    return data
