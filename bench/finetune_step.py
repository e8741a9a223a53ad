"""Fine-tuning step benchmark: one optimizer step of ``fastmam/finetune.py``'s classifier (DeepSpeed engine, the
run's precision: bf16 on a GPU) on in-memory uint8 clips, decoding excluded.

    python bench/finetune_step.py [--presets ft_vit_b_k400 ft_vit_b_ssv2] [--steps 300] [--out DIR]
    python bench/finetune_step.py --quick          # ft_tiny on the CPU: checks the script, no performance claim

A step is what the training loop does: erasing and mixup/cutmix on the device (``BatchAugment``), forward, the
soft-target cross-entropy, backward, AdamW over the layer-decay groups. ``--steps`` steps are run (the first
``--warmup`` untimed); each row holds ms/step (median, 20/80% quantiles), clips/s, peak memory, the loss at the
first and last step (it must stay finite), device, versions and commit. A GPU is needed for a number that counts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import environment  # noqa: E402
from fastmam.config import deepspeed_config, load_config, resolve_precision  # noqa: E402
from fastmam.finetuning.config import FinetuneConfig  # noqa: E402

GPU_PRESETS = ("ft_vit_b_k400", "ft_vit_b_ssv2", "ft_vit_b_ucf101")


def bench_preset(name: str, steps: int, warmup: int, overrides: list[str]) -> dict:
    import deepspeed

    from fastmam import distributed
    from fastmam.finetune import build_optimizer
    from fastmam.finetuning.augment import BatchAugment, key_of, soft_target_cross_entropy
    from fastmam.finetuning.model import VideoClassifier

    cfg = load_config(name, ["init.checkpoint=", "data.source=synthetic", *overrides], root=FinetuneConfig)
    dist = distributed.setup(cfg.device)
    torch.manual_seed(0)
    model = VideoClassifier(cfg)
    optimizer, scheduler = build_optimizer(model, cfg, dist.world_size, total=steps, warmup=max(1, steps // 10))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, dist.world_size, dist.device.type),
                                           dist_init_required=False)
    d = cfg.data
    g = torch.Generator(device=dist.device).manual_seed(0)
    clips = torch.randint(0, 256, (d.batch_size, d.num_frames, d.img_size, d.img_size, 3), generator=g,
                          dtype=torch.uint8, device=dist.device)
    labels = torch.randint(0, cfg.classifier.num_classes, (d.batch_size,), generator=g, device=dist.device)
    augment = BatchAugment(cfg)
    losses, times = [], []
    sync = torch.cuda.synchronize if dist.device.type == "cuda" else (lambda: None)
    if dist.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dist.device)
    for step in range(steps):
        sync()
        t0 = time.perf_counter()
        pixels, targets = augment(clips, labels, key_of(0, step))
        loss = soft_target_cross_entropy(engine(pixels), targets)
        engine.backward(loss)
        engine.step()
        sync()
        if step >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
        if step in (0, steps - 1):
            losses.append(loss.item())
    q20, med, q80 = np.quantile(times, [0.2, 0.5, 0.8]).tolist() if times else (None,) * 3
    row = {"bench": "finetune_step", "preset": name, "batch": d.batch_size, "frames": d.num_frames,
           "img_size": d.img_size, "precision": resolve_precision(cfg, dist.device.type),
           "zero_stage": cfg.deepspeed.zero_stage, "steps": steps, "timed_steps": len(times),
           "ms_median": med, "ms_q20": q20, "ms_q80": q80,
           "clips_per_s": d.batch_size * 1e3 / med if med else None, "loss_first": losses[0], "loss_last": losses[-1],
           "params_m": sum(p.numel() for p in model.parameters()) / 1e6, **environment(dist.device)}
    if dist.device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated(dist.device) / 2**30
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=list(GPU_PRESETS))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="ft_tiny on the CPU, 6 steps (checks the script)")
    p.add_argument("--out", default=None, help="folder for finetune_step.json")
    p.add_argument("overrides", nargs="*", help="config overrides for every preset (key=value)")
    args = p.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    presets, steps, warmup, extra = args.presets, args.steps, args.warmup, list(args.overrides)
    if args.quick:
        presets, steps, warmup = ["ft_tiny"], 6, 2
        extra += ["device=cpu", "data.batch_size=4", "model.depth=2"]
    rows = []
    for name in presets:
        row = bench_preset(name, steps, warmup, extra)
        rows.append(row)
        print(f"{name}: {row['ms_median']:.1f} ms/step (q20 {row['ms_q20']:.1f}, q80 {row['ms_q80']:.1f}), "
              f"{row['clips_per_s']:.1f} clips/s, batch {row['batch']} x {row['frames']}x{row['img_size']}, "
              f"{row['precision']}, loss {row['loss_first']:.3f} -> {row['loss_last']:.3f}"
              + (f", peak {row['peak_mem_gib']:.2f} GiB" if "peak_mem_gib" in row else ""), flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "finetune_step.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
