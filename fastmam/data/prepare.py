"""Scan a folder of videos into a VideoMAE-style annotation list, optionally re-encoding the videos.

Usage::

    python -m fastmam.data.prepare ROOT --out LIST [--flat] [--ext .mp4 .avi] [--classes FILE]
                                   [--jobs N] [--exact-count]
                                   [--reencode OUT_DIR] [--codec h264|vp9] [--short-side 320] [--gop 8]
                                   [--crf 23] [--overwrite]

Layout: ``ROOT/<class>/.../<video>`` (Kinetics / UCF101); the label of a video is the index of its top-level
folder among the sorted class folder names, and ``classes.txt`` (one name per line, line number = label) is
written next to LIST. With ``--flat`` the videos need no class folders and all get label 0 (unlabelled
pretraining data).

The list has one line per usable video, sorted by path::

    relative/path/to/video.mp4 LABEL NUM_FRAMES

with the path relative to the data root (ROOT, or OUT_DIR with ``--reencode``). VideoMAE's readers use the
first two columns only; NUM_FRAMES (frames in the first video stream) is an extra. Videos that are bad by the rule
the loaders and the code cache apply too (``fastmam.data.decode.probe``: unreadable, not a video, no video stream,
no frames, truncated, damaged, first frame not decodable) are left out and reported on stderr as
``skipped <path>: <reason>``, with the reason worded as the loaders word it.

``--reencode OUT_DIR`` transcodes every usable video to a small, seek-friendly copy (short side
``--short-side``, a keyframe every ``--gop`` frames, yuv420p, no audio) under the same relative path; this is
the usual remedy when decoding, not the model, limits training speed. Outputs are written atomically and
existing ones are reused, so an interrupted run resumes where it stopped.

Exit status: 0 when at least one video was written to the list, 1 when none, 2 for invalid arguments, 130 when
interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
from tqdm import tqdm

from ..fileio import temporary_path, write_text_atomic
from .decode import BadVideo, open_video, probe

__all__ = ["CODECS", "VIDEO_EXTS", "count_frames", "main", "reencode", "scaled_size", "scan_videos", "write_list"]

VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".flv")

# codec name -> (encoder, output extension, container format, encoder options besides keyframes and quality)
CODECS: dict[str, tuple[str, str, str, dict[str, str]]] = {
    "h264": ("libx264", ".mp4", "mp4", {"preset": "veryfast"}),
    "vp9": ("libvpx-vp9", ".webm", "webm", {"deadline": "realtime", "cpu-used": "8"}),
}
_CRF_MAX = {"h264": 51, "vp9": 63}
_FALLBACK_RATE = Fraction(30)


# --------------------------------------------------------------------------------------------------- scanning


def _normalize_exts(exts: Iterable[str] | None) -> tuple[str, ...]:
    if exts is None:
        return VIDEO_EXTS
    out = []
    for ext in exts:
        for part in ext.split(","):  # accept both "--ext .mp4 .avi" and "--ext mp4,avi"
            part = part.strip().lower()
            if part:
                out.append(part if part.startswith(".") else "." + part)
    if not out:
        raise ValueError("no file extensions given; pass e.g. --ext .mp4 .avi")
    return tuple(out)


def _walk_videos(root: Path, exts: tuple[str, ...]) -> list[Path]:
    """All files under ``root`` (following folder symlinks, once each) whose extension is in ``exts``."""
    found, seen_dirs = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # a symlink back up the tree would otherwise loop forever
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        # hidden entries are tool debris (macOS "._x.mp4" AppleDouble files, our own ".x.mp4.*.part" temporaries)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in exts:
                found.append(Path(dirpath) / name)
    return found


def scan_videos(root: str | os.PathLike, exts: Iterable[str] | None = None, flat: bool = False,
                classes: Sequence[str] | None = None) -> tuple[list[tuple[Path, int]], list[str]]:
    """Find the videos under ``root`` and label them by class folder.

    Args:
        root: the dataset folder, laid out as ``root/<class>/.../<video>`` (or anything with ``flat=True``).
        exts: file extensions to accept (case-insensitive, with or without the dot); default ``VIDEO_EXTS``.
        flat: videos are not arranged in class folders: every video gets label 0.
        classes: a fixed class list (e.g. the ``classes.txt`` of the training split) so that a second split gets
            the same labels even if it lacks some classes; by default the sorted names of the top-level folders
            that contain videos.

    Returns:
        ``(videos, classes)``: ``videos`` is a list of ``(path, label)`` with ``path = root / relative path``,
        sorted by relative path; ``classes[label]`` is the class name (with ``flat``, ``[root folder name]``).

    Raises:
        ValueError: ``root`` is not a folder, videos lie directly in ``root`` without ``flat``, or a class folder
            is missing from ``classes``.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder; pass the folder that holds the videos (or their class folders)")
    exts = _normalize_exts(exts)
    paths = sorted(_walk_videos(root, exts), key=lambda p: p.relative_to(root).as_posix())
    rels = [p.relative_to(root) for p in paths]
    if flat:
        return [(p, 0) for p in paths], [root.resolve().name or "videos"]

    loose = [r for r in rels if len(r.parts) == 1]
    if loose:
        raise ValueError(
            f"{len(loose)} video(s) lie directly in {root} (e.g. {loose[0]}), outside any class folder; pass "
            f"--flat to give every video label 0, or move the videos into class folders {root}/<class>/"
        )
    folders = sorted({r.parts[0] for r in rels})
    if classes is None:
        classes = folders
    classes = list(classes)
    index = {name: i for i, name in enumerate(classes)}
    if len(index) != len(classes):
        raise ValueError("the class list names some class twice; each class must appear on exactly one line")
    unknown = [f for f in folders if f not in index]
    if unknown:
        raise ValueError(
            f"{len(unknown)} class folder(s) of {root} are not in the class list: {', '.join(unknown[:5])}"
            f"{', ...' if len(unknown) > 5 else ''}; add them to the class list or remove the folders"
        )
    return [(p, index[r.parts[0]]) for p, r in zip(paths, rels, strict=True)], classes


# --------------------------------------------------------------------------------------------------- probing


def count_frames(path: str | os.PathLike, exact: bool = False) -> int:
    """Number of frames in the first video stream of ``path``: ``fastmam.data.decode.probe(path, exact).frames``.

    The default counts the non-empty packets of the stream (one per frame; demuxing reads no pixels, so this is
    cheap) and decodes only the first frame, to be sure the codec works. ``exact`` decodes every frame and counts
    them: slower, but catches damage in the middle of the stream. Either way the file must pass the one rule for
    a bad video that the loaders and the code cache apply too (``fastmam.data.decode``'s docstring), e.g. a file
    holding fewer frames than its header lists (a cut-off download) is rejected.

    Raises:
        BadVideo: the file is not a usable video; the message is the reason (missing, permission denied, empty,
            not a video, no video stream, no frames, damaged, truncated), worded as the loaders word it.
    """
    return probe(path, exact).frames


# --------------------------------------------------------------------------------------------------- re-encoding


def _even(x: float) -> int:
    return max(2, 2 * round(x / 2))


def scaled_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) scaled so that the shorter side is ``short_side`` (rounded to even), aspect ratio kept.

    Both sides are even because yuv420p stores chroma at half resolution in each direction.
    """
    if width <= height:
        return _even(short_side), _even(height * short_side / width)
    return _even(width * short_side / height), _even(short_side)


def reencode(src: str | os.PathLike, dst: str | os.PathLike, short_side: int = 320, gop: int = 8,
             codec: str = "h264", crf: int = 23, *, threads: int = 0) -> int:
    """Transcode the first video stream of ``src`` into ``dst``; returns the number of frames written.

    The output has its short side scaled to ``short_side`` (even, aspect kept), a keyframe exactly every ``gop``
    frames (so a clip sampler seeks cheaply), yuv420p, the source's average frame rate (30 if unknown) and no
    audio. It is written to a hidden temporary file next to ``dst`` and renamed into place, so ``dst`` is either
    absent or complete, even if the process is killed.

    Args:
        codec: ``"h264"`` (libx264, preset veryfast, .mp4) or ``"vp9"`` (libvpx-vp9, realtime, .webm); the
            container format follows the codec, whatever the extension of ``dst``.
        crf: constant quality; lower is better and larger (h264: 0-51, vp9: 0-63).
        threads: codec threads per video; 0 lets FFmpeg choose (use 1 when many videos run in parallel).

    Raises:
        ValueError: bad arguments, or ``src`` has no decodable frame or no frame size.
        BadVideo: ``src`` cannot be opened as a video (the message says why).
        OSError, av.error.FFmpegError: reading ``src`` or writing ``dst`` failed.
    """
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
    if short_side < 2:
        raise ValueError(f"short_side must be at least 2 pixels, got {short_side}")
    if gop < 1:
        raise ValueError(f"gop (keyframe interval) must be at least 1 frame, got {gop}")
    if not 0 <= crf <= _CRF_MAX[codec]:
        raise ValueError(f"crf for {codec} must be in 0..{_CRF_MAX[codec]}, got {crf}")
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    # unique per process and call, hidden and without a video extension so a scan never lists it
    tmp = temporary_path(dst)
    try:
        _transcode(Path(src), tmp, short_side, gop, codec, crf, threads)
        frames = count_frames(tmp)  # counted from the file itself, which also checks that it reads back
        os.replace(tmp, dst)
    except BaseException:  # including KeyboardInterrupt: never leave the temporary behind
        tmp.unlink(missing_ok=True)
        raise
    return frames


def _transcode(src: Path, tmp: Path, short_side: int, gop: int, codec: str, crf: int, threads: int) -> None:
    encoder, _, fmt, extra = CODECS[codec]
    container = open_video(src)
    with container:
        in_stream = container.streams.video[0]
        in_stream.thread_type = "AUTO"
        in_stream.thread_count = threads
        width, height = in_stream.codec_context.width, in_stream.codec_context.height
        if not width or not height:
            raise ValueError("the video stream does not say its frame size")
        out_w, out_h = scaled_size(width, height, short_side)
        rate = in_stream.average_rate
        if not rate or rate <= 0:
            rate = _FALLBACK_RATE
        rate = Fraction(rate)
        # g = maximum keyframe distance; keyint_min = minimum; x264's scene-cut detection would add keyframes
        # in between (sc_threshold 0 turns it off), so keyframes come exactly every gop frames
        options = {**extra, "crf": str(crf), "g": str(gop), "keyint_min": str(gop)}
        if codec == "h264":
            options["sc_threshold"] = "0"
        else:
            options["b"] = "0"  # libvpx needs bitrate 0 for crf to mean constant quality rather than a cap
        with av.open(str(tmp), "w", format=fmt) as out:
            out_stream = out.add_stream(encoder, rate=rate, options=options)
            out_stream.width, out_stream.height, out_stream.pix_fmt = out_w, out_h, "yuv420p"
            out_stream.thread_count = threads
            time_base = 1 / rate
            frames = 0
            for frame in container.decode(in_stream):
                small = frame.reformat(width=out_w, height=out_h, format="yuv420p", interpolation="AREA")
                # constant frame rate: frame i is shown at i / rate, whatever the source's timestamps were
                small.pts, small.time_base = frames, time_base
                out.mux(out_stream.encode(small))
                frames += 1
            if frames == 0:
                raise ValueError("the video stream has no decodable frames")
            out.mux(out_stream.encode(None))  # flush the frames the encoder still holds


# --------------------------------------------------------------------------------------------------- list files


def write_list(path: str | os.PathLike, rows: Iterable[tuple[str, int, int]]) -> None:
    """Write an annotation list: one ``relpath label num_frames`` line per row, sorted by path.

    Args:
        path: the list file to (over)write; written to a temporary file and renamed, so readers never see half.
        rows: ``(relative path with / separators, label, number of frames)``.

    Raises:
        ValueError: a path contains whitespace, which the space-separated format cannot hold.
    """
    lines = []
    for rel, label, frames in sorted(rows, key=lambda row: row[0]):
        if any(c.isspace() for c in rel):
            raise ValueError(f"path {rel!r} contains whitespace, which the space-separated list cannot hold; rename it")
        lines.append(f"{rel} {int(label)} {int(frames)}\n")
    write_text_atomic(Path(path), "".join(lines))




# --------------------------------------------------------------------------------------------------- jobs


def _av_reason(err: BaseException) -> str:
    """A short human reason for an av / OS error (its message without the errno and file name)."""
    return getattr(err, "strerror", None) or str(err) or type(err).__name__


@dataclass(frozen=True)
class _Job:
    """One video: probe ``src``, or (with ``dst``) re-encode it to ``dst`` and probe the result."""

    src: str
    dst: str | None
    exact: bool
    overwrite: bool = False
    short_side: int = 320
    gop: int = 8
    codec: str = "h264"
    crf: int = 23
    threads: int = 0


def _run_job(job: _Job) -> tuple[int | None, str | None]:
    """Returns ``(frames, None)`` or ``(None, reason)``; never raises, so one bad file cannot stop a run."""
    try:
        if job.dst is None:
            return count_frames(job.src, job.exact), None
        dst = Path(job.dst)
        if dst.exists() and not job.overwrite:
            try:  # done by an earlier run (outputs only ever appear complete)
                return count_frames(dst, job.exact), None
            except BadVideo:
                pass  # not ours or damaged since: make it again
        count_frames(job.src)  # cheap, and gives a clearer reason for a bad source than a failed transcode
        try:
            frames = reencode(job.src, dst, job.short_side, job.gop, job.codec, job.crf, threads=job.threads)
        except (BadVideo, ValueError, OSError, av.error.FFmpegError) as err:
            return None, f"re-encoding failed: {_av_reason(err)}"
        return (count_frames(dst, exact=True) if job.exact else frames), None
    except BadVideo as err:
        return None, str(err)
    except (ValueError, OSError, av.error.FFmpegError) as err:
        return None, _av_reason(err)
    except Exception as err:  # an unforeseen failure on one file must not lose the hours spent on the others
        return None, f"unexpected {type(err).__name__}: {err}"


def _run_jobs(jobs: Sequence[_Job], workers: int, desc: str) -> Iterator[tuple[int | None, str | None]]:
    """Results of ``jobs`` in order, computed by ``workers`` processes (inline for 1)."""
    progress = tqdm(total=len(jobs), desc=desc, unit="video", file=sys.stderr, disable=not sys.stderr.isatty())
    with progress:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                yield _run_job(job)
                progress.update()
            return
        # probes take milliseconds, so batch them to save inter-process traffic; re-encodes one at a time
        chunk = 1 if jobs[0].dst is not None else max(1, min(64, len(jobs) // (workers * 8)))
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            for result in pool.map(_run_job, jobs, chunksize=chunk):
                yield result
                progress.update()


# --------------------------------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastmam.data.prepare",
        description="Scan a folder of videos and write a VideoMAE-style list 'relpath label num_frames' "
                    "(plus classes.txt next to it), optionally re-encoding the videos for fast decoding.",
    )
    p.add_argument("root", metavar="ROOT", help="dataset folder: ROOT/<class>/<video> (or any layout with --flat)")
    p.add_argument("--out", required=True, metavar="LIST", help="annotation list to write; classes.txt goes next to it")
    p.add_argument("--ext", nargs="+", metavar="EXT",
                   help=f"video file extensions to accept, case-insensitive (default: {' '.join(VIDEO_EXTS)})")
    p.add_argument("--flat", action="store_true", help="videos are not in class folders: label every video 0")
    p.add_argument("--classes", metavar="FILE",
                   help="reuse this class list (e.g. the training split's classes.txt) so labels match across splits")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, metavar="N",
                   help="parallel worker processes (default: all CPUs; 1 runs inline)")
    p.add_argument("--exact-count", action="store_true",
                   help="count frames by decoding them all (slow; also catches damage mid-stream) instead of "
                        "counting packets")
    g = p.add_argument_group("re-encoding")
    g.add_argument("--reencode", metavar="OUT_DIR",
                   help="transcode the videos into OUT_DIR (same relative paths) and list those instead")
    g.add_argument("--codec", choices=sorted(CODECS), default="h264", help="h264 -> .mp4, vp9 -> .webm (default h264)")
    g.add_argument("--short-side", type=int, default=320, metavar="PX",
                   help="scale so the shorter side is PX pixels, rounded to even (default 320)")
    g.add_argument("--gop", type=int, default=8, metavar="FRAMES", help="a keyframe every FRAMES frames (default 8)")
    g.add_argument("--crf", type=int, default=23, help="constant quality, lower is better (default 23)")
    g.add_argument("--overwrite", action="store_true",
                   help="re-encode even where OUT_DIR already has the output (existing outputs are otherwise reused "
                        "as they are, so pass this after changing --short-side/--gop/--crf)")
    return p


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _check_args(args: argparse.Namespace) -> str | None:
    """The reason the arguments cannot work, or None."""
    if args.jobs < 1:
        return f"--jobs must be at least 1, got {args.jobs}"
    if Path(args.out).name == "classes.txt":
        return "--out must not be named classes.txt: that name is used for the class list written next to it"
    if args.reencode is None:
        return None
    if args.short_side < 2:
        return f"--short-side must be at least 2 pixels, got {args.short_side}"
    if args.gop < 1:
        return f"--gop must be at least 1 frame, got {args.gop}"
    if not 0 <= args.crf <= _CRF_MAX[args.codec]:
        return f"--crf for {args.codec} must be in 0..{_CRF_MAX[args.codec]}, got {args.crf}"
    root, out_dir = Path(args.root).resolve(), Path(args.reencode).resolve()
    if _is_within(out_dir, root) or _is_within(root, out_dir):
        # inside ROOT, the copies would be scanned as an extra class next time (or overwrite the sources)
        return (f"--reencode folder {args.reencode} and ROOT {args.root} must not contain each other; "
                f"choose an output folder outside ROOT")
    return None


def _read_classes(path: str) -> list[str]:
    names = [line.strip() for line in Path(path).read_text().splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names or not all(names):
        raise ValueError(f"class list {path} must have one non-empty class name per line")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0: list written, 1: no usable video, 2: bad arguments).

    Args:
        argv: the arguments after the program name; default ``sys.argv[1:]``.
    """
    args = _parser().parse_args(argv)
    error = _check_args(args)
    if error is None:
        try:
            classes = _read_classes(args.classes) if args.classes else None
            videos, classes = scan_videos(args.root, args.ext, flat=args.flat, classes=classes)
        except (ValueError, OSError) as err:
            error = str(err)
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        return 2

    root = Path(args.root)
    say: Callable[[str], None] = lambda msg: tqdm.write(msg, file=sys.stderr)
    if not videos:
        exts = " ".join(_normalize_exts(args.ext))
        print(f"error: no videos ({exts}) found under {root}; check ROOT or pass --ext", file=sys.stderr)
        return 1

    out_dir = Path(args.reencode) if args.reencode else None
    suffix = CODECS[args.codec][1]
    threads = 0 if args.jobs <= 1 else max(1, (os.cpu_count() or 1) // args.jobs)  # don't oversubscribe CPUs
    skipped = 0
    todo: list[tuple[str, int, _Job]] = []  # (relative path in the list, label, job)
    claimed: dict[str, str] = {}  # output relative path -> source relative path, to catch a.avi + a.mp4
    for path, label in videos:
        rel = path.relative_to(root).as_posix()
        if any(c.isspace() for c in rel):
            say(f"skipped {path}: the path contains whitespace, which the space-separated list cannot hold; "
                f"rename the file or folder (e.g. spaces -> underscores)")
            skipped += 1
            continue
        if out_dir is None:
            todo.append((rel, label, _Job(str(path), None, args.exact_count)))
            continue
        out_rel = Path(rel).with_suffix(suffix).as_posix()
        if out_rel in claimed:
            say(f"skipped {path}: its re-encoded copy {out_rel} would replace that of {claimed[out_rel]}; "
                f"rename one of the two")
            skipped += 1
            continue
        claimed[out_rel] = rel
        job = _Job(str(path), str(out_dir / out_rel), args.exact_count, args.overwrite, args.short_side, args.gop,
                   args.codec, args.crf, threads)
        todo.append((out_rel, label, job))

    rows = []
    try:
        results = _run_jobs([job for _, _, job in todo], args.jobs, "re-encoding" if out_dir else "probing")
        for (rel, label, job), (frames, reason) in zip(todo, results, strict=True):
            if reason is None:
                rows.append((rel, label, frames))
            else:
                say(f"skipped {job.src}: {reason}")
                skipped += 1
    except BrokenProcessPool:
        print("error: a worker process died (crashed on a file, or killed e.g. for lack of memory); rerun with "
              "--jobs 1 to see which file (re-encoded outputs made so far are kept)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        resume = "; the re-encoded videos are kept: run the same command again to resume" if out_dir else ""
        print(f"interrupted, no list written{resume}", file=sys.stderr)
        return 130

    print(f"{len(rows)} videos written, {skipped} skipped")
    if not rows:
        print("error: no usable video, so no list was written", file=sys.stderr)
        return 1
    out = Path(args.out)
    write_list(out, rows)
    write_text_atomic(out.parent / "classes.txt", "".join(f"{name}\n" for name in classes))
    base = Path(out_dir or root)
    print(f"wrote {out} (paths relative to {base}) and {out.parent / 'classes.txt'}")
    if base.resolve() != out.parent.resolve():
        # relative paths start at the list's folder unless data.data_root says otherwise
        print(f"train with: data.train_list={out} data.data_root={base}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
