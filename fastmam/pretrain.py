"""Pretraining entry point.

    deepspeed fastmam/pretrain.py --config configs/vit_b.yaml [key=value ...]
    python fastmam/pretrain.py --config tiny [--resume] [key=value ...]

One DeepSpeed engine always (also for one process). Each optimizer step reads
``gradient_accumulation_steps`` micro-batches; all randomness of a step (masking noise) is drawn
from a generator seeded by (seed, step, micro-step, rank), and data order is a function of
(seed, micro-step), so a resumed run repeats exactly what an uninterrupted one does. The host
waits for the device only at log intervals (loss values) and checkpoints.
"""

from __future__ import annotations

import os
import sys

# `deepspeed fastmam/pretrain.py` / `python fastmam/pretrain.py` put this folder first on sys.path;
# drop it so that our module names never shadow top-level packages, and make the repository
# importable when fastmam is not installed.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
if os.path.dirname(_here) not in sys.path:
    sys.path.append(os.path.dirname(_here))

import argparse  # noqa: E402
import json  # noqa: E402
import textwrap  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fastmam import checkpointing, distributed  # noqa: E402
from fastmam.config import (  # noqa: E402
    Config,
    ConfigError,
    deepspeed_config,
    dump_config,
    global_batch_size,
    load_config,
    peak_lr,
    resolve_precision,
    saved_tree,
)
from fastmam.data import build_dataset, build_loader  # noqa: E402
from fastmam.data.annotations import AnnotationError  # noqa: E402
from fastmam.data.code_cache import CacheError  # noqa: E402
from fastmam.data.dali import UnsupportedCodec  # noqa: E402
from fastmam.data.health import BadDataError, DataHealth  # noqa: E402
from fastmam.data.video import VideoDataset  # noqa: E402
from fastmam.memory import count_parameters, estimate_memory, largest_block_params  # noqa: E402
from fastmam.metrics import MetricsLogger  # noqa: E402
from fastmam.models import Pretrainer  # noqa: E402
from fastmam.models.attention import AttentionBackendError  # noqa: E402
from fastmam.models.vqgan import CheckpointMismatch, MissingCheckpoint  # noqa: E402
from fastmam.optim import NonFiniteGuard, build_optimizer  # noqa: E402
from fastmam.probe import ProbeError, TrainingProbe  # noqa: E402

#: what the process's exit status means (``--help`` lists it; so does the README's Pretraining section)
EXIT_STATUSES = {
    0: "finished (schedule.steps reached)",
    1: "an unexpected error (a Python traceback follows)",
    2: "a configuration or file error: an unknown key or bad value, a missing or malformed annotation list, VQGAN "
       "checkpoint or code cache, a codec DALI cannot read, a run folder holding checkpoints without --resume, an "
       "attention backend (model.attention) that is not installed or cannot run on this device, a bad eval list",
    3: "bad data: more than data.max_bad_fraction of the list could not be read (examples in the message; all of "
       "them in <run>/bad_videos.rank<r>.tsv)",
    4: "non-finite loss or gradients (safety.nonfinite)",
}


class RunFolderInUse(RuntimeError):
    """The run folder holds checkpoints of an earlier run and --resume was not passed."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    statuses = [textwrap.fill(what, 79, initial_indent=f"  {code}  ", subsequent_indent=" " * 5)
                for code, what in EXIT_STATUSES.items()]
    epilog = "exit status:\n" + "\n".join(statuses)
    p = argparse.ArgumentParser(
        description="fastmam pretraining (MAM2 / VideoMAE). Overrides: key.sub=value, e.g. optim.base_lr=3e-4",
        epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default="tiny", help="preset name (configs/<name>.yaml) or YAML path [tiny]")
    p.add_argument("--resume", action="store_true",
                   help="continue from the run's latest complete checkpoint (start fresh if it has none)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    return p.parse_args(argv)


def step_noise(shape, seed: int, step: int, micro: int, rank: int, device: torch.device) -> torch.Tensor:
    """Masking noise of one micro-step, a pure function of (seed, step, micro, rank)."""
    key = int(np.random.SeedSequence([seed, step, micro, rank]).generate_state(1, np.uint64)[0] >> np.uint64(1))
    g = torch.Generator(device=device).manual_seed(key)
    return torch.rand(shape, generator=g, device=device)


def log0(dist: distributed.DistInfo, *msg) -> None:
    if dist.is_main:
        print("fastmam:", *msg, flush=True)


def train(cfg: Config, resume: bool = False, stop_after: int | None = None) -> dict:
    """Run (or continue) pretraining; returns a summary. ``stop_after`` ends the run early at that
    step, as an interruption would (tests use it); the schedule still spans ``schedule.steps``."""
    import deepspeed

    dist = distributed.setup(cfg.device)
    run_dir = cfg.run_dir
    ckpt_dir = run_dir / "checkpoints"
    start_tag = checkpointing.latest_tag(ckpt_dir)
    if start_tag is not None and not resume:
        raise RunFolderInUse(
            f"{run_dir} already holds checkpoints (latest {start_tag}); pass --resume to continue that run, "
            "or choose another output_dir / name"
        )

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank and every attempt
    model = Pretrainer(cfg)
    optimizer, scheduler = build_optimizer(model.model, cfg, dist.world_size, dist.device.type)
    ds_config = deepspeed_config(cfg, dist.world_size, dist.device.type)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(cfg))
        (run_dir / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2))
    log0(dist, f"deepspeed config: {json.dumps(ds_config)}")
    counts = count_parameters(model.model)
    parts = ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in counts.items() if k != "total" and v)
    log0(dist, f"{cfg.name}: {counts['total'] / 1e6:.2f} M parameters ({parts}), {dist.world_size} rank(s) on "
               f"{dist.device.type}, global batch {global_batch_size(cfg, dist.world_size)}, "
               f"peak lr {peak_lr(cfg, dist.world_size):.3g}")
    estimate = estimate_memory(cfg, counts["total"], largest_block_params(model.model), dist.world_size,
                               dist.device.type)
    log0(dist, estimate.summary(cfg, dist.world_size, resolve_precision(cfg, dist.device.type), dist.device.type))

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config, dist_init_required=False)
    # a step with a non-finite loss or gradient is skipped on the device; safety.nonfinite decides what follows
    guard = NonFiniteGuard(optimizer, dist.device)

    step = 0
    skipped_total = 0
    if resume and start_tag is not None:
        client = checkpointing.load(engine, ckpt_dir, start_tag)
        step = int(client["step"])
        skipped_total = int(client.get("skipped_steps", 0))
        if client.get("global_batch") != global_batch_size(cfg, dist.world_size):
            log0(dist, f"warning: checkpoint was written with global batch {client.get('global_batch')}; "
                       "data order after resume differs from an uninterrupted run")
        log0(dist, f"resumed from {ckpt_dir / start_tag} at step {step}")
    elif resume:
        log0(dist, f"--resume: no checkpoint in {ckpt_dir}, starting from step 0")

    total = cfg.schedule.steps if stop_after is None else min(cfg.schedule.steps, stop_after)
    accum = cfg.deepspeed.gradient_accumulation_steps
    dataset = build_dataset(cfg)
    loader = build_loader(cfg, dataset, dist.rank, dist.world_size, step * accum, total * accum,
                          pin_memory=cfg.data.pin_memory and dist.device.type == "cuda", device=dist.device)
    batches = iter(loader)
    # bad videos: replaced by the loader, logged once here, counted, fatal only past data.max_bad_fraction; the
    # record of bad files is continued only by the attempt that resumes from a checkpoint
    health = DataHealth(len(dataset), cfg.data.max_bad_fraction, log=lambda m: print(f"fastmam[rank {dist.rank}]: {m}",
                        flush=True), record=run_dir / f"bad_videos.rank{dist.rank}.tsv",
                        resume=resume and start_tag is not None,
                        paths=dataset.videos.paths if isinstance(dataset, VideoDataset) else ())
    # frozen probes every eval.every_steps: built on every rank now, so that a bad eval list stops the run before step 1
    prober = TrainingProbe(cfg, dist.device, log=lambda m: log0(dist, m)) if cfg.eval.every_steps else None
    metrics = MetricsLogger(run_dir, dist.is_main, cfg.logging.tensorboard, start_step=step)
    progress = None
    if dist.is_main and cfg.logging.progress_bar:
        from tqdm import tqdm

        progress = tqdm(total=cfg.schedule.steps, initial=step, desc=cfg.name, dynamic_ncols=True)

    # running sums of the finite micro-steps stay on the device; read (a host sync) only at log intervals
    sums = torch.zeros(3, device=dist.device)
    finite = torch.zeros((), device=dist.device)
    ds_skipped = engine.skipped_steps  # DeepSpeed's own skips (its bf16 path checks gradients itself)
    last = {}
    t_log = time.perf_counter()
    clips_since_log = 0
    while step < total:
        for micro in range(accum):
            batch = next(batches)
            health.update(batch.get("bad"))
            clip = batch["video"].to(dist.device, non_blocking=True)
            next_clip = batch["next_video"].to(dist.device, non_blocking=True) if "next_video" in batch else None
            codes = batch["codes"].to(dist.device, non_blocking=True) if "codes" in batch else None  # cached codes
            noise = step_noise(model.noise_shape(clip.shape[0]), cfg.seed, step, micro, dist.rank, dist.device)
            # MME's trajectory target: the loader's trajectories of each tubelet's first frame (synthetic or cached)
            traj = {k: batch[k].to(dist.device, non_blocking=True) for k in ("trajectories", "trajectory_valid")
                    if k in batch}
            out = engine(clip, noise, next_clip, codes, **traj)
            guard.observe(out.total)
            engine.backward(out.total)
            engine.step()  # DeepSpeed applies the optimizer and lr schedule at the accumulation boundary
            values = torch.stack([t.detach().float() for t in out])
            ok = torch.isfinite(values).all()
            sums += torch.where(ok, values, torch.zeros_like(values))
            finite += ok
            clips_since_log += clip.shape[0]
        step += 1
        guard.end_step(step)

        probe_values = {}
        if prober is not None and step % cfg.eval.every_steps == 0:
            # collective (ZeRO-3 gathers the encoder's weights one module at a time), then rank 0 probes a copy of
            # them: the training module, its mode and every RNG stay as they were. A host sync, like a log interval.
            t_probe = time.perf_counter()
            probe_values = prober(engine.module.model, dist.is_main)
            t_log += time.perf_counter() - t_probe  # probe time is not training time (clips_per_s)

        if step % cfg.logging.every_steps == 0 or step == total:
            *totals, good = torch.cat([sums, finite.view(1)]).tolist()  # host sync
            values = [v / good for v in totals] if good else [None] * 3
            skips = guard.read()
            skips["skipped"] += engine.skipped_steps - ds_skipped
            ds_skipped = engine.skipped_steps
            skipped_total += skips["skipped"]
            if skips["skipped"]:
                check_nonfinite(cfg, dist, step, skips, ckpt_dir)
            elapsed = time.perf_counter() - t_log
            last = {
                "loss": values[0], "loss_appearance": values[1], "loss_motion": values[2],
                "lr": engine.get_lr()[0], "clips_per_s": clips_since_log * dist.world_size / max(elapsed, 1e-9),
                "skipped_steps": skipped_total,
            }
            if dist.device.type == "cuda":  # the caching allocator's own counter: no device sync
                last["peak_mem_gib"] = torch.cuda.max_memory_allocated(dist.device) / 2**30
            if cfg.data.source == "video":
                last.update(health.metrics())  # this rank's count
            last.update(probe_values)
            metrics.log(step, last)
            if progress is not None:
                progress.update(step - progress.n)
                progress.set_postfix(loss="-" if values[0] is None else f"{values[0]:.4f}", lr=f"{last['lr']:.2e}")
            sums.zero_()
            finite.zero_()
            clips_since_log, t_log = 0, time.perf_counter()
        elif probe_values:
            metrics.log(step, probe_values)

        if step % cfg.checkpoint.every_steps == 0 or step == total:
            client = {"step": step, "global_batch": global_batch_size(cfg, dist.world_size),
                      "config": saved_tree(cfg), "skipped_steps": skipped_total}
            checkpointing.save(engine, ckpt_dir, step, client, cfg.checkpoint.keep_last, dist.is_main)

    if progress is not None:
        progress.close()
    metrics.close()
    log0(dist, f"stopped at step {step}; checkpoints in {ckpt_dir}, metrics in {metrics.path}")
    return {"step": step, "run_dir": str(run_dir), "last": last}


def check_nonfinite(cfg: Config, dist: distributed.DistInfo, step: int, skips: dict, ckpt_dir) -> None:
    """At a log interval where steps were skipped for a non-finite loss or gradient: stop (``safety.nonfinite:
    stop``, or too many in a row under ``skip``) or say so and go on."""
    since = step - (step - 1) % cfg.logging.every_steps
    where = (f"{skips['skipped']} optimizer step(s) since the last log (steps {since}-{step}) had a non-finite loss "
             "or gradient" + (f", the first at step {skips['first_step']}" if skips["first_step"] is not None else ""))
    latest = checkpointing.latest_tag(ckpt_dir)
    resume_from = f"the last checkpoint is {ckpt_dir / latest}" if latest else "no checkpoint was written yet"
    if cfg.safety.nonfinite == "stop":
        raise FloatingPointError(
            f"{where}; they were skipped, so the weights are those of the last finite step, and the run stops "
            f"(safety.nonfinite=stop). Lower optim.base_lr or check the data and resume with --resume ({resume_from}), "
            "or set safety.nonfinite=skip to carry on past isolated bad steps"
        )
    if skips["longest_run"] > cfg.safety.max_consecutive_skips:
        raise FloatingPointError(
            f"{where}; {skips['longest_run']} steps in a row were skipped, more than safety.max_consecutive_skips="
            f"{cfg.safety.max_consecutive_skips}: training is not recovering. Lower optim.base_lr or check the data "
            f"and resume with --resume ({resume_from})"
        )
    log0(dist, f"warning: {where}; skipped (safety.nonfinite=skip), training goes on")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"fastmam: {exc}", file=sys.stderr)
        return 2
    try:
        train(cfg, resume=args.resume)
    # the VQGAN tokenizer's file, the code cache, the annotation list, DALI on CPU with H.264, the run folder, an
    # attention backend that cannot run here
    except (MissingCheckpoint, CheckpointMismatch, CacheError, AnnotationError, UnsupportedCodec,
            RunFolderInUse, AttentionBackendError, ProbeError) as exc:
        print(f"fastmam: {exc}", file=sys.stderr)
        return 2
    except BadDataError as exc:
        print(f"fastmam: {exc}", file=sys.stderr)
        return 3
    except FloatingPointError as exc:
        print(f"fastmam: {exc}", file=sys.stderr)
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
