"""Supervised control for the synthetic motion classes: what the tiny encoder learns *with labels* in a CPU budget.

    python bench/supervised.py                                  # ViT (mean, max pool), 3D CNN, 1500 steps each
    python bench/supervised.py --quick                          # CI: a few steps, the machinery only
    python bench/supervised.py --models vit --init runs/tiny    # the ViT from a pretraining run

The representation benchmark (``bench/representation.py``) asks what a pretraining objective teaches the encoder about
motion, read by frozen probes. This script bounds that question from above: the same encoder (``ft_tiny``'s geometry:
the tiny ViT, 8 frames of 32x32, tubelet 2, patch 8, ``fastmam.finetuning.model.VideoClassifier`` with VideoMAE's
mean-pooled head), trained end to end on the motion labels themselves (cross-entropy, AdamW, constant lr, no
augmentation, no mixup, no drop path), on the clips ``ft_tiny`` samples (``ClipDataset`` over ``SyntheticSource``;
training videos 0..N-1, held-out videos from index 100,000 on, one centre view each). Beside it, with the same data,
steps, batch and optimizer, a small 3D CNN (three 3x3x3 convolutions, two max-pools, global average pool, Linear): an
architecture with a translation-equivariant, pixel-local first layer. If the ViT does not leave chance with labels, no
frozen probe of a pretraining run of that budget can be expected to. ``vit_max`` is the same ViT whose head pools the
tokens by their per-channel maximum (``classifier.pool=max``) instead of VideoMAE's mean: the two differ only in how
the tokens become one vector, which isolates what mean pooling costs on these clips. Held-out top-1 every
``--eval-every`` steps, with its standard error ``sqrt(p (1 - p) / n)``; a table on stdout, and ``--json`` writes
everything with the environment.
"""

from __future__ import annotations

import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
if os.path.dirname(_here) not in sys.path:
    sys.path.append(os.path.dirname(_here))

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from bench.harness import environment  # noqa: E402
from fastmam.config import load_config  # noqa: E402
from fastmam.data.synthetic import MOTIONS  # noqa: E402
from fastmam.finetuning.config import FinetuneConfig  # noqa: E402
from fastmam.finetuning.data import ClipDataset, eval_spec, train_spec  # noqa: E402
from fastmam.finetuning.model import VideoClassifier  # noqa: E402
from fastmam.finetuning.sources import SyntheticSource  # noqa: E402

#: the recipe's regularization is off: this measures what the labels alone teach in the budget
OVERRIDES = ["device=cpu", "augment.randaug=", "augment.erasing=0", "augment.mixup=0", "augment.cutmix=0",
             "classifier.drop_path=0", "init.checkpoint="]
#: held-out videos start here (far from any training index)
VAL_START = 100_000


class Conv3dNet(nn.Module):
    """Three 3x3x3 convolutions (32, 64, 64 channels, GELU), max-pool 2 after the first two, global average pool,
    Linear. Input: uint8 clips (B, T, H, W, C), normalized with the data's mean and std."""

    def __init__(self, num_classes: int, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1, 1), persistent=False)
        self.net = nn.Sequential(
            nn.Conv3d(3, 32, 3, padding=1), nn.GELU(), nn.MaxPool3d(2),
            nn.Conv3d(32, 64, 3, padding=1), nn.GELU(), nn.MaxPool3d(2),
            nn.Conv3d(64, 64, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(),
            nn.Linear(64, num_classes),
        )

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        x = clip.permute(0, 4, 1, 2, 3).float() / 255.0
        return self.net((x - self.mean) / self.std)


def build_model(kind: str, cfg: FinetuneConfig, init: str | None) -> nn.Module:
    if kind == "cnn":
        return Conv3dNet(cfg.classifier.num_classes, cfg.data.mean, cfg.data.std)
    model = VideoClassifier(cfg.model_copy(update={"classifier": cfg.classifier.model_copy(
        update={"pool": "max" if kind == "vit_max" else "mean"})}))
    if init:
        from fastmam.finetuning.init import load_pretrained, read_pretrained

        load_pretrained(model, cfg, read_pretrained(init))
    return model


def _stack(items: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([it["video"] for it in items]), torch.tensor([it["label"] for it in items])


@torch.no_grad()
def accuracy(model: nn.Module, clips: torch.Tensor, labels: torch.Tensor, chunk: int = 64) -> float:
    was = model.training
    model.eval()
    pred = torch.cat([model(clips[i:i + chunk]).argmax(1) for i in range(0, len(clips), chunk)])
    model.train(was)
    return 100.0 * (pred == labels).float().mean().item()


def se(top1: float, n: int) -> float:
    p = top1 / 100
    return 100 * math.sqrt(p * (1 - p) / n)


def train_one(kind: str, cfg: FinetuneConfig, args: argparse.Namespace, val: tuple[torch.Tensor, torch.Tensor]
              ) -> dict:
    """Train one model on the motion labels; its curve of held-out top-1."""
    torch.manual_seed(args.seed)
    src = SyntheticSource(0, args.train_videos, cfg.data.synthetic_frames, cfg.data.synthetic_size, cfg.seed)
    data = ClipDataset(src, train_spec(cfg), "dense", None)
    model = build_model(kind, cfg, args.init if kind != "cnn" else None)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    curve, loss_avg, t0, n = [], None, time.perf_counter(), args.train_videos
    for step in range(1, args.steps + 1):
        first = (step - 1) * args.batch
        # item (video, epoch): each video once per epoch, a new random crop every epoch
        clips, labels = _stack([data[((first + i) % n, (first + i) // n)] for i in range(args.batch)])
        loss = F.cross_entropy(model(clips), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_avg = loss.item() if loss_avg is None else 0.95 * loss_avg + 0.05 * loss.item()
        if step % args.eval_every == 0 or step == args.steps:
            top1 = accuracy(model, *val)
            curve.append({"step": step, "clips_seen": step * args.batch, "loss_ema": loss_avg, "top1": top1,
                          "se": se(top1, len(val[1])), "seconds": time.perf_counter() - t0})
            print(f"supervised: {kind} step {step}: loss {loss_avg:.3f}, held-out top-1 {top1:.1f} %", file=sys.stderr,
                  flush=True)
    return {"model": kind, "parameters": sum(p.numel() for p in model.parameters()),
            "init": args.init if kind != "cnn" and args.init else "random", "curve": curve}


def format_table(results: list[dict], n_val: int) -> str:
    chance = 100 / len(MOTIONS)
    lines = [f"held-out top-1 % (± SE, {n_val} clips; chance {chance:.1f} %)",
             f"{'model':<8} {'init':<12} {'params':>8}  " + "  ".join(f"{'step ' + str(c['step']):>14}"
                                                               for c in results[0]["curve"])]
    for r in results:
        init = r["init"] if len(r["init"]) <= 12 else "…" + r["init"][-11:]
        cells = "  ".join(f"{c['top1']:5.1f} ± {c['se']:4.1f}  " for c in r["curve"])
        lines.append(f"{r['model']:<8} {init:<12} {r['parameters']:>8}  {cells}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=["vit", "vit_max", "cnn"], choices=["vit", "vit_max", "cnn"],
                   help="vit: VideoMAE's mean-pooled head; vit_max: the same, classifier.pool=max; cnn: a 3D CNN")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per model [1500; --quick: 4]")
    p.add_argument("--batch", type=int, default=16, help="clips per step [16, ft_tiny's]")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW lr, constant [1e-3]")
    p.add_argument("--train-videos", type=int, default=None, help="training videos [8192; --quick: 32]")
    p.add_argument("--val-videos", type=int, default=None, help="held-out videos [384; --quick: 16]")
    p.add_argument("--eval-every", type=int, default=None, help="steps between held-out evaluations [250]")
    p.add_argument("--init", default=None, help="the ViTs' encoder from a pretraining run / export (default: random)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads [torch's default]")
    p.add_argument("--quick", action="store_true", help="CI: a few steps on a few clips")
    p.add_argument("--json", type=Path, default=None, help="write the report here")
    p.add_argument("--set", nargs="*", default=[], dest="overrides", metavar="KEY=VALUE",
                   help="ft_tiny config overrides (e.g. data.img_size=64)")
    args = p.parse_args(argv)
    quick = {"steps": 4, "train_videos": 32, "val_videos": 16, "eval_every": 2}
    full = {"steps": 1500, "train_videos": 8192, "val_videos": 384, "eval_every": 250}
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for k in ("steps", "batch", "train_videos", "val_videos", "eval_every"):
        if getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config("ft_tiny", [*OVERRIDES, *args.overrides], root=FinetuneConfig)
    vsrc = SyntheticSource(VAL_START, args.val_videos, cfg.data.synthetic_frames, cfg.data.synthetic_size, cfg.seed)
    vdata = ClipDataset(vsrc, eval_spec(cfg), "dense", None)
    val = _stack([vdata[(i, 0)] for i in range(args.val_videos)])
    results = [train_one(kind, cfg, args, val) for kind in args.models]
    table = format_table(results, args.val_videos)
    print(table)
    if args.json:
        report = {"environment": environment(torch.device("cpu")), "threads": torch.get_num_threads(),
                  "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                  "num_classes": len(MOTIONS), "chance": 100 / len(MOTIONS), "results": results, "table": table}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
