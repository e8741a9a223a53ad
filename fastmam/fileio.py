"""Atomic file writes: a reader sees the old content or the new, never a half-written file."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def temporary_path(path: Path) -> Path:
    """A hidden sibling of ``path``, unique per process and call, without the file's extension (so a scan for
    videos or checkpoints never lists it)."""
    return path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.part"


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary sibling, fsync it, and rename it over ``path``; the temporary is removed on
    any failure (a ``KeyboardInterrupt`` included)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
