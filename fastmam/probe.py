"""Frozen-feature probes of a pretrained encoder: kNN, linear and (optionally) attentive (DESIGN §11).

    python -m fastmam.probe runs/tiny --synthetic-train 512 --synthetic-val 256
    python -m fastmam.probe runs/mam2_vit_b --train-list ucf101/trainlist01.txt --val-list ucf101/testlist01.txt \\
        [--tag step_00100000] [--attentive] [--json probe.json]

The input is what ``python -m fastmam.export`` takes (a run folder, its ``checkpoints/``, or one checkpoint; the
newest complete checkpoint without ``--tag``; any ZeRO stage): the checkpoint is found, its config read and its
weights consolidated by ``fastmam.export``'s functions. Features: one view per video, the centre clip (the
loader's own frame rule with the start in the middle of its range, ``data.num_frames`` at ``data.stride``) and
the centre crop (``data.crop: center``) at ``data.img_size``, normalized with ``data.mean``/``data.std``; the
encoder on all tokens (no masking); the mean over tokens after the encoder's final norm. Labels come from the
annotation list (``fastmam.data.annotations``' formats; an HMDB51 split folder gives its train videos to
``--train-list`` and its test videos to ``--val-list``). Synthetic clips (``--synthetic-train N --synthetic-val
M``) are the run's own moving shapes (``fastmam.data.synthetic``) labelled by motion class, held out: item i of
that dataset depends only on (seed, i) and pretraining draws indices below ``data.num_samples``, so the probe
takes the indices from ``data.num_samples`` on (train first, then val).

Probes, on the fixed features (top-1 in percent):

- kNN (DINO's): cosine similarity to every train feature, the k most similar vote with weight exp(sim / T)
  (k=20, T=0.07). Ties: among neighbours as similar as the k-th one the lower train indices are taken; among
  classes with equal votes the lower class id wins.
- linear: BatchNorm1d(affine=False) + Linear, trained with AdamW (or SGD) and a cosine lr for a fixed number of
  epochs, from a seed; the batch norm's statistics are the average over all training batches.
- attentive (``--attentive``, V-JEPA's): one learned query cross-attends the token features (one block:
  cross-attention + MLP, pre-norm), then a linear head. It needs every token's feature: these are cached only
  when asked (N x tokens x D fp16: ~2.4 MB per ViT-B 16x224 clip).

Features are cached as fp16 in ``<run>/probe/<tag>/<name>.safetensors`` (``--cache-dir`` moves the ``probe``
folder, ``--no-cache`` skips it), ``<name>`` being ``synthetic-train`` / ``synthetic-val`` or the list's stem
and a hash of its path. The key, kept in the file's metadata (and copied to ``<name>.json`` for people), holds the
checkpoint (its tag, folder, and every file's size and mtime), the source (the list's path, format, root and a
SHA-256 of its content; or the synthetic seed and indices), the view (frames, stride, size, crop, mean, std,
tubelet, patch) and whether token features are stored. A cache whose key differs is rebuilt, with a line that
says which part changed; a fresh key is read without loading the weights.

During pretraining, ``eval.every_steps`` runs the kNN and linear probes on rank 0 (``TrainingProbe``) and logs
``probe_knn_top1`` / ``probe_linear_top1`` to the metrics.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .config import Config
from .data.annotations import AnnotationError, VideoList, detect_format, list_root, read_hmdb51, read_list
from .export import ExportError, consolidated_state, encoder_state, find_checkpoint, load_run_config
from .fileio import temporary_path, write_text_atomic
from .models.layers import LN_EPS, Block, CrossAttention, Mlp, sinusoid_table
from .models.mam import MaskedVideoModel
from .ops import normalize_patches, patchify_reference

#: bump when the features computed for the same key change (pooling, view rule)
CACHE_VERSION = 1
KEY_METADATA = "fastmam_probe_key"
OPTIMIZERS = ("adamw", "sgd")
DEFAULT_LR = {"adamw": 1e-3, "sgd": 0.1}


class ProbeError(RuntimeError):
    """The probe's input is wrong (no videos, an empty set, bad options); the message says what to change."""


def _log(msg: str) -> None:
    print(f"fastmam.probe: {msg}", file=sys.stderr, flush=True)


def _rng_devices(device: torch.device) -> list:
    """Devices whose RNG ``torch.random.fork_rng`` must save: the probe leaves every generator as it found it."""
    return [device] if device.type == "cuda" else []


# --------------------------------------------------------------------------- probes on fixed features


def knn_scores(train_x: torch.Tensor, train_y: torch.Tensor, query_x: torch.Tensor, num_classes: int, k: int = 20,
               temperature: float = 0.07, chunk_elements: int = 1 << 24) -> torch.Tensor:
    """Weighted kNN votes (DINO): train_x (N, D), train_y (N,) int64, query_x (Q, D) -> scores (Q, C) float32.

    Features are L2-normalized (cosine similarity). Query q's k most similar train features (k is capped at N) vote
    for their class with weight exp(sim / temperature). Neighbours as similar as the k-th one are taken in train
    order (a tie at the k-th place is decided by the lower train index, not by ``topk``'s unspecified choice). The
    prediction is ``scores.argmax(1)``: among tied classes, the lowest id. Queries go in chunks of about
    ``chunk_elements`` similarities."""
    if temperature <= 0:
        raise ProbeError(f"the kNN temperature must be > 0, got {temperature}")
    train = F.normalize(train_x.float(), dim=1)
    query = F.normalize(query_x.float(), dim=1)
    n = train.shape[0]
    k = min(k, n)
    labels = train_y.to(train.device)
    scores = torch.zeros(query.shape[0], num_classes, dtype=torch.float32, device=train.device)
    rows = max(1, chunk_elements // n)
    for start in range(0, query.shape[0], rows):
        sim = query[start:start + rows] @ train.T  # (q, N)
        kth = sim.topk(k, dim=1).values[:, -1:]  # (q, 1): the k-th largest similarity
        above, equal = sim > kth, sim == kth
        # all neighbours above the k-th similarity, then the first (k - their count) of those equal to it
        take = above | (equal & (equal.cumsum(1) <= k - above.sum(1, keepdim=True)))
        weights = torch.where(take, (sim / temperature).exp(), torch.zeros((), device=sim.device))
        scores[start:start + rows].scatter_add_(1, labels.expand_as(sim), weights)
    return scores


def top1(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent of scores (Q, C) against labels (Q,)."""
    return 100.0 * (scores.argmax(1) == labels.to(scores.device)).float().mean().item()


def _batches(n: int, batch_size: int, g: torch.Generator) -> list[torch.Tensor]:
    """A shuffled epoch in batches; a last batch of one sample joins the one before (a batch norm needs two)."""
    batches = list(torch.randperm(n, generator=g).split(batch_size))
    if len(batches) > 1 and len(batches[-1]) < 2:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


def _fit(model: nn.Module, inputs: Callable[[torch.Tensor], torch.Tensor], y: torch.Tensor, epochs: int, lr: float,
         weight_decay: float, optimizer: str, batch_size: int, g: torch.Generator) -> nn.Module:
    """Cross-entropy training of ``model`` on ``inputs(index batch)`` with a cosine lr; returns it in eval mode."""
    if optimizer not in OPTIMIZERS:
        raise ProbeError(f"optimizer '{optimizer}' is not one of {', '.join(OPTIMIZERS)}")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay) if optimizer == "adamw" else \
        torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    n = y.shape[0]
    steps = epochs * len(_batches(n, batch_size, torch.Generator().manual_seed(0)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    for _ in range(epochs):
        for idx in _batches(n, batch_size, g):
            idx = idx.to(y.device)
            loss = F.cross_entropy(model(inputs(idx)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def fit_linear_probe(x: torch.Tensor, y: torch.Tensor, num_classes: int, epochs: int = 100, lr: float | None = None,
                     weight_decay: float = 1e-4, optimizer: str = "adamw", batch_size: int = 256,
                     seed: int = 0) -> nn.Module:
    """BatchNorm1d(affine=False) + Linear trained on fixed features x (N, D) and labels y (N,) int64, on x's device.

    Deterministic given ``seed`` (initialization and batch order); the global RNGs are left as they were. The
    batch norm keeps the cumulative average of its batch statistics (momentum None): on fixed features that is
    their mean and variance. Returns the probe in eval mode: ``probe(x)`` -> (N, num_classes) logits."""
    if x.shape[0] < 2:
        raise ProbeError(f"the linear probe needs at least 2 training clips, got {x.shape[0]}")
    lr = DEFAULT_LR.get(optimizer, 1e-3) if lr is None else lr
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=_rng_devices(x.device)):
        probe = nn.Sequential(nn.BatchNorm1d(x.shape[1], affine=False, momentum=None),
                              nn.Linear(x.shape[1], num_classes))
        nn.init.trunc_normal_(probe[1].weight, std=0.01, generator=g)  # MAE's linear probe
        nn.init.zeros_(probe[1].bias)
    x = x.float()
    return _fit(probe.to(x.device), lambda idx: x[idx], y, epochs, lr, weight_decay, optimizer, batch_size, g)


class AttentiveProbe(nn.Module):
    """V-JEPA's attentive classifier: a learned query cross-attends the tokens, one pre-norm block, a linear head.

    tokens (B, N, D) -> logits (B, num_classes)."""

    def __init__(self, dim: int, num_heads: int, num_classes: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = CrossAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        q = self.query.expand(tokens.shape[0], -1, -1)
        q = q + self.attn(q, self.norm1(tokens))
        q = q + self.mlp(self.norm2(q))
        return self.head(q[:, 0])


def fit_attentive_probe(tokens: torch.Tensor, y: torch.Tensor, num_classes: int, num_heads: int, epochs: int = 20,
                        lr: float = 1e-3, weight_decay: float = 0.01, batch_size: int = 64,
                        seed: int = 0) -> AttentiveProbe:
    """``AttentiveProbe`` trained with AdamW on token features (N, Ntok, D) (fp16 is cast per batch), labels (N,)."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=_rng_devices(tokens.device)):
        torch.manual_seed(seed)
        probe = AttentiveProbe(tokens.shape[-1], num_heads, num_classes)
        nn.init.trunc_normal_(probe.query, std=0.02, generator=g)
    return _fit(probe.to(tokens.device), lambda idx: tokens[idx].float(), y, epochs, lr, weight_decay, "adamw",
                batch_size, g)


# --------------------------------------------------------------------------- the frozen encoder


class FrozenEncoder(nn.Module):
    """The pretrained encoder alone (``MaskedVideoModel``'s ``patch_embed``, ``blocks``, ``norm``: the names of
    ``fastmam.export.encoder_state``), run on every token of a clip; its math is ``MaskedVideoModel.forward_encoder``
    itself. Attention is always SDPA: features do not depend on the backend the run trained with."""

    forward_encoder = MaskedVideoModel.forward_encoder

    def __init__(self, cfg: Config, in_chans: int = 3):
        super().__init__()
        m, d = cfg.model, cfg.data
        self.cfg = m
        self.mean, self.std, self.in_chans = d.mean, d.std, in_chans
        self.num_tokens = cfg.num_tokens
        self.patch_embed = nn.Linear(m.tubelet * m.patch * m.patch * in_chans, m.embed_dim)
        self.register_buffer("pos_embed", sinusoid_table(self.num_tokens, m.embed_dim), persistent=False)
        self.blocks = nn.ModuleList(Block(m.embed_dim, m.num_heads, m.mlp_ratio, m.qkv_bias) for _ in range(m.depth))
        self.norm = nn.LayerNorm(m.embed_dim, eps=LN_EPS)

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        """clip: (B, T, H, W, C) uint8 of the run's geometry -> tokens (B, N, D) after the final norm."""
        patches = patchify_reference(clip, self.cfg.tubelet, self.cfg.patch)
        patches = normalize_patches(patches, self.mean, self.std, self.in_chans, self.patch_embed.weight.dtype)
        b, n = patches.shape[:2]
        if n != self.num_tokens:
            raise ProbeError(f"a clip of shape {tuple(clip.shape)} gives {n} tokens; the encoder was built for "
                             f"{self.num_tokens} (data.num_frames, data.img_size of the run)")
        return self.forward_encoder(patches, torch.arange(n, device=clip.device).expand(b, n))


def load_encoder(cfg: Config, state: dict[str, torch.Tensor], device: torch.device) -> FrozenEncoder:
    """A ``FrozenEncoder`` with ``state`` (encoder names), fp32, in eval mode on ``device``; global RNGs untouched."""
    with torch.random.fork_rng(devices=[]):  # module construction draws initial weights, which are replaced
        encoder = FrozenEncoder(cfg)
    encoder.load_state_dict({k: v.float() for k, v in state.items()})
    return encoder.to(device).eval().requires_grad_(False)


def gather_encoder_state(model: nn.Module, keep: bool, device: torch.device | None = None
                         ) -> dict[str, torch.Tensor] | None:
    """fp32 copies of the encoder weights of a training ``MaskedVideoModel`` (encoder names) where ``keep``, else None.

    Collective under ZeRO-3, where each rank holds a slice of every weight: every rank must call it.
    ``deepspeed.zero.GatheredParameters`` assembles one module's weights at a time (the patch embedding, each block,
    the norm) on every rank, ``keep`` ranks copy them, and the slices are restored at the context's exit. For ZeRO
    0-2 the weights are whole on every rank and the context does nothing."""
    import deepspeed

    parts = [("patch_embed.", model.patch_embed), *((f"blocks.{i}.", b) for i, b in enumerate(model.blocks)),
             ("norm.", model.norm)]
    out: dict[str, torch.Tensor] = {}
    for prefix, module in parts:
        params = dict(module.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
            if keep:
                out.update({prefix + name: p.detach().to(device=device or p.device, dtype=torch.float32, copy=True)
                            for name, p in params.items()})
    return out if keep else None


# --------------------------------------------------------------------------- clips of a probe set


class _Centre:
    """Stands in for the generator of ``sampling.sample_frame_indices``: each draw is the middle of its range, so
    the loaders' own rule (stride, short videos) gives the centre clip."""

    @staticmethod
    def integers(low: int, high: int | None = None) -> int:
        low, high = (0, low) if high is None else (low, high)
        return (low + high - 1) // 2


class SyntheticClips(Dataset):
    """Items ``first .. first + count - 1`` of the run's ``SyntheticShapes`` (label = motion class)."""

    def __init__(self, cfg: Config, first: int, count: int):
        from .data.synthetic import SyntheticShapes

        d = cfg.data
        self.first, self.count = first, count
        self.shapes = SyntheticShapes(first + count, d.num_frames, d.img_size, d.img_size, seed=cfg.seed)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict:
        item = self.shapes[self.first + i]
        return {"video": item["video"], "label": item["label"], "ok": True, "path": "", "reason": ""}


class VideoClips(Dataset):
    """The centre view of each video of a list: centre clip, centre crop, at the run's frames, stride and size.

    A video that cannot give its frames (``decode.probe``'s rule, a failed decode, too short under
    ``short_videos: skip``) is reported (``ok`` False) and left out of the features, never replaced."""

    def __init__(self, cfg: Config, videos: VideoList):
        from .data.sampling import spec_from_config

        self.videos = videos
        self.spec = dataclasses.replace(spec_from_config(cfg), crop="center", flip=False, repeated=1, dense=False)
        self.backend = "pyav" if cfg.data.backend == "dali" else cfg.data.backend
        self.threads = cfg.data.decode_threads

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, i: int) -> dict:
        from .data.decode import BadVideo, decoder, probe
        from .data.sampling import TooShort, apply_crop, sample_crop, sample_frame_indices

        path, label, s = self.videos.paths[i], self.videos.labels[i], self.spec
        try:
            n = probe(path).frames
            indices = sample_frame_indices(n, s.num_frames, s.stride, _Centre(), s.short_videos)
            frames = torch.from_numpy(decoder(self.backend)(path, indices, self.threads))
        except (BadVideo, TooShort) as exc:
            return {"video": torch.zeros(0, dtype=torch.uint8), "label": label, "ok": False, "path": path,
                    "reason": str(exc)}
        box = sample_crop(_Centre(), frames.shape[1], frames.shape[2], s)
        return {"video": apply_crop(frames, box, s.img_size), "label": label, "ok": True, "path": path, "reason": ""}


@dataclass
class ClipSource:
    """One probe split: its clips, a name (the cache file's stem), what it is (for logs) and its cache identity."""

    name: str
    dataset: Dataset
    describe: str
    identity: dict


def synthetic_sources(cfg: Config, num_train: int, num_val: int) -> tuple[ClipSource, ClipSource]:
    """Held-out synthetic clips: indices from ``data.num_samples`` on (pretraining draws only below it)."""
    for what, n in (("train", num_train), ("val", num_val)):
        if n < 1:
            raise ProbeError(f"--synthetic-{what} (eval.synthetic_{what}) must be at least 1, got {n}")
    first = cfg.data.num_samples
    out = []
    for role, start, n in (("train", first, num_train), ("val", first + num_train, num_val)):
        identity = {"synthetic": {"seed": cfg.seed, "first": start, "count": n}}
        out.append(ClipSource(f"synthetic-{role}", SyntheticClips(cfg, start, n),
                              f"{n} synthetic clips (items {start}..{start + n - 1})", identity))
    return out[0], out[1]


def _content_hash(path: Path) -> str:
    """SHA-256 of a list file, or of a folder's files (names and bytes, sorted: HMDB51's split folder)."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]:
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def list_source(cfg: Config, list_path: str | Path, role: str, data_root: str = "", fmt: str = "auto",
                hmdb51_split: int | None = None, log: Callable[[str], None] = _log) -> ClipSource:
    """A probe split from an annotation list (``role``: train or val; an HMDB51 folder gives its train or test
    subset). Fails when the list names no video that exists; warns about the missing ones (they are skipped)."""
    path = Path(list_path).expanduser()
    split = hmdb51_split or cfg.data.hmdb51_split
    resolved = detect_format(path) if fmt == "auto" and path.exists() else fmt
    if resolved == "hmdb51" and path.is_dir():
        videos = read_hmdb51(path, list_root(path, data_root), split, subset=1 if role == "train" else 2)
        if not len(videos):
            raise AnnotationError(f"HMDB51 split folder {path} (split {split}) lists no {role} videos")
    else:
        videos = read_list(path, data_root, fmt, split)
    missing = [p for p in videos.paths if not os.path.exists(p)]
    root = list_root(path, data_root)
    if len(missing) == len(videos):
        raise ProbeError(
            f"none of the {len(videos)} videos of {path} exists (e.g. {missing[0]}); the list has labels but no "
            f"videos under {root}: pass --data-root (eval.data_root) with the folder its relative paths start from")
    if missing:
        log(f"warning: {len(missing)} of the {len(videos)} videos of {path} do not exist (e.g. {missing[0]}); they "
            "are left out")
    identity = {"list": str(path.resolve()), "format": resolved, "root": str(root.resolve()),
                "hmdb51_split": split if resolved == "hmdb51" else None, "sha256": _content_hash(path)}
    stem = hashlib.sha256(json.dumps([identity[k] for k in ("list", "format", "root", "hmdb51_split")]).encode())
    name = f"{path.stem}-{stem.hexdigest()[:12]}"
    return ClipSource(name, VideoClips(cfg, videos), f"{len(videos)} videos of {path}", identity)


# --------------------------------------------------------------------------- features and their cache


@dataclass
class Features:
    """pooled: (N, D) fp16 mean of the tokens after the final norm; labels: (N,) int64; tokens: (N, Ntok, D) fp16
    or None; skipped: (path, reason) of the videos left out."""

    pooled: torch.Tensor
    labels: torch.Tensor
    tokens: torch.Tensor | None = None
    skipped: list = dataclasses.field(default_factory=list)


def _collate(items: list[dict]) -> dict:
    good = [it for it in items if it["ok"]]
    return {"video": torch.stack([it["video"] for it in good]) if good else None,
            "label": torch.tensor([it["label"] for it in good], dtype=torch.int64),
            "bad": [(it["path"], it["reason"]) for it in items if not it["ok"]]}


def _autocast(device: torch.device):
    # bf16 on a GPU (the precision the run trained in); fp32 on CPU
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


@torch.inference_mode()
def extract_features(encoder: nn.Module, source: ClipSource, batch_size: int = 16, num_workers: int = 0,
                     keep_tokens: bool = False, device: torch.device | None = None) -> Features:
    """The encoder's features of every clip of ``source`` (``Features``), in the source's order."""
    device = device or next(encoder.parameters()).device
    loader = DataLoader(source.dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=_collate, prefetch_factor=2 if num_workers > 0 else None)
    pooled, labels, tokens, skipped = [], [], [], []
    for batch in loader:
        skipped += batch["bad"]
        if batch["video"] is None:
            continue
        with _autocast(device):
            out = encoder(batch["video"].to(device, non_blocking=True))
        pooled.append(out.float().mean(1).half().cpu())
        labels.append(batch["label"])
        if keep_tokens:
            tokens.append(out.half().cpu())
    if not pooled:
        examples = "; ".join(f"{p}: {r}" for p, r in skipped[:3])
        raise ProbeError(f"none of the {len(skipped)} clips of {source.describe} could be read ({examples}); check "
                         "the files, or rebuild the list with `python -m fastmam.data.prepare`")
    return Features(torch.cat(pooled), torch.cat(labels), torch.cat(tokens) if keep_tokens else None, skipped)


def checkpoint_key(ckpt_dir: Path, tag: str) -> dict:
    """What identifies a checkpoint's weights cheaply: its tag, folder, and each file's size and mtime (ns)."""
    tag_dir = Path(ckpt_dir) / tag
    files = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(tag_dir.iterdir()) if p.is_file()]
    return {"tag": tag, "dir": str(tag_dir.resolve()), "files": files}


def view_key(cfg: Config) -> dict:
    """Everything about the run's config that changes a feature."""
    d, m = cfg.data, cfg.model
    return {"num_frames": d.num_frames, "stride": d.stride, "img_size": d.img_size, "crop": "center",
            "clip": "centre", "short_videos": d.short_videos, "mean": list(d.mean), "std": list(d.std),
            "tubelet": m.tubelet, "patch": m.patch, "pooling": "mean of tokens after the final norm"}


def read_cache_key(path: Path) -> dict | None:
    """The key stored in a feature cache's metadata, None when there is no readable cache."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get(KEY_METADATA, "null"))
    except Exception:  # a cut or foreign file (safetensors' own error, or bad JSON): no usable cache
        return None


def _key_fits(stored: dict | None, wanted: dict) -> list[str]:
    """The parts of the key that differ ([] when the cache serves; one holding tokens serves one without)."""
    if stored is None:
        return ["no cache"]
    parts = [k for k in sorted(set(stored) | set(wanted)) if k != "tokens" and stored.get(k) != wanted.get(k)]
    if wanted.get("tokens") and not stored.get("tokens"):
        parts.append("tokens (none stored)")
    return parts


def save_features(path: Path, features: Features, key: dict) -> None:
    """Write the features (fp16) with ``key`` in the file's metadata (atomic), then a JSON copy beside it."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"features": features.pooled.contiguous(), "labels": features.labels.contiguous()}
    if features.tokens is not None:
        tensors["tokens"] = features.tokens.contiguous()
    tmp = temporary_path(path)
    try:
        save_file(tensors, str(tmp), metadata={KEY_METADATA: json.dumps(key), "skipped": json.dumps(features.skipped)})
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    info = {"key": key, "clips": int(features.labels.shape[0]), "skipped": features.skipped,
            "feature_dim": int(features.pooled.shape[1])}
    write_text_atomic(path.with_suffix(".json"), json.dumps(info, indent=2) + "\n")


def load_features(path: Path) -> Features:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        tokens = f.get_tensor("tokens") if "tokens" in f.keys() else None
        skipped = json.loads((f.metadata() or {}).get("skipped", "[]"))
        return Features(f.get_tensor("features"), f.get_tensor("labels"), tokens, [tuple(s) for s in skipped])


def cached_features(path: Path | None, key: dict, extract: Callable[[], Features],
                    log: Callable[[str], None] = _log) -> tuple[Features, str]:
    """Features from the cache at ``path`` when its key fits ``key``, else from ``extract()`` (then written there).

    Returns (features, what happened: ``cached``, ``built``, ``rebuilt`` or ``uncached``)."""
    if path is None:
        return extract(), "uncached"
    differs = _key_fits(read_cache_key(path), key)
    if not differs:
        log(f"features from the cache {path}")
        return load_features(path), "cached"
    status = "built"
    if path.exists():
        status = "rebuilt"
        log(f"the cache {path} does not fit this request (it differs in: {', '.join(differs)}); extracting the "
            "features again")
    features = extract()
    save_features(path, features, key)
    return features, status


# --------------------------------------------------------------------------- the probes on a train/val pair


@dataclass(frozen=True)
class ProbeOptions:
    knn_k: int = 20
    knn_temperature: float = 0.07
    linear_epochs: int = 100
    linear_lr: float | None = None  # adamw 1e-3, sgd 0.1
    linear_weight_decay: float = 1e-4
    linear_optimizer: str = "adamw"
    linear_batch_size: int = 256
    seed: int = 0
    attentive: bool = False
    attentive_epochs: int = 20
    attentive_lr: float = 1e-3
    attentive_batch_size: int = 64
    num_heads: int | None = None  # the attentive probe's; None: the encoder's

    def check(self) -> None:
        if self.knn_k < 1:
            raise ProbeError(f"the kNN k must be at least 1, got {self.knn_k}")
        if self.knn_temperature <= 0:
            raise ProbeError(f"the kNN temperature must be > 0, got {self.knn_temperature}")
        if self.linear_optimizer not in OPTIMIZERS:
            raise ProbeError(f"the linear optimizer '{self.linear_optimizer}' is not one of {', '.join(OPTIMIZERS)}")
        for name in ("linear_epochs", "linear_batch_size", "attentive_epochs", "attentive_batch_size"):
            if getattr(self, name) < 1:
                raise ProbeError(f"{name} must be at least 1, got {getattr(self, name)}")


def evaluate(train: Features, val: Features, options: ProbeOptions, device: torch.device | None = None,
             log: Callable[[str], None] = _log) -> dict:
    """kNN, linear and (``options.attentive``) attentive top-1 (percent) on ``val`` of probes fit on ``train``."""
    options.check()
    device = device or torch.device("cpu")
    train_y, val_y = train.labels.to(device), val.labels.to(device)
    num_classes = int(max(train.labels.max(), val.labels.max())) + 1
    absent = sorted(set(val.labels.tolist()) - set(train.labels.tolist()))
    if absent:
        count = int(sum((val.labels == c).sum() for c in absent))
        log(f"warning: {count} val clip(s) have classes that no train clip has ({', '.join(map(str, absent[:10]))}"
            f"{' ...' if len(absent) > 10 else ''}); no probe can get them right")
    train_x, val_x = train.pooled.to(device).float(), val.pooled.to(device).float()
    result = {"num_classes": num_classes, "train_clips": int(train_y.shape[0]), "val_clips": int(val_y.shape[0]),
              "feature_dim": int(train_x.shape[1]), "val_classes_absent_from_train": absent}
    t0 = time.perf_counter()
    scores = knn_scores(train_x, train_y, val_x, num_classes, options.knn_k, options.knn_temperature)
    result["knn"] = {"top1": top1(scores, val_y), "k": min(options.knn_k, train_x.shape[0]),
                     "temperature": options.knn_temperature, "seconds": round(time.perf_counter() - t0, 3)}
    t0 = time.perf_counter()
    lr = DEFAULT_LR[options.linear_optimizer] if options.linear_lr is None else options.linear_lr
    linear = fit_linear_probe(train_x, train_y, num_classes, options.linear_epochs, lr, options.linear_weight_decay,
                              options.linear_optimizer, options.linear_batch_size, options.seed)
    with torch.no_grad():
        result["linear"] = {"top1": top1(linear(val_x), val_y), "epochs": options.linear_epochs, "lr": lr,
                            "weight_decay": options.linear_weight_decay, "optimizer": options.linear_optimizer,
                            "seed": options.seed, "seconds": round(time.perf_counter() - t0, 3)}
    if options.attentive:
        if train.tokens is None or val.tokens is None:
            raise ProbeError("the attentive probe needs token features; extract them with keep_tokens=True")
        t0 = time.perf_counter()
        tokens = train.tokens.to(device)
        heads = options.num_heads or 1
        attentive = fit_attentive_probe(tokens, train_y, num_classes, heads, options.attentive_epochs,
                                        options.attentive_lr, batch_size=options.attentive_batch_size,
                                        seed=options.seed)
        with torch.no_grad():
            val_tokens = val.tokens.to(device)
            logits = torch.cat([attentive(val_tokens[i:i + 256].float()) for i in range(0, len(val_tokens), 256)])
        result["attentive"] = {"top1": top1(logits, val_y), "epochs": options.attentive_epochs,
                               "lr": options.attentive_lr, "num_heads": heads, "seed": options.seed,
                               "seconds": round(time.perf_counter() - t0, 3)}
    return result


# --------------------------------------------------------------------------- a checkpoint, from the command line


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ProbeError("--device cuda was requested but no CUDA GPU is visible; use --device auto or cpu")
    return torch.device(name)


def probe_checkpoint(path: str | Path, *, tag: str | None = None, train_list: str | None = None,
                     val_list: str | None = None, data_root: str = "", list_format: str = "auto",
                     hmdb51_split: int | None = None, synthetic_train: int = 0, synthetic_val: int = 0,
                     options: ProbeOptions = ProbeOptions(), batch_size: int = 16, num_workers: int = 2,
                     device: str = "auto", cache: bool = True, cache_dir: str | Path | None = None,
                     log: Callable[[str], None] = _log) -> dict:
    """Probe one checkpoint of a run (see the module docstring); returns the report (``main`` prints and writes it)."""
    if bool(train_list) != bool(val_list):
        raise ProbeError("pass both --train-list and --val-list (or --synthetic-train and --synthetic-val)")
    if train_list and (synthetic_train or synthetic_val):
        raise ProbeError("pass either annotation lists (--train-list/--val-list) or synthetic clip counts "
                         "(--synthetic-train/--synthetic-val), not both")
    if not train_list and not (synthetic_train or synthetic_val):
        raise ProbeError("nothing to probe on: pass --train-list and --val-list (annotation lists), or "
                         "--synthetic-train N --synthetic-val M (held-out synthetic clips, labelled by motion class)")
    ckpt_dir, tag, run_dir = find_checkpoint(path, tag)
    cfg = load_run_config(ckpt_dir, tag, run_dir)
    if options.num_heads is None:
        options = dataclasses.replace(options, num_heads=cfg.model.num_heads)
    options.check()
    dev = _device(device)
    if train_list:
        sources = [list_source(cfg, train_list, "train", data_root, list_format, hmdb51_split, log),
                   list_source(cfg, val_list, "val", data_root, list_format, hmdb51_split, log)]
    else:
        sources = list(synthetic_sources(cfg, synthetic_train, synthetic_val))
    folder = Path(cache_dir) if cache_dir else (run_dir or ckpt_dir.parent) / "probe"
    base_key = {"version": CACHE_VERSION, "checkpoint": checkpoint_key(ckpt_dir, tag), "view": view_key(cfg),
                "tokens": options.attentive}
    encoder: list[FrozenEncoder] = []  # loaded on the first extraction only: a cache hit never reads the weights

    def extract(source: ClipSource) -> Features:
        if not encoder:
            log(f"loading the encoder of {ckpt_dir / tag}")
            encoder.append(load_encoder(cfg, encoder_state(consolidated_state(ckpt_dir, tag), cfg), dev))
        log(f"extracting features of {source.describe}")
        return extract_features(encoder[0], source, batch_size, num_workers, options.attentive, dev)

    features, status = [], {}
    t0 = time.perf_counter()
    for role, source in zip(("train", "val"), sources, strict=True):
        where = folder / tag / f"{source.name}.safetensors" if cache else None
        f, status[role] = cached_features(where, {**base_key, "source": source.identity}, lambda s=source: extract(s),
                                          log)
        if f.skipped:
            log(f"warning: {len(f.skipped)} video(s) of {source.describe} could not be read and are left out "
                f"(e.g. {f.skipped[0][0]}: {f.skipped[0][1]})")
        features.append(f)
    seconds = time.perf_counter() - t0
    result = evaluate(features[0], features[1], options, dev, log)
    step = int(tag.split("_")[-1]) if tag.startswith("step_") and tag.split("_")[-1].isdigit() else None
    splits = {role: {"source": s.describe, "clips": result[f"{role}_clips"], "skipped": len(f.skipped),
                     "cache": status[role]} for role, s, f in zip(("train", "val"), sources, features, strict=True)}
    return {"checkpoint": str((ckpt_dir / tag).resolve()), "tag": tag, "step": step, "run": cfg.name, **splits,
            "features_seconds": round(seconds, 3), "device": str(dev), **result}


def format_table(report: dict) -> str:
    """The report as a few lines of text."""
    rows = [("probe", "top-1 %", "settings"),
            ("kNN", f"{report['knn']['top1']:.2f}",
             f"k={report['knn']['k']}, T={report['knn']['temperature']}, cosine"),
            ("linear", f"{report['linear']['top1']:.2f}",
             f"BN+Linear, {report['linear']['optimizer']} lr {report['linear']['lr']:g}, "
             f"{report['linear']['epochs']} epochs, seed {report['linear']['seed']}")]
    if "attentive" in report:
        a = report["attentive"]
        rows.append(("attentive", f"{a['top1']:.2f}", f"1 query, {a['num_heads']} heads, {a['epochs']} epochs, "
                                                      f"AdamW lr {a['lr']:g}, seed {a['seed']}"))
    lines = [f"{a:<10} {b:>8}   {c}" for a, b, c in rows]
    lines.append(f"{report['tag']} of {report['run']}: train {report['train']['clips']} clips "
                 f"({report['train']['cache']}), val {report['val']['clips']} clips ({report['val']['cache']}), "
                 f"{report['num_classes']} classes, {report['feature_dim']}-d features")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastmam.probe", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("path", help="run folder (output_dir), its checkpoints/ folder, or one checkpoint folder")
    p.add_argument("--tag", default=None, help="checkpoint tag (step_<N>); default: the newest complete one")
    g = p.add_argument_group("data: annotation lists, or held-out synthetic clips")
    g.add_argument("--train-list", default=None, help="annotation list the probes are fit on")
    g.add_argument("--val-list", default=None, help="annotation list the probes are scored on")
    g.add_argument("--data-root", default="", help="folder the lists' relative paths start from; '' = each list's")
    g.add_argument("--list-format", default="auto", choices=("auto", "videomae", "ucf101", "hmdb51", "ssv2_json"))
    g.add_argument("--hmdb51-split", type=int, default=None, help="HMDB51 split (default: the run's data.hmdb51_split)")
    g.add_argument("--synthetic-train", type=int, default=0, help="held-out synthetic clips to fit on")
    g.add_argument("--synthetic-val", type=int, default=0, help="held-out synthetic clips to score on")
    g = p.add_argument_group("probes")
    g.add_argument("--knn-k", type=int, default=20)
    g.add_argument("--knn-temperature", type=float, default=0.07)
    g.add_argument("--linear-epochs", type=int, default=100)
    g.add_argument("--linear-lr", type=float, default=None, help="default: 1e-3 (adamw), 0.1 (sgd)")
    g.add_argument("--linear-weight-decay", type=float, default=1e-4)
    g.add_argument("--linear-optimizer", choices=OPTIMIZERS, default="adamw")
    g.add_argument("--linear-batch-size", type=int, default=256)
    g.add_argument("--seed", type=int, default=0, help="the trained probes' initialization and batch order")
    g.add_argument("--attentive", action="store_true", help="also the attentive probe (caches token features)")
    g.add_argument("--attentive-epochs", type=int, default=20)
    g.add_argument("--attentive-lr", type=float, default=1e-3)
    g = p.add_argument_group("running")
    g.add_argument("--batch-size", type=int, default=16, help="clips per encoder call")
    g.add_argument("--num-workers", type=int, default=2, help="DataLoader workers that decode the videos")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g.add_argument("--cache-dir", default=None, help="feature cache folder; default: <run>/probe")
    g.add_argument("--no-cache", action="store_true", help="extract the features again and store nothing")
    g.add_argument("--json", default=None, help="write the report to this JSON file")
    args = p.parse_args(argv)
    options = ProbeOptions(knn_k=args.knn_k, knn_temperature=args.knn_temperature, linear_epochs=args.linear_epochs,
                           linear_lr=args.linear_lr, linear_weight_decay=args.linear_weight_decay,
                           linear_optimizer=args.linear_optimizer, linear_batch_size=args.linear_batch_size,
                           seed=args.seed, attentive=args.attentive,
                           attentive_epochs=args.attentive_epochs, attentive_lr=args.attentive_lr)
    try:
        report = probe_checkpoint(
            args.path, tag=args.tag, train_list=args.train_list, val_list=args.val_list, data_root=args.data_root,
            list_format=args.list_format, hmdb51_split=args.hmdb51_split, synthetic_train=args.synthetic_train,
            synthetic_val=args.synthetic_val, options=options, batch_size=args.batch_size,
            num_workers=args.num_workers, device=args.device, cache=not args.no_cache, cache_dir=args.cache_dir)
    except (ProbeError, ExportError, AnnotationError) as exc:
        print(f"fastmam.probe: {exc}", file=sys.stderr)
        return 2
    print(format_table(report))
    if args.json:
        write_text_atomic(args.json, json.dumps(report, indent=2) + "\n")
        print(f"fastmam.probe: report written to {args.json}")
    return 0


# --------------------------------------------------------------------------- the pretraining hook


class TrainingProbe:
    """``eval.every_steps`` of ``fastmam/pretrain.py``: kNN and linear probes of the current weights.

    Built on every rank before the first step (a list that names no existing video fails every rank at once).
    ``__call__`` is collective (the encoder weights are gathered under ZeRO-3, ``gather_encoder_state``); rank 0
    then copies them into a ``FrozenEncoder`` and probes it. The training module is never touched: no mode switch,
    no weight change; features are extracted under ``torch.inference_mode``, and every global RNG (CPU, and the
    device's) is restored afterwards, so the run's losses and data order are those of a run without probes."""

    def __init__(self, cfg: Config, device: torch.device, log: Callable[[str], None] = _log):
        e = cfg.eval
        self.cfg, self.device = cfg, device
        self._logged: set[str] = set()

        def log_once(msg: str) -> None:  # a warning about the eval data would repeat at every probe
            if msg not in self._logged:
                self._logged.add(msg)
                log(msg)

        self.log = log_once
        if e.train_list:
            self.sources = (list_source(cfg, e.train_list, "train", e.data_root, e.list_format, log=log),
                            list_source(cfg, e.val_list, "val", e.data_root, e.list_format, log=log))
        else:
            self.sources = synthetic_sources(cfg, e.synthetic_train, e.synthetic_val)
        self.options = ProbeOptions(knn_k=e.knn_k, knn_temperature=e.knn_temperature, linear_epochs=e.linear_epochs,
                                    linear_lr=e.linear_lr, linear_optimizer=e.linear_optimizer, seed=e.seed)
        self.options.check()

    def __call__(self, model: nn.Module, is_main: bool) -> dict[str, float]:
        """model: the training ``MaskedVideoModel`` (``engine.module.model``) -> the metrics on rank 0, {} elsewhere."""
        t0 = time.perf_counter()
        state = gather_encoder_state(model, keep=is_main, device=self.device)
        if not is_main:
            return {}
        e = self.cfg.eval
        with torch.random.fork_rng(devices=_rng_devices(self.device)):
            encoder = load_encoder(self.cfg, state, self.device)
            del state
            train, val = [extract_features(encoder, s, e.batch_size, self.cfg.data.num_workers, False, self.device)
                          for s in self.sources]
            for source, features in zip(self.sources, (train, val), strict=True):
                if features.skipped:
                    self.log(f"warning: {len(features.skipped)} video(s) of {source.describe} could not be read and "
                             f"are left out of the probes (e.g. {features.skipped[0][0]}: {features.skipped[0][1]})")
            result = evaluate(train, val, self.options, self.device, self.log)
        return {"probe_knn_top1": result["knn"]["top1"], "probe_linear_top1": result["linear"]["top1"],
                "probe_seconds": time.perf_counter() - t0}


if __name__ == "__main__":
    sys.exit(main())
