"""Bad-data bookkeeping of the training loop: log each bad file once, count, stop past a bound.

Loaders report every failed read as ``(path, reason)`` in the batch's ``"bad"`` list (the sample itself was
already replaced). ``DataHealth`` keeps, per rank, the set of distinct bad files and the number of replaced
samples, appends each new file to ``<run>/bad_videos.rank<r>.tsv`` (``path, reason, size:mtime`` of the file
when it was found bad), and raises ``BadDataError`` once the distinct bad files exceed ``max_bad_fraction`` of
the list.

The record belongs to one line of attempts of a run: a run resumed from a checkpoint continues it (a file is
logged once per run, not once per attempt), counting only the recorded files that are still in the list and
unchanged since they were found bad (a file fixed or replaced in place is read again, and counted again only if
it fails again). Any other start -- a fresh run, or ``--resume`` with no checkpoint to resume from -- moves an
existing record aside to ``bad_videos.rank<r>.previous.tsv``, says so, and starts a new one, so an earlier
attempt's files are never counted silently.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection
from pathlib import Path

from ..fileio import write_text_atomic


class BadDataError(RuntimeError):
    """Too large a fraction of the dataset is unreadable; the message lists examples and the fix."""


def file_signature(path: str) -> str:
    """``size:mtime_ns`` of a file (``-`` when it cannot be stat'ed): changes when the file is fixed or replaced."""
    try:
        st = os.stat(path)
    except OSError:
        return "-"
    return f"{st.st_size}:{st.st_mtime_ns}"


class DataHealth:
    """Per-rank bad-file bookkeeping over a list of ``dataset_len`` videos (module docstring).

    Args:
        record: the run's ``bad_videos.rank<r>.tsv``, or None to keep nothing on disk.
        resume: the run continues an earlier attempt from its checkpoint: read ``record`` back instead of
            moving it aside.
        paths: the videos of the current list; entries read back count only if they are among them.
    """

    def __init__(self, dataset_len: int, max_bad_fraction: float, log: Callable[[str], None] = print,
                 record: str | Path | None = None, resume: bool = False, paths: Collection[str] = ()):
        self.dataset_len, self.max_bad_fraction, self.log = dataset_len, max_bad_fraction, log
        self.record = Path(record) if record is not None else None
        self.bad: dict[str, str] = {}
        self.skipped = 0
        if self.record is None or not self.record.is_file():
            return
        if resume:
            self._read_back(set(paths))
        else:
            aside = self.record.with_name(self.record.name.removesuffix(".tsv") + ".previous.tsv")
            os.replace(self.record, aside)
            self.log(f"{self.record.name} is from an earlier attempt that this run does not continue (no checkpoint "
                     f"resumed): moved to {aside.name}; its files are not counted, this run keeps a new record")

    def _read_back(self, listed: set[str]) -> None:
        kept, unlisted, changed = [], 0, 0
        for line in self.record.read_text().splitlines():
            path, _, rest = line.partition("\t")
            reason, _, signature = rest.partition("\t")
            if not path:
                continue
            if path not in listed:
                unlisted += 1
            elif signature and signature != file_signature(path):
                changed += 1
            else:
                self.bad[path] = reason
                kept.append(line)
        if unlisted or changed:
            write_text_atomic(self.record, "".join(f"{line}\n" for line in kept))
        self.log(f"{self.record.name}: {len(self.bad)} bad file(s) of the resumed run still count"
                 + (f"; not counted: {unlisted} no longer in the list, {changed} changed since (read again)"
                    if unlisted or changed else ""))

    @property
    def bad_fraction(self) -> float:
        return len(self.bad) / max(1, self.dataset_len)

    def update(self, bad: list[tuple[str, str]] | None) -> None:
        """Account for the failed reads of one batch; raises ``BadDataError`` past the bound."""
        if not bad:
            return
        for path, reason in bad:
            self.skipped += 1
            if path in self.bad:
                continue
            self.bad[path] = reason
            self.log(f"skipped bad video {path}: {reason} (replaced by another sample; "
                     f"{len(self.bad)} bad file(s) so far)")
            if self.record is not None:
                self.record.parent.mkdir(parents=True, exist_ok=True)
                with self.record.open("a") as f:
                    f.write(f"{path}\t{' '.join(reason.split())}\t{file_signature(path)}\n")
        self.check()

    def check(self) -> None:
        if self.bad_fraction <= self.max_bad_fraction:
            return
        examples = "\n  ".join(f"{p}: {r}" for p, r in list(self.bad.items())[:10])
        raise BadDataError(
            f"{len(self.bad)} of {self.dataset_len} videos ({self.bad_fraction:.1%}) could not be read, more than "
            f"data.max_bad_fraction={self.max_bad_fraction:g}. Examples:\n  {examples}\n"
            "Fix or remove these files (`python -m fastmam.data.prepare` writes a list of readable videos), "
            "check data.data_root, or raise data.max_bad_fraction."
        )

    def metrics(self) -> dict:
        return {"data_bad_videos": len(self.bad), "data_skipped_samples": self.skipped}
