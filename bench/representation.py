"""Representation benchmark on the synthetic data: what each pretraining objective teaches the encoder.

    python bench/representation.py                       # the full run (see --help for the defaults)
    python bench/representation.py --quick               # CI: a few steps, one seed, small probe sets
    python bench/representation.py --steps 2000 --seeds 0 1 2 --objectives videomae mam2 --json out.json

For every objective and seed, ``fastmam/pretrain.py`` trains the preset (``--config``, default ``tiny``) for
``--steps`` optimizer steps in its own process (``--jobs`` at a time), with the objective's overrides:

- ``videomae``: no regressor, pixel target only (``model.regressor_depth=0 targets.motion=none
  loss.motion_weight=0``, as ``configs/videomae_vit_b.yaml``);
- ``pixel_motion``: no regressor, pixels + RGB difference (``model.regressor_depth=0``): MotionMAE's objective
  (``configs/tiny_motionmae.yaml``);
- ``mam2``: the preset itself (encoder - regressor - two decoders);
- ``mam2_decoder_masking``: ``mam2`` with VideoMAE V2's decoder masking (``masking.decoder=running_cell``, half of
  the masked tokens reconstructed);
- ``mme``: MME's objective (``configs/tiny_mme.yaml``): no regressor, one shared decoder with a head per target,
  70% tube masking, HOG of each tubelet's first frame and the shapes' true trajectories over 4 frames;
- ``mme_motion``: MME's motion-only ablation: ``mme`` with ``loss.appearance_weight=0`` (the shapes' true trajectories
  are the only target);
- ``mam2_motion``: MAM2's motion-only ablation: ``mam2`` with ``loss.appearance_weight=0`` and the RGB difference
  normalized per patch (``targets.normalize_motion=true``);
- ``random``: the ``mam2`` model at initialization (``torch.manual_seed(seed)`` then ``Pretrainer(cfg)``, what
  ``pretrain.train`` builds before its first step): the control every pretrained encoder must beat.

The frozen encoder (``fastmam.probe.FrozenEncoder``: all tokens, no masking) then gives features of held-out clips
(``--train-clips`` to fit, ``--val-clips`` to score; items from ``data.num_samples`` on, labelled by motion class,
9 classes) and ``fastmam.probe`` fits three probes: kNN (k=20, cosine, T=0.07) and linear (BatchNorm + Linear) on
the mean-pooled tokens; on the token features, linear on the per-time-slice means (``linear_time``: time slices x D,
their order kept), linear on the per-channel maximum over the tokens (``linear_max``, ``classifier.pool=max``'s
pooling) and attentive (one learned query cross-attending all tokens). Two controls
need no encoder: the same kNN and linear probes on the raw pixels of the clip's first frame (appearance alone: near
chance, since one frame cannot reveal the motion), and on its consecutive frame differences (2x2 average-pooled:
how far the raw motion signal goes).

Every accuracy is reported with its standard error on the val clips, ``sqrt(p (1 - p) / n)``; over seeds, the mean,
the standard error of that mean (``sqrt(sum se_i^2) / n_seeds``) and the spread (standard deviation over seeds).
``vs random``: (accuracy - random init's) / the standard error of that difference, per probe. Final pretraining
losses (the mean over the last log interval) stand beside their trivial baselines, measured on training batches
with the run's own masks: appearance against the clip's mean colour (raw pixels) or 0 (per-patch normalized
pixels), motion against predicting no motion (0). A loss above its baseline means the decoder learned nothing.
Nothing here decides which objective is better: the benchmark reports what it measured.
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
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.harness import environment  # noqa: E402
from fastmam import ops  # noqa: E402
from fastmam.config import Config, load_config  # noqa: E402
from fastmam.data.synthetic import MOTIONS, SyntheticShapes  # noqa: E402
from fastmam.export import consolidated_state, encoder_state, find_checkpoint  # noqa: E402
from fastmam.metrics import read_metrics  # noqa: E402
from fastmam.probe import (  # noqa: E402
    Features,
    ProbeOptions,
    evaluate,
    extract_features,
    load_encoder,
    synthetic_sources,
)

REPO = Path(__file__).resolve().parents[1]
#: config overrides of each pretraining objective (on top of --config and --set)
OBJECTIVES: dict[str, list[str]] = {
    "videomae": ["model.regressor_depth=0", "targets.motion=none", "loss.motion_weight=0"],
    "pixel_motion": ["model.regressor_depth=0"],
    "mam2": [],
    "mam2_motion": ["loss.appearance_weight=0", "targets.normalize_motion=true"],  # MAM2's RGB difference only
    "mam2_decoder_masking": ["masking.decoder=running_cell"],
    # = configs/tiny_mme.yaml (tiny + these)
    "mme": ["model.regressor_depth=0", "model.shared_decoder=true", "model.decoder_depth=1", "masking.ratio=0.7",
            "targets.appearance=hog", "targets.motion=trajectory", "targets.trajectory_length=4",
            "targets.trajectory_norm=global"],
}
OBJECTIVES["mme_motion"] = [*OBJECTIVES["mme"], "loss.appearance_weight=0"]  # MME's trajectory-only ablation
RANDOM = "random"
PROBES = ("knn", "linear", "linear_time", "linear_max", "attentive")
#: probes that read the token features (kept only with the attentive probe on)
TOKEN_PROBES = ("linear_time", "linear_max", "attentive")
CONTROLS = ("frame_pixels", "frame_diffs")
#: runs never write TensorBoard or a progress bar; one checkpoint, at the end
RUN_OVERRIDES = ["logging.progress_bar=false", "logging.tensorboard=false"]


def _log(msg: str) -> None:
    print(f"representation: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- pretraining runs


def run_config(config: str, objective: str, seed: int, steps: int, out: Path, extra: list[str]) -> list[str]:
    """The overrides of one pretraining run (``fastmam/pretrain.py --config <config> <these>``)."""
    steps = max(steps, 1)
    every = max(1, min(50, steps // 4))
    warmup = min(load_config(config, extra).schedule.warmup_steps, steps)  # a short run (--quick) keeps its warmup
    return [f"output_dir={out}", f"seed={seed}", f"schedule.steps={steps}", f"schedule.warmup_steps={warmup}",
            f"checkpoint.every_steps={steps}", f"logging.every_steps={every}", *RUN_OVERRIDES,
            *extra, *OBJECTIVES.get(objective, [])]


def launch(config: str, overrides: list[str], log_path: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, str(REPO / "fastmam/pretrain.py"), "--config", config, *overrides],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)


def run_all(jobs: list[tuple[str, list[str], Path]], parallel: int) -> dict[Path, float]:
    """Run the pretraining processes, ``parallel`` at a time; {run folder: seconds}. A failed run raises."""
    pending, running, seconds = list(jobs), {}, {}
    while pending or running:
        while pending and len(running) < parallel:
            config, overrides, out = pending.pop(0)
            _log(f"pretraining {out.name}: {' '.join(overrides)}")
            running[out] = (launch(config, overrides, out.with_suffix(".log")), time.perf_counter())
        time.sleep(0.5)
        for out, (proc, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[out]
            if proc.returncode != 0:
                for other, _ in running.values():
                    other.kill()
                tail = out.with_suffix(".log").read_text().strip().splitlines()[-15:]
                raise RuntimeError(f"pretraining {out.name} failed (exit {proc.returncode}):\n" + "\n".join(tail))
            seconds[out] = time.perf_counter() - t0
            _log(f"{out.name} done in {seconds[out]:.0f} s")
    return seconds


def random_init_state(cfg: Config) -> dict[str, torch.Tensor]:
    """The encoder weights ``pretrain.train`` starts from (same seed, same construction order)."""
    from fastmam.models import Pretrainer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = Pretrainer(cfg).model
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if k.startswith(("patch_embed.", "blocks.", "norm."))}


def trained_state(run: Path) -> tuple[dict[str, torch.Tensor], Config]:
    ckpt_dir, tag, _ = find_checkpoint(run)
    cfg = load_config(run / "config.yaml")
    return encoder_state(consolidated_state(ckpt_dir, tag), cfg), cfg


# --------------------------------------------------------------------------- loss baselines


@torch.no_grad()
def loss_baselines(cfg: Config, batches: int = 8) -> dict[str, float]:
    """Trivial predictors' losses on training clips (indices < data.num_samples) under the run's own masking.

    appearance: raw pixels -> each clip's mean colour over its visible patches; normalized pixels -> 0 (a
    patch's own mean); HOG -> the batch's mean descriptor. motion (RGB difference, MSE; trajectories, MSE over
    valid entries) -> 0: no motion. Means over masked tokens, like the loss."""
    from fastmam.pretrain import step_noise

    m, d, tg = cfg.model, cfg.data, cfg.targets
    trajectories = (m.tubelet, tg.trajectory_length) if tg.motion == "trajectory" else None
    data = SyntheticShapes(d.num_samples, d.num_frames, d.img_size, d.img_size, seed=cfg.seed,
                           trajectories=trajectories)
    s = (d.img_size // m.patch) ** 2
    appearance, motion = [], []
    for b in range(batches):
        items = [data[(b * d.batch_size + i) % len(data)] for i in range(d.batch_size)]
        clip = torch.stack([it["video"] for it in items])
        noise = step_noise((d.batch_size, s), cfg.seed, b, 0, 0, torch.device("cpu"))
        vis = ops.tube_mask_gather(clip, noise, cfg.masking.ratio, m.tubelet, m.patch, d.mean, d.std)
        if tg.motion == "trajectory":
            disp = torch.stack([it["trajectories"] for it in items])
            valid = torch.stack([it["trajectory_valid"] for it in items])
            mt, weight = ops.trajectory_target(disp, valid, vis.ids_masked, m.tubelet, m.patch, tg.trajectory_norm)
            motion.append(ops.trajectory_loss(torch.zeros_like(mt), mt, weight).item())
        if tg.appearance == "hog":
            target = ops.hog_target(clip, vis.ids_masked, m.tubelet, m.patch, "first")
            guess = target.mean((0, 1), keepdim=True).expand_as(target)
        elif tg.normalize_pixels:
            target = ops.pixel_target(clip, vis.ids_masked, m.tubelet, m.patch, True)
            guess = torch.zeros_like(target)
        else:  # the mean colour of the visible pixels, per clip and channel
            target = ops.pixel_target(clip, vis.ids_masked, m.tubelet, m.patch, False)
            visible = ops.patchify_reference(clip, m.tubelet, m.patch).float() / 255.0
            visible = torch.gather(visible, 1, vis.ids_keep.unsqueeze(-1).expand(-1, -1, visible.shape[-1]))
            colour = visible.reshape(d.batch_size, -1, 3).mean(1)  # (B, 3)
            guess = colour.repeat(1, target.shape[-1] // 3).unsqueeze(1).expand_as(target)
        appearance.append(F.mse_loss(guess, target).item())
        if tg.motion == "rgb_diff":
            mt = ops.rgb_diff_target(clip, vis.ids_masked, m.tubelet, m.patch, tg.normalize_motion)
            motion.append(mt.square().mean().item())
    predictor = "batch mean HOG" if tg.appearance == "hog" else \
        "0 (per-patch mean)" if tg.normalize_pixels else "clip mean colour"
    out = {"appearance": statistics.fmean(appearance), "appearance_predictor": predictor}
    if motion:
        out.update(motion=statistics.fmean(motion), motion_predictor="0 (no motion)")
    return out


# --------------------------------------------------------------------------- probes


def _se(top1: float, n: int) -> float:
    """Standard error (percent) of a top-1 accuracy (percent) on n clips."""
    p = top1 / 100.0
    return 100.0 * math.sqrt(max(p * (1 - p), 0.0) / n)


def control_features(cfg: Config, first: int, count: int) -> dict[str, Features]:
    """Raw-pixel controls of clips first..first+count-1: one frame's pixels, and the 2x2-pooled frame differences."""
    d = cfg.data
    data = SyntheticShapes(first + count, d.num_frames, d.img_size, d.img_size, seed=cfg.seed)
    frames, diffs, labels = [], [], []
    for i in range(first, first + count):
        item = data[i]
        v = item["video"].float() / 255.0  # (T, H, W, C)
        frames.append(v[0].flatten())
        dv = (v[1:] - v[:-1]).permute(0, 3, 1, 2)  # (T-1, C, H, W)
        diffs.append(F.avg_pool2d(dv, 2).flatten())
        labels.append(item["label"])
    y = torch.tensor(labels, dtype=torch.int64)
    return {"frame_pixels": Features(torch.stack(frames), y), "frame_diffs": Features(torch.stack(diffs), y)}


def probe_encoder(cfg: Config, state: dict[str, torch.Tensor], n_train: int, n_val: int, options: ProbeOptions
                  ) -> dict:
    encoder = load_encoder(cfg, state, torch.device("cpu"))
    train_src, val_src = synthetic_sources(cfg, n_train, n_val)
    keep = options.attentive
    train, val = (extract_features(encoder, s, 32, 0, keep) for s in (train_src, val_src))
    result = evaluate(train, val, options)
    if train.tokens is not None:
        # linear_time: the linear probe on the per-time-slice means (slices x D): the order of the time slices is kept
        slices = cfg.data.num_frames // cfg.model.tubelet
        per_slice = [Features(f.tokens.float().unflatten(1, (slices, -1)).mean(2).flatten(1), f.labels)
                     for f in (train, val)]
        linear_only = ProbeOptions(**{**options.__dict__, "attentive": False})
        result["linear_time"] = evaluate(*per_slice, linear_only)["linear"]
        # linear_max: the linear probe on the per-channel maximum over all tokens (classifier.pool=max's pooling): a
        # small moving shape's tokens are not averaged away by the background's
        per_max = [Features(f.tokens.float().amax(1), f.labels) for f in (train, val)]
        result["linear_max"] = evaluate(*per_max, linear_only)["linear"]
    out = {p: {"top1": result[p]["top1"], "se": _se(result[p]["top1"], result["val_clips"])}
           for p in PROBES if p in result}
    # collapse diagnostics: mean cosine between clips' pooled features, and how much a token changes over time
    pooled = F.normalize(val.pooled.float(), dim=1)
    n = pooled.shape[0]
    out["pooled_cosine"] = ((pooled @ pooled.T).sum() - n).item() / (n * (n - 1))
    if val.tokens is not None:
        slices = cfg.data.num_frames // cfg.model.tubelet
        tok = val.tokens.float().unflatten(1, (slices, -1))  # (N, slices, S, D)
        out["token_change"] = ((tok[:, -1] - tok[:, 0]).norm(dim=-1) / tok[:, 0].norm(dim=-1)).mean().item()
    return out


def probe_controls(cfg: Config, n_train: int, n_val: int, options: ProbeOptions) -> dict:
    first = cfg.data.num_samples
    train = control_features(cfg, first, n_train)
    val = control_features(cfg, first + n_train, n_val)
    out = {}
    for name in CONTROLS:
        result = evaluate(train[name], val[name], ProbeOptions(**{**options.__dict__, "attentive": False}))
        out[name] = {p: {"top1": result[p]["top1"], "se": _se(result[p]["top1"], result["val_clips"])}
                     for p in ("knn", "linear")}
    return out


# --------------------------------------------------------------------------- summary and table


def summarize(rows: list[dict], probes: tuple[str, ...]) -> dict[str, dict]:
    """Per objective: for each probe the mean top-1 over seeds, the SE of that mean and the seed spread (std)."""
    out: dict[str, dict] = {}
    for name in dict.fromkeys(r["objective"] for r in rows):
        mine = [r for r in rows if r["objective"] == name]
        entry: dict = {"seeds": [r["seed"] for r in mine]}
        for p in probes:
            vals = [r["probes"][p]["top1"] for r in mine if p in r["probes"]]
            if not vals:
                continue
            ses = [r["probes"][p]["se"] for r in mine if p in r["probes"]]
            entry[p] = {"mean": statistics.fmean(vals), "se": math.sqrt(sum(s * s for s in ses)) / len(ses),
                        "seed_std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "per_seed": vals}
        for k in ("loss_appearance", "loss_motion", "baseline_appearance", "baseline_motion", "pooled_cosine",
                  "token_change", "train_seconds"):
            vals = [r.get(k) for r in mine if r.get(k) is not None]
            if vals:
                entry[k] = statistics.fmean(vals)
        out[name] = entry
    ref = out.get(RANDOM)
    for name, entry in out.items():
        if ref is None or name == RANDOM:
            continue
        entry["vs_random_in_se"] = {p: (entry[p]["mean"] - ref[p]["mean"]) / math.hypot(entry[p]["se"], ref[p]["se"])
                                    for p in probes if p in entry and p in ref and math.hypot(entry[p]["se"],
                                                                                            ref[p]["se"]) > 0}
    return out


def _cell(e: dict | None) -> str:
    return "-" if e is None else f"{e['mean']:.1f} ± {e['se']:.1f} (sd {e['seed_std']:.1f})"


def format_table(summary: dict, controls: dict, steps: int, probes: tuple[str, ...]) -> str:
    head = ["objective", "steps", *[f"{p} top-1 %" for p in probes], "vs random (SE)", "loss app / base",
            "loss mot / base", "cos", "Δt"]
    rows = []
    for name, e in summary.items():
        vs = e.get("vs_random_in_se")
        losses = []
        for k in ("appearance", "motion"):
            loss, base = e.get(f"loss_{k}"), e.get(f"baseline_{k}")
            losses.append("-" if loss is None or base is None else f"{loss:.4g} / {base:.4g}")
        rows.append([name, "0" if name == RANDOM else str(steps), *[_cell(e.get(p)) for p in probes],
                     "-" if not vs else " ".join(f"{vs[p]:+.1f}" for p in probes if p in vs), *losses,
                     f"{e['pooled_cosine']:.2f}" if "pooled_cosine" in e else "-",
                     f"{e['token_change']:.2f}" if "token_change" in e else "-"])
    for name, c in controls.items():
        cells = {p: {"mean": statistics.fmean(v["top1"] for v in c[p]),
                     "se": math.sqrt(sum(v["se"] ** 2 for v in c[p])) / len(c[p]),
                     "seed_std": statistics.stdev([v["top1"] for v in c[p]]) if len(c[p]) > 1 else 0.0}
                 for p in ("knn", "linear")}
        rows.append([f"control: {name}", "-", *[_cell(cells.get(p)) for p in probes], "-", "-", "-", "-", "-"])
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default="tiny", help="preset every objective starts from")
    p.add_argument("--steps", type=int, default=None, help="pretraining steps per run [1000; --quick: 20]")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds [0 1; --quick: 0]")
    p.add_argument("--objectives", nargs="+", default=None, choices=[*OBJECTIVES, RANDOM],
                   help=f"objectives to pretrain [all: {' '.join(OBJECTIVES)}]; random init is always added")
    p.add_argument("--train-clips", type=int, default=None, help="held-out clips the probes fit on [2000; --quick: 72]")
    p.add_argument("--val-clips", type=int, default=None, help="held-out clips the probes are scored on [1000; "
                                                               "--quick: 72]")
    p.add_argument("--no-attentive", action="store_true", help="skip the attentive probe")
    p.add_argument("--linear-epochs", type=int, default=None, help="linear probe epochs [100; --quick: 10]")
    p.add_argument("--attentive-epochs", type=int, default=None, help="attentive probe epochs [20; --quick: 3]")
    p.add_argument("--set", nargs="*", default=[], dest="overrides", metavar="KEY=VALUE",
                   help="config overrides for every run (e.g. optim.base_lr=1e-2)")
    p.add_argument("--jobs", type=int, default=2, help="pretraining processes at a time")
    p.add_argument("--quick", action="store_true", help="CI: 20 steps, one seed, small probe sets")
    p.add_argument("--out-dir", type=Path, default=None, help="folder for the runs [runs/representation]")
    p.add_argument("--reuse", action="store_true", help="probe runs already in --out-dir instead of training")
    p.add_argument("--json", type=Path, default=None, help="write the report here")
    args = p.parse_args(argv)
    q = args.quick
    # the full defaults are the recorded runs' (bench/results/representation_cpu_2000*.json): ~80 min on 2 CPU cores.
    # 2000 / 1000 probe clips: with 600 / 400 the attentive probe read nothing even from random init, and one SE of
    # a difference to it was ~1.8-2.1 points instead of ~1.3-1.5
    defaults = {"steps": (1000, 20), "seeds": ([0, 1], [0]), "train_clips": (2000, 72), "val_clips": (1000, 72),
                "linear_epochs": (100, 10), "attentive_epochs": (20, 3)}
    for k, (full, quick) in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, quick if q else full)
    if args.objectives is None:
        args.objectives = list(OBJECTIVES)
    if args.out_dir is None:
        args.out_dir = REPO / "runs" / ("representation_quick" if q else "representation")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    t_start = time.perf_counter()
    objectives = [o for o in args.objectives if o != RANDOM]
    options = ProbeOptions(linear_epochs=args.linear_epochs, attentive=not args.no_attentive,
                           attentive_epochs=args.attentive_epochs)
    probes = tuple(p for p in PROBES if p not in TOKEN_PROBES or options.attentive)

    jobs = []
    for seed in args.seeds:
        for obj in objectives:
            out = args.out_dir / f"{obj}_s{seed}"
            if args.reuse and (out / "checkpoints").is_dir():
                continue
            if out.exists():
                raise SystemExit(f"representation: {out} exists; remove it, choose another --out-dir, or --reuse")
            jobs.append((args.config, run_config(args.config, obj, seed, args.steps, out, args.overrides), out))
    seconds = run_all(jobs, args.jobs)

    rows, controls = [], {}
    for seed in args.seeds:
        base_cfg = load_config(args.config, [f"seed={seed}", *args.overrides])
        random_options = {**options.__dict__, "num_heads": base_cfg.model.num_heads}
        opts = ProbeOptions(**random_options)
        _log(f"probing random init, seed {seed}")
        row = {"objective": RANDOM, "seed": seed, "steps": 0,
               "probes": probe_encoder(base_cfg, random_init_state(base_cfg), args.train_clips, args.val_clips, opts)}
        row.update(pooled_cosine=row["probes"].pop("pooled_cosine"), token_change=row["probes"].pop("token_change",
                                                                                                   None))
        rows.append(row)
        for obj in objectives:
            run = args.out_dir / f"{obj}_s{seed}"
            _log(f"probing {run.name}")
            state, cfg = trained_state(run)
            last = read_metrics(run)[-1]
            base = loss_baselines(cfg)
            trained = cfg.loss.appearance_weight > 0  # the *_motion ablations' appearance head is not trained
            row = {"objective": obj, "seed": seed, "steps": last["step"], "overrides": OBJECTIVES[obj],
                   "loss_appearance": last["loss_appearance"] if trained else None,
                   "loss_motion": last["loss_motion"] if cfg.targets.motion != "none" else None,
                   "baseline_appearance": base["appearance"] if trained else None,
                   "baseline_motion": base.get("motion"),
                   "baselines": base, "train_seconds": seconds.get(run),
                   "probes": probe_encoder(cfg, state, args.train_clips, args.val_clips, opts)}
            row.update(pooled_cosine=row["probes"].pop("pooled_cosine"),
                       token_change=row["probes"].pop("token_change", None))
            rows.append(row)
        _log(f"probing the raw-pixel controls, seed {seed}")
        for name, c in probe_controls(base_cfg, args.train_clips, args.val_clips, opts).items():
            controls.setdefault(name, {"knn": [], "linear": []})
            for p in ("knn", "linear"):
                controls[name][p].append(c[p])

    summary = summarize(rows, probes)
    table = format_table(summary, controls, args.steps, probes)
    print(table)
    cfg0 = load_config(args.config, args.overrides)
    report = {
        "benchmark": "representation", "command": "python bench/representation.py " + " ".join(argv or sys.argv[1:]),
        "environment": {**environment(torch.device("cpu")), "threads": torch.get_num_threads()},
        "settings": {"config": args.config, "overrides": args.overrides, "steps": args.steps, "seeds": args.seeds,
                     "objectives": {o: OBJECTIVES[o] for o in objectives}, "train_clips": args.train_clips,
                     "val_clips": args.val_clips, "num_classes": len(MOTIONS), "chance": 100.0 / len(MOTIONS),
                     "probe_options": options.__dict__, "batch_size": cfg0.data.batch_size,
                     "num_samples": cfg0.data.num_samples, "quick": args.quick},
        "rows": rows, "summary": summary, "controls": controls, "table": table,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        _log(f"report written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
