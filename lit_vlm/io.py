"""Small file helpers shared by the data tools, the callbacks and checkpointing (no torch, no Lightning)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_output(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing; when the block ends without an error,
    flush it to disk (``fsync``) and rename it over ``path``. A crash or an error at any point
    leaves ``path`` as it was (the old file, or none), never half-written.

    Args:
        path: Destination; missing parent folders are created.
        mode: ``"wb"`` or ``"w"``.
        encoding: Text encoding for ``mode="w"``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory handles
        return
    try:
        os.fsync(dir_fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(dir_fd)


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 2, default: Callable[[Any], Any] | None = None) -> None:
    """Write ``obj`` as JSON through :func:`atomic_output`: readers see the old file or the new
    one, never a half-written one.

    Args:
        path: Destination; missing parent folders are created.
        obj: A JSON-serialisable object.
        indent: ``json.dump`` indentation; ``None`` writes compactly (large annotation files).
        default: ``json.dump``'s fallback for objects it cannot serialise (e.g. ``str``).
    """
    with atomic_output(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, ensure_ascii=False, indent=indent, default=default)
        fh.write("\n")


def manifest_format(path: str | os.PathLike) -> str | None:
    """The ``"format"`` of the JSON manifest at ``path``; ``None`` if it is missing, unreadable or has none."""
    try:
        with open(path, encoding="utf-8") as fh:
            manifest = json.load(fh)
    except (OSError, ValueError):
        return None
    return manifest.get("format") if isinstance(manifest, dict) else None
