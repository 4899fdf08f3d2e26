"""Write files so a reader never sees a partial one: temp file in the same directory, fsync, ``os.replace``."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from typing import IO, Any

__all__ = ["atomic_write", "atomic_write_json", "atomic_write_text"]


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[Any]], Any], mode: str = "w") -> None:
    """Call ``write(fh)`` on a temp file next to ``path`` (created with its parents), then rename it over ``path``.

    On any exception the temp file is removed and an existing ``path`` is left untouched.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) atomically."""
    atomic_write(path, lambda fh: fh.write(text))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON (no NaN/inf: they are not JSON) atomically, with a trailing newline."""
    atomic_write_text(path, json.dumps(obj, indent=indent, allow_nan=False) + "\n")
