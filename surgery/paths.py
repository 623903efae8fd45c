"""Where surgery keeps its caches (converted zoo models, skeleton descriptions).

A leaf module with no surgery imports, so both model loading and skeletons can use it without
importing each other.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$SURGERY_CACHE``, default ``~/.cache/surgery``."""
    return Path(os.environ.get("SURGERY_CACHE", Path.home() / ".cache" / "surgery"))
