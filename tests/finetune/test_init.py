"""Initializing the classifier: a fastmam run (ZeRO 0 and 3), an HF export, a VideoMAE export and a VideoMAE-repository
``.pth`` give the same encoder; strict key checks; fine-tuned checkpoints; positions for another geometry."""

import argparse
from pathlib import Path

import pytest
import torch

from fastmam.config import load_config
from fastmam.export import consolidated_state, encoder_state, export, find_checkpoint
from fastmam.finetuning.config import FinetuneConfig

pytest.importorskip("timm", reason="fine-tuning needs timm (pip install -e .[finetune])")

from fastmam.finetuning.init import InitError, load_pretrained, read_pretrained  # noqa: E402
from fastmam.finetuning.model import VideoClassifier, resize_pos_embed  # noqa: E402

FAST = ["model.depth=2", "data.num_workers=0", "logging.progress_bar=false", "logging.tensorboard=false",
        "schedule.steps=2", "schedule.warmup_steps=1", "checkpoint.every_steps=2", "data.batch_size=2",
        "logging.every_steps=1"]
ENCODER = ["model.depth=2", "device=cpu", "classifier.drop_path=0", "data.img_size=64", "data.synthetic_size=80"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    from fastmam.pretrain import train

    root = tmp_path_factory.mktemp("init_runs")
    out = {}
    for name, extra in (("z0", []), ("z3", ["deepspeed.zero_stage=3"])):
        train(load_config("tiny", [f"output_dir={root / name}", *FAST, *extra]))
        out[name] = root / name
    return out


def classifier(*extra) -> tuple[FinetuneConfig, VideoClassifier]:
    cfg = load_config("ft_tiny", [*ENCODER, *extra], root=FinetuneConfig)
    torch.manual_seed(1)
    return cfg, VideoClassifier(cfg).eval()


def features_from(source, *extra, log=None):
    cfg, model = classifier(*extra)
    load_pretrained(model, cfg, read_pretrained(source, log=log or (lambda m: None)), log or (lambda m: None))
    d = cfg.data
    g = torch.Generator().manual_seed(0)
    clip = torch.randint(0, 256, (2, d.num_frames, d.img_size, d.img_size, 3), generator=g, dtype=torch.uint8)
    with torch.no_grad():
        return model.forward_features(clip), model


def videomae_pth(run: Path, path: Path) -> Path:
    """A file as the VideoMAE repository writes it: {'model': encoder.* (Conv3d patch kernel) + decoder.*, mask token,
    encoder_to_decoder}, plus the argparse Namespace its save_model pickles (refused by weights_only)."""
    ckpt_dir, tag, _ = find_checkpoint(run)
    cfg = load_config("tiny", FAST)
    enc = encoder_state(consolidated_state(ckpt_dir, tag), cfg)
    from fastmam.export import to_videomae

    state = {f"encoder.{k}": v for k, v in to_videomae(enc, cfg).items()}
    state |= {"decoder.blocks.0.mlp.fc1.weight": torch.zeros(4, 4), "mask_token": torch.zeros(1, 1, 64),
              "encoder_to_decoder.weight": torch.zeros(64, 128)}
    torch.save({"model": state, "epoch": 1599, "args": argparse.Namespace(model="pretrain_videomae_base")}, path)
    return path


def test_every_source_gives_the_same_encoder(runs, tmp_path):
    logs = []
    ref, model = features_from(runs["z0"], log=logs.append)
    assert any("pretraining-only weights" in m and "final norm is replaced by fc_norm" in m for m in logs)
    hf = export(runs["z0"], tmp_path / "hf", fmt="hf")
    vm = export(runs["z0"], tmp_path / "vm", fmt="videomae")
    pth = videomae_pth(runs["z0"], tmp_path / "checkpoint-1599.pth")
    for source in (runs["z3"], hf, vm, pth, hf / "model.safetensors"):
        got, _ = features_from(source)
        if source == runs["z3"]:  # another run (other stage): same recipe, other weights -- only the shape agrees
            assert got.shape == ref.shape
            continue
        torch.testing.assert_close(got, ref, rtol=0, atol=0, msg=f"{source}")  # conversions only move fp32 values
    # the classifier started from the pretrained encoder, not its own init
    _, fresh = classifier()
    assert not torch.equal(model.blocks[0].mlp.fc1.weight, fresh.blocks[0].mlp.fc1.weight)


def test_zero3_run_loads_its_consolidated_encoder(runs):
    ckpt_dir, tag, _ = find_checkpoint(runs["z3"])
    enc = encoder_state(consolidated_state(ckpt_dir, tag), load_config("tiny", FAST))
    _, model = features_from(runs["z3"])
    torch.testing.assert_close(model.blocks[1].attn.qkv.weight, enc["blocks.1.attn.qkv.weight"])


def test_another_architecture_names_missing_and_misshaped_keys(runs):
    cfg, model = classifier("model.depth=3")
    with pytest.raises(InitError, match=r"(?s)depth=3.*has width 128, 2 blocks.*missing keys \(13\): blocks\.2\."):
        load_pretrained(model, cfg, read_pretrained(runs["z0"]), lambda m: None)
    cfg, model = classifier("model.embed_dim=64")
    with pytest.raises(InitError, match=r"(?s)misshaped keys \(\d+\):.*blocks.0.attn.qkv.weight: "
                                         r"shape \(384, 128\) in the checkpoint, \(192, 64\)"):
        load_pretrained(model, cfg, read_pretrained(runs["z0"]), lambda m: None)


def test_unexpected_keys_are_named(runs, tmp_path):
    path = videomae_pth(runs["z0"], tmp_path / "x.pth")
    obj = torch.load(path, weights_only=False)
    obj["model"]["encoder.blocks.0.attn.rel_pos_bias"] = torch.zeros(3)
    torch.save(obj, path)
    cfg, model = classifier()
    with pytest.raises(InitError, match=r"unexpected keys \(1\): blocks.0.attn.rel_pos_bias"):
        load_pretrained(model, cfg, read_pretrained(path), lambda m: None)


def test_finetuned_checkpoint_is_refused_unless_its_head_is_dropped(runs, tmp_path):
    path = videomae_pth(runs["z0"], tmp_path / "ft.pth")
    obj = torch.load(path, weights_only=False)
    obj["model"] |= {"head.weight": torch.zeros(400, 128), "head.bias": torch.zeros(400),
                     "fc_norm.weight": torch.ones(128), "fc_norm.bias": torch.zeros(128)}
    torch.save(obj, path)
    cfg, model = classifier()
    with pytest.raises(InitError, match="is a fine-tuned checkpoint .* init.finetuned=drop_head"):
        load_pretrained(model, cfg, read_pretrained(path), lambda m: None)
    ref, _ = features_from(runs["z0"])
    logs = []
    got, model = features_from(path, "init.finetuned=drop_head", log=logs.append)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert any("dropping the fine-tuned head" in m for m in logs)
    assert model.head.weight.shape == (9, 128) and model.head.weight.abs().max() < 1e-3  # a fresh head


def test_missing_and_unreadable_sources(tmp_path):
    cfg, model = classifier()
    with pytest.raises(InitError, match="does not exist"):
        read_pretrained(tmp_path / "nope")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(InitError, match="not a readable torch checkpoint"):
        read_pretrained(tmp_path / "junk.pth")
    torch.save({"epoch": 3}, tmp_path / "empty.pth")
    with pytest.raises(InitError, match="no state dict of tensors"):
        read_pretrained(tmp_path / "empty.pth")


def test_positions_for_another_geometry(runs, tmp_path):
    # sinusoid: rebuilt for 16 frames (the run was pretrained on 8), with a log line
    logs = []
    features_from(runs["z0"], "data.num_frames=16", "data.synthetic_frames=40", log=logs.append)
    assert any("sinusoid positions rebuilt for 512 tokens" in m and "(4, 8, 8)" in m for m in logs)
    # learned positions in the file: refused with sinusoid, interpolated with classifier.pos_embed=learned
    path = videomae_pth(runs["z0"], tmp_path / "learned.pth")
    obj = torch.load(path, weights_only=False)
    table = torch.randn(1, 4 * 8 * 8, 128)
    obj["model"]["encoder.pos_embed"] = table
    torch.save(obj, path)
    cfg, model = classifier()
    with pytest.raises(InitError, match="learned positions .* classifier.pos_embed=learned"):
        load_pretrained(model, cfg, read_pretrained(path), lambda m: None)
    logs = []
    _, model = features_from(path, "classifier.pos_embed=learned", "data.num_frames=16", "data.synthetic_frames=40",
                             log=logs.append)
    assert any("interpolated to (8, 8, 8)" in m for m in logs)
    torch.testing.assert_close(model.pos_embed.detach(), resize_pos_embed(table[0], (4, 8, 8), (8, 8, 8)))
    # a constant-in-time table stays constant; the same grid is a copy
    const = torch.randn(1, 8, 8, 5).expand(4, 8, 8, 5).reshape(256, 5)
    torch.testing.assert_close(resize_pos_embed(const, (4, 8, 8), (2, 8, 8)), const[:128])
    torch.testing.assert_close(resize_pos_embed(table[0], (4, 8, 8), (4, 8, 8)), table[0])
