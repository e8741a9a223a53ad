"""Readers for VideoMAE-compatible annotation lists.

Every reader returns a ``VideoList``: absolute paths, integer labels and (when the list carries
them) decoded frame counts. Formats (``data.list_format``):

- ``videomae`` — VideoMAE's K400 / SSv2 / UCF101 / HMDB51 lists: one video per line,
  ``path label`` separated by a space (VideoMAE's files are named ``train.csv`` but are
  space-separated). An optional third column is the decoded frame count, as written by
  ``python -m fastmam.data.prepare``; VideoMAE's own readers ignore it, and so do the loaders,
  which sample from the file's own count (``decode.probe``: the file may have changed since the list
  was written). A line that also holds commas (``path,label``) is accepted.
- ``ucf101`` — the official split files: ``trainlist0N.txt`` (``Class/v_Class_gXX_cYY.avi 1``,
  1-based labels) or ``testlist0N.txt`` (path only). Labels come from ``classInd.txt`` next to
  the list when it is there, else from the sorted class folder names.
- ``hmdb51`` — the official split folder: ``<class>_test_split<k>.txt`` files whose lines are
  ``video.avi id`` with id 1 = train, 2 = test, 0 = unused. ``data.train_list`` names the folder;
  ``data.hmdb51_split`` picks k; the train subset is read. Labels are the sorted class names.
- ``ssv2_json`` — Something-Something V2's own ``something-something-v2-train.json`` (a list of
  ``{"id", "template", ...}``) with ``something-something-v2-labels.json`` next to it; the video
  is ``<id>.webm``.
- ``auto`` — ``ssv2_json`` for a ``.json`` file, ``hmdb51`` for a folder, ``ucf101`` for a file
  named ``trainlist*``/``testlist*``, otherwise ``videomae``.

Relative paths are joined to ``data.data_root`` (or, when that is empty, to the list's folder).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

FORMATS = ("auto", "videomae", "ucf101", "hmdb51", "ssv2_json")


class AnnotationError(ValueError):
    """An annotation list is missing or malformed; the message names the file, the line and the fix."""


@dataclass
class VideoList:
    """Videos of one split: ``paths[i]`` has label ``labels[i]`` and, when known, ``num_frames[i]`` frames."""

    paths: list[str]
    labels: list[int]
    num_frames: list[int | None] = field(default_factory=list)

    def __post_init__(self):
        if not self.num_frames:
            self.num_frames = [None] * len(self.paths)
        if not len(self.paths) == len(self.labels) == len(self.num_frames):
            raise ValueError("paths, labels and num_frames must have the same length")

    def __len__(self) -> int:
        return len(self.paths)


def _join(root: Path, rel: str) -> str:
    p = Path(rel)
    return str(p if p.is_absolute() else root / p)


def _int(text: str, path: Path, lineno: int, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise AnnotationError(f"{path}:{lineno}: {what} '{text}' is not an integer") from None


def read_videomae(path: Path, root: Path) -> VideoList:
    """``path label [num_frames]`` per line, space- (or comma-) separated."""
    paths, labels, frames = [], [], []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.replace(",", " ").split() if "," in line and " " not in line else line.split()
        if len(parts) < 2:
            raise AnnotationError(
                f"{path}:{lineno}: expected 'path label' (space-separated, VideoMAE's list format), got '{line}'"
            )
        if len(parts) > 3:
            raise AnnotationError(
                f"{path}:{lineno}: {len(parts)} fields in '{line}'; expected 'path label [num_frames]' "
                "(a path with spaces cannot be listed: rename the file)"
            )
        paths.append(_join(root, parts[0]))
        labels.append(_int(parts[1], path, lineno, "label"))
        frames.append(_int(parts[2], path, lineno, "frame count") if len(parts) == 3 else None)
    return VideoList(paths, labels, frames)


def read_ucf101(path: Path, root: Path) -> VideoList:
    """UCF101's ``trainlist0N.txt`` (1-based labels) or ``testlist0N.txt`` (labels from the class folder)."""
    class_ind = path.parent / "classInd.txt"
    classes: dict[str, int] = {}
    if class_ind.is_file():
        for lineno, line in enumerate(class_ind.read_text().splitlines(), 1):
            if line.strip():
                idx, name = line.split()
                classes[name] = _int(idx, class_ind, lineno, "class index") - 1
    rows = [(n, line.split()) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    if not classes:
        classes = {c: i for i, c in enumerate(sorted({Path(p[0]).parts[0] for _, p in rows}))}
    paths, labels = [], []
    for lineno, parts in rows:
        rel = parts[0]
        if len(parts) >= 2:
            label = _int(parts[1], path, lineno, "label") - 1
        else:
            cls = Path(rel).parts[0]
            if cls not in classes:
                raise AnnotationError(f"{path}:{lineno}: class folder '{cls}' is not in {class_ind}")
            label = classes[cls]
        paths.append(_join(root, rel))
        labels.append(label)
    return VideoList(paths, labels)


def read_hmdb51(folder: Path, root: Path, split: int = 1, subset: int = 1) -> VideoList:
    """HMDB51's split folder: ``<class>_test_split<k>.txt`` with ``video.avi id`` lines (1 train, 2 test)."""
    files = sorted(folder.glob(f"*_test_split{split}.txt"))
    if not files:
        raise AnnotationError(
            f"{folder} holds no HMDB51 split files '*_test_split{split}.txt'; point data.train_list at the "
            "folder of the official splits (testTrainMulti_7030_splits) or set data.hmdb51_split"
        )
    paths, labels = [], []
    for label, f in enumerate(files):
        cls = f.name[: -len(f"_test_split{split}.txt")]
        for lineno, line in enumerate(f.read_text().splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2:
                raise AnnotationError(f"{f}:{lineno}: expected 'video.avi id', got '{line.strip()}'")
            if _int(parts[1], f, lineno, "split id") == subset:
                paths.append(_join(root, f"{cls}/{parts[0]}"))
                labels.append(label)
    return VideoList(paths, labels)


def read_ssv2_json(path: Path, root: Path) -> VideoList:
    """Something-Something V2's JSON list plus ``something-something-v2-labels.json`` beside it."""
    labels_file = path.parent / "something-something-v2-labels.json"
    if not labels_file.is_file():
        raise AnnotationError(f"{labels_file} is missing; SSv2 lists need the labels file from the same download")
    names = {k: int(v) for k, v in json.loads(labels_file.read_text()).items()}
    paths, labels = [], []
    for i, entry in enumerate(json.loads(path.read_text())):
        template = re.sub(r"[\[\]]", "", entry["template"])
        if template not in names:
            raise AnnotationError(
                f"{path}: entry {i} (id {entry['id']}) has template '{template}' not in {labels_file}"
            )
        paths.append(_join(root, f"{entry['id']}.webm"))
        labels.append(names[template])
    return VideoList(paths, labels)


def detect_format(path: Path) -> str:
    if path.is_dir():
        return "hmdb51"
    if path.suffix == ".json":
        return "ssv2_json"
    if re.match(r"(train|test)list\d*", path.name):
        return "ucf101"
    return "videomae"


def list_root(list_path: str | Path, data_root: str | Path = "") -> Path:
    """The folder a list's relative paths start from: ``data_root``, else the list's folder (or the list itself
    when it is a folder, as HMDB51's split folder is)."""
    path = Path(list_path).expanduser()
    return Path(data_root).expanduser() if str(data_root) else (path if path.is_dir() else path.parent)


def read_list(list_path: str | Path, data_root: str | Path = "", fmt: str = "auto", hmdb51_split: int = 1) -> VideoList:
    """Read an annotation list (see the module docstring for the formats)."""
    path = Path(list_path).expanduser()
    if not path.exists():
        raise AnnotationError(
            f"annotation list {path} does not exist; write one with "
            "`python -m fastmam.data.prepare VIDEO_FOLDER --out LIST` or set data.train_list"
        )
    if fmt not in FORMATS:
        raise AnnotationError(f"unknown list format '{fmt}'; expected one of {', '.join(FORMATS)}")
    fmt = detect_format(path) if fmt == "auto" else fmt
    root = list_root(path, data_root)
    if fmt == "hmdb51":
        out = read_hmdb51(path, root, hmdb51_split)
    elif fmt == "ssv2_json":
        out = read_ssv2_json(path, root)
    elif fmt == "ucf101":
        out = read_ucf101(path, root)
    else:
        out = read_videomae(path, root)
    if not len(out):
        raise AnnotationError(f"annotation list {path} ({fmt}) lists no videos")
    if min(out.labels) < 0:
        raise AnnotationError(f"annotation list {path} has a negative label ({min(out.labels)})")
    return out
