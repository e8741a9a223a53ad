"""Periodic, atomic checkpoints on top of DeepSpeed's.

Layout: ``<run>/checkpoints/step_00001000/`` (DeepSpeed's files plus a ``COMPLETE`` marker) and
``<run>/checkpoints/latest`` (the tag of the newest complete checkpoint, DeepSpeed's convention).
A checkpoint counts only once every rank has written it: ``COMPLETE`` and ``latest`` are written
after a barrier, ``latest`` by an atomic rename. A crash mid-save leaves ``latest`` on the previous
checkpoint, and pruning never removes the one ``latest`` names. The folder a crashed save left behind
is never loaded; it is cleared before its tag is written again, and removed once a later checkpoint is
complete.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .distributed import barrier
from .fileio import write_text_atomic

MARKER = "COMPLETE"
LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags of complete checkpoints, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and (p / MARKER).exists())


def incomplete_tags(ckpt_dir: Path) -> list[str]:
    """Checkpoint folders without ``COMPLETE``: saves that crashed (or, on other ranks, are in flight)."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step_")
                  and not (p / MARKER).exists())


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag ``latest`` names if it is complete, else the newest complete one, else None."""
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / LATEST
    if pointer.exists():
        tag = pointer.read_text().strip()
        if (ckpt_dir / tag / MARKER).exists():
            return tag
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


def save(engine, ckpt_dir: Path, step: int, client_state: dict, keep_last: int, is_main: bool) -> str:
    """Collective: every rank calls it. Returns the tag written."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    if is_main and (ckpt_dir / tag).is_dir() and not (ckpt_dir / tag / MARKER).exists():
        # what a crashed save of this step left: files of another world size would survive an overwrite
        shutil.rmtree(ckpt_dir / tag)
    barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    barrier()  # every rank's shards are on disk before the checkpoint is declared complete
    if is_main:
        write_text_atomic(ckpt_dir / tag / MARKER, f"{step}\n")
        write_text_atomic(ckpt_dir / LATEST, tag)
        for old in complete_tags(ckpt_dir)[:-keep_last]:
            if old != tag:
                shutil.rmtree(ckpt_dir / old, ignore_errors=True)
        for debris in incomplete_tags(ckpt_dir):
            if debris < tag:  # older than a complete checkpoint: no save of it is in flight
                shutil.rmtree(ckpt_dir / debris, ignore_errors=True)
    barrier()
    return tag


def load(engine, ckpt_dir: Path, tag: str) -> dict:
    """Restore model, optimizer, scheduler; return the client state saved with it."""
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    return client_state or {}
