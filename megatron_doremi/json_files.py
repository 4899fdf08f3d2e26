"""One reader for every JSON (or YAML) file the project takes (run and pipeline configs, mixtures, summaries, weights).

:func:`read_json_file` raises the caller's error class with a message naming the file, the line and what the file
was meant to be; a key repeated within one object is an error (``json.load`` would silently keep the last).
A file whose name ends in ``.yaml`` / ``.yml`` is read as YAML with the same schema: JSON's data model only
(``true``/``false`` are the only booleans, ``1e-4`` is a number, dates stay strings, keys are strings), and the same
errors, with the YAML line. :func:`key_lines` maps each dotted key of a config file to its line, so validation
errors about a key can point at it.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

__all__ = ["YAML_SUFFIXES", "is_yaml_path", "key_lines", "read_json_file"]

YAML_SUFFIXES = (".yaml", ".yml")


def is_yaml_path(path: str | os.PathLike[str]) -> bool:
    return os.fspath(path).lower().endswith(YAML_SUFFIXES)


def _reject_duplicates(path: str, what: str, error: type[Exception], hint: str):
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise error(f"{path}: duplicate key {key!r} in {what}{hint}")
            out[key] = value
        return out

    return hook


def _yaml_loader(path: str, what: str, error: type[Exception], hint: str) -> Any:
    """A SafeLoader restricted to JSON's data model that rejects repeated and non-string keys."""
    import yaml

    bool_tag, float_tag = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"
    dropped = (bool_tag, float_tag, "tag:yaml.org,2002:timestamp")

    class Loader(yaml.SafeLoader):
        pass

    Loader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag not in dropped]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver(
        bool_tag, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
    )
    Loader.add_implicit_resolver(
        float_tag,
        re.compile(
            r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
            r"|[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
        ),
        list("-+0123456789."),
    )

    def mapping(loader: Any, node: Any, deep: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, str):
                raise error(f"{path}:{line}: {what}: keys must be strings, got {key!r}")
            if key in out:
                raise error(f"{path}:{line}: duplicate key {key!r} in {what}{hint}")
            out[key] = loader.construct_object(value_node, deep=True)
        return out

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return Loader


def _parse_yaml(text: str, path: str, what: str, error: type[Exception], hint: str) -> Any:
    import yaml

    try:
        return yaml.load(text, Loader=_yaml_loader(path, what, error, hint))  # noqa: S506 - a SafeLoader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        column = f" at column {mark.column + 1}" if mark is not None else ""
        raise error(f"{where}: invalid YAML in {what} ({exc.problem or exc.context}{column})") from None
    except yaml.YAMLError as exc:
        raise error(f"{path}: invalid YAML in {what} ({exc})") from None


def read_json_file(
    path: str | os.PathLike[str],
    what: str,
    error: type[Exception] = ValueError,
    *,
    require_object: bool = False,
    duplicate_hint: str = "",
) -> Any:
    """The parsed contents of ``path`` (``what``: e.g. "run config", named in errors); YAML for ``.yaml``/``.yml``.

    Raises ``error`` when the file is missing or unreadable, is not valid UTF-8 JSON (YAML), repeats a key in an
    object (``duplicate_hint`` is appended to that message) or, with ``require_object``, is not an object.
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
    if is_yaml_path(path):
        data = _parse_yaml(text, path, what, error, duplicate_hint)
        kind = "a YAML mapping"
    else:
        try:
            data = json.loads(text, object_pairs_hook=_reject_duplicates(path, what, error, duplicate_hint))
        except json.JSONDecodeError as exc:
            raise error(
                f"{path}:{exc.lineno}: invalid JSON in {what} ({exc.msg} at column {exc.colno})"
            ) from None
        kind = "a JSON object"
    if require_object and not isinstance(data, dict):
        raise error(f"{path}: {what} must be {kind} at the top level, got {type(data).__name__}")
    return data


def key_lines(path: str | os.PathLike[str]) -> dict[str, int]:
    """``{"schedule.lr": 12, ...}``: the 1-based line of every key of the (JSON or YAML) object file ``path``.

    Best effort for error messages: {} when the file cannot be read or composed.
    """
    try:
        import yaml

        with open(path, encoding="utf-8") as fh:
            root = yaml.compose(fh, Loader=yaml.SafeLoader)
    except Exception:  # noqa: BLE001 - only used to decorate an error that is raised anyway
        return {}
    out: dict[str, int] = {}

    def walk(node: Any, prefix: str) -> None:
        if not isinstance(node, yaml.MappingNode):
            return
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                dotted = f"{prefix}{key_node.value}"
                out.setdefault(dotted, key_node.start_mark.line + 1)
                walk(value_node, dotted + ".")

    walk(root, "")
    return out
