"""The one prober of video files, and CPU decoding at given frame indices: PyAV (default) and decord.

**What makes a video file bad.** One rule, applied by ``probe`` -- which ``prepare``, every loader backend (PyAV,
decord, and DALI's planning) and the code cache call before they decode a file -- so that a file is bad or good
the same way everywhere. A file is bad when

1. it cannot be read: missing, a directory or another non-regular file, permission denied, empty (0 bytes);
2. FFmpeg cannot open it as a media file (not a video, or a cut-off MP4 whose index was at the end);
3. it has no video stream, or its video stream does not give a frame size;
4. its video stream holds no frame, fewer frames than its header lists (a cut-off copy of an MP4 whose index is
   at the front, "faststart"), or demuxing it stops with an error part-way (damaged);
5. its first frame does not decode.

The frame count of a video is the number of packets of its first video stream that hold a frame (demuxed, not
decoded: about the cost of decoding two frames). It is what ``prepare`` writes in the list and what the loaders
sample from; a count in the list is not trusted, as the file may have changed since the list was written.
``probe(path, exact=True)`` decodes every frame and counts those instead (``prepare --exact-count``), which also
catches damage in the middle of the stream; the loaders meet such damage when they decode and report
``decoding failed (...)``. Containers whose header does not list a frame count (WebM / Matroska, MPEG-PS) cannot
tell a cut-off copy from a short video: they are served with the frames they hold, on every backend alike.

Every failure is a ``BadVideo`` whose text is the reason, worded the same whichever decoder met the file: the
list above (``missing file``, ``a directory, not a video file``, ``permission denied``, ``empty file (0 bytes)``,
``not a readable video (...)``, ``no video stream (...)``, ``truncated: ...``, ``damaged: ...``), then at decode
time ``decoding failed (...)`` and ``truncated: frame i requested, only n frame(s) decodable``. The words in
parentheses are FFmpeg's: decord's messages are cleaned of their timestamps, C++ source locations and raw
AVERROR numbers (1094995529 is ``Invalid data found when processing input``).

Frame ``i`` of a video is the i-th frame in presentation order, as a sequential decode from the start numbers
them. ``decode_pyav`` seeks to the keyframe before the first wanted frame (this is where a short keyframe interval
pays off) and numbers frames by their presentation time times the stream's average frame rate, which equals the
sequential numbering for the constant-frame-rate videos of the usual datasets; when a stream lacks timestamps or
the seek lands past the wanted frame, it decodes sequentially from the start instead.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

BACKENDS = ("pyav", "decord")


class BadVideo(Exception):
    """A video file cannot give the requested frames; ``str(exc)`` is the reason (module docstring)."""


@dataclass(frozen=True)
class VideoInfo:
    """What ``probe`` found in a good file's first video stream."""

    frames: int  # frames it holds (module docstring: packets, or decoded frames with exact=True)
    height: int
    width: int
    codec: str  # FFmpeg's decoder name: h264, hevc, vp9, ...


_OS_REASONS = {
    errno.ENOENT: "missing file",
    errno.ENOTDIR: "missing file",  # a folder on its path is a file
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EISDIR: "a directory, not a video file",
}


def _os_reason(exc: OSError) -> str:
    return _OS_REASONS.get(exc.errno) or f"cannot read ({exc.strerror or exc})"


def _ffmpeg_reason(exc: Exception) -> str:
    """FFmpeg's words for an error, without the errno and the path (the log line names the file already)."""
    return getattr(exc, "strerror", None) or str(exc).splitlines()[0]


def check_file(path: str | os.PathLike) -> None:
    """The cheap checks of rule 1, before a decoder sees the file."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise BadVideo(_os_reason(exc)) from None
    if stat.S_ISDIR(st.st_mode):
        raise BadVideo(_OS_REASONS[errno.EISDIR])
    if not stat.S_ISREG(st.st_mode):  # a pipe or a device would block or never end
        raise BadVideo("not a regular file (a pipe, socket or device)")
    if st.st_size == 0:
        raise BadVideo("empty file (0 bytes)")


def open_video(path: str | os.PathLike):
    """A PyAV container of ``path`` that has a video stream (rules 1-3 but the frame size); ``BadVideo`` otherwise."""
    import av

    check_file(path)
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except OSError as exc:  # av's errors that carry an errno (permission denied, ...) are OSErrors too
        if exc.errno in _OS_REASONS:
            raise BadVideo(_OS_REASONS[exc.errno]) from None
        raise BadVideo(f"not a readable video ({_ffmpeg_reason(exc)})") from None
    except (av.error.FFmpegError, UnicodeDecodeError) as exc:
        raise BadVideo(f"not a readable video ({_ffmpeg_reason(exc)})") from None
    if not container.streams.video:
        container.close()
        raise BadVideo("no video stream (audio-only or not a video)")
    return container


def probe(path: str | os.PathLike, exact: bool = False) -> VideoInfo:
    """Check ``path`` against the rule of the module docstring -> its ``VideoInfo``; ``BadVideo`` says why not.

    ``exact`` counts frames by decoding them all (slow; catches damage in the middle of the stream)."""
    container = open_video(path)
    with container:
        stream = container.streams.video[0]
        frames = _count_frames(container, stream, exact)
        ctx = stream.codec_context
        height, width = int(ctx.height or 0), int(ctx.width or 0)
        if height <= 0 or width <= 0:
            raise BadVideo(f"no frame size in the video stream's header ({width}x{height})")
        return VideoInfo(frames, height, width, str(ctx.name))


def _count_frames(container, stream, exact: bool) -> int:
    """Rules 4 and 5: the packets of ``stream`` (decoding the first frame only), or every frame decoded."""
    import av

    if exact:
        stream.thread_type = "AUTO"  # frame threading: decoding every frame is the whole cost here
    packets, decoded, decode_error = 0, 0, None

    def decode(packet) -> None:
        nonlocal decoded, decode_error
        try:
            decoded += len(stream.codec_context.decode(packet))
        except av.error.FFmpegError as exc:
            if exact:
                raise BadVideo(f"damaged: decoding stopped after {decoded} frames ({_ffmpeg_reason(exc)})") from None
            decode_error = exc  # a damaged leading packet; later ones may still decode

    try:
        for packet in container.demux(stream):
            # the demuxer ends with an empty packet that only flushes the decoder; a corrupt one is cut short
            if packet.size == 0 or packet.is_corrupt:
                continue
            packets += 1
            if exact or not decoded:  # the cheap count only checks that one frame decodes
                decode(packet)
    except av.error.FFmpegError as exc:
        raise BadVideo(f"damaged: reading stopped after {packets} frames ({_ffmpeg_reason(exc)})") from None
    if packets == 0:
        raise BadVideo("the video stream has no frames")
    if stream.frames and packets < stream.frames:  # 0 where the container does not say (mkv, webm, mpeg-ps)
        raise BadVideo(f"truncated: the header lists {stream.frames} frames but only {packets} are in the file")
    if exact or not decoded:
        decode(None)  # a decoder with delay (B-frames, threads) holds frames until flushed
    if not decoded:
        detail = f" ({_ffmpeg_reason(decode_error)})" if decode_error is not None else ""
        raise BadVideo(f"none of its {packets} frames can be decoded{detail}")
    return decoded if exact else packets


# ---------------------------------------------------------------------------------------------- PyAV


def _frame_index(frame, start: int, time_base: Fraction, rate: Fraction) -> int:
    return int(round(float((frame.pts - start) * time_base * rate)))


class _Restart(Exception):
    pass


def decode_pyav(path: str, indices, threads: int = 1) -> np.ndarray:
    """Frames ``indices`` (any order, repeats allowed) of a probed file -> (len(indices), H, W, 3) uint8 RGB."""
    import av

    wanted = sorted(set(int(i) for i in indices))
    if not wanted or wanted[0] < 0:
        raise ValueError(f"frame indices must be non-negative and non-empty, got {list(indices)[:8]}")
    container = open_video(path)
    got: dict[int, np.ndarray] = {}
    last = -1  # index of the last frame decoded: when the stream ends early, last + 1 frames are decodable
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO" if threads > 1 else "SLICE"
        stream.thread_count = max(1, threads)
        rate, tb = stream.average_rate, stream.time_base
        start = stream.start_time if stream.start_time is not None else 0
        timed = bool(rate) and tb is not None
        seeked = timed and wanted[0] > 0
        if seeked:
            target = start + int(Fraction(wanted[0]) / rate / tb)
            container.seek(target, stream=stream, backward=True, any_frame=False)
        sequential = not timed
        for i, frame in enumerate(container.decode(stream)):
            if not sequential and frame.pts is None:
                raise _Restart
            idx = i if sequential else _frame_index(frame, start, tb, rate)
            if last < 0 and idx > wanted[0]:  # the seek overshot: number frames from the start instead
                raise _Restart
            last = idx
            if idx in wanted and idx not in got:
                got[idx] = frame.to_ndarray(format="rgb24")
            if idx >= wanted[-1]:
                break
        if seeked and last < 0:  # nothing after the seek point: count the frames from the start
            raise _Restart
    except _Restart:
        container.close()
        return _decode_sequential(path, indices, wanted, threads)
    except av.error.FFmpegError as exc:
        raise explain(path, decoding_failed(exc)) from None
    finally:
        container.close()
    return _assemble(path, got, indices, wanted, last + 1)


def _decode_sequential(path: str, indices, wanted: list[int], threads: int) -> np.ndarray:
    import av

    container = open_video(path)
    got: dict[int, np.ndarray] = {}
    decoded = 0
    try:
        stream = container.streams.video[0]
        stream.thread_count = max(1, threads)
        for i, frame in enumerate(container.decode(stream)):
            decoded = i + 1
            if i in wanted:
                got[i] = frame.to_ndarray(format="rgb24")
            if i >= wanted[-1]:
                break
    except av.error.FFmpegError as exc:
        raise explain(path, decoding_failed(exc)) from None
    finally:
        container.close()
    return _assemble(path, got, indices, wanted, decoded)


def decoding_failed(exc: Exception) -> BadVideo:
    """The reason of a file that passes ``probe`` but whose frames FFmpeg fails to decode."""
    return BadVideo(f"decoding failed ({_ffmpeg_reason(exc)})")


def explain(path: str, failure: BadVideo) -> BadVideo:
    """The reason for a failed decode: the probe's, when the file breaks the rule (the reason every backend and
    ``prepare`` give for it), else ``failure`` (what this decoder met)."""
    try:
        probe(path)
    except BadVideo as exc:
        return exc
    return failure


def _assemble(path: str, got: dict[int, np.ndarray], indices, wanted: list[int], decodable: int) -> np.ndarray:
    missing = [i for i in wanted if i not in got]
    if missing:
        raise explain(path, _past_the_end(missing[0], decodable))
    return np.stack([got[int(i)] for i in indices])


def _past_the_end(index: int, frames: int) -> BadVideo:
    return BadVideo(f"truncated: frame {index} requested, only {frames} frame(s) decodable")


# ---------------------------------------------------------------------------------------------- decord

_DECORD_NOISE = re.compile(r"\[\d\d:\d\d:\d\d\]\s*|\S+\.(?:cc|cpp|h):\d+:\s*")
_DECORD_CHECK = re.compile(r"Check failed: .*?\((-?\d+) vs\. -?\d+\)\s*")
_DECORD_CODE = re.compile(r"\s*failed with (-?\d+)")


def _averror_words(code: int) -> str | None:
    """FFmpeg's words for an AVERROR code (decord prints them as numbers, with either sign)."""
    import av

    try:
        av.error.err_check(-abs(code))
    except av.error.FFmpegError as exc:  # err_check raises the error class of the code
        return exc.strerror
    return None


def _decord_reason(exc: Exception, path: str) -> str:
    """decord's message without timestamps, C++ source locations, the path and raw error numbers.

    An FFmpeg error code in it is reported in FFmpeg's words alone, as PyAV reports the same failure."""
    text = " ".join(str(exc).split())
    for pattern in (_DECORD_CHECK, _DECORD_CODE):
        m = pattern.search(text)
        if m and abs(int(m.group(1))) > 255:  # AVERROR tags are large; small numbers are not error codes
            words = _averror_words(int(m.group(1)))
            if words:
                return words
    text = _DECORD_CHECK.sub("", _DECORD_NOISE.sub("", text)).replace(str(path), "the file")
    return text.removeprefix("ERROR ").strip(" .") or type(exc).__name__


def _open_decord(path: str, threads: int):
    import decord

    try:
        return decord.VideoReader(str(path), num_threads=max(1, threads))
    except (decord.DECORDError, RuntimeError) as exc:
        raise explain(path, BadVideo(f"not readable by decord ({_decord_reason(exc, path)})")) from None


def decode_decord(path: str, indices, threads: int = 1) -> np.ndarray:
    """decord's accurate-seek batch decode of a probed file -> (len(indices), H, W, 3) uint8 RGB."""
    import decord

    idx = [int(i) for i in indices]
    if not idx or min(idx) < 0:
        raise ValueError(f"frame indices must be non-negative and non-empty, got {idx[:8]}")
    vr = _open_decord(path, threads)
    n = len(vr)
    if max(idx) >= n:
        raise explain(path, _past_the_end(min(i for i in idx if i >= n), n))
    try:
        return vr.get_batch(idx).asnumpy()
    except (decord.DECORDError, RuntimeError) as exc:
        raise explain(path, BadVideo(f"decoding failed ({_decord_reason(exc, path)})")) from None


def decoder(backend: str):
    """The decode function ``(path, indices, threads) -> (len(indices), H, W, 3) uint8`` of a CPU backend."""
    if backend == "pyav":
        return decode_pyav
    if backend == "decord":
        try:
            import decord  # noqa: F401
        except ImportError:
            raise ImportError("data.backend='decord' needs decord: pip install decord") from None
        return decode_decord
    raise ValueError(f"unknown CPU decoder '{backend}'; expected one of {', '.join(BACKENDS)}")
