"""Access to the optional native extension ``megatron_doremi._helpers``.

Every native function has a numpy fallback that returns identical results;
set ``MEGATRON_DOREMI_NO_NATIVE=1`` to force the fallback (used by the tests
that check native and fallback agree).
"""

from __future__ import annotations

import logging
import os
from types import ModuleType

logger = logging.getLogger(__name__)


def _load() -> ModuleType | None:
    if os.environ.get("MEGATRON_DOREMI_NO_NATIVE", "0") == "1":
        return None
    try:
        from megatron_doremi import _helpers
    except ImportError as exc:  # pragma: no cover - depends on the build
        logger.warning(
            "native extension megatron_doremi._helpers unavailable (%s); using numpy fallbacks", exc
        )
        return None
    return _helpers


helpers: ModuleType | None = _load()


def native_enabled() -> bool:
    """True when the compiled helpers are loaded and not disabled by the environment."""
    return helpers is not None and os.environ.get("MEGATRON_DOREMI_NO_NATIVE", "0") != "1"
