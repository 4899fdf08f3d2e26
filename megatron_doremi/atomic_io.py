"""Write files so a reader never sees a partial one: temp file in the same directory, fsync, ``os.replace``.

Files and directories made here honour the process umask (0644 / 0755 under the usual 022), like ``open`` and
``os.makedirs`` do: ``mkstemp`` / ``mkdtemp`` alone would make them 0600 / 0700, unreadable to teammates.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from typing import IO, Any

__all__ = [
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
    "current_umask",
    "make_temp_dir",
    "umask_tree",
]


def current_umask() -> int:
    """The process umask, read without changing it (``/proc/self/status`` on Linux; else set-and-restore)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_temp_dir(parent: str, prefix: str) -> str:
    """``tempfile.mkdtemp`` in ``parent`` with the mode a plain ``os.makedirs`` would give (0777 & ~umask)."""
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    os.chmod(tmp, 0o777 & ~current_umask())
    return tmp


def umask_tree(root: str | os.PathLike[str]) -> None:
    """Give ``root`` and everything below it the modes ``open`` / ``os.makedirs`` would (0666 / 0777 & ~umask; a
    file with an execute bit keeps being executable), for trees written by libraries that use 0600 (safetensors)."""
    mask = current_umask()
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o777 & ~mask)
        for name in filenames:
            path = os.path.join(dirpath, name)
            executable = os.stat(path).st_mode & 0o111
            os.chmod(path, (0o777 if executable else 0o666) & ~mask)


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[Any]], Any], mode: str = "w") -> None:
    """Call ``write(fh)`` on a temp file next to ``path`` (created with its parents), then rename it over ``path``.

    The file gets mode ``0666 & ~umask``. On any exception the temp file is removed and an existing ``path`` is left
    untouched.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600
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
