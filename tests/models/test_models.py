import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastmam import ops
from fastmam.config import PRESET_DIR, build_config, load_config
from fastmam.models import Pretrainer, RandomTokenizer, clip_codes, sinusoid_table
from fastmam.models.tokenizer import code_frames, select_code_frames, token_codes
from fastmam.models.vqgan import VQGANTokenizer
from tests.conftest import random_clip

PRESETS = sorted(p.stem for p in PRESET_DIR.glob("*.yaml") if not p.stem.startswith("ft_"))  # pretraining presets
SMALL = ["data.num_frames=4", "data.img_size=32", "model.patch=8", "model.embed_dim=32", "model.num_heads=4",
         "model.depth=2", "model.decoder_dim=16", "model.decoder_heads=2", "masking.ratio=0.75"]


def videomae_sinusoid_table(n_position, d_hid):
    """VideoMAE's get_sinusoid_encoding_table, verbatim."""
    def get_position_angle_vec(position):
        return [position / np.power(10000, 2 * (hid_j // 2) / d_hid) for hid_j in range(d_hid)]

    table = np.array([get_position_angle_vec(pos_i) for pos_i in range(n_position)])
    table[:, 0::2] = np.sin(table[:, 0::2])
    table[:, 1::2] = np.cos(table[:, 1::2])
    return torch.FloatTensor(table)


@pytest.mark.parametrize("n,d", [(1568, 768), (7, 10), (64, 384)])
def test_sinusoid_table_equals_videomae(n, d):
    assert torch.equal(sinusoid_table(n, d), videomae_sinusoid_table(n, d))


@pytest.mark.parametrize("name", PRESETS)
def test_preset_output_shapes_on_meta(name):
    """Every preset builds (on the meta device: no memory) and produces the documented shapes."""
    cfg = load_config(name)
    m, d = cfg.model, cfg.data
    s = (d.img_size // m.patch) ** 2
    slices = d.num_frames // m.tubelet
    nm = int(cfg.masking.ratio * s) * slices
    nv = cfg.num_tokens - nm
    b = 2
    with torch.device("meta"):
        # VQGAN presets name a checkpoint users download: build the tokenizer's architecture alone (meta, no file)
        tok = VQGANTokenizer.from_config(cfg.targets.vqgan) if cfg.targets.appearance == "vqgan" else None
        model = Pretrainer(cfg, tokenizer=tok).model
        patches = torch.empty(b, nv, m.tubelet * m.patch * m.patch * 3)
        out = model(patches, torch.zeros(b, nv, dtype=torch.long), torch.zeros(b, nm, dtype=torch.long))
    assert out.appearance_hidden.shape == (b, nm, m.decoder_dim)
    if cfg.targets.motion == "rgb_diff":
        assert out.motion_pred.shape == (b, nm, (m.tubelet - 1) * m.patch * m.patch * 3)
    elif cfg.targets.motion == "trajectory":  # (p/8)^2 points x L steps x (dx, dy)
        assert out.motion_pred.shape == (b, nm, (m.patch // 8) ** 2 * cfg.targets.trajectory_length * 2)
    else:
        assert out.motion_pred is None and model.motion_decoder is None
    assert (model.motion_decoder is None and model.appearance_decoder is None) == m.shared_decoder
    assert model.has_regressor == (m.regressor_depth > 0)
    # encoder width and depth as named: ViT blocks hold ~12 * D^2 * depth parameters (+ mlp_ratio changes)
    per_block = sum(p.numel() for p in model.blocks[0].parameters())
    expected = (4 + 2 * m.mlp_ratio) * m.embed_dim**2
    assert abs(per_block - expected) / expected < 0.01
    assert len(model.blocks) == m.depth


def test_vit_b_parameter_count():
    with torch.device("meta"):
        model = Pretrainer(load_config("vit_b")).model
    encoder = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("blocks", "patch_embed", "norm.")))
    # VideoMAE's ViT-B/16 encoder (tubelet 2): 86.2 M parameters
    assert 86.0e6 < encoder < 86.5e6


def test_encoder_sees_only_visible_tokens(rng):
    cfg = build_config({}, SMALL)
    p = Pretrainer(cfg)
    seen = []
    p.model.blocks[0].register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[1]))
    clip = random_clip((2, 4, 32, 32, 3), rng)
    p(clip, torch.rand(p.noise_shape(2), generator=rng))
    # 16 spatial positions, 12 hidden per slice, 2 slices -> 8 visible tokens
    assert seen == [8]


@pytest.mark.parametrize("extra", [
    [],                                                             # MAM2: regressor + two decoders
    ["model.regressor_depth=0", "targets.motion=none", "loss.motion_weight=0"],  # VideoMAE baseline
    ["targets.appearance=random_codes", "targets.codebook_size=64"],  # code targets, CE
    ["targets.appearance=random_codes", "targets.codebook_size=64", "targets.code_frame=all"],  # t codes per token
    ["masking.kind=random", "model.activation_checkpointing=true"],
    ["masking.decoder=running_cell"],                                # VideoMAE V2's decoder masking, MAM2's layout
    ["model.regressor_depth=0", "masking.decoder=random", "masking.decoder_ratio=0.3"],  # and VideoMAE's layout
])
def test_forward_backward_all_parameters_get_gradients(extra, rng):
    cfg = build_config({}, SMALL + extra)
    torch.manual_seed(0)
    p = Pretrainer(cfg)
    clip = random_clip((2, 4, 32, 32, 3), rng)
    out = p(clip, torch.rand(p.noise_shape(2), generator=rng))
    assert all(t.shape == () and t.dtype == torch.float32 and math.isfinite(t.item()) for t in out)
    out.total.backward()
    missing = [n for n, q in p.named_parameters() if q.requires_grad and (q.grad is None or q.grad.abs().sum() == 0)]
    assert not missing, f"parameters without gradient: {missing}"
    if "targets.appearance=random_codes" in extra:
        # chance-level cross-entropy at init: about log(64)
        assert abs(out.appearance.item() - math.log(64)) < 1.5


def test_activation_checkpointing_gives_same_gradients(rng):
    clip = random_clip((2, 4, 32, 32, 3), rng)
    noise = torch.rand(2, 16, generator=rng)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        p = Pretrainer(build_config({}, SMALL + [f"model.activation_checkpointing={ckpt}"]))
        p(clip, noise).total.backward()
        grads.append(torch.cat([q.grad.flatten() for q in p.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_random_tokenizer_codes_align_with_tokens(rng):
    tok = RandomTokenizer(codebook_size=50, downsample=8, seed=3)
    clip = random_clip((2, 4, 16, 24, 3), rng)
    codes = clip_codes(tok, clip, tubelet=2, frame="first")
    assert codes.shape == (2, 2 * 2 * 3) and codes.dtype == torch.int64
    assert 0 <= codes.min() and codes.max() < 50
    # token (slice i, row r, col c) carries the code of frame 2i's cell (r, c)
    frame2 = tok.encode(clip[:, 2])  # (B, 2, 3)
    assert torch.equal(codes.view(2, 2, 2, 3)[:, 1], frame2)
    middle = clip_codes(tok, clip, tubelet=2, frame="middle")
    assert torch.equal(middle.view(2, 2, 2, 3)[:, 0], tok.encode(clip[:, 1]))
    # deterministic by seed, and content-dependent
    assert torch.equal(codes, clip_codes(RandomTokenizer(50, 8, seed=3), clip, 2))
    assert not torch.equal(codes, clip_codes(tok, 255 - clip, 2))


def test_pretrainer_rejects_clip_that_does_not_match_config(rng):
    p = Pretrainer(build_config({}, SMALL))
    with pytest.raises(ValueError, match=r"expected \(B, 4, 32, 32, C\)"):
        p(random_clip((1, 4, 48, 48, 3), rng), torch.rand(1, 16))
    with pytest.raises(TypeError, match="must be uint8"):
        p(random_clip((1, 4, 32, 32, 3), rng, torch.float32), torch.rand(1, 16))


def test_token_codes_layout():
    """Codes whose values encode (frame, row, col) land on the token (frame // t, row, col), in token order."""
    b, t_frames, h, w, t = 2, 6, 3, 4, 2
    f, r, c = torch.meshgrid(torch.arange(t_frames), torch.arange(h), torch.arange(w), indexing="ij")
    every = (100 * f + 10 * r + c).expand(b, -1, -1, -1)  # (B, T, h, w)
    assert code_frames(t_frames, t, "first") == [0, 2, 4] and code_frames(t_frames, t, "middle") == [1, 3, 5]
    assert code_frames(t_frames, t, "all") == list(range(6))
    for frame in ("first", "middle", "all"):  # the strided view the step uses selects exactly those frames
        assert torch.equal(select_code_frames(every, t, frame), every[:, code_frames(t_frames, t, frame)]), frame
    first = token_codes(every[:, ::2], t, "first")  # (B, N), N = 3 * 3 * 4
    n = torch.arange(first.shape[1])
    slice_, row, col = n // (h * w), n % (h * w) // w, n % w
    assert torch.equal(first[0], 100 * 2 * slice_ + 10 * row + col)
    both = token_codes(every, t, "all")  # (B, N, t)
    assert torch.equal(both[0, :, 0], first[0]) and torch.equal(both[0, :, 1], first[0] + 100)
    with pytest.raises(ValueError, match="do not split into tubelets"):
        token_codes(every[:, :5], t, "all")


@pytest.mark.parametrize("frame", ["first", "middle", "all"])
def test_cached_codes_give_the_same_loss_as_online_codes(frame, rng):
    """Codes handed in with the batch (every frame's map, as the code cache delivers them) select the same
    frames as the online tokenizer: same targets, same loss."""
    cfg = build_config({}, SMALL + ["targets.appearance=random_codes", "targets.codebook_size=64",
                                    f"targets.code_frame={frame}"])
    torch.manual_seed(0)
    p = Pretrainer(cfg)
    clip = random_clip((2, 4, 32, 32, 3), rng)
    noise = torch.rand(p.noise_shape(2), generator=rng)
    every = p.tokenizer.encode(clip.flatten(0, 1)).view(2, 4, 4, 4).to(torch.int32)  # (B, T, H/p, W/p)
    online, cached = p(clip, noise), p(clip, noise, codes=every)
    assert torch.equal(torch.stack(online), torch.stack(cached))
    vis_masked = torch.arange(4).expand(2, -1)
    assert p.appearance_codes(clip, vis_masked, every).shape == ((2, 4, 2) if frame == "all" else (2, 4))
    with pytest.raises(ValueError, match=r"do not match the clip: expected \(B, T, H/p, W/p\)"):
        p(clip, noise, codes=every[:, :2])


# --------------------------------------------------------------------------- decoder masking (VideoMAE V2)

DECODER_MASKING = {
    "mam2_pixels": ["masking.decoder=running_cell"],
    "mam2_codes": ["masking.decoder=random", "masking.decoder_ratio=0.3", "targets.appearance=random_codes",
                   "targets.codebook_size=64"],
    "mam2_codes_every_frame": ["masking.decoder=running_cell", "targets.appearance=random_codes",
                               "targets.codebook_size=64", "targets.code_frame=all"],
    "videomae_pixels_motion": ["model.regressor_depth=0", "masking.decoder=running_cell", "masking.decoder_ratio=0.25"],
    "videomae_codes": ["model.regressor_depth=0", "masking.decoder=running_cell", "targets.appearance=random_codes",
                       "targets.codebook_size=64", "targets.motion=none", "loss.motion_weight=0"],
    "videomae_v2": ["model.regressor_depth=0", "masking.decoder=running_cell", "targets.motion=none",
                    "loss.motion_weight=0", "targets.normalize_pixels=true", "masking.kind=random"],
}


@pytest.mark.parametrize("case", list(DECODER_MASKING))
def test_decoder_masking_loss_is_the_full_target_restricted_to_ids_decode(case, rng):
    """With decoder masking the step computes its targets for ids_decode only; its loss equals the loss's
    specification applied to the targets of *all* masked tokens restricted to ids_decode, and to the model's
    predictions of those tokens: a mean over the B * Nd decoded tokens."""
    cfg = build_config({}, SMALL + DECODER_MASKING[case])
    torch.manual_seed(0)
    p = Pretrainer(cfg)
    m, b = cfg.model, 2
    clip = random_clip((b, 4, 32, 32, 3), rng)
    noise = torch.rand(p.noise_shape(b), generator=rng)
    got = p(clip, noise)

    encoder_noise, decoder_noise = p.split_noise(noise)
    vis = ops.tube_mask_gather(clip, encoder_noise, cfg.masking.ratio, m.tubelet, m.patch, cfg.data.mean,
                               cfg.data.std, masking=cfg.masking.kind)
    ids = ops.decoder_masking(decoder_noise, vis.ids_masked, cfg.masking.decoder_ratio, (2, 4, 4),
                              cfg.masking.decoder)
    nm, nd = vis.ids_masked.shape[1], ids.shape[1]
    assert nd == nm - int(cfg.masking.decoder_ratio * nm) < nm
    where = torch.searchsorted(vis.ids_masked, ids)  # rows of the decoded tokens among the masked ones

    def restrict(full):
        index = where.view(b, nd, *([1] * (full.dim() - 2))).expand(-1, -1, *full.shape[2:])
        return full.gather(1, index)

    tg = cfg.targets
    if p.uses_codes:
        target = restrict(p.appearance_codes(clip, vis.ids_masked))
    else:
        target = restrict(ops.pixel_target_reference(clip, vis.ids_masked, m.tubelet, m.patch, tg.normalize_pixels))
    motion_target = None
    if tg.motion != "none":
        motion_target = restrict(ops.rgb_diff_target_reference(clip, vis.ids_masked, m.tubelet, m.patch,
                                                               tg.normalize_motion))
    with torch.no_grad():
        out = p.model(vis.patches, vis.ids_keep, ids)
    head, wa, wm = p.model.appearance_head, cfg.loss.appearance_weight, cfg.loss.motion_weight
    assert out.appearance_hidden.shape[:2] == (b, nd)
    if p.codes_per_token == 1:
        want = ops.dual_decoder_loss_reference(out.appearance_hidden, head.weight, head.bias, target,
                                               out.motion_pred, motion_target, wa, wm)
    else:  # one code per frame: t appearance rows per decoded token, one motion row
        appearance = ops.dual_decoder_loss_reference(out.appearance_hidden, head.weight, head.bias, target).appearance
        diff = (out.motion_pred - motion_target).float()
        motion = diff.square().mean(-1).sum() / (b * nd)
        want = ops.LossOutput(wa * appearance + wm * motion, appearance, motion)
    for name, g, w in zip(("total", "appearance", "motion"), got, want, strict=True):
        assert torch.equal(g.detach(), w.detach()), f"{name}: {g.item()!r} != {w.item()!r}"
    # the appearance term is the mean over the decoded tokens (and their code rows), by the definition
    with torch.no_grad():
        logits = head(out.appearance_hidden).double()
        per_row = (F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
                   if p.uses_codes else (logits - target.double()).square().mean(-1).reshape(-1))
    assert per_row.numel() == b * nd * p.codes_per_token
    assert abs(got.appearance.item() - per_row.mean().item()) <= 1e-5 * per_row.mean().item()


@pytest.mark.parametrize("layout", ["mam2", "videomae"])
def test_decoder_masking_runs_regressor_and_decoders_on_decoded_tokens_only(layout, rng):
    extra = ["masking.decoder=running_cell"] + (["model.regressor_depth=0"] if layout == "videomae" else [])
    cfg = build_config({}, SMALL + extra)
    p = Pretrainer(cfg)
    seen = {}

    def hook(name):
        def record(mod, inp, out):
            seen.setdefault(name, tuple(x.shape[1] for x in inp))  # the first call (no return: keep the output)
        return record

    p.model.blocks[0].register_forward_hook(hook("encoder"))
    p.model.appearance_decoder.blocks[0].register_forward_hook(hook("appearance"))
    p.model.motion_decoder.blocks[0].register_forward_hook(hook("motion"))
    if layout == "mam2":
        p.model.regressor[0].register_forward_hook(hook("regressor"))
    p(random_clip((2, 4, 32, 32, 3), rng), torch.rand(p.noise_shape(2), generator=rng))
    # 2 slices of 4x4, 12 of 16 hidden: Nv = 8, Nm = 24, Nd = 24 - int(0.5 * 24) = 12
    nv, nd = 8, 12
    assert seen["encoder"] == (nv,)
    if layout == "mam2":
        assert seen["regressor"] == (nd, nv)  # the decoded tokens' queries; the visible latents as context
        assert seen["appearance"] == seen["motion"] == (nd,)
    else:
        assert seen["appearance"] == seen["motion"] == (nv + nd,)  # visible latents + the decoded mask tokens


def test_decoder_masking_noise_layout(rng):
    """One draw per step: the encoder mask's columns, then the decoder's (1 + N). Without decoder masking the noise
    and everything computed from it are unchanged."""
    plain = Pretrainer(build_config({}, SMALL))
    dual = Pretrainer(build_config({}, SMALL + ["masking.decoder=running_cell"]))
    assert plain.noise_shape(3) == (3, 16) and dual.noise_shape(3) == (3, 16 + 1 + 32)
    noise = torch.rand(3, 16, generator=rng)
    assert plain.split_noise(noise) == (noise, None)
    ids = torch.arange(5).expand(3, -1)
    assert plain.decoded_ids(ids, None) is ids
    full = torch.rand(dual.noise_shape(3), generator=rng)
    enc, dec = dual.split_noise(full)
    assert torch.equal(enc, full[:, :16]) and torch.equal(dec, full[:, 16:]) and enc.is_contiguous()
    with pytest.raises(ValueError, match=r"noise_shape\(B\) = \(B, 49\).*16 positions, then the decoder's 33"):
        dual(random_clip((3, 4, 32, 32, 3), rng), noise)
