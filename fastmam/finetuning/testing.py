"""The multi-view test of a fine-tuned classifier (DESIGN §11): every video once across ranks, softmax per view then
the mean, top-1 / top-5 / mean per-class accuracy, per-video predictions and a confusion matrix.

VideoMAE's ``final_test`` writes one text file per rank and ``merge`` reads them afterwards; here the ranks gather
their per-video probabilities inside the run (``torch.distributed.all_gather_object``), every rank checks that each
video came back exactly once, and rank 0 writes, atomically:

- ``<out_dir>/<name>_predictions.jsonl``: one line per video, in index order: index, path, label, prediction,
  correct, top-5 classes with their probabilities, the number of views (a bad video: ``ok`` false and the reason);
- ``<out_dir>/<name>_metrics.json``: what ``run_test`` returns;
- ``<out_dir>/<name>_confusion.png``: counts of (true, predicted) classes, rows normalised; per-cell numbers only up to
  30 classes, an image beyond.

A video that cannot be read (``ViewDataset``'s ``ok`` False) is left out of the accuracy, and counted with examples
in ``metrics["skipped"]``; it is never replaced by another video.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..fileio import temporary_path, write_text_atomic

#: classes up to which the confusion matrix carries per-cell counts and every class name
ANNOTATE_CLASSES = 30
#: bad videos listed by path and reason in the metrics (all of them are in the predictions file)
SKIPPED_EXAMPLES = 10


class TestError(RuntimeError):
    """The multi-view test cannot give a trustworthy result (lost or duplicated videos, no readable video)."""

    __test__ = False


def merge_views(logits: torch.Tensor) -> torch.Tensor:
    """logits: (N, V, classes) -> probabilities (N, classes) float32: softmax over classes per view, then the mean
    over the V views (VideoMAE's ``merge``)."""
    if logits.dim() != 3:
        raise ValueError(f"merge_views takes logits (N, views, classes), got shape {tuple(logits.shape)}")
    return torch.softmax(logits.float(), dim=-1).mean(dim=1)


def accuracy_report(probs: torch.Tensor | np.ndarray, labels: Sequence[int] | np.ndarray | torch.Tensor,
                    num_classes: int) -> dict:
    """probs: (N, classes) float, labels: (N,) int -> accuracies in percent.

    ``top1``, ``top5`` (k = min(5, classes)), ``mean_class_accuracy``: the mean over the classes present in
    ``labels`` of their recall (top-1); ``videos``, ``correct_top1``, ``correct_top5``, ``classes_present``,
    ``top5_k``. Ties in probability go to the lower class id."""
    p = probs.detach().cpu().numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs)
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    y = y.astype(np.int64).reshape(-1)
    if p.ndim != 2 or p.shape[1] != num_classes or p.shape[0] != len(y):
        raise ValueError(f"accuracy_report takes probs (N, {num_classes}) and labels (N,), got {p.shape} and {y.shape}")
    if len(y) == 0:
        raise ValueError("accuracy_report needs at least one video")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), found {y.min()}..{y.max()}: "
                         "does num_classes match the annotation list?")
    k = min(5, num_classes)
    order = ranked_classes(p)[:, :k]
    hit1 = order[:, 0] == y
    hit5 = (order == y[:, None]).any(axis=1)
    present = np.unique(y)
    recall = [hit1[y == c].mean() for c in present]
    return {"top1": 100.0 * float(hit1.mean()), "top5": 100.0 * float(hit5.mean()),
            "mean_class_accuracy": 100.0 * float(np.mean(recall)),
            "videos": int(len(y)), "correct_top1": int(hit1.sum()), "correct_top5": int(hit5.sum()),
            "classes_present": int(len(present)), "top5_k": k}


def ranked_classes(probs: np.ndarray) -> np.ndarray:
    """probs: (N, classes) -> class ids (N, classes) int64 by decreasing probability, ties to the lower id."""
    return np.argsort(-probs, axis=1, kind="stable")


def _collate(items: list[dict]) -> list[dict]:
    return items


def _confusion(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """(classes, classes) int64 counts: row = true class, column = predicted class."""
    return np.bincount(labels * num_classes + preds, minlength=num_classes * num_classes).reshape(num_classes, -1)


def write_confusion_png(path: Path, counts: np.ndarray, class_names: Sequence[str] | None, title: str) -> None:
    """The confusion matrix (classes, classes) as a PNG, rows normalised to the fraction of each true class.

    Up to ``ANNOTATE_CLASSES`` classes: class names on both axes and the count in every non-empty cell. Beyond: an
    image (~2 pixels per cell for 400 classes), no per-cell text, class ids at a few round ticks. The figure stays
    at most 11.5 x 10 inches at 100 dpi whatever the class count."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    n = counts.shape[0]
    rows = counts.sum(axis=1, keepdims=True)
    frac = counts / np.maximum(rows, 1)
    side = min(10.0, max(4.0, 0.35 * n + 2.0))
    fig = Figure(figsize=(side + 1.5, side), dpi=100)
    ax = fig.add_subplot()
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    if n <= ANNOTATE_CLASSES:
        names = list(class_names) if class_names is not None else [str(c) for c in range(n)]
        ax.set_xticks(range(n), names, rotation=90, fontsize=7)
        ax.set_yticks(range(n), names, fontsize=7)
        for t, p in zip(*np.nonzero(counts), strict=True):
            ax.text(p, t, str(counts[t, p]), ha="center", va="center", fontsize=6,
                    color="white" if frac[t, p] > 0.5 else "black")
    else:  # class ids only, at matplotlib's round-number ticks
        for axis in (ax.xaxis, ax.yaxis):
            axis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    tmp = temporary_path(path)
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _gather(payload: dict, world_size: int) -> list[dict]:
    if world_size == 1:
        return [payload]
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError(f"run_test(world_size={world_size}) needs the process group: call "
                           "fastmam.distributed.setup() first, or pass world_size=1")
    if torch.distributed.get_world_size() != world_size:
        raise ValueError(f"run_test(world_size={world_size}) but the process group has "
                         f"{torch.distributed.get_world_size()} ranks; pass DistInfo.world_size")
    out: list = [None] * world_size
    torch.distributed.all_gather_object(out, payload)  # collective: every rank must reach it
    return out


def run_test(predict: Callable[[torch.Tensor], torch.Tensor], dataset: Dataset, num_classes: int, *,
             batch_size: int, num_workers: int, device: torch.device | str, out_dir: str | Path | None = None,
             name: str = "test", rank: int = 0, world_size: int = 1, class_names: Sequence[str] | None = None,
             log: Callable[[str], None] = print) -> dict:
    """The multi-view test of ``dataset`` (a ``ViewDataset``, or any dataset with its items) -> metrics (a dict,
    the same on every rank).

    Rank r evaluates videos r, r + W, r + 2W, ... (W = world_size; no padding, no drops). ``predict(views)``
    takes views (M, T, S, S, C) uint8 on ``device`` (the views of up to ``batch_size`` videos, clip-major per
    video; normalising them is predict's job) and returns logits (M, num_classes); it runs under
    ``torch.no_grad()`` (putting the model in ``eval()`` mode is the caller's job). With W > 1 the call is
    collective: every rank calls it with the same dataset. Rank 0 writes the predictions, metrics and confusion
    files into ``out_dir`` (module docstring) when given.

    Metrics: ``top1``, ``top5``, ``mean_class_accuracy`` (percent, over the readable videos), ``videos`` (all),
    ``evaluated``, ``views_per_video``, ``skipped`` ({"count", "fraction", "examples": [{"index", "path",
    "reason"}]}), the counts of ``accuracy_report``, ``num_classes``, ``world_size``, ``seconds`` (of the slowest
    rank, up to the gather), ``files``; ``clips``, ``crops``, ``sampling`` when the dataset has them.
    Raises ``TestError`` when a video is lost or duplicated across ranks or when no video could be read."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is not in [0, world_size={world_size})")
    if batch_size < 1:
        raise ValueError(f"batch_size (videos per forward) must be at least 1, got {batch_size}")
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"class_names has {len(class_names)} names for num_classes={num_classes}")
    device = torch.device(device)
    start = time.perf_counter()
    total = len(dataset)
    mine = list(range(rank, total, world_size))
    loader = DataLoader(Subset(dataset, mine), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=_collate, pin_memory=device.type == "cuda")
    if rank == 0:
        what = dataset.describe() if hasattr(dataset, "describe") else f"{total} videos"
        log(f"{name}: multi-view test of {what} on {world_size} rank(s)")
    records, bad = [], []
    every = max(1, len(loader) // 10)
    with torch.no_grad():
        for step, items in enumerate(loader):
            bad.extend((it["index"], it["path"], int(it["label"]), it["reason"]) for it in items if not it["ok"])
            good = [it for it in items if it["ok"]]
            if not good:
                continue
            views = [it["views"].shape[0] for it in good]
            x = torch.cat([it["views"] for it in good]).to(device, non_blocking=True)
            logits = predict(x)
            if tuple(logits.shape) != (x.shape[0], num_classes):
                raise ValueError(f"predict returned logits {tuple(logits.shape)} for {x.shape[0]} views; expected "
                                 f"({x.shape[0]}, {num_classes}) = (views, num_classes)")
            # views of one video are contiguous: split, then softmax per view and the mean (the sync of the batch)
            probs = torch.cat([merge_views(chunk[None]) for chunk in logits.split(views)]).cpu().numpy()
            records.extend((it["index"], it["path"], int(it["label"]), v, p)
                           for it, v, p in zip(good, views, probs, strict=True))
            if rank == 0 and (step + 1) % every == 0:
                done = min((step + 1) * batch_size, len(mine))
                log(f"{name}: rank 0 {done}/{len(mine)} videos, {done / (time.perf_counter() - start):.1f} videos/s")

    parts = _gather({"total": total, "records": records, "bad": bad, "seconds": time.perf_counter() - start},
                    world_size)
    totals = sorted({part["total"] for part in parts})
    if len(totals) != 1:
        raise TestError(f"the ranks hold test sets of different sizes {totals}: every rank must build the same dataset")
    records = sorted((r for part in parts for r in part["records"]), key=lambda r: r[0])
    bad = sorted((b for part in parts for b in part["bad"]), key=lambda b: b[0])
    seen = np.bincount(np.asarray([r[0] for r in records] + [b[0] for b in bad], dtype=np.int64), minlength=total)
    if len(seen) != total or (seen != 1).any():
        lost, twice = np.flatnonzero(seen[:total] == 0).tolist(), np.flatnonzero(seen > 1).tolist()
        raise TestError(f"the multi-view test must count each of the {total} videos exactly once; lost {lost[:10]} "
                        f"({len(lost)} in all), counted more than once {twice[:10]} ({len(twice)} in all), "
                        f"{len(seen) - total} indices past the end: every rank must call run_test with the same "
                        f"dataset, its own rank and world_size={world_size}, and items must carry their own index")
    if not records:
        raise TestError(f"none of the {total} test videos could be read; first reasons: "
                        + "; ".join(f"{p}: {r}" for _, p, _, r in bad[:3]))

    probs = np.stack([r[4] for r in records])
    labels = np.asarray([r[2] for r in records], dtype=np.int64)
    report = accuracy_report(probs, labels, num_classes)
    view_counts = sorted({r[3] for r in records})
    metrics = {"name": name, **report, "evaluated": report["videos"], "videos": total,
               "views_per_video": view_counts[0] if len(view_counts) == 1 else view_counts,
               "skipped": {"count": len(bad), "fraction": len(bad) / total,
                           "examples": [{"index": i, "path": p, "reason": r} for i, p, _, r in bad[:SKIPPED_EXAMPLES]]},
               "num_classes": num_classes, "world_size": world_size,
               "seconds": round(max(part["seconds"] for part in parts), 3), "files": {}}
    for key in ("clips", "crops", "sampling"):
        if hasattr(dataset, key):
            metrics[key] = getattr(dataset, key)
    if out_dir is not None:
        out = Path(out_dir)
        metrics["files"] = {kind: str(out / f"{name}_{kind}.{ext}")
                            for kind, ext in (("predictions", "jsonl"), ("metrics", "json"), ("confusion", "png"))}
    if rank == 0:
        if out_dir is not None:
            _write_files(metrics, records, bad, probs, labels, num_classes, class_names)
        log(f"{name}: top-1 {metrics['top1']:.2f}% top-5 {metrics['top5']:.2f}% mean class "
            f"{metrics['mean_class_accuracy']:.2f}% over {metrics['evaluated']} videos x {metrics['views_per_video']} "
            f"views; skipped {len(bad)} unreadable")
        for i, p, _, r in bad[:SKIPPED_EXAMPLES]:
            log(f"{name}: skipped video {i} {p}: {r}")
    return metrics


def _write_files(metrics: dict, records: list, bad: list, probs: np.ndarray, labels: np.ndarray, num_classes: int,
                 class_names: Sequence[str] | None) -> None:
    files = {k: Path(v) for k, v in metrics["files"].items()}
    order = ranked_classes(probs)[:, : min(5, num_classes)]
    lines = []
    for (index, path, label, views, p), top in zip(records, order, strict=True):
        row = {"index": index, "path": path, "label": label, "prediction": int(top[0]),
               "correct": bool(top[0] == label), "top5": [[int(c), round(float(p[c]), 6)] for c in top],
               "views": views, "ok": True}
        if class_names is not None:
            row["label_name"], row["prediction_name"] = class_names[label], class_names[int(top[0])]
        lines.append((index, row))
    lines.extend((index, {"index": index, "path": path, "label": label, "prediction": None, "correct": None,
                          "top5": [], "views": 0, "ok": False, "reason": reason})
                 for index, path, label, reason in bad)
    lines.sort(key=lambda item: item[0])
    write_text_atomic(files["predictions"], "".join(json.dumps(row) + "\n" for _, row in lines))
    counts = _confusion(labels, order[:, 0], num_classes)
    title = f"{metrics['name']}: top-1 {metrics['top1']:.1f}% over {metrics['evaluated']} videos"
    write_confusion_png(files["confusion"], counts, class_names, title)
    write_text_atomic(files["metrics"], json.dumps(metrics, indent=2) + "\n")
