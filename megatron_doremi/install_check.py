"""Minimum versions of the dependencies, one table for ``setup.py`` and the runtime check.

``python -m megatron_doremi.install_check`` (and the trainer, before it starts) reports every dependency that is
missing or older than its minimum, with the reason for the bound. The bounds are the versions the code is known to
need or the suite has actually run on, not guesses: torch and DeepSpeed are the releases the tests ran on
(2.13.0 CPU, 0.19.8); transformers 4.56 is the first release whose ``from_config`` / ``from_pretrained`` take the
``dtype=`` argument that model building, the DoReMi reference and the HF export pass.

This module imports only the standard library at the top (``setup.py`` executes it before anything is installed).
"""

from __future__ import annotations

import sys

__all__ = ["MINIMUM_VERSIONS", "check_installed", "install_requires", "main"]

#: distribution name -> (minimum version, why)
MINIMUM_VERSIONS: dict[str, tuple[str, str]] = {
    "numpy": ("1.24", "array API used by the data path"),
    "torch": ("2.13", "the oldest torch the test suite has run on"),
    "tokenizers": ("0.15", "tokenizer training and encoding"),
    "transformers": ("4.56", "from_config/from_pretrained take dtype= (earlier releases only torch_dtype=)"),
    "safetensors": ("0.4", "HF export format"),
    "deepspeed": ("0.19.8", "the oldest DeepSpeed the test suite has run on"),
    "matplotlib": ("3.6", "domain weight plots"),
    "tqdm": ("4.60", "progress bar"),
    "PyYAML": ("6.0", "YAML run and pipeline configs"),
}


def install_requires() -> list[str]:
    """``["numpy>=1.24", ...]`` for setup.py."""
    return [f"{name}>={minimum}" for name, (minimum, _) in MINIMUM_VERSIONS.items()]


def check_installed(names: list[str] | None = None) -> list[str]:
    """One line per dependency that is missing or too old (empty when all are fine)."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import InvalidVersion, Version

    problems = []
    for name in names or list(MINIMUM_VERSIONS):
        minimum, why = MINIMUM_VERSIONS[name]
        try:
            found = version(name)
        except PackageNotFoundError:
            problems.append(f"{name} is not installed: megatron-doremi needs {name}>={minimum} ({why})")
            continue
        try:
            too_old = Version(found) < Version(minimum)
        except InvalidVersion:
            continue  # a local build with a non-PEP 440 version: nothing to compare
        if too_old:
            problems.append(
                f"{name} {found} is too old: megatron-doremi needs {name}>={minimum} ({why}); "
                f"pip install -U '{name}>={minimum}'"
            )
    return problems


def main() -> int:
    problems = check_installed()
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    if not problems:
        print("megatron-doremi dependencies: all present and recent enough")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
