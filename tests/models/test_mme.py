"""MME's layout and targets on the synthetic data: the shapes' true trajectories, the shared decoder with a head per
target, the HOG / trajectory loss against a hand-written reference, and the config rules."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from fastmam import ops
from fastmam.config import ConfigError, build_config, load_config
from fastmam.data.synthetic import MOTIONS, SyntheticShapes
from fastmam.models import Pretrainer

SMALL = ["data.num_frames=4", "data.img_size=32", "model.patch=16", "model.embed_dim=32", "model.num_heads=4",
         "model.depth=2", "model.decoder_dim=16", "model.decoder_heads=2", "masking.ratio=0.5"]
MME = ["model.regressor_depth=0", "model.shared_decoder=true", "targets.appearance=hog", "targets.motion=trajectory"]


def first_index(ds: SyntheticShapes, motion: str, shape: str | None = None) -> int:
    for i in range(len(ds)):
        tr = ds.trajectory(i)
        if MOTIONS[tr.label] == motion and (shape is None or tr.shape == shape):
            return i
    raise AssertionError(f"no {motion} clip")


def grid_and_on(ds, index, f):
    tr = ds.trajectory(index)
    gx = 4.0 + 8 * np.arange(ds.width // 8)
    gy = 4.0 + 8 * np.arange(ds.height // 8)
    from fastmam.data.synthetic import _coverage

    on = _coverage(tr.shape, tr.center[f, 0], tr.center[f, 1], tr.angle[f], tr.radius[f], gx[None, :],
                   gy[:, None]) >= 0.5
    return gx, gy, on, tr


@pytest.fixture(scope="module")
def shapes():
    return SyntheticShapes(400, 8, 64, 64, seed=3)


def test_static_clip_has_zero_trajectories(shapes):
    i = first_index(shapes, "static")
    disp, valid = shapes.true_trajectories(i, 2, 4)
    assert disp.shape == (4, 8, 8, 4, 2) and disp.dtype == np.float32 and valid.dtype == bool
    assert not disp.any() and valid.all()


@pytest.mark.parametrize("motion", ["left", "right", "up", "down"])
def test_translating_shape_points_move_with_its_velocity(shapes, motion):
    i = first_index(shapes, motion)
    disp, valid = shapes.true_trajectories(i, 2, 4)
    tr = shapes.trajectory(i)
    velocity = tr.center[1] - tr.center[0]
    assert np.abs(velocity).max() > 0.4
    for n, f in enumerate(range(0, 8, 2)):
        _, _, on, _ = grid_and_on(shapes, i, f)
        assert on.sum() >= 2, "the shape covers grid points"
        np.testing.assert_allclose(disp[n][on], np.broadcast_to(velocity, disp[n][on].shape), atol=1e-5)
        assert not disp[n][~on].any()  # background points do not move
        assert valid[n].all()  # the shape stays inside the frame (SyntheticShapes' rule), the background is static


@pytest.mark.parametrize("motion", ["rotate_cw", "grow", "shrink"])
def test_rotation_and_scale_follow_the_rigid_transform(shapes, motion):
    i = first_index(shapes, motion)
    tubelet, steps = 4, 3
    disp, valid = shapes.true_trajectories(i, tubelet, steps)
    ext = shapes._sample(i, extra=steps)[0]  # the closed-form motion past the clip's last frame
    tr = shapes.trajectory(i)
    np.testing.assert_array_equal(ext.center[:8], tr.center)  # the first T frames are the clip's own
    np.testing.assert_array_equal(ext.angle[:8], tr.angle)
    np.testing.assert_array_equal(ext.radius[:8], tr.radius)
    for n, f in enumerate(range(0, 8, tubelet)):
        gx, gy, on, _ = grid_and_on(shapes, i, f)
        jy, jx = np.nonzero(on)
        c0, a0, r0 = ext.center[f], ext.angle[f], ext.radius[f]
        j = int(np.argmax(np.hypot(gx[jx] - c0[0], gy[jy] - c0[1])))  # the point farthest from the centre
        p = np.array([gx[jx[j]], gy[jy[j]]])
        pos = [p]
        for s in range(f + 1, f + steps + 1):
            da, k = ext.angle[s] - a0, ext.radius[s] / r0
            rot = np.array([[math.cos(da), -math.sin(da)], [math.sin(da), math.cos(da)]])
            pos.append(ext.center[s] + k * rot @ (p - c0))
        expected = np.diff(np.array(pos), axis=0)
        np.testing.assert_allclose(disp[n, jy[j], jx[j]], expected, atol=1e-5)
        assert np.abs(expected).max() > 1e-3  # the point really moves (shrinking small shapes: slowly)
    if motion == "rotate_cw":  # clockwise on screen: a point right of the centre (y down) moves down
        tr0 = ext
        right = (gx[None, :] > tr0.center[0, 0] + 2) & on & (np.abs(gy[:, None] - tr0.center[0, 1]) < 4)
        if right.any():
            assert (disp[0][right][:, 0, 1] > 0).all()


def test_leaving_points_are_invalid():
    """A grid point on a shape moving right near the border leaves the frame within L steps: invalid."""
    ds = SyntheticShapes(400, 8, 64, 64, seed=3)
    found = False
    for i in range(len(ds)):
        tr = ds.trajectory(i)
        if MOTIONS[tr.label] not in ("left", "right", "up", "down"):
            continue
        disp, valid = ds.true_trajectories(i, 2, 40)  # far past the clip: the shape leaves the frame
        if not valid.all():
            found = True
            gx, gy, on, _ = grid_and_on(ds, i, 0)
            assert not (~valid[0] & ~on).any(), "only points on the moving shape can leave"
            end = np.stack(np.broadcast_arrays(gx[None, :], gy[:, None]), -1) + disp[0].sum(2)
            outside = (end[..., 0] < 0) | (end[..., 0] >= 64) | (end[..., 1] < 0) | (end[..., 1] >= 64)
            assert (outside[~valid[0]]).all()
            break
    assert found


def test_trajectories_do_not_change_the_pixels():
    plain = SyntheticShapes(20, 8, 64, 64, seed=1)
    traj = SyntheticShapes(20, 8, 64, 64, seed=1, trajectories=(2, 4))
    for i in range(20):
        a, b = plain[i], traj[i]
        assert torch.equal(a["video"], b["video"]) and a["label"] == b["label"]
        assert b["trajectories"].shape == (4, 8, 8, 4, 2) and b["trajectory_valid"].shape == (4, 8, 8)
        d, v = traj.true_trajectories(i, 2, 4)
        assert torch.equal(b["trajectories"], torch.from_numpy(d)) and torch.equal(b["trajectory_valid"],
                                                                                   torch.from_numpy(v))
    with pytest.raises(ValueError, match="tubelet=3 must be a positive int dividing num_frames=8"):
        SyntheticShapes(20, 8, 64, 64, trajectories=(3, 4))


def test_shared_decoder_runs_one_decoder_with_a_head_per_target(rng):
    cfg = build_config({}, SMALL + MME)
    p = Pretrainer(cfg)
    m = p.model
    assert m.appearance_decoder is None and m.motion_decoder is None
    assert sum(type(x).__name__ == "Decoder" for x in m.modules()) == 1
    assert isinstance(m.appearance_hidden[0], nn.Linear) and isinstance(m.appearance_hidden[1], nn.GELU)
    assert m.appearance_head.out_features == 108 and m.appearance_head.in_features == 16
    assert [type(x).__name__ for x in m.motion_head] == ["Linear", "GELU", "Linear"]
    assert m.motion_head[0].out_features == 16 and m.motion_head[2].out_features == 32  # 2x2 points x 4 x (dx, dy)
    calls = []
    m.decoder.register_forward_hook(lambda *a: calls.append(1))
    for blk in m.decoder.blocks:
        blk.register_forward_hook(lambda *a: calls.append(2))
    clip, noise, disp, valid = mme_inputs(cfg, p, rng)
    p(clip, noise, trajectories=disp, trajectory_valid=valid).total.backward()
    assert calls.count(1) == 1 and calls.count(2) == cfg.model.decoder_depth
    # the separate-decoder default is unchanged: two decoders, linear heads
    sep = Pretrainer(build_config({}, SMALL)).model
    assert sum(type(x).__name__ == "Decoder" for x in sep.modules()) == 2 and isinstance(sep.motion_head, nn.Linear)


def mme_inputs(cfg, p, rng, b=2):
    d = cfg.data
    clip = torch.randint(0, 256, (b, d.num_frames, d.img_size, d.img_size, 3), dtype=torch.uint8, generator=rng)
    noise = torch.rand(p.noise_shape(b), generator=rng)
    g = d.img_size // 8
    disp = torch.randn(b, d.num_frames // cfg.model.tubelet, g, g, cfg.targets.trajectory_length, 2, generator=rng) * 3
    valid = torch.rand(b, d.num_frames // cfg.model.tubelet, g, g, generator=rng) > 0.2
    return clip, noise, disp, valid


@pytest.mark.parametrize("extra", [[], ["masking.decoder=random", "masking.decoder_ratio=0.5"],
                                   ["targets.trajectory_norm=global", "model.shared_decoder=false",
                                    "loss.motion_weight=0.3", "model.regressor_depth=1"]],
                         ids=["mme", "decoder_masking", "global_separate"])
def test_hog_trajectory_loss_equals_a_hand_written_reference(extra, rng):
    cfg = build_config({}, SMALL + MME + ["data.num_frames=8", "loss.appearance_weight=0.7"] + extra)
    torch.manual_seed(0)
    p = Pretrainer(cfg)
    clip, noise, disp, valid = mme_inputs(cfg, p, rng)
    out = p(clip, noise, trajectories=disp, trajectory_valid=valid)
    # by hand: the same decoded tokens, the model's outputs, the targets' references, plain MSEs
    m = cfg.model
    enc_noise, dec_noise = p.split_noise(noise)
    vis = ops.tube_mask_gather(clip, enc_noise, cfg.masking.ratio, m.tubelet, m.patch, cfg.data.mean, cfg.data.std)
    ids = p.decoded_ids(vis.ids_masked, dec_noise)
    assert (ids.shape[1] < vis.ids_masked.shape[1]) == ("masking.decoder=random" in extra)
    o = p.model(vis.patches, vis.ids_keep, ids)
    hog = ops.hog_target_reference(clip, ids, m.tubelet, m.patch, "first")
    pred = o.appearance_hidden @ p.model.appearance_head.weight.T + p.model.appearance_head.bias
    appearance = (pred - hog).square().mean()
    target, weight = ops.trajectory_target_reference(disp, valid, ids, m.tubelet, m.patch,
                                                     cfg.targets.trajectory_norm)
    motion = (weight * (o.motion_pred - target).square()).sum() / weight.sum()
    torch.testing.assert_close(out.appearance, appearance, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.motion, motion, rtol=1e-5, atol=1e-6)
    wa, wm = cfg.loss.appearance_weight, cfg.loss.motion_weight
    torch.testing.assert_close(out.total, wa * appearance + wm * motion, rtol=1e-5, atol=1e-6)


def test_trajectory_target_is_required(rng):
    cfg = build_config({}, SMALL + MME)
    p = Pretrainer(cfg)
    clip, noise, _, _ = mme_inputs(cfg, p, rng)
    with pytest.raises(ValueError, match="needs trajectories= and trajectory_valid="):
        p(clip, noise)


@pytest.mark.parametrize("overrides,match", [
    (["targets.appearance=hog", "model.patch=4", "data.img_size=32"], "appearance='hog'.*multiple of 8"),
    (["targets.motion=trajectory", "model.patch=4", "data.img_size=32"], "motion='trajectory'.*multiple of 8"),
    (["targets.motion=trajectory", "data.source=video", "data.train_list=x.csv"],
     r"needs targets.trajectory_cache.*python -m fastmam.data.trajectories --list x.csv --out DIR --length 4"),
    (["targets.motion=trajectory", "targets.trajectory_norm=bad"], "trajectory_norm"),
    (["targets.motion=trajectory", "targets.trajectory_length=0"], "trajectory_length"),
])
def test_config_rules(overrides, match):
    with pytest.raises(ConfigError, match=match):
        build_config({}, overrides)


def test_method_presets():
    mme, tiny = load_config("mme_vit_b"), load_config("tiny_mme")
    assert (mme.masking.ratio, mme.model.decoder_depth, mme.model.decoder_dim, mme.model.decoder_heads) == \
        (0.7, 1, 192, 6)
    assert mme.model.shared_decoder and mme.model.regressor_depth == 0
    assert (mme.targets.appearance, mme.targets.motion, mme.targets.trajectory_length,
            mme.targets.trajectory_norm) == ("hog", "trajectory", 4, "patch_std")
    assert tiny.model.shared_decoder and tiny.targets.motion == "trajectory" and tiny.data.source == "synthetic"
    assert load_config("mam2_vit_b") == load_config("vit_b")  # vit_b stays an alias of MAM2's preset
    mm = load_config("motionmae_vit_b")
    assert mm.model.regressor_depth == 0 and mm.targets.motion == "rgb_diff" and mm.loss.motion_weight == 1.0
    assert load_config("tiny_videomae").targets.motion == "none"
    assert load_config("tiny_motionmae").model.regressor_depth == 0
