"""Small file helpers shared by the data tools and the callbacks (no torch, no Lightning)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 2, default: Callable[[Any], Any] | None = None) -> None:
    """Write ``obj`` as JSON to a temporary file beside ``path``, then rename it over ``path``, so a
    crash never leaves a half-written file (readers see the old file or the new one).

    Args:
        path: Destination; missing parent folders are created.
        obj: A JSON-serialisable object.
        indent: ``json.dump`` indentation; ``None`` writes compactly (large annotation files).
        default: ``json.dump``'s fallback for objects it cannot serialise (e.g. ``str``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, ensure_ascii=False, indent=indent, default=default)
            fh.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def manifest_format(path: str | os.PathLike) -> str | None:
    """The ``"format"`` of the JSON manifest at ``path``; ``None`` if it is missing, unreadable or has none."""
    try:
        with open(path, encoding="utf-8") as fh:
            manifest = json.load(fh)
    except (OSError, ValueError):
        return None
    return manifest.get("format") if isinstance(manifest, dict) else None
