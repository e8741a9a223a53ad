"""Fine-tuning entry point: a pretrained encoder + VideoMAE's classification recipe, then the multi-view test.

    deepspeed fastmam/finetune.py --config ft_vit_b_k400 init.checkpoint=runs/mam2_vit_b [key=value ...]
    python fastmam/finetune.py --config ft_tiny [--resume] [key=value ...]
    python fastmam/finetune.py --config ft_tiny --test-only        # the multi-view test of the run's checkpoint

The same guarantees as pretraining (``fastmam/pretrain.py``): one DeepSpeed engine (any ZeRO stage, also for one
process); data order a function of (seed, micro-step), every augmentation draw a function of its key, so a resumed
run repeats exactly what an uninterrupted one does; atomic checkpoints; non-finite steps skipped on the device;
metrics in ``metrics.jsonl`` and TensorBoard; bad videos replaced, counted, fatal only past
``data.max_bad_fraction``. Validation during training (``test.val_every_epochs``) scores one centre view per video
and is logged as ``val_centre_top1``; the final number is the multi-view test at the end (``test_top1``:
``test.clips`` x ``test.crops`` views per video, softmax per view then the mean, every video once across ranks),
written to ``<run>/test/``.
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
import textwrap  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import yaml  # noqa: E402

from fastmam import checkpointing, distributed  # noqa: E402
from fastmam.config import (  # noqa: E402
    ConfigError,
    deepspeed_config,
    dump_config,
    global_batch_size,
    load_config,
    saved_tree,
)
from fastmam.data.annotations import AnnotationError, VideoList, detect_format, list_root, read_hmdb51, read_list  # noqa: E402,E501
from fastmam.data.health import BadDataError, DataHealth  # noqa: E402
from fastmam.data.loader import StepBatchSampler  # noqa: E402
from fastmam.data.video import collate_clips  # noqa: E402
from fastmam.finetuning.augment import BatchAugment, ClipAugment, key_of, soft_target_cross_entropy  # noqa: E402
from fastmam.finetuning.config import FinetuneConfig, schedule_steps  # noqa: E402
from fastmam.finetuning.data import ClipDataset, eval_spec, train_spec  # noqa: E402
from fastmam.finetuning.init import InitError, load_pretrained, read_pretrained  # noqa: E402
from fastmam.finetuning.model import VideoClassifier, layer_decay_groups  # noqa: E402
from fastmam.finetuning.sources import ListSource, SyntheticSource  # noqa: E402
from fastmam.finetuning.testing import TestError  # noqa: E402
from fastmam.metrics import MetricsLogger  # noqa: E402
from fastmam.models.attention import AttentionBackendError  # noqa: E402
from fastmam.optim import NonFiniteGuard, lr_factor  # noqa: E402
from fastmam.pretrain import RunFolderInUse, check_nonfinite, log0  # noqa: E402

EXIT_STATUSES = {
    0: "finished (the schedule's steps, then the multi-view test when test.at_end)",
    1: "an unexpected error (a Python traceback follows)",
    2: "a configuration or file error: an unknown key or bad value, a pretraining preset, a missing or malformed "
       "annotation list, labels outside [0, classifier.num_classes) or a class count that differs from it, an "
       "init.checkpoint that is missing, of another architecture, or already fine-tuned, a run folder holding "
       "checkpoints without --resume, --test-only on a run without a fine-tuned checkpoint",
    3: "bad data: more than data.max_bad_fraction of the training list could not be read, or no video of the "
       "validation or test list",
    4: "non-finite loss or gradients (safety.nonfinite)",
}


class NotFinetuned(RuntimeError):
    """--test-only on a folder that holds no fine-tuned checkpoint (nothing, or a pretraining run)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    statuses = [textwrap.fill(what, 79, initial_indent=f"  {code}  ", subsequent_indent=" " * 5)
                for code, what in EXIT_STATUSES.items()]
    p = argparse.ArgumentParser(
        description="fastmam fine-tuning for action recognition + multi-view test. Overrides: key.sub=value, e.g. "
                    "init.checkpoint=runs/mam2_vit_b optim.base_lr=5e-4",
        epilog="exit status:\n" + "\n".join(statuses), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="ft_tiny", help="preset name (configs/ft_<name>.yaml) or YAML path [ft_tiny]")
    p.add_argument("--resume", action="store_true", help="continue from the run's latest complete checkpoint")
    p.add_argument("--test-only", action="store_true",
                   help="no training: the multi-view test of the run's newest complete checkpoint (output_dir)")
    p.add_argument("--tag", default=None,
                   help="checkpoint of the init run to start from (step_<N>; same as init.tag=...) [the newest]")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    args = p.parse_args(argv)
    if args.tag:
        args.overrides.append(f"init.tag={args.tag}")
    return args


# --------------------------------------------------------------------------- data


def _read_split(cfg: FinetuneConfig, path: str, role: str) -> VideoList:
    """An annotation list; an HMDB51 split folder gives its train subset for training and its test subset else."""
    d = cfg.data
    p = Path(path).expanduser()
    fmt = detect_format(p) if d.list_format == "auto" and p.exists() else d.list_format
    if fmt == "hmdb51" and p.is_dir() and role != "train":
        return read_hmdb51(p, list_root(p, d.data_root), d.hmdb51_split, subset=2)
    return read_list(p, d.data_root, d.list_format, d.hmdb51_split)


def check_labels(videos: VideoList, num_classes: int, what: str, exact: bool) -> None:
    """Labels must lie in [0, num_classes); a training list must also have exactly num_classes classes."""
    bad = [(p, lab) for p, lab in zip(videos.paths, videos.labels, strict=True) if not 0 <= lab < num_classes]
    if bad:
        examples = ", ".join(f"{p} -> {lab}" for p, lab in bad[:3])
        raise AnnotationError(f"{len(bad)} video(s) of the {what} have labels outside [0, classifier.num_classes="
                              f"{num_classes}) (e.g. {examples}); fix the list or set classifier.num_classes")
    classes = len(set(videos.labels))
    if exact and classes != num_classes:
        raise AnnotationError(f"the {what} has {classes} classes but classifier.num_classes={num_classes}; set "
                              f"classifier.num_classes={classes} (or use the list of the dataset the preset is for)")


def build_sources(cfg: FinetuneConfig, log) -> dict:
    """{'train', 'val', 'test'} video sources (None where there is none)."""
    d, k = cfg.data, cfg.classifier.num_classes
    if d.source == "synthetic":
        n = d.num_samples
        if k != SyntheticSource.num_classes:
            classes = SyntheticSource.num_classes
            raise AnnotationError(f"synthetic clips have {classes} motion classes but classifier.num_classes={k}; "
                                  f"set classifier.num_classes={classes}")
        make = lambda first, count: SyntheticSource(first, count, d.synthetic_frames, d.synthetic_size, cfg.seed) \
            if count else None
        return {"train": make(0, n), "val": make(n, d.synthetic_val),
                "test": make(n + d.synthetic_val, d.synthetic_test)}
    out = {}
    for role, path in (("train", d.train_list), ("val", d.val_list), ("test", d.test_list)):
        if not path:
            out[role] = None
            continue
        videos = _read_split(cfg, path, role)
        check_labels(videos, k, f"{role} list {path}", exact=role == "train")
        out[role] = ListSource(videos, d.backend, d.decode_threads)
    if out["val"] is None and out["test"] is None:
        log("warning: neither data.val_list nor data.test_list is set: the run reports no accuracy")
    return out


# --------------------------------------------------------------------------- model and optimizer


def ft_peak_lr(cfg: FinetuneConfig, world_size: int) -> float:
    """VideoMAE's linear scaling: base_lr x (videos per optimizer step) / 256; the ``repeated_sampling`` crops of a
    video count once, as VideoMAE's ``total_batch_size`` counts its ``num_sample`` clips."""
    return cfg.optim.base_lr * global_batch_size(cfg, world_size) / cfg.data.repeated_sampling / 256


def build_optimizer(model: VideoClassifier, cfg: FinetuneConfig, world_size: int, total: int, warmup: int):
    """AdamW over the layer-decay groups (each at peak x lr_scale) and the warmup + cosine schedule."""
    peak = ft_peak_lr(cfg, world_size)
    o = cfg.optim
    groups = layer_decay_groups(model, o.weight_decay, o.layer_decay)
    for g in groups:
        g.pop("names")
        g["lr"] = peak * g["lr_scale"]
    optimizer = torch.optim.AdamW(groups, lr=peak, betas=o.betas, eps=o.eps, fused=True)
    min_lr = peak * o.min_lr / o.base_lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, peak, min_lr, warmup, total))
    return optimizer, scheduler


def eval_copy(module: VideoClassifier, cfg: FinetuneConfig, device: torch.device) -> VideoClassifier:
    """A plain copy of the training classifier's weights in eval mode (collective under ZeRO-3, where each rank holds
    a slice of every weight: ``GatheredParameters`` assembles one module at a time). Evaluating the copy needs no
    collective per forward, so ranks may see different numbers of test videos."""
    import deepspeed

    with torch.random.fork_rng(devices=[]):
        model = VideoClassifier(cfg)
    state = {}
    for name, sub in module.named_children():
        params = dict(sub.named_parameters())
        if not params:
            continue
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
            state.update({f"{name}.{k}": p.detach().to(device=device, dtype=torch.float32, copy=True)
                          for k, p in params.items()})
    if cfg.classifier.pos_embed == "learned":
        with deepspeed.zero.GatheredParameters([module.pos_embed], modifier_rank=None):
            state["pos_embed"] = module.pos_embed.detach().to(device=device, dtype=torch.float32, copy=True)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval().requires_grad_(False)


def _autocast(device: torch.device, precision: str):
    import contextlib

    if device.type == "cuda" and precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def evaluate(engine, cfg: FinetuneConfig, dist, source, clips: int, crops: int, name: str, out_dir: Path | None,
             log) -> dict:
    """The multi-view test (or the centre-view validation, 1 x 1) of the current weights on ``source``."""
    from fastmam.config import resolve_precision
    from fastmam.finetuning.testing import run_test
    from fastmam.finetuning.views import ViewDataset

    model = eval_copy(engine.module, cfg, dist.device)
    precision = resolve_precision(cfg, dist.device.type)
    dataset = ViewDataset(source, eval_spec(cfg), clips, crops, cfg.data.sampling)

    def predict(views: torch.Tensor) -> torch.Tensor:
        with _autocast(dist.device, precision):
            return model(views).float()

    with torch.random.fork_rng(devices=[dist.device] if dist.device.type == "cuda" else []):
        result = run_test(predict, dataset, cfg.classifier.num_classes, batch_size=cfg.test.batch_size,
                          num_workers=cfg.data.num_workers, device=dist.device, out_dir=out_dir, name=name,
                          rank=dist.rank, world_size=dist.world_size, log=log)
    return result


# --------------------------------------------------------------------------- the run


def _run_kind(run_dir: Path) -> str | None:
    """'pretraining' or 'fine-tuning' for a run folder with config.yaml, else None."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    tree = yaml.safe_load(path.read_text()) or {}
    return "fine-tuning" if "classifier" in tree else "pretraining"


def train(cfg: FinetuneConfig, resume: bool = False, stop_after: int | None = None, test_only: bool = False) -> dict:
    """Fine-tune (or continue, or only test); returns a summary. ``stop_after`` ends training early at that step, as
    an interruption would (tests use it): no test then; the schedule still spans all steps."""
    import deepspeed

    dist = distributed.setup(cfg.device)
    log = lambda m: log0(dist, m)  # noqa: E731
    run_dir = cfg.run_dir
    ckpt_dir = run_dir / "checkpoints"
    start_tag = checkpointing.latest_tag(ckpt_dir)
    kind = _run_kind(run_dir)
    if test_only:
        if kind == "pretraining":
            raise NotFinetuned(f"{run_dir} is a pretraining run (its config.yaml has no classifier): there is no "
                               "fine-tuned classifier to test; fine-tune it first: python fastmam/finetune.py "
                               f"--config <ft preset> init.checkpoint={run_dir}")
        if start_tag is None:
            raise NotFinetuned(f"{run_dir} holds no complete fine-tuning checkpoint to test; train first (without "
                               "--test-only), or set output_dir to the fine-tuning run to test")
    elif start_tag is not None and not resume:
        raise RunFolderInUse(f"{run_dir} already holds checkpoints (latest {start_tag}); pass --resume to continue "
                             "that run, --test-only to test it, or choose another output_dir / name")
    if kind == "pretraining" and start_tag is not None:
        raise RunFolderInUse(f"{run_dir} holds a pretraining run; choose another output_dir for the fine-tuning")

    sources = build_sources(cfg, log)
    per_epoch, total, warmup = schedule_steps(cfg, len(sources["train"]), dist.world_size)
    torch.manual_seed(cfg.seed)
    model = VideoClassifier(cfg)
    loading = (resume or test_only) and start_tag is not None
    if cfg.init.checkpoint and not loading:
        load_pretrained(model, cfg, read_pretrained(cfg.init.checkpoint, cfg.init.tag, log), log)
    elif not cfg.init.checkpoint and not loading:
        log("warning: init.checkpoint is not set: the encoder starts from random weights (training from scratch)")
    optimizer, scheduler = build_optimizer(model, cfg, dist.world_size, total, warmup)
    ds_config = deepspeed_config(cfg, dist.world_size, dist.device.type)
    if dist.is_main and not test_only:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(cfg))
        (run_dir / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config, dist_init_required=False)
    guard = NonFiniteGuard(optimizer, dist.device)
    step, skipped_total = 0, 0
    if loading:
        client = checkpointing.load(engine, ckpt_dir, start_tag)
        step, skipped_total = int(client["step"]), int(client.get("skipped_steps", 0))
        log(f"loaded {ckpt_dir / start_tag} (step {step})")
    params = sum(p.numel() for p in model.parameters())
    log(f"{cfg.name}: {params / 1e6:.2f} M parameters, {len(sources['train'])} training videos, {per_epoch} steps per "
        f"epoch, {total} steps, global batch {global_batch_size(cfg, dist.world_size)} clips, peak lr "
        f"{ft_peak_lr(cfg, dist.world_size):.3g} (layer decay {cfg.optim.layer_decay})")

    test_views = f"{cfg.test.clips} clip(s) x {cfg.test.crops} crop(s)"
    if test_only:
        result = evaluate(engine, cfg, dist, sources["test"], cfg.test.clips, cfg.test.crops, "test",
                          run_dir / "test", log) if sources["test"] is not None else {}
        _report_test(dist, result, test_views, step)
        return {"step": step, "run_dir": str(run_dir), "test": result}

    stop = total if stop_after is None else min(total, stop_after)
    accum = cfg.deepspeed.gradient_accumulation_steps
    augment = ClipAugment(cfg.augment, cfg.data.mean) if cfg.augment.randaug else None
    dataset = ClipDataset(sources["train"], train_spec(cfg), cfg.data.sampling, augment)
    sampler = StepBatchSampler(len(dataset), cfg.data.batch_size // cfg.data.repeated_sampling, dist.rank,
                               dist.world_size, cfg.seed, step * accum, stop * accum, with_epoch=True)
    workers = cfg.data.num_workers
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                         collate_fn=collate_clips, pin_memory=cfg.data.pin_memory and
                                         dist.device.type == "cuda", prefetch_factor=2 if workers else None)
    batches = iter(loader)
    health = DataHealth(len(dataset), cfg.data.max_bad_fraction,
                        log=lambda m: print(f"fastmam[rank {dist.rank}]: {m}", flush=True),
                        record=run_dir / f"bad_videos.rank{dist.rank}.tsv", resume=loading,
                        paths=dataset.paths if cfg.data.source == "video" else ())
    batch_augment = BatchAugment(cfg)
    metrics = MetricsLogger(run_dir, dist.is_main, cfg.logging.tensorboard, start_step=step)
    progress = None
    if dist.is_main and cfg.logging.progress_bar:
        from tqdm import tqdm

        progress = tqdm(total=total, initial=step, desc=cfg.name, dynamic_ncols=True)
    val_every = round(cfg.test.val_every_epochs * per_epoch) if sources["val"] is not None else 0
    if cfg.test.val_every_epochs and sources["val"] is not None:
        val_every = max(1, val_every)

    sums = torch.zeros(1, device=dist.device)
    finite = torch.zeros((), device=dist.device)
    ds_skipped = engine.skipped_steps
    last: dict = {}
    t_log, clips_since_log = time.perf_counter(), 0
    engine.train()
    while step < stop:
        for micro in range(accum):
            batch = next(batches)
            health.update(batch.get("bad"))
            clip = batch["video"].to(dist.device, non_blocking=True)
            labels = batch["label"].to(dist.device, non_blocking=True)
            key = key_of(cfg.seed, step, micro, dist.rank)
            pixels, targets = batch_augment(clip, labels, key)
            torch.manual_seed(key)  # stochastic depth draws from the global generators: a function of the step
            logits = engine(pixels)
            loss = soft_target_cross_entropy(logits, targets)
            guard.observe(loss)
            engine.backward(loss)
            engine.step()
            ok = torch.isfinite(loss.detach())
            sums += torch.where(ok, loss.detach().float(), torch.zeros((), device=dist.device))
            finite += ok
            clips_since_log += clip.shape[0]
        step += 1
        guard.end_step(step)

        values: dict = {}
        if val_every and (step % val_every == 0 or step == total):
            t_val = time.perf_counter()
            result = evaluate(engine, cfg, dist, sources["val"], 1, 1, "val", None, lambda m: None)
            values = {"val_centre_top1": result["top1"], "val_centre_top5": result["top5"],
                      "val_centre_mean_class": result["mean_class_accuracy"], "epoch": step / per_epoch}
            t_log += time.perf_counter() - t_val  # not training time (clips_per_s)
            log(f"step {step}: validation (1 centre view per video, not the multi-view test) top-1 "
                f"{result['top1']:.2f}% on {result['evaluated']} videos")
        if step % cfg.logging.every_steps == 0 or step == stop:
            total_loss, good = torch.cat([sums, finite.view(1)]).tolist()  # host sync
            skips = guard.read()
            skips["skipped"] += engine.skipped_steps - ds_skipped
            ds_skipped = engine.skipped_steps
            skipped_total += skips["skipped"]
            if skips["skipped"]:
                check_nonfinite(cfg, dist, step, skips, ckpt_dir)
            elapsed = time.perf_counter() - t_log
            last = {"loss": total_loss / good if good else None, "lr": engine.get_lr()[-1],
                    "clips_per_s": clips_since_log * dist.world_size / max(elapsed, 1e-9),
                    "skipped_steps": skipped_total, "epoch": step / per_epoch}
            if dist.device.type == "cuda":
                last["peak_mem_gib"] = torch.cuda.max_memory_allocated(dist.device) / 2**30
            if cfg.data.source == "video":
                last.update(health.metrics())
            last.update(values)
            metrics.log(step, last)
            if progress is not None:
                progress.update(step - progress.n)
                progress.set_postfix(loss="-" if last["loss"] is None else f"{last['loss']:.4f}")
            sums.zero_()
            finite.zero_()
            clips_since_log, t_log = 0, time.perf_counter()
        elif values:
            metrics.log(step, values)
        if step % cfg.checkpoint.every_steps == 0 or step == stop:
            client = {"step": step, "global_batch": global_batch_size(cfg, dist.world_size),
                      "config": saved_tree(cfg), "skipped_steps": skipped_total}
            checkpointing.save(engine, ckpt_dir, step, client, cfg.checkpoint.keep_last, dist.is_main)
    if progress is not None:
        progress.close()

    result: dict = {}
    if step == total and cfg.test.at_end and sources["test"] is not None:
        t0 = time.perf_counter()
        result = evaluate(engine, cfg, dist, sources["test"], cfg.test.clips, cfg.test.crops, "test",
                          run_dir / "test", log)
        result["seconds"] = round(time.perf_counter() - t0, 3)
        metrics.log(step, {"test_top1": result["top1"], "test_top5": result["top5"],
                           "test_mean_class": result["mean_class_accuracy"], "test_views": test_views})
        _report_test(dist, result, test_views, step)
    metrics.close()
    log(f"stopped at step {step}; checkpoints in {ckpt_dir}, metrics in {metrics.path}")
    return {"step": step, "run_dir": str(run_dir), "last": last, "test": result}


def _report_test(dist, result: dict, views: str, step: int) -> None:
    if not result:
        return
    log0(dist, f"test at step {step} ({views} per video, softmax averaged; {result['evaluated']} of "
               f"{result['videos']} videos, {result['skipped']['count']} unreadable): top-1 {result['top1']:.2f}%, "
               f"top-5 {result['top5']:.2f}%, mean per-class {result['mean_class_accuracy']:.2f}%")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, root=FinetuneConfig)
    except ConfigError as exc:
        print(f"fastmam: {exc}", file=sys.stderr)
        return 2
    try:
        train(cfg, resume=args.resume, test_only=args.test_only)
    except (InitError, AnnotationError, RunFolderInUse, NotFinetuned, AttentionBackendError, ConfigError) as exc:
        print(f"fastmam: {exc}", file=sys.stderr)
        return 2
    except BadDataError as exc:
        print(f"fastmam: {exc}", file=sys.stderr)
        return 3
    except TestError as exc:  # the multi-view test found no readable video (or lost one across ranks)
        print(f"fastmam: {exc}", file=sys.stderr)
        return 3
    except FloatingPointError as exc:
        print(f"fastmam: {exc}", file=sys.stderr)
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
