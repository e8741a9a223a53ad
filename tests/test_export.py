"""Export of the pretrained encoder: a tiny run trained through the real checkpoint path, exported, loaded by
Hugging Face's ``VideoMAEModel`` and compared with our encoder's last block on the same clip (all tokens, and
the visible tokens of a tube mask); loaded by ``VideoMAEForVideoClassification``, whose logits must be its
head on the mean of all our tokens (not the first one); the VideoMAE repository's names; ZeRO checkpoints;
errors that name the fix.

Tolerance: in float64 both encoders must agree to rounding (the mapping is exact); in fp32,
err(HF fp32, ours fp64) <= 2 * err(ours fp32, ours fp64) + atol (CONVENTIONS), atol 1e-6 (unit-scale features).
"""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from fastmam import checkpointing, ops
from fastmam.config import load_config
from fastmam.export import ExportError, consolidated_state, export, find_checkpoint, load_run_config, main
from fastmam.models import Pretrainer

transformers = pytest.importorskip("transformers", reason="the export is checked against transformers' VideoMAE")

FAST = ["model.depth=2", "data.num_workers=0", "logging.progress_bar=false", "logging.tensorboard=false",
        "schedule.steps=2", "schedule.warmup_steps=1", "checkpoint.every_steps=2", "data.batch_size=2"]


def train_tiny(out: Path, *extra: str) -> Path:
    from fastmam.pretrain import train

    train(load_config("tiny", [f"output_dir={out}", *FAST, *extra]))
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny run (ZeRO stage 0, fp32) with one complete checkpoint at step 2."""
    return train_tiny(tmp_path_factory.mktemp("export") / "run")


def ours_and_hf(run: Path, out: Path, dtype: torch.dtype):
    """Our Pretrainer with the checkpoint's weights and HF's VideoMAEModel from the export, both in ``dtype``."""
    ckpt_dir, tag, run_dir = find_checkpoint(run)
    cfg = load_run_config(ckpt_dir, tag, run_dir)
    ours = Pretrainer(cfg)
    ours.load_state_dict(consolidated_state(ckpt_dir, tag))
    hf, info = transformers.VideoMAEModel.from_pretrained(out, output_loading_info=True)
    return cfg, ours.to(dtype).eval(), hf.to(dtype).eval(), info


def patchify(x, t, p):
    """(B, T, H, W, C) -> (B, N, t*p*p*C), tokens (time, row, col), vectors (t, p, p, C): written out here."""
    b, nt, h, w, c = x.shape
    x = x.reshape(b, nt // t, t, h // p, p, w // p, p, c).permute(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(b, -1, t * p * p * c)


def block_outputs(ours, patches, ids_keep):
    """Our encoder on patch vectors (B, Nv, t*p*p*C): (its last block's output, its latents = norm of that),
    each (B, Nv, D). The export leaves the final norm out, so HF's last_hidden_state is the first of the two."""
    seen = {}
    hook = ours.model.norm.register_forward_hook(lambda module, args, out: seen.update(tokens=args[0]))
    try:
        with torch.no_grad():
            latents = ours.model.forward_encoder(patches, ids_keep)
    finally:
        hook.remove()
    return seen["tokens"], latents


def pixels_and_patches(cfg, clip, dtype):
    """The same clip for both encoders: normalized pixels (B, T, H, W, C) and patch vectors (B, N, t*p*p*C)."""
    mean, std = torch.tensor(cfg.data.mean, dtype=torch.float64), torch.tensor(cfg.data.std, dtype=torch.float64)
    pixels = ((clip.to(torch.float64) / 255 - mean) / std).to(dtype)
    return pixels, patchify(pixels, cfg.model.tubelet, cfg.model.patch)


def features(cfg, ours, hf, clip, mask_noise, dtype):
    """Encoder features of the same clip: ours on (visible) patch vectors, HF on (B, T, C, H, W) pixels;
    (our last block's output, HF's last_hidden_state, our latents)."""
    pixels, patches = pixels_and_patches(cfg, clip, dtype)
    b, n = patches.shape[:2]
    ids_keep, mask = torch.arange(n).expand(b, n), None
    if mask_noise is not None:
        masking = ops.tube_masking(mask_noise, cfg.masking.ratio, cfg.data.num_frames // cfg.model.tubelet)
        ids_keep, mask = masking.ids_keep, masking.mask
        patches = torch.gather(patches, 1, ids_keep[..., None].expand(-1, -1, patches.shape[-1]))
    mine, latents = block_outputs(ours, patches, ids_keep)
    with torch.no_grad():
        theirs = hf(pixels.permute(0, 1, 4, 2, 3), bool_masked_pos=mask).last_hidden_state
    return mine.double(), theirs.double(), latents.double()


@pytest.mark.parametrize("masked", [False, True])
def test_hf_videomae_loads_the_export_and_gives_our_features(run, tmp_path, masked, rng):
    out = export(run, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert not any(k.startswith("layernorm.") for k in load_file(str(out / "model.safetensors")))
    clip = torch.randint(0, 256, (2, 8, 64, 64, 3), dtype=torch.uint8, generator=rng)
    noise = torch.rand(2, 64, generator=rng) if masked else None

    cfg, ours64, hf64, info = ours_and_hf(run, out, torch.float64)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    assert hf64.config.layer_norm_eps == 1e-6 and hf64.config.use_mean_pooling and hf64.layernorm is None
    ref, theirs64, latents = features(cfg, ours64, hf64, clip, noise, torch.float64)
    assert ref.shape == (2, 64 if masked else 256, 128)  # tiny: 4 slices of 8 x 8 tokens, 48 of 64 hidden in each
    assert (theirs64 - ref).abs().max().item() < 1e-10
    # what the README tells feature users: the videomae export's `norm` on last_hidden_state gives our latents
    norm = load_file(str(export(run, tmp_path / "vm", fmt="videomae") / "model.safetensors"))
    ln = F.layer_norm(theirs64, (128,), norm["norm.weight"].double(), norm["norm.bias"].double(), 1e-6)
    assert (ln - latents).abs().max().item() < 1e-10 and (theirs64 - latents).abs().max().item() > 1e-2

    _, ours32, hf32, _ = ours_and_hf(run, out, torch.float32)
    mine32, theirs32, _ = features(cfg, ours32, hf32, clip, noise, torch.float32)
    err, err_ours = (theirs32 - ref).abs(), (mine32 - ref).abs()
    bound = 2 * err_ours.max().item() + 1e-6
    assert err.max().item() <= bound, (
        f"HF fp32: max err {err.max().item():.3g} (mean {err.mean().item():.3g}) > {bound:.3g}; "
        f"ours fp32: max err {err_ours.max().item():.3g}")


def test_hf_classification_head_pools_the_mean_of_all_tokens(run, tmp_path, rng):
    """VideoMAEForVideoClassification on the export: every encoder weight loads, only the head is new, and its
    logits are classifier(fc_norm(mean over all tokens of our last block)): VideoMAE's fine-tuning head."""
    out = export(run, tmp_path / "hf")
    clf, info = transformers.VideoMAEForVideoClassification.from_pretrained(out, num_labels=5,
                                                                           output_loading_info=True)
    assert set(info["missing_keys"]) == {"fc_norm.weight", "fc_norm.bias", "classifier.weight", "classifier.bias"}
    assert not any(info[k] for k in ("unexpected_keys", "mismatched_keys", "error_msgs")), info
    clf = clf.double().eval()
    fc_norm, classifier = clf.fc_norm, clf.classifier
    with torch.no_grad():  # fresh: LayerNorm (1, 0) and a zero bias, which would hide a skipped affine or bias
        for w in (fc_norm.weight, fc_norm.bias, classifier.bias):
            w.copy_(torch.randn(w.shape, generator=rng, dtype=w.dtype))

    cfg, ours, _, _ = ours_and_hf(run, out, torch.float64)
    clip = torch.randint(0, 256, (2, 8, 64, 64, 3), dtype=torch.uint8, generator=rng)
    pixels, patches = pixels_and_patches(cfg, clip, torch.float64)
    tokens, latents = block_outputs(ours, patches, torch.arange(patches.shape[1]).expand(2, -1))
    with torch.no_grad():
        logits = clf(pixels.permute(0, 1, 4, 2, 3)).logits

    def head(v):  # (B, D) -> (B, 5), with the classifier's own head weights
        return F.linear(F.layer_norm(v, (128,), fc_norm.weight, fc_norm.bias, fc_norm.eps), classifier.weight,
                        classifier.bias)

    expected = head(tokens.mean(1))  # tokens: (2, 256, 128), all of them
    assert logits.shape == (2, 5)
    err = (logits - expected).abs().max().item()
    assert err < 1e-10, f"logits differ from classifier(fc_norm(mean of our tokens)) by {err:.3g}"
    # negative controls: use_mean_pooling false would classify our normed first patch token (no CLS token in
    # VideoMAE), and fc_norm on the first token alone is another pooling; both are far from the logits
    for name, wrong in (("first token", F.linear(latents[:, 0], classifier.weight, classifier.bias)),
                        ("fc_norm(first token)", head(tokens[:, 0]))):
        gap = (logits - wrong).abs().max().item()
        assert gap > 1e-2, f"the {name} gives the same logits (max diff {gap:.3g}): the check cannot tell poolings"


def test_videomae_format_names_and_conv_kernel(run, tmp_path, rng):
    out = export(run, tmp_path / "vm", fmt="videomae")
    weights = load_file(str(out / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    expected = {"patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"}
    for i in range(2):
        expected |= {f"blocks.{i}.{n}.{w}" for n in ("norm1", "norm2", "attn.proj", "mlp.fc1", "mlp.fc2")
                     for w in ("weight", "bias")}
        expected |= {f"blocks.{i}.attn.qkv.weight", f"blocks.{i}.attn.q_bias", f"blocks.{i}.attn.v_bias"}
    assert set(weights) == expected
    assert weights["patch_embed.proj.weight"].shape == (128, 3, 2, 8, 8)  # (D, C, t, p, p)
    assert weights["blocks.1.attn.qkv.weight"].shape == (384, 128) and weights["norm.weight"].dtype == torch.float32
    assert config["model"] is None  # tiny is none of VideoMAE's registered sizes
    assert {k: config[k] for k in ("embed_dim", "depth", "num_heads", "tubelet_size", "all_frames", "img_size",
                                   "use_mean_pooling")} == {"embed_dim": 128, "depth": 2, "num_heads": 4,
                                                            "tubelet_size": 2, "all_frames": 8, "img_size": 64,
                                                            "use_mean_pooling": True}
    # the Conv3d kernel on the (B, C, T, H, W) clip equals our Linear on (t, p, p, C) patch vectors
    ckpt_dir, tag, run_dir = find_checkpoint(run)
    state = consolidated_state(ckpt_dir, tag)
    clip = torch.randn(2, 8, 64, 64, 3, generator=rng, dtype=torch.float64)
    conv = F.conv3d(clip.permute(0, 4, 1, 2, 3), weights["patch_embed.proj.weight"].double(),
                    weights["patch_embed.proj.bias"].double(), stride=(2, 8, 8)).flatten(2).transpose(1, 2)
    linear = F.linear(patchify(clip, 2, 8), state["model.patch_embed.weight"].double(),
                      state["model.patch_embed.bias"].double())
    assert (conv - linear).abs().max().item() < 1e-12
    for name in ("blocks.0.attn.qkv.weight", "blocks.1.attn.q_bias", "blocks.1.mlp.fc2.bias", "norm.weight"):
        assert torch.equal(weights[name], state["model." + name]), name


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_checkpoint_consolidates_to_the_same_encoder(run, tmp_path, stage):
    """ZeRO 2/3 keep the weights partitioned in the optimizer shards (stage 3 leaves empty placeholders in the
    module): the export consolidates them, and the same run at stage 0 gives the same encoder."""
    zero = train_tiny(tmp_path / f"zero{stage}", f"deepspeed.zero_stage={stage}")
    ckpt = zero / "checkpoints" / "step_00000002"
    assert any(ckpt.glob("*optim_states.pt"))
    a = load_file(str(export(run, tmp_path / "a") / "model.safetensors"))
    b = load_file(str(export(zero, tmp_path / "b") / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:  # the same fp32 math, summed in another order by the flat ZeRO buffers
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), (k, (a[k] - b[k]).abs().max().item())


@pytest.mark.slow
def test_two_rank_zero2_export_merges_the_shards(tmp_path):
    """Two ranks hold one optimizer shard each; the merged fp32 weights equal the full module both ranks kept."""
    from tests.train.test_pretrain import free_port, run_cli

    out = tmp_path / "ddp"
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or shutil.which("deepspeed")
    run_cli([launcher, "--num_gpus", "2", "--master_port", str(free_port()), "fastmam/pretrain.py", "--config", "tiny",
             f"output_dir={out}", "deepspeed.zero_stage=2", *FAST])
    ckpt = out / "checkpoints" / "step_00000002"
    assert len(list(ckpt.glob("*optim_states.pt"))) == 2
    exported = load_file(str(export(out, tmp_path / "hf") / "model.safetensors"))
    module = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    q, k, v = module["model.blocks.1.attn.qkv.weight"].split(128)
    assert torch.equal(exported["encoder.layer.1.attention.attention.key.weight"], k)
    assert torch.equal(exported["encoder.layer.1.attention.attention.value.bias"], module["model.blocks.1.attn.v_bias"])
    assert torch.equal(exported["encoder.layer.1.layernorm_after.weight"], module["model.blocks.1.norm2.weight"])
    assert "layernorm.weight" not in exported  # the final norm is not exported (fastmam.export.to_hf)
    model, info = transformers.VideoMAEModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_errors_name_the_fix(run, tmp_path, capsys):
    with pytest.raises(ExportError, match="is not a folder; pass a run folder"):
        export(tmp_path / "nothing", tmp_path / "o")
    (tmp_path / "other").mkdir()
    with pytest.raises(ExportError, match="is not a fastmam run or checkpoint folder.*output_dir of fastmam/pretrain"):
        export(tmp_path / "other", tmp_path / "o")
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    shutil.copy(run / "config.yaml", empty / "config.yaml")
    with pytest.raises(ExportError, match="holds no complete checkpoint.*checkpoint.every_steps"):
        export(empty, tmp_path / "o")
    # a save that did not finish: no COMPLETE marker
    partial = empty / "checkpoints" / "step_00000004"
    shutil.copytree(run / "checkpoints" / "step_00000002", partial)
    (partial / checkpointing.MARKER).unlink()
    with pytest.raises(ExportError, match="incomplete checkpoint"):
        export(partial, tmp_path / "o")
    with pytest.raises(ExportError, match="no complete checkpoint step_00000009; complete ones: step_00000002"):
        export(run, tmp_path / "o", tag="step_00000009")
    with pytest.raises(ExportError, match="format 'onnx' is not one of hf, videomae"):
        export(run, tmp_path / "o", fmt="onnx")
    # the CLI: exit 2 and the message; and a checkpoint folder without a run folder uses the config saved in it
    assert main([str(tmp_path / "other"), "--out", str(tmp_path / "o")]) == 2
    assert "fastmam.export: " in capsys.readouterr().err
    alone = tmp_path / "alone" / "step_00000002"
    shutil.copytree(run / "checkpoints" / "step_00000002", alone)
    assert main([str(alone), "--out", str(tmp_path / "o"), "--format", "videomae"]) == 0
    assert "videomae format" in capsys.readouterr().out
