"""Bad-data bookkeeping of the training loop: log each bad file once, count, stop past a bound.

Loaders report every failed read as ``(path, reason)`` in the batch's ``"bad"`` list (the sample
itself was already replaced). ``DataHealth`` keeps, per rank, the set of distinct bad files and the
number of replaced samples, appends each new file to ``<run>/bad_videos.rank<r>.tsv`` (read back
on resume, so a file is logged once per run, not once per attempt), and raises ``BadDataError``
once the distinct bad files exceed ``max_bad_fraction`` of the list.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


class BadDataError(RuntimeError):
    """Too large a fraction of the dataset is unreadable; the message lists examples and the fix."""


class DataHealth:
    def __init__(self, dataset_len: int, max_bad_fraction: float, log: Callable[[str], None] = print,
                 record: str | Path | None = None):
        self.dataset_len, self.max_bad_fraction, self.log = dataset_len, max_bad_fraction, log
        self.record = Path(record) if record is not None else None
        self.bad: dict[str, str] = {}
        self.skipped = 0
        if self.record is not None and self.record.is_file():
            for line in self.record.read_text().splitlines():
                path, _, reason = line.partition("\t")
                if path:
                    self.bad[path] = reason

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
                    f.write(f"{path}\t{reason}\n")
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
