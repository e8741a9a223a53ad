"""Export the pretrained encoder for fine-tuning: ``model.safetensors`` plus ``config.json``.

    python -m fastmam.export runs/mam2_vit_b --out exported/mam2_vit_b              # Hugging Face VideoMAE
    python -m fastmam.export runs/mam2_vit_b --out exported/vit_b_videomae --format videomae

The input is a run folder (``output_dir`` of ``fastmam/pretrain.py``), its ``checkpoints/`` folder, or one
checkpoint (``checkpoints/step_00001000``); without ``--tag`` the newest complete checkpoint is read
(``fastmam.checkpointing.latest_tag``). Weights come from the DeepSpeed checkpoint of any ZeRO stage:
stages 1-3 (and bf16 runs, whose fp32 master weights live in the optimizer shards) are consolidated to
fp32 with DeepSpeed's ``zero_to_fp32``; a stage-0 fp32 checkpoint holds the full module. The run's
``config.yaml`` (or the config saved inside the checkpoint) gives the architecture. Only the encoder is
written, in fp32; both formats are set up for VideoMAE's fine-tuning recipe, a classifier on the mean of
all tokens (``use_mean_pooling``: LayerNorm ``fc_norm`` over the token mean, then a Linear; see ``to_hf``):

- ``hf`` (default): Hugging Face ``VideoMAEModel`` names (patch embedding and blocks) and a ``VideoMAEConfig``
  JSON with ``use_mean_pooling: true``, so that ``VideoMAEModel.from_pretrained(out)`` and
  ``VideoMAEForVideoClassification.from_pretrained(out, num_labels=N)`` load it with no missing or unexpected
  encoder keys (the classifier's ``fc_norm`` and ``classifier`` start fresh). ``VideoMAEModel``'s
  ``last_hidden_state`` is then the last block's output, without our final encoder norm (not exported).
  Pixel inputs are (B, T, C, H, W), normalized with the run's ``data.mean`` / ``data.std`` (recorded under
  ``fastmam`` in the JSON).
- ``videomae``: the original VideoMAE repository's fine-tuning names (``patch_embed.proj.weight`` as a
  Conv3d kernel, ``blocks.N.attn.qkv.weight``, ``q_bias``, ``v_bias``, ``norm1``, ``mlp.fc1``, ...,
  ``norm``) and the keyword arguments of its ``VisionTransformer`` in the JSON (``use_mean_pooling: true``,
  its default; ``norm`` is kept as in VideoMAE's own pretraining checkpoints, for its ``--use_cls`` path).

Our patch embedding is a Linear over (t, p, p, C) patch vectors; as a Conv3d kernel (D, C, t, p, p) it is
``W.view(D, t, p, p, C).permute(0, 4, 1, 2, 3)``. Both formats use VideoMAE's fixed sinusoid positions,
which are not weights.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path

import torch
import yaml

from . import checkpointing
from .config import Config, ConfigError, build_config, readable_tree
from .models.layers import LN_EPS

FORMATS = ("hf", "videomae")
WEIGHTS, CONFIG = "model.safetensors", "config.json"
#: VideoMAE's registered fine-tuning models: (embed_dim, depth, num_heads, patch) -> name
VIDEOMAE_MODELS = {
    (384, 12, 6, 16): "vit_small_patch16_224",
    (768, 12, 12, 16): "vit_base_patch16_224",
    (1024, 24, 16, 16): "vit_large_patch16_224",
    (1280, 32, 16, 16): "vit_huge_patch16_224",
}


class ExportError(RuntimeError):
    """The input is not a fastmam run or checkpoint, or holds no complete checkpoint; the message says what to pass."""


def find_checkpoint(path: str | Path, tag: str | None = None) -> tuple[Path, str, Path | None]:
    """(checkpoints folder, tag, run folder or None) for a run folder, its ``checkpoints/``, or one checkpoint."""
    path = Path(path)
    if not path.is_dir():
        raise ExportError(f"{path} is not a folder; pass a run folder of fastmam/pretrain.py (its output_dir), "
                          "its checkpoints/ folder, or one checkpoint folder (checkpoints/step_<N>)")
    if (path / checkpointing.MARKER).exists() or any(path.glob("*model_states.pt")):  # one checkpoint
        if not (path / checkpointing.MARKER).exists():
            raise ExportError(f"{path} is an incomplete checkpoint (no {checkpointing.MARKER} marker: its save did "
                              "not finish); pass the run folder to export its newest complete checkpoint")
        if tag is not None and tag != path.name:
            raise ExportError(f"--tag {tag} does not name the checkpoint folder {path}")
        ckpt_dir = path.parent
        return ckpt_dir, path.name, _run_dir_of(ckpt_dir)
    ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    tags = checkpointing.complete_tags(ckpt_dir)
    if tag is None:
        tag = checkpointing.latest_tag(ckpt_dir)
    elif tag not in tags:
        raise ExportError(f"{ckpt_dir} has no complete checkpoint {tag}; complete ones: {', '.join(tags) or 'none'}")
    if tag is None:
        looked = f"{ckpt_dir}/step_*/{checkpointing.MARKER}"
        if (path / "config.yaml").exists() or ckpt_dir != path:
            raise ExportError(f"{path} holds no complete checkpoint (looked for {looked}); train longer than "
                              "checkpoint.every_steps, or let the run reach its end, then export again")
        raise ExportError(f"{path} is not a fastmam run or checkpoint folder (looked for {looked}); pass the "
                          "output_dir of fastmam/pretrain.py, its checkpoints/ folder, or one checkpoint folder")
    return ckpt_dir, tag, _run_dir_of(ckpt_dir)


def _run_dir_of(ckpt_dir: Path) -> Path | None:
    return ckpt_dir.parent if (ckpt_dir.parent / "config.yaml").exists() else None


def _model_states_file(tag_dir: Path) -> Path:
    # rank 0's file: mp_rank_00_model_states.pt (stages 0-2), zero_pp_rank_0_mp_rank_00_model_states.pt (3)
    files = sorted(tag_dir.glob("*model_states.pt"), key=lambda p: (len(p.name), p.name))
    if not files:
        raise ExportError(f"{tag_dir} has no DeepSpeed model states file (*model_states.pt)")
    return files[0]


def load_run_config(ckpt_dir: Path, tag: str, run_dir: Path | None) -> Config:
    """The run's config: ``config.yaml`` of the run folder, else the copy saved inside the checkpoint."""
    try:
        if run_dir is not None:
            return build_config(readable_tree(yaml.safe_load((run_dir / "config.yaml").read_text())))
        client = torch.load(_model_states_file(ckpt_dir / tag), map_location="cpu", weights_only=False)
        if "config" not in client:
            raise ExportError(f"{ckpt_dir / tag} carries no config and has no run folder with config.yaml above it")
        return build_config(readable_tree(dict(client["config"])))
    except ConfigError as exc:
        raise ExportError(f"the config of {ckpt_dir / tag} does not validate with this fastmam: {exc}") from None


def consolidated_state(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of the trained module (``Pretrainer`` names) from a checkpoint of any ZeRO stage."""
    tag_dir = ckpt_dir / tag
    if any(tag_dir.glob("*optim_states.pt")):  # ZeRO 1-3 / bf16: fp32 weights are partitioned in the optimizer
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # it prints a line per step of the consolidation, and progress bars
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    else:  # stage 0 in fp32: the module's weights are the trained weights
        state = torch.load(_model_states_file(tag_dir), map_location="cpu", weights_only=False)["module"]
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def encoder_state(state: dict[str, torch.Tensor], cfg: Config) -> dict[str, torch.Tensor]:
    """Our encoder's weights (``patch_embed``, ``blocks.N``, ``norm``) out of the Pretrainer's state dict."""
    prefix = "model."
    enc = {k[len(prefix):]: v for k, v in state.items()
           if k.startswith(prefix) and k[len(prefix):].startswith(("patch_embed.", "blocks.", "norm."))}
    expected = {"patch_embed.weight", "patch_embed.bias", "norm.weight", "norm.bias"}
    for i in range(cfg.model.depth):
        names = ["norm1", "norm2", "attn.proj", "mlp.fc1", "mlp.fc2"]
        expected |= {f"blocks.{i}.{n}.{w}" for n in names for w in ("weight", "bias")}
        expected |= {f"blocks.{i}.attn.qkv.weight"}
        if cfg.model.qkv_bias:
            expected |= {f"blocks.{i}.attn.q_bias", f"blocks.{i}.attn.v_bias"}
    if missing := sorted(expected - enc.keys()):
        raise ExportError(f"the checkpoint lacks encoder weights of the configured model: {', '.join(missing[:6])}"
                          f"{' ...' if len(missing) > 6 else ''}; is config.yaml the one this run was trained with?")
    return {k: enc[k] for k in sorted(expected)}


def conv3d_kernel(weight: torch.Tensor, cfg: Config, in_chans: int = 3) -> torch.Tensor:
    """Linear patch-embedding weight (D, t*p*p*C) -> Conv3d kernel (D, C, t, p, p)."""
    m = cfg.model
    return weight.view(weight.shape[0], m.tubelet, m.patch, m.patch, in_chans).permute(0, 4, 1, 2, 3).contiguous()


def to_hf(enc: dict[str, torch.Tensor], cfg: Config) -> dict[str, torch.Tensor]:
    """Our encoder names -> Hugging Face ``VideoMAEModel`` names (q, k, v as separate linears; k has no bias).

    Our final encoder norm (``norm``) is left out, on purpose. VideoMAE has no CLS token; its fine-tuning
    (MCG-NJU/VideoMAE ``run_class_finetuning.py``, ``--use_mean_pooling`` on by default) builds
    ``VisionTransformer`` with ``norm = Identity`` and a freshly initialised ``fc_norm`` over the mean of the
    last block's tokens (``modeling_finetune.py``), so the pretraining checkpoint's ``norm`` is never loaded.
    transformers mirrors this: with ``use_mean_pooling: true`` ``VideoMAEModel.layernorm`` is None and
    ``VideoMAEForVideoClassification`` adds ``fc_norm`` (its own init) over ``last_hidden_state.mean(1)``.
    Writing ``layernorm.*`` would be an unexpected key there; with ``use_mean_pooling: false`` instead, the
    classifier would read ``last_hidden_state[:, 0]``, the first *patch* token. Our ``norm`` is not a stand-in
    for ``fc_norm`` either: it normalised each token during pretraining, ``fc_norm`` normalises their mean.
    (HF's ``fc_norm`` takes LayerNorm's default eps 1e-5, VideoMAE's 1e-6: a fresh layer, so nothing to map.)
    """
    d = cfg.model.embed_dim
    out = {
        "embeddings.patch_embeddings.projection.weight": conv3d_kernel(enc["patch_embed.weight"], cfg),
        "embeddings.patch_embeddings.projection.bias": enc["patch_embed.bias"],
    }
    for i in range(cfg.model.depth):
        src, dst = f"blocks.{i}.", f"encoder.layer.{i}."
        q, k, v = enc[src + "attn.qkv.weight"].split(d)
        out |= {dst + "attention.attention.query.weight": q, dst + "attention.attention.key.weight": k,
                dst + "attention.attention.value.weight": v}
        if cfg.model.qkv_bias:
            out[dst + "attention.attention.query.bias"] = enc[src + "attn.q_bias"]
            out[dst + "attention.attention.value.bias"] = enc[src + "attn.v_bias"]
        for ours, theirs in (("attn.proj", "attention.output.dense"), ("mlp.fc1", "intermediate.dense"),
                             ("mlp.fc2", "output.dense"), ("norm1", "layernorm_before"), ("norm2", "layernorm_after")):
            out[dst + theirs + ".weight"] = enc[src + ours + ".weight"]
            out[dst + theirs + ".bias"] = enc[src + ours + ".bias"]
    return out


def to_videomae(enc: dict[str, torch.Tensor], cfg: Config) -> dict[str, torch.Tensor]:
    """Our encoder names -> the VideoMAE repository's fine-tuning ``VisionTransformer`` names."""
    out = dict(enc)
    out["patch_embed.proj.weight"] = conv3d_kernel(out.pop("patch_embed.weight"), cfg)
    out["patch_embed.proj.bias"] = out.pop("patch_embed.bias")
    return out


def _provenance(cfg: Config, ckpt_dir: Path, tag: str) -> dict:
    return {"source": str((ckpt_dir / tag).resolve()), "tag": tag, "run": cfg.name,
            "mean": list(cfg.data.mean), "std": list(cfg.data.std), "exported_by": "fastmam.export"}


def hf_config(cfg: Config, provenance: dict) -> dict:
    """A ``VideoMAEConfig`` as JSON for a ``VideoMAEModel`` with our encoder (decoder fields describe our decoder).

    ``use_mean_pooling: true``: ``VideoMAEForVideoClassification`` classifies from ``fc_norm`` over the mean of
    all tokens (VideoMAE's fine-tuning head), and ``VideoMAEModel`` has no final ``layernorm`` (see ``to_hf``)."""
    m, d = cfg.model, cfg.data
    return {
        "architectures": ["VideoMAEModel"], "model_type": "videomae", "torch_dtype": "float32",
        "image_size": d.img_size, "patch_size": m.patch, "num_channels": 3, "num_frames": d.num_frames,
        "tubelet_size": m.tubelet, "hidden_size": m.embed_dim, "num_hidden_layers": m.depth,
        "num_attention_heads": m.num_heads, "intermediate_size": int(m.embed_dim * m.mlp_ratio), "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
        "layer_norm_eps": LN_EPS, "qv_bias": m.qkv_bias, "use_mean_pooling": True,
        "decoder_hidden_size": m.decoder_dim, "decoder_num_hidden_layers": m.decoder_depth,
        "decoder_num_attention_heads": m.decoder_heads, "decoder_intermediate_size": int(m.decoder_dim * m.mlp_ratio),
        "norm_pix_loss": cfg.targets.normalize_pixels, "fastmam": provenance,
    }


def videomae_config(cfg: Config, provenance: dict) -> dict:
    """Keyword arguments of VideoMAE's ``VisionTransformer`` (``model``: its registered name, where one fits).

    ``use_mean_pooling: true`` (its fine-tuning default): ``fc_norm`` over the mean of all tokens; with false
    it would classify from ``norm(x)[:, 0]``, the first patch token, as VideoMAE has no CLS token."""
    m, d = cfg.model, cfg.data
    name = VIDEOMAE_MODELS.get((m.embed_dim, m.depth, m.num_heads, m.patch)) if m.mlp_ratio == 4 else None
    return {
        "model": name, "img_size": d.img_size, "patch_size": m.patch, "in_chans": 3, "embed_dim": m.embed_dim,
        "depth": m.depth, "num_heads": m.num_heads, "mlp_ratio": m.mlp_ratio, "qkv_bias": m.qkv_bias,
        "norm_layer_eps": LN_EPS, "all_frames": d.num_frames, "tubelet_size": m.tubelet,
        "use_learnable_pos_emb": False, "use_mean_pooling": True, "fastmam": provenance,
    }


def export(path: str | Path, out: str | Path, fmt: str = "hf", tag: str | None = None) -> Path:
    """Write ``model.safetensors`` and ``config.json`` of the encoder to ``out``; returns ``out``."""
    from safetensors.torch import save_file

    if fmt not in FORMATS:
        raise ExportError(f"format '{fmt}' is not one of {', '.join(FORMATS)}")
    ckpt_dir, tag, run_dir = find_checkpoint(path, tag)
    cfg = load_run_config(ckpt_dir, tag, run_dir)
    enc = encoder_state(consolidated_state(ckpt_dir, tag), cfg)
    provenance = _provenance(cfg, ckpt_dir, tag)
    weights, config = (to_hf(enc, cfg), hf_config(cfg, provenance)) if fmt == "hf" else \
        (to_videomae(enc, cfg), videomae_config(cfg, provenance))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / WEIGHTS),
              metadata={"format": "pt", "fastmam_source": provenance["source"], "fastmam_format": fmt})
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastmam.export", description=__doc__.splitlines()[0])
    p.add_argument("path", help="run folder (output_dir), its checkpoints/ folder, or one checkpoint folder")
    p.add_argument("--out", required=True, help="folder to write model.safetensors and config.json to")
    p.add_argument("--format", choices=FORMATS, default="hf",
                   help="hf: Hugging Face VideoMAEModel / VideoMAEForVideoClassification (mean pooling); "
                        "videomae: the VideoMAE repository's fine-tuning names [hf]")
    p.add_argument("--tag", default=None, help="checkpoint tag (step_<N>) [the newest complete one]")
    args = p.parse_args(argv)
    try:
        out = export(args.path, args.out, args.format, args.tag)
    except ExportError as exc:
        print(f"fastmam.export: {exc}", file=sys.stderr)
        return 2
    print(f"fastmam.export: encoder written to {out / WEIGHTS} and {out / CONFIG} ({args.format} format)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
