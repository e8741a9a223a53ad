"""Where a classifier's encoder comes from (``init.checkpoint``), read safely and loaded strictly.

Sources, told apart by what they hold:

- a fastmam pretraining run: its folder, ``checkpoints/`` or one checkpoint (any ZeRO stage, consolidated by
  ``fastmam.export``; the newest complete checkpoint unless ``init.tag``); its ``config.yaml`` gives the geometry;
- a folder written by ``python -m fastmam.export`` (``model.safetensors`` + ``config.json``, either format);
- a file: ``.safetensors``, or a ``.pth`` / ``.pt`` / ``.bin`` of the VideoMAE repository (``{"model": ...}`` or
  ``{"module": ...}`` or a bare state dict; ``module.``, ``backbone.``, ``encoder.``, ``videomae.`` prefixes are
  stripped as VideoMAE's ``run_class_finetuning.py`` does). Pickles are read with ``weights_only=True``, else by the
  restricted unpickler of the VQGAN loader: a file never runs code when read.

Names are converted to ours (``patch_embed`` as a Linear over (t, p, p, C), ``blocks.N.attn.qkv`` with ``q_bias`` /
``v_bias``). Then, strictly: every encoder weight of the configured model must be there with its shape (missing and
misshaped keys are named, with the architecture the checkpoint has); a key that is neither ours nor a known
pretraining-only part (decoder, regressor, mask token, pretraining heads) is unexpected and named; a checkpoint
that already has a classification head (``head``, ``fc_norm``, ``classifier``) is a fine-tuned one and stops the
run unless ``init.finetuned: drop_head``. Positions: a fixed sinusoid table is rebuilt for this run's token grid (a
log line says when the grid differs from pretraining's); a learned table (``pos_embed`` in the checkpoint) needs
``classifier.pos_embed: learned`` and is interpolated to this grid (trilinear), with a log line.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from ..models.layers import sinusoid_table
from .config import FinetuneConfig
from .model import VideoClassifier, resize_pos_embed, token_grid

#: keys of a pretraining checkpoint that are not the encoder (MAE / VideoMAE / MAM2 / our Pretrainer)
PRETRAINING_ONLY = ("decoder", "encoder_to_decoder", "mask_token", "regressor", "appearance_", "motion_", "head_",
                    "pixel_head", "norm.")
#: keys that only a classifier has
HEAD_KEYS = ("head.", "fc_norm.", "classifier.")
PREFIXES = ("module.", "backbone.", "encoder.", "videomae.", "model.")


class InitError(RuntimeError):
    """``init.checkpoint`` cannot initialize this classifier; the message names the keys or the file and the fix."""


@dataclass
class Pretrained:
    """An encoder state in our names (``patch_embed.weight`` (D, t*p*p*C), ``blocks.N.*``, optionally ``pos_embed``
    (N0, D), ``norm.*``, and head keys of a fine-tuned checkpoint), where it came from, and the token grid it was
    trained on when known."""

    state: dict[str, torch.Tensor]
    source: str
    kind: str
    grid: tuple[int, int, int] | None = None
    unused: list[str] = field(default_factory=list)  # pretraining-only keys left out


def _conv_to_linear(w: torch.Tensor) -> torch.Tensor:
    """Conv3d patch kernel (D, C, t, p, p) -> our Linear weight (D, t*p*p*C)."""
    return w.permute(0, 2, 3, 4, 1).reshape(w.shape[0], -1).contiguous()


def from_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face ``VideoMAEModel`` names -> ours (the inverse of ``fastmam.export.to_hf``); keys it does not know
    are returned unchanged."""
    out, rest = {}, dict(state)
    conv = rest.pop("embeddings.patch_embeddings.projection.weight", None)
    if conv is not None:
        out["patch_embed.weight"] = _conv_to_linear(conv)
        out["patch_embed.bias"] = rest.pop("embeddings.patch_embeddings.projection.bias")
    layers = sorted({int(k.split(".")[2]) for k in rest if k.startswith("encoder.layer.")})
    for i in layers:
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        att = src + "attention.attention."
        q, k, v = (rest.pop(att + n + ".weight") for n in ("query", "key", "value"))
        out[dst + "attn.qkv.weight"] = torch.cat([q, k, v])
        for ours, names in (("q_bias", ("query.bias", "q_bias")), ("v_bias", ("value.bias", "v_bias"))):
            for n in names:
                if att + n in rest:
                    out[dst + "attn." + ours] = rest.pop(att + n)
        if att + "key.bias" in rest:
            kb = rest.pop(att + "key.bias")
            if kb.abs().max() > 0:
                raise InitError(f"{att}key.bias is not zero: our attention has no key bias (VideoMAE's qkv)")
        for theirs, ours in (("attention.output.dense", "attn.proj"), ("intermediate.dense", "mlp.fc1"),
                             ("output.dense", "mlp.fc2"), ("layernorm_before", "norm1"), ("layernorm_after", "norm2")):
            for w in ("weight", "bias"):
                if src + theirs + "." + w in rest:
                    out[dst + ours + "." + w] = rest.pop(src + theirs + "." + w)
    for w in ("weight", "bias"):
        if f"layernorm.{w}" in rest:
            out[f"norm.{w}"] = rest.pop(f"layernorm.{w}")
    out.update(rest)
    return out


def from_videomae(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """VideoMAE repository names -> ours: only the patch embedding differs (a Conv3d kernel there)."""
    out = dict(state)
    if "patch_embed.proj.weight" in out:
        out["patch_embed.weight"] = _conv_to_linear(out.pop("patch_embed.proj.weight"))
        out["patch_embed.bias"] = out.pop("patch_embed.proj.bias")
    if "pos_embed" in out and out["pos_embed"].dim() == 3:  # (1, N, D)
        out["pos_embed"] = out["pos_embed"][0]
    return out


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """VideoMAE's fine-tuning loader: drop ``module.`` / ``backbone.`` / ``encoder.`` (and HF's ``videomae.``) in
    front of the encoder's keys; the decoder's keys keep their names (they are left out later)."""
    out = {}
    for k, v in state.items():
        name = k
        changed = True
        while changed:
            changed = False
            for p in PREFIXES:
                if name.startswith(p) and not name.startswith("encoder.layer.") and len(name) > len(p):
                    name, changed = name[len(p):], True
        out[name] = v
    return out


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a checkpoint file, never running code from it."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise InitError(f"{path} is not a readable safetensors file ({exc})") from None
    from ..models.vqgan import CheckpointMismatch, _restricted_load

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # VideoMAE's files pickle argparse.Namespace: read with inert stand-ins
        try:
            obj = _restricted_load(path)
        except CheckpointMismatch as exc:
            raise InitError(str(exc)) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise InitError(f"{path} is not a readable torch checkpoint ({str(exc).splitlines()[0]})") from None
    if isinstance(obj, dict):
        for key in ("model", "module", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InitError(f"{path} holds no state dict of tensors (looked at 'model', 'module', 'state_dict' and the "
                        "top level)")
    return dict(obj)


def _grid_of_json(config: dict) -> tuple[int, int, int] | None:
    try:
        if "tubelet_size" in config:  # HF VideoMAEConfig
            return token_grid(config["num_frames"], config["image_size"], config["tubelet_size"], config["patch_size"])
        return token_grid(config["all_frames"], config["img_size"], config["tubelet_size"], config["patch_size"])
    except (KeyError, TypeError):
        return None


def _convert(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = _strip_prefixes(state)
    if any(k.startswith(("embeddings.", "encoder.layer.")) for k in state):
        return from_hf(state)
    return from_videomae(state)


def read_pretrained(path: str | Path, tag: str = "", log: Callable[[str], None] = print) -> Pretrained:
    """The encoder state of ``path`` (see the module docstring), in our names."""
    from ..export import CONFIG, WEIGHTS, ExportError, consolidated_state, find_checkpoint

    path = Path(path).expanduser()
    if not path.exists():
        raise InitError(f"init.checkpoint {path} does not exist; pass a fastmam pretraining run folder, an exported "
                        "folder (python -m fastmam.export) or a VideoMAE checkpoint file")
    if path.is_file():
        state = _read_file(path)
        return Pretrained(_convert(state), str(path), "checkpoint file")
    if (path / WEIGHTS).is_file() and (path / CONFIG).is_file():
        config = json.loads((path / CONFIG).read_text())
        state = _read_file(path / WEIGHTS)
        return Pretrained(_convert(state), str(path), "exported folder", _grid_of_json(config))
    try:
        ckpt_dir, tag, run_dir = find_checkpoint(path, tag or None)
    except ExportError as exc:
        raise InitError(str(exc)) from None
    grid, kind = None, "fastmam pretraining run"
    if run_dir is not None:
        tree = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        if "classifier" in tree:
            kind = "fastmam fine-tuning run"
        m, d = tree.get("model", {}), tree.get("data", {})
        try:
            grid = token_grid(d.get("num_frames", 16), d.get("img_size", 224), m.get("tubelet", 2), m.get("patch", 16))
        except TypeError:
            grid = None
    full = consolidated_state(ckpt_dir, tag)
    state = {k.removeprefix("model."): v for k, v in full.items()}
    return Pretrained(state, str(ckpt_dir / tag), kind, grid)


def _listing(keys: list[str], limit: int = 8) -> str:
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _architecture(state: dict[str, torch.Tensor]) -> str:
    """What a state's encoder looks like, for error messages."""
    w = state.get("patch_embed.weight")
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    if w is None:
        return f"{depth} blocks, no patch embedding"
    return f"width {w.shape[0]}, {depth} blocks, patch vectors of {w.shape[1]} values"


def load_pretrained(model: VideoClassifier, cfg: FinetuneConfig, pre: Pretrained,
                    log: Callable[[str], None] = print) -> None:
    """Copy ``pre``'s encoder into ``model`` (strict; see the module docstring); the head stays as initialized."""
    state = dict(pre.state)
    heads = sorted(k for k in state if k.startswith(HEAD_KEYS))
    if heads:
        if cfg.init.finetuned == "error":
            raise InitError(
                f"{pre.source} is a fine-tuned checkpoint (it has a classification head: {_listing(heads, 4)}), "
                "not a pretrained encoder. To start a new fine-tuning from its encoder anyway (e.g. K400 -> UCF101), "
                "set init.finetuned=drop_head; to continue that fine-tuning run, use its output_dir with --resume; to "
                "test it, use --test-only on its output_dir")
        log(f"init: dropping the fine-tuned head of {pre.source} ({_listing(heads, 4)}); init.finetuned=drop_head")
        for k in heads:
            state.pop(k)
    own = {k: v for k, v in model.state_dict().items()}
    own_keys = set(own) - {"pos_embed"}
    unused = sorted(k for k in state if k not in own and k != "pos_embed" and k.startswith(PRETRAINING_ONLY))
    unexpected = sorted(k for k in state if k not in own and k != "pos_embed" and k not in unused)
    missing = sorted(own_keys - set(state) - {k for k in own_keys if k.startswith(HEAD_KEYS)})
    mismatched = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in sorted(own_keys & set(state))
                  if state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        lines = [f"{pre.source} ({pre.kind}) does not fit the encoder of this config "
                 f"(model.embed_dim={cfg.model.embed_dim}, depth={cfg.model.depth}, tubelet={cfg.model.tubelet}, "
                 f"patch={cfg.model.patch}); the checkpoint has {_architecture(state)}:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {_listing(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
        if mismatched:
            lines.append(f"  misshaped keys ({len(mismatched)}):")
            lines += [f"    {k}: shape {got} in the checkpoint, {want} in the model" for k, got, want in mismatched[:8]]
        lines.append("Set model.* to the architecture the checkpoint was pretrained with (a fastmam run's "
                     "config.yaml, an export's config.json).")
        raise InitError("\n".join(lines))
    if unused:
        log(f"init: {len(unused)} pretraining-only weights of {pre.source} are not used ({_listing(unused, 4)}); "
            "the encoder's final norm is replaced by fc_norm over the token mean, as in VideoMAE's fine-tuning")
    _load_positions(model, cfg, pre, state, log)
    model.load_state_dict({k: state[k] for k in own_keys if k in state}, strict=False)
    log(f"init: encoder from {pre.source} ({pre.kind}), {len(own_keys)} tensors")


def _load_positions(model: VideoClassifier, cfg: FinetuneConfig, pre: Pretrained, state: dict,
                    log: Callable[[str], None]) -> None:
    grid = model.grid
    pos = state.get("pos_embed")
    learned = cfg.classifier.pos_embed == "learned"
    if pos is not None:
        pos = pos.float()
        sinusoid = sinusoid_table(pos.shape[0], pos.shape[1])
        fixed = pos.shape == sinusoid.shape and torch.allclose(pos, sinusoid, atol=1e-4)
        if not learned and not fixed:
            raise InitError(f"{pre.source} has learned positions (pos_embed {tuple(pos.shape)}, not the sinusoid "
                            "table); set classifier.pos_embed=learned to fine-tune them")
        if learned:
            src = pre.grid
            if src is None or src[0] * src[1] * src[2] != pos.shape[0]:
                src = _guess_grid(pos.shape[0], grid)
            with torch.no_grad():
                model.pos_embed.copy_(resize_pos_embed(pos, src, grid))
            log(f"init: learned positions of {pre.source} on the token grid {src} "
                f"{'copied' if tuple(src) == tuple(grid) else f'interpolated to {grid} (trilinear)'}")
            return
    if pre.grid is not None and tuple(pre.grid) != tuple(grid):
        log(f"init: sinusoid positions rebuilt for {model.num_tokens} tokens (grid {grid}); the checkpoint was "
            f"pretrained on a {pre.grid} grid")


def _guess_grid(n: int, grid: tuple[int, int, int]) -> tuple[int, int, int]:
    """The token grid of a position table of ``n`` rows when nothing records it: this run's spatial grid with
    another frame count, or this run's frame count with another square spatial grid."""
    t, h, w = grid
    if n % (h * w) == 0:
        return n // (h * w), h, w
    side = round((n / t) ** 0.5)
    if n % t == 0 and side * side * t == n:
        return t, side, side
    raise InitError(f"cannot tell the token grid of a position table of {n} rows (this run's grid is {grid}); "
                    "export the checkpoint with its config.json next to it")
