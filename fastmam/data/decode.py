"""CPU video decoding at given frame indices: PyAV (default) and decord.

Frame ``i`` of a video is the i-th frame in presentation order, as a sequential decode from the
start numbers them. ``decode_pyav`` seeks to the keyframe before the first wanted frame (this is
where a short keyframe interval pays off) and numbers frames by their presentation time times the
stream's average frame rate, which equals the sequential numbering for the constant-frame-rate
videos of the usual datasets; when a stream lacks timestamps or the seek lands past the wanted
frame, it decodes sequentially from the start instead.

Every failure is raised as ``BadVideo`` with a short reason (missing, zero bytes, not a video,
no video stream, no frames, truncated), which the datasets count and log.
"""

from __future__ import annotations

import os
from fractions import Fraction

import numpy as np

BACKENDS = ("pyav", "decord")


class BadVideo(Exception):
    """A video file cannot give the requested frames; ``str(exc)`` is the reason."""


def check_file(path: str) -> None:
    """Cheap checks with clear reasons before a decoder sees the file."""
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise BadVideo("missing file") from None
    except OSError as exc:
        raise BadVideo(f"cannot stat: {exc.strerror or exc}") from None
    if size == 0:
        raise BadVideo("zero-byte file")


def _open_pyav(path: str):
    import av

    check_file(path)
    try:
        container = av.open(path, metadata_errors="ignore")
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise BadVideo(f"not a readable video: {_why(exc)}") from None
    if not container.streams.video:
        container.close()
        raise BadVideo("no video stream")
    return container


def _why(exc: Exception) -> str:
    """FFmpeg's reason without the errno and the path (the log line names the file already)."""
    return getattr(exc, "strerror", None) or str(exc).splitlines()[0]


def count_frames_pyav(path: str) -> int:
    """Frames of the first video stream: the container's count, else the packets demuxed (no decoding)."""
    import av

    container = _open_pyav(path)
    try:
        stream = container.streams.video[0]
        n = stream.frames
        if n <= 0:
            n = sum(1 for pkt in container.demux(stream) if pkt.size > 0)
    except av.error.FFmpegError as exc:
        raise BadVideo(f"cannot demux: {_why(exc)}") from None
    finally:
        container.close()
    if n <= 0:
        raise BadVideo("no frames")
    return n


def _frame_index(frame, start: int, time_base: Fraction, rate: Fraction) -> int:
    return int(round(float((frame.pts - start) * time_base * rate)))


def decode_pyav(path: str, indices, threads: int = 1) -> np.ndarray:
    """Frames ``indices`` (any order, repeats allowed) -> (len(indices), H, W, 3) uint8 RGB."""
    import av

    wanted = sorted(set(int(i) for i in indices))
    if not wanted or wanted[0] < 0:
        raise ValueError(f"frame indices must be non-negative and non-empty, got {list(indices)[:8]}")
    container = _open_pyav(path)
    got: dict[int, np.ndarray] = {}
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO" if threads > 1 else "SLICE"
        stream.thread_count = max(1, threads)
        rate, tb = stream.average_rate, stream.time_base
        start = stream.start_time if stream.start_time is not None else 0
        timed = bool(rate) and tb is not None
        if timed and wanted[0] > 0:
            target = start + int(Fraction(wanted[0]) / rate / tb)
            container.seek(target, stream=stream, backward=True, any_frame=False)
        sequential = not timed
        first = True
        for i, frame in enumerate(container.decode(stream)):
            if not sequential and frame.pts is None:
                raise _Restart
            idx = i if sequential else _frame_index(frame, start, tb, rate)
            if first and idx > wanted[0]:  # the seek overshot: number frames from the start instead
                raise _Restart
            first = False
            if idx in wanted and idx not in got:
                got[idx] = frame.to_ndarray(format="rgb24")
            if idx >= wanted[-1]:
                break
    except _Restart:
        container.close()
        return _decode_sequential(path, indices, wanted, threads)
    except av.error.FFmpegError as exc:
        raise BadVideo(f"decoding failed: {_why(exc)}") from None
    finally:
        container.close()
    return _assemble(got, indices, wanted)


class _Restart(Exception):
    pass


def _decode_sequential(path: str, indices, wanted: list[int], threads: int) -> np.ndarray:
    import av

    container = _open_pyav(path)
    got: dict[int, np.ndarray] = {}
    try:
        stream = container.streams.video[0]
        stream.thread_count = max(1, threads)
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                got[i] = frame.to_ndarray(format="rgb24")
            if i >= wanted[-1]:
                break
    except av.error.FFmpegError as exc:
        raise BadVideo(f"decoding failed: {_why(exc)}") from None
    finally:
        container.close()
    return _assemble(got, indices, wanted)


def _assemble(got: dict[int, np.ndarray], indices, wanted: list[int]) -> np.ndarray:
    missing = [i for i in wanted if i not in got]
    if missing:
        have = max(got) + 1 if got else 0
        raise BadVideo(f"truncated: frame {missing[0]} requested, only {have} frame(s) decodable")
    return np.stack([got[int(i)] for i in indices])


def _decord_why(exc: Exception) -> str:
    """decord's message without its timestamp and source location."""
    first = str(exc).splitlines()[0]
    return first.split("Error: ", 1)[-1]


def count_frames_decord(path: str) -> int:
    return len(_open_decord(path, 1))


def _open_decord(path: str, threads: int):
    import decord

    check_file(path)
    try:
        return decord.VideoReader(path, num_threads=max(1, threads))
    except (decord.DECORDError, RuntimeError) as exc:
        raise BadVideo(f"not a readable video: {_decord_why(exc)}") from None


def decode_decord(path: str, indices, threads: int = 1) -> np.ndarray:
    """decord's accurate-seek batch decode -> (len(indices), H, W, 3) uint8 RGB."""
    import decord

    vr = _open_decord(path, threads)
    n = len(vr)
    idx = [int(i) for i in indices]
    if max(idx) >= n:
        raise BadVideo(f"truncated: frame {max(idx)} requested, only {n} frame(s) decodable")
    try:
        return vr.get_batch(idx).asnumpy()
    except (decord.DECORDError, RuntimeError) as exc:
        raise BadVideo(f"decoding failed: {_decord_why(exc)}") from None


def decoder(backend: str):
    """(count_frames, decode) for a CPU backend name."""
    if backend == "pyav":
        return count_frames_pyav, decode_pyav
    if backend == "decord":
        try:
            import decord  # noqa: F401
        except ImportError:
            raise ImportError("data.backend='decord' needs decord: pip install decord") from None
        return count_frames_decord, decode_decord
    raise ValueError(f"unknown CPU decoder '{backend}'; expected one of {', '.join(BACKENDS)}")
