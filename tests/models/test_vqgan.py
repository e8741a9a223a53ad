"""The VQGAN tokenizer: taming-transformers' architecture and checkpoints, codes equal to taming's, strict loading."""

from __future__ import annotations

import argparse
import math
import os
import pickle

import pytest
import torch

from fastmam.config import build_config
from fastmam.models import Pretrainer, clip_codes
from fastmam.models.vqgan import UNUSED_PREFIXES, VQGAN_DOWNLOADS, VQGANTokenizer, read_checkpoint
from tests.conftest import random_clip

from .taming_ref import F16_DDCONFIG, F16_EMBED_DIM, F16_N_EMBED, build_taming

# a small taming architecture: two levels (f = 2), attention at the 16-pixel level, GroupNorm-compatible widths
SMALL_DD = {"double_z": False, "z_channels": 8, "resolution": 32, "in_channels": 3, "out_ch": 3, "ch": 32,
            "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [16], "dropout": 0.0}
SMALL = {"n_embed": 24, "embed_dim": 6, "z_channels": 8, "ch": 32, "ch_mult": (1, 2), "num_res_blocks": 1,
         "attn_resolutions": (16,), "resolution": 32}


def small_tokenizer(seed=0, **kw) -> VQGANTokenizer:
    torch.manual_seed(seed)
    tok = VQGANTokenizer(**{**SMALL, **kw})
    with torch.no_grad():  # a spread-out codebook: distinct nearest codes, far from ties
        tok.quantize.embedding.weight.normal_()
    return tok


@pytest.mark.parametrize("name", sorted(F16_N_EMBED))
def test_parameter_names_and_shapes_equal_tamings_f16_models(name):
    """Our tokenizer built from the config (defaults + n_embed) has the parameters of taming's VQModel for the
    published f16 configs, minus the parts encoding does not use (decoder, post_quant_conv, loss)."""
    with torch.device("meta"):
        ref = build_taming(F16_DDCONFIG, F16_N_EMBED[name], F16_EMBED_DIM)
        cfg = build_config({}, ["targets.appearance=vqgan", f"targets.vqgan.n_embed={F16_N_EMBED[name]}"])
        ours = VQGANTokenizer.from_config(cfg.targets.vqgan)
    expected = [(k, tuple(v.shape)) for k, v in ref.state_dict().items() if not k.startswith(UNUSED_PREFIXES)]
    got = [(k, tuple(v.shape)) for k, v in ours.state_dict().items()]
    assert got == expected
    assert {k.split(".")[0] for k in ref.state_dict() if k.startswith(UNUSED_PREFIXES)} == {"decoder",
                                                                                          "post_quant_conv"}
    assert ours.downsample == 16 and ours.codebook_size == F16_N_EMBED[name]


def test_codes_equal_tamings_encode(rng):
    """Same weights, same images: our codes are taming's ``VQModel.encode`` indices; the latents agree closely."""
    torch.manual_seed(0)
    ref = build_taming(SMALL_DD, SMALL["n_embed"], SMALL["embed_dim"]).eval()
    with torch.no_grad():
        ref.quantize.embedding.weight.normal_()
    tok = VQGANTokenizer(**SMALL)
    tok.load_taming_state_dict(ref.state_dict())
    frames = random_clip((3, 32, 48, 3), rng)
    x = frames.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        z_ref = ref.quant_conv(ref.encoder(x))
        _, _, (_, _, idx) = ref.quantize(z_ref)
    z = tok.encode_latents(frames)
    torch.testing.assert_close(z, z_ref, rtol=1e-4, atol=1e-4)
    codes = tok.encode(frames)
    assert codes.shape == (3, 16, 24) and codes.dtype == torch.int64
    assert torch.equal(codes.flatten(), idx.flatten()), f"{(codes.flatten() != idx.flatten()).sum()} codes differ"
    assert len(codes.unique()) > 3  # not a degenerate comparison


def test_code_cells_are_nearest_codewords_of_their_latent(rng):
    """Cell (r, c) of frame n is the nearest codeword (brute force) to the latent at (n, :, r, c)."""
    tok = small_tokenizer()
    frames = random_clip((2, 16, 32, 3), rng)
    z = tok.encode_latents(frames)  # (2, E, 8, 16)
    e = tok.quantize.embedding.weight
    brute = torch.cdist(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).double(), e.double()).argmin(-1)
    assert torch.equal(tok.encode(frames), brute.view(2, 8, 16))


def test_clip_codes_take_the_right_frames(rng):
    tok = small_tokenizer()
    clip = random_clip((2, 4, 16, 16, 3), rng)
    first = clip_codes(tok, clip, tubelet=2, frame="first")  # (2, 2 * 8 * 8)
    assert torch.equal(first.view(2, 2, 8, 8)[:, 1], tok.encode(clip[:, 2]))
    middle = clip_codes(tok, clip, tubelet=2, frame="middle")
    assert torch.equal(middle.view(2, 2, 8, 8)[:, 0], tok.encode(clip[:, 1]))
    every = clip_codes(tok, clip, tubelet=2, frame="all")  # (2, N, t): token's frames in order
    assert every.shape == (2, 128, 2)
    assert torch.equal(every.view(2, 2, 8, 8, 2)[:, 1, :, :, 1], tok.encode(clip[:, 3]))
    assert torch.equal(every[..., 0], first) and torch.equal(every[..., 1], middle)


def test_codes_are_deterministic_and_independent_of_the_batch(rng):
    tok = small_tokenizer(encode_chunk=2)
    frames = random_clip((5, 16, 16, 3), rng)
    codes = tok.encode(frames)
    assert torch.equal(codes, tok.encode(frames))
    assert torch.equal(codes, torch.cat([tok.encode(frames[i : i + 1]) for i in range(5)]))
    assert torch.equal(codes, small_tokenizer().encode(frames))  # same weights, another instance
    assert not torch.equal(codes, tok.encode(255 - frames))


def _taming_checkpoint(tok: VQGANTokenizer, path, lightning=True):
    """``tok`` written as taming writes a VQGAN: a Lightning checkpoint whose state_dict also holds the decoder,
    post_quant_conv and the loss's discriminator, and Python objects besides."""
    state = dict(tok.state_dict())
    state.update({"decoder.conv_in.weight": torch.randn(32, 8, 3, 3), "post_quant_conv.weight": torch.randn(8, 6, 1, 1),
                  "loss.discriminator.main.0.weight": torch.randn(64, 3, 4, 4), "loss.logvar": torch.zeros(())})
    obj = {"state_dict": state}
    if lightning:
        obj.update({"epoch": 3, "global_step": 1234, "pytorch-lightning_version": "1.0.8",
                    "callbacks": {argparse.ArgumentParser: {"best_model_score": torch.tensor(0.1)}},
                    "hyper_parameters": argparse.Namespace(lr=4.5e-6), "optimizer_states": [{"state": {}}]})
    torch.save(obj, path)
    return path


def test_loads_a_lightning_checkpoint_and_a_bare_state_dict(tmp_path, rng):
    tok = small_tokenizer(seed=1)
    frames = random_clip((2, 16, 16, 3), rng)
    cfg = build_config({}, ["targets.appearance=vqgan", "model.patch=2", "data.img_size=32", "data.num_frames=4",
                            "masking.ratio=0.75", *[f"targets.vqgan.{k}={list(v) if isinstance(v, tuple) else v}"
                                                    for k, v in SMALL.items()]])
    ckpt = _taming_checkpoint(tok, tmp_path / "last.ckpt")
    with pytest.raises(pickle.UnpicklingError):  # what the weights-only loader says about Lightning's objects
        torch.load(ckpt, weights_only=True)
    loaded = VQGANTokenizer.load(cfg.targets.vqgan.model_copy(update={"checkpoint": str(ckpt)}))
    assert torch.equal(loaded.encode(frames), tok.encode(frames))
    torch.save(tok.state_dict(), tmp_path / "bare.pt")
    bare = VQGANTokenizer.load(cfg.targets.vqgan.model_copy(update={"checkpoint": str(tmp_path / "bare.pt")}))
    assert torch.equal(bare.encode(frames), tok.encode(frames))


def test_reading_a_checkpoint_never_runs_its_code(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"state_dict": {"w": torch.ones(2)}, "callbacks": Payload()}, tmp_path / "evil.ckpt")
    state = read_checkpoint(tmp_path / "evil.ckpt")
    assert not marker.exists() and torch.equal(state["w"], torch.ones(2))


def test_strict_loading_names_missing_unexpected_and_mismatched_keys(tmp_path):
    tok = small_tokenizer()
    state = dict(tok.state_dict())
    del state["encoder.mid.attn_1.q.weight"]
    state["encoder.extra.weight"] = torch.zeros(1)
    state["quantize.embedding.weight"] = torch.zeros(1024, 6)
    with pytest.raises(ValueError) as err:
        small_tokenizer().load_taming_state_dict(state, source="ck.pt")
    msg = str(err.value)
    assert "missing keys (1): encoder.mid.attn_1.q.weight" in msg
    assert "unexpected keys (1): encoder.extra.weight" in msg
    assert "quantize.embedding.weight: shape (1024, 6) in the checkpoint, (24, 6) in the model" in msg
    assert "targets.vqgan.n_embed=1024" in msg
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        read_checkpoint(tmp_path / "notes.txt")
    torch.save({"step": 3}, tmp_path / "empty.pt")
    with pytest.raises(ValueError, match="neither a taming checkpoint"):
        read_checkpoint(tmp_path / "empty.pt")


def test_missing_checkpoint_says_where_to_get_one(tmp_path):
    cfg = build_config({}, ["targets.appearance=vqgan", f"targets.vqgan.checkpoint={tmp_path / 'nope.ckpt'}"])
    with pytest.raises(FileNotFoundError) as err:
        Pretrainer(cfg)
    msg = str(err.value)
    assert f"{tmp_path / 'nope.ckpt'} does not exist" in msg and "targets.vqgan.checkpoint=" in msg
    assert all(url in msg for url in VQGAN_DOWNLOADS.values()) and "targets.codes=cached" in msg
    with pytest.raises(FileNotFoundError, match="targets.vqgan.checkpoint is not set"):
        Pretrainer(build_config({}, ["targets.appearance=vqgan"]))


def test_tokenizer_stays_frozen_fp32_and_out_of_the_trained_module(rng):
    """DeepSpeed casts (bf16), partitions (ZeRO-3) and checkpoints the module it wraps: the tokenizer is not in it."""
    cfg = build_config({}, ["targets.appearance=vqgan", "model.patch=2", "data.img_size=16", "data.num_frames=4",
                            "masking.ratio=0.75", "model.embed_dim=32", "model.num_heads=4", "model.depth=1",
                            "model.decoder_dim=16", "model.decoder_heads=2",
                            *[f"targets.vqgan.{k}={list(v) if isinstance(v, tuple) else v}" for k, v in SMALL.items()]])
    tok = small_tokenizer()
    p = Pretrainer(cfg, tokenizer=tok)
    assert p.tokenizer is tok
    assert not any(k.startswith("tokenizer") or "quantize" in k for k in p.state_dict())
    assert all(q.data_ptr() not in {t.data_ptr() for t in tok.parameters()} for q in p.parameters())
    p.bfloat16()
    tok.bfloat16()  # even cast directly, the codebook stays exact
    assert all(t.dtype == torch.float32 and not t.requires_grad for t in tok.parameters())
    assert not tok.training
    out = p(random_clip((2, 4, 16, 16, 3), rng), torch.rand(p.noise_shape(2), generator=rng))
    assert out.appearance.dtype == torch.float32 and torch.isfinite(out.total)


def test_tokenizer_must_match_the_config():
    cfg = build_config({}, ["targets.appearance=random_codes", "targets.codebook_size=64", "model.patch=2",
                            "data.img_size=16", "data.num_frames=4", "masking.ratio=0.75"])
    with pytest.raises(ValueError, match="24 codes on 2-pixel cells; the config expects 64 codes"):
        Pretrainer(cfg, tokenizer=small_tokenizer())


@pytest.mark.gpu
def test_bf16_encoder_on_gpu_with_fp32_distances():
    """On CUDA the encoder runs under bf16 autocast (weights stay fp32), codes are computed from fp32 latents,
    deterministic, and agree with the fp32 encoder's on most cells."""
    torch.manual_seed(0)
    tok = small_tokenizer().cuda()
    seen = []
    tok.encoder.conv_out.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    g = torch.Generator(device="cuda").manual_seed(0)
    frames = torch.randint(0, 256, (8, 64, 64, 3), dtype=torch.uint8, device="cuda", generator=g)
    codes = tok.encode(frames)
    assert seen == [torch.bfloat16] and tok.encode_latents(frames).dtype == torch.float32
    assert torch.equal(codes, tok.encode(frames))
    assert all(t.dtype == torch.float32 for t in tok.parameters())
    fp32 = VQGANTokenizer(**SMALL, precision="fp32").cuda()
    fp32.load_state_dict(tok.state_dict())
    agree = (fp32.encode(frames) == codes).float().mean().item()
    assert agree > 0.9, f"bf16 and fp32 codes agree on {agree:.1%} of cells"


@pytest.mark.gpu
def test_pretrainer_on_gpu_in_bf16_keeps_the_tokenizer_fp32():
    """A bf16 model on CUDA (what DeepSpeed makes of it): the tokenizer follows the clip to the GPU, stays fp32
    outside the cast, and the code cross-entropy (fused path) is finite."""
    cfg = build_config({}, ["targets.appearance=vqgan", "model.patch=2", "data.img_size=16", "data.num_frames=4",
                            "masking.ratio=0.75", "model.embed_dim=32", "model.num_heads=4", "model.depth=1",
                            "model.decoder_dim=16", "model.decoder_heads=2",
                            *[f"targets.vqgan.{k}={list(v) if isinstance(v, tuple) else v}" for k, v in SMALL.items()]])
    p = Pretrainer(cfg, tokenizer=small_tokenizer()).cuda().bfloat16()
    g = torch.Generator(device="cuda").manual_seed(0)
    clip = torch.randint(0, 256, (2, 4, 16, 16, 3), dtype=torch.uint8, device="cuda", generator=g)
    out = p(clip, torch.rand(p.noise_shape(2), device="cuda", generator=g))
    out.total.backward()
    assert torch.isfinite(out.total) and abs(out.appearance.item() - math.log(SMALL["n_embed"])) < 2
    assert all(t.device.type == "cuda" and t.dtype == torch.float32 for t in p.tokenizer.parameters())
