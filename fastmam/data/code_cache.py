"""Cached VQGAN codes: computed once for a video list, read with the video through the same crop and flip.

Online codes cost one VQGAN encoder pass over the code frames of every clip of every step (``python
bench/throughput.py`` measures its share of the step). A cache computes them once per dataset:

    python -m fastmam.data.code_cache --config vit_b_k400_vqgan --out /data/k400/codes_f16 \\
        targets.vqgan.checkpoint=/ckpt/vqgan_imagenet_f16_16384/last.ckpt
    deepspeed fastmam/pretrain.py --config vit_b_k400_vqgan targets.codes=cached targets.code_cache=/data/k400/codes_f16

What is stored: for every frame of every video of ``data.train_list``, the codes of the *whole* frame,
resized (bilinear, antialiased, as ``sampling.apply_crop``) so that its short side is ``short_side``
pixels (default ``data.img_size``) and both sides are multiples of f: a (gh, gw) grid of cells of f
source-scaled pixels. A VQGAN's codes of a crop are not a crop of the full frame's codes -- the encoder's
receptive field is large and it attends globally at 16x16 -- so the loader does not crop codes; it maps
every output token through the sample's crop box and flip back into the frame and takes the cached cell
under the token's centre (``token_cells``). For a crop of the full short side (crop scale 1 with
``short_side = img_size``) a token covers exactly one cached cell; smaller crops magnify the frame, and
several tokens then share a cell. Cached codes are therefore an approximation of online codes: the same
frames, the same places, codes computed at a fixed scale on the whole frame.

Layout of a cache folder:

- ``codes.u16``: uint16 codes, video after video, frame after frame, each frame (gh, gw) row-major;
- ``index.jsonl``: a header line ``{"format", "n_embed", "downsample", "short_side", "checkpoint", "list",
  "root"}``, then one line per video, ``{"key", "offset", "frames", "grid": [gh, gw], "size": [H, W]}``
  (offset in codes; ``key`` is the path relative to the list's root) or ``{"key", "bad": reason}``, and
  a last line ``{"complete": true, "videos", "bad", "frames"}`` once every video was written.

Writing appends only: a batch of videos is appended to ``codes.u16`` and fsynced before their index lines
are appended (and fsynced), so every index line names data that is on disk. An interrupted build is
resumed by running the same command again: index lines after a torn one and data past the last indexed
video are dropped, and the build continues with the next video. The loaders refuse a cache without its
``complete`` line. Videos that ``decode.probe`` finds bad (the rule ``prepare`` and the loaders apply) or
that fail to decode are recorded as bad, with their reason, and counted; in training they are replaced like
any bad video (``DataHealth``), as is a video that the cache does not hold.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .decode import BadVideo, decoding_failed, open_video, probe

FORMAT = "fastmam-codes/1"
CODES_FILE = "codes.u16"
INDEX_FILE = "index.jsonl"


class CacheError(ValueError):
    """A code cache is missing, incomplete or does not match the config; the message says how to fix it."""


class ProcessMemmap:
    """A read-only memory map of a cache's data file, opened on first use in each process: a DataLoader worker
    (forked or spawned) gets the path, not the parent's map, and opens its own. An empty file reads as no data."""

    def __init__(self, path: Path, dtype):
        self.path, self.dtype = Path(path), np.dtype(dtype)
        self._map, self._pid = None, None

    def __getstate__(self):
        return {**self.__dict__, "_map": None, "_pid": None}

    def array(self) -> np.ndarray:
        if self._map is None or self._pid != os.getpid():
            size = self.path.stat().st_size
            self._map = np.memmap(self.path, dtype=self.dtype, mode="r") if size else np.zeros(0, self.dtype)
            self._pid = os.getpid()
        return self._map



@dataclass(frozen=True)
class CacheEntry:
    """Codes of one video: ``frames`` maps of (gh, gw) uint16 at ``offset`` (in codes), of H x W source frames."""

    offset: int
    frames: int
    grid: tuple[int, int]
    size: tuple[int, int]


def cache_key(path: str, root: str | Path) -> str:
    """A video's key in the index: its path relative to the list's root (absolute when outside it)."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    return os.path.abspath(path) if rel.startswith("..") else rel


def code_grid(height: int, width: int, short_side: int, downsample: int) -> tuple[int, int]:
    """Cells (gh, gw) of a frame resized to ``short_side`` on its short side, sides rounded to multiples of f."""
    scale = short_side / min(height, width)
    return max(1, round(height * scale / downsample)), max(1, round(width * scale / downsample))


def token_cells(box, frame_size: tuple[int, int], grid: tuple[int, int], img_size: int,
                patch: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows (n,) and columns (n,) of the cached grid under the centres of the n x n output tokens of one crop.

    ``box`` (a ``sampling.CropBox``, source pixels) is resized to ``img_size`` squared and then flipped when
    ``box.flip``; token (r, c) of the output has its centre at ((r + 0.5) p, (c + 0.5) p), which is pixel
    ``box.y + (r + 0.5) p * box.h / img_size`` of the source (column likewise, after mirroring c for a flip),
    and cell ``floor(y * gh / H)`` of the cached grid, which covers the whole H x W frame."""
    n = img_size // patch
    (height, width), (gh, gw) = frame_size, grid
    r = np.arange(n)
    c = n - 1 - r if box.flip else r
    y = box.y + (r + 0.5) * patch * box.h / img_size
    x = box.x + (c + 0.5) * patch * box.w / img_size
    rows = np.clip(np.floor(y * gh / height), 0, gh - 1).astype(np.int64)
    cols = np.clip(np.floor(x * gw / width), 0, gw - 1).astype(np.int64)
    return rows, cols


# ---------------------------------------------------------------------------------------------- reading


def _read_index(folder: Path) -> tuple[dict | None, list[dict], dict | None, int]:
    """(header, entries, completion line, byte length of the valid lines) of ``index.jsonl``; a torn or unreadable
    line ends the valid part."""
    path = folder / INDEX_FILE
    if not path.is_file():
        return None, [], None, 0
    header, entries, done, valid = None, [], None, 0
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            try:
                row = json.loads(raw)
            except json.JSONDecodeError:
                break
            if header is None:
                header = row
            elif row.get("complete"):
                done = row
            else:
                entries.append(row)
            valid += len(raw)
    return header, entries, done, valid


class CodeCache:
    """A complete cache folder, read through a memory map (opened lazily in each loader process)."""

    def __init__(self, folder: str | Path, root: str | Path):
        self.folder, self.root = Path(folder).expanduser(), root
        header, entries, done, _ = _read_index(self.folder)
        if header is None or header.get("format") != FORMAT:
            raise CacheError(f"{self.folder} holds no code cache ({INDEX_FILE} of format {FORMAT}); write one with "
                             "`python -m fastmam.data.code_cache --config <config> --out <folder>`")
        if done is None:
            raise CacheError(f"the code cache {self.folder} is incomplete ({len(entries)} videos written): run the "
                             "same `python -m fastmam.data.code_cache` command again to finish it")
        self.header = header
        self.n_embed, self.downsample = int(header["n_embed"]), int(header["downsample"])
        self.entries = {e["key"]: CacheEntry(e["offset"], e["frames"], tuple(e["grid"]), tuple(e["size"]))
                        for e in entries if "bad" not in e}
        self.bad = {e["key"]: e["bad"] for e in entries if "bad" in e}
        self._codes = ProcessMemmap(self.folder / CODES_FILE, np.uint16)

    @classmethod
    def for_config(cls, cfg) -> CodeCache:
        """The cache of ``targets.code_cache``, checked against the config's codebook and patch."""
        from .annotations import list_root

        cache = cls(cfg.targets.code_cache, list_root(cfg.data.train_list, cfg.data.data_root))
        want = (cfg.targets.num_codes, cfg.model.patch)
        if (cache.n_embed, cache.downsample) != want:
            raise CacheError(
                f"the code cache {cache.folder} holds codes of a {cache.n_embed}-code VQGAN on {cache.downsample}-"
                f"pixel cells; the config trains {want[0]} codes (targets.vqgan.n_embed) on model.patch={want[1]}"
            )
        return cache

    def _memmap(self) -> np.ndarray:
        return self._codes.array()  # each loader worker opens its own map

    def entry(self, path: str) -> CacheEntry:
        """The cache entry of a video; ``BadVideo`` when the cache lacks it (replaced like an unreadable file)."""
        key = cache_key(path, self.root)
        got = self.entries.get(key)
        if got is None:
            why = self.bad.get(key)
            raise BadVideo(f"no cached codes ({'bad when the cache was written: ' + why if why else 'not in the cache'}"
                           f" {self.folder})")
        return got

    def clip_codes(self, path: str, indices: np.ndarray, boxes, frame_size: tuple[int, int],
                   img_size: int) -> torch.Tensor:
        """Codes of frames ``indices`` (T,) seen through each crop of ``boxes`` -> (k, T, n, n) int32, n = img_size/f.

        frame_size: (H, W) of the decoded source frames, which must be those the cache was computed on."""
        e = self.entry(path)
        if tuple(frame_size) != e.size:
            raise BadVideo(f"decodes to {frame_size[0]}x{frame_size[1]} frames but its cached codes are of "
                           f"{e.size[0]}x{e.size[1]} frames: rebuild the code cache {self.folder}")
        idx = np.asarray(indices, dtype=np.int64)
        if idx.max(initial=0) >= e.frames:
            raise BadVideo(f"frame {int(idx.max())} requested, the code cache holds {e.frames} frame(s)")
        gh, gw = e.grid
        maps = self._memmap()[e.offset : e.offset + e.frames * gh * gw].reshape(e.frames, gh, gw)
        out = []
        for box in boxes:
            rows, cols = token_cells(box, e.size, e.grid, img_size, self.downsample)
            out.append(maps[np.ix_(idx, rows, cols)])
        return torch.from_numpy(np.stack(out).astype(np.int32))


# ---------------------------------------------------------------------------------------------- writing


def _frames_pyav(path: str, chunk: int):
    """Every frame of a video in decode order, in arrays of up to ``chunk`` frames (n, H, W, 3) uint8; a file that
    ``decode.probe`` finds bad raises its ``BadVideo`` first, with the reason the loaders and ``prepare`` give."""
    import av

    probe(path)
    container = open_video(path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame threads: a whole video is decoded in order
        buf = []
        for frame in container.decode(stream):
            buf.append(frame.to_ndarray(format="rgb24"))
            if len(buf) == chunk:
                yield np.stack(buf)
                buf = []
        if buf:
            yield np.stack(buf)
    except av.error.FFmpegError as exc:
        raise decoding_failed(exc) from None
    finally:
        container.close()


def _resize(frames: np.ndarray, grid: tuple[int, int], f: int, device: torch.device) -> torch.Tensor:
    x = torch.from_numpy(frames).to(device).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(grid[0] * f, grid[1] * f), mode="bilinear", align_corners=False, antialias=True)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _append_sync(path: Path, lines: list[dict]) -> None:
    with open(path, "a") as f:
        f.write("".join(json.dumps(row) + "\n" for row in lines))
        f.flush()
        os.fsync(f.fileno())


def build_cache(cfg, out: str | Path, tokenizer=None, short_side: int | None = None, batch_frames: int = 64,
                commit_every: int = 16, device: str | torch.device = "cpu", log=print, progress: bool = False,
                stop_after: int | None = None) -> dict:
    """Write (or finish) the code cache of ``cfg.data.train_list`` in ``out`` with ``cfg.targets.vqgan`` (or the
    given ``tokenizer``); returns the completion summary. ``stop_after`` ends after that many new videos
    without completing, as an interruption would (tests use it)."""
    from ..models.vqgan import VQGANTokenizer
    from .annotations import list_root, read_list

    d = cfg.data
    device = torch.device(device)
    tok = tokenizer if tokenizer is not None else VQGANTokenizer.load(cfg.targets.vqgan)
    tok.to(device)
    f = tok.downsample
    short_side = short_side or d.img_size
    videos = read_list(d.train_list, d.data_root, d.list_format, d.hmdb51_split)
    root = list_root(d.train_list, d.data_root)
    header = {"format": FORMAT, "n_embed": tok.codebook_size, "downsample": f, "short_side": short_side,
              "checkpoint": str(cfg.targets.vqgan.checkpoint), "list": str(d.train_list), "root": str(root)}
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    codes_path, index_path = out / CODES_FILE, out / INDEX_FILE

    old, entries, done, valid = _read_index(out)
    if old is not None and {k: old.get(k) for k in header} != header:
        diff = ", ".join(f"{k}: {old.get(k)!r} -> {v!r}" for k, v in header.items() if old.get(k) != v)
        raise CacheError(f"{out} holds a code cache written with other settings ({diff}); choose another --out")
    if done is not None:
        log(f"{out}: complete ({done['videos']} videos, {done['bad']} bad, {done['frames']} frames)")
        return done
    # resume: keep the valid index lines, drop a torn line and the data no index line names
    end = max((e["offset"] + e["frames"] * e["grid"][0] * e["grid"][1] for e in entries if "bad" not in e), default=0)
    if old is None:
        index_path.write_text(json.dumps(header) + "\n")
    else:
        os.truncate(index_path, valid)
    codes_path.touch()
    if os.path.getsize(codes_path) < 2 * end:
        raise CacheError(f"{codes_path} is shorter than its index says ({os.path.getsize(codes_path)} < {2 * end} "
                         "bytes): the cache is damaged; delete the folder and build it again")
    os.truncate(codes_path, 2 * end)
    seen = {e["key"] for e in entries}
    todo = [p for p in videos.paths if cache_key(p, root) not in seen]
    if entries:
        log(f"{out}: resuming after {len(entries)} of {len(videos)} videos")

    pending: list[dict] = []
    written = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(videos), initial=len(entries), desc="codes", dynamic_ncols=True)
    with open(codes_path, "ab") as data:
        def commit():
            data.flush()
            os.fsync(data.fileno())  # the codes are on disk before an index line names them
            _append_sync(index_path, pending)
            pending.clear()

        for path in todo:
            key, start, frames, grid, size = cache_key(path, root), data.tell(), 0, None, None
            try:
                for chunk in _frames_pyav(path, batch_frames):
                    if grid is None:
                        size = (int(chunk.shape[1]), int(chunk.shape[2]))
                        grid = code_grid(*size, short_side, f)
                    codes = tok.encode(_resize(chunk, grid, f, device))
                    data.write(codes.to(torch.int32).cpu().numpy().astype(np.uint16).tobytes())
                    frames += len(chunk)
                if not frames:
                    raise BadVideo("no frames")
                pending.append({"key": key, "offset": start // 2, "frames": frames, "grid": list(grid),
                                "size": list(size)})
            except BadVideo as exc:
                data.truncate(start)
                data.seek(start)
                pending.append({"key": key, "bad": str(exc)})
                log(f"skipped bad video {path}: {exc}")
            written += 1
            if bar is not None:
                bar.update(1)
            if len(pending) >= commit_every:
                commit()
            if stop_after is not None and written >= stop_after:
                commit()
                return {"complete": False, "videos": len(entries) + written}
        commit()
    if bar is not None:
        bar.close()
    _, entries, _, _ = _read_index(out)
    bad = sum("bad" in e for e in entries)
    summary = {"complete": True, "videos": len(entries), "bad": bad,
               "frames": sum(e.get("frames", 0) for e in entries)}
    _append_sync(index_path, [summary])
    log(f"{out}: {summary['videos']} videos ({bad} bad, skipped), {summary['frames']} frames, "
        f"{os.path.getsize(codes_path) / 2**20:.1f} MiB of codes")
    return summary


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastmam.data.code_cache",
        description="Precompute the VQGAN codes of a video list (data.train_list, targets.vqgan of the config) for "
                    "training with targets.codes=cached. Run it again to resume an interrupted build.",
    )
    p.add_argument("--config", required=True, help="preset name or YAML path (its data.* list and targets.vqgan)")
    p.add_argument("--out", required=True, help="cache folder (codes.u16 + index.jsonl)")
    p.add_argument("--short-side", type=int, default=None, help="short side of the encoded frames [data.img_size]")
    p.add_argument("--batch-frames", type=int, default=64, help="frames per encoder call [64]")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto [auto: cuda when available]")
    p.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    return p


def main(argv: list[str] | None = None) -> int:
    from ..config import ConfigError, load_config

    args = _parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"fastmam: {exc}", file=sys.stderr)
        return 2
    if cfg.targets.appearance != "vqgan":
        print("fastmam: the code cache holds VQGAN codes: use a config with targets.appearance=vqgan", file=sys.stderr)
        return 2
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    try:
        build_cache(cfg, args.out, short_side=args.short_side, batch_frames=args.batch_frames, device=device,
                    progress=sys.stderr.isatty())
    except (CacheError, FileNotFoundError, ValueError) as exc:
        print(f"fastmam: {exc}", file=sys.stderr)
        return 2
    print(f"done in {time.perf_counter() - t0:.0f} s; train with targets.codes=cached targets.code_cache={args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
