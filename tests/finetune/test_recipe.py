"""The fine-tuning recipe's pieces: presets and config rules, layer-decay groups against VideoMAE's formula, and
augmentations that act identically on every frame of a clip (RandAugment, erasing, mixup, cutmix)."""

import pytest
import torch

from fastmam.config import ConfigError, load_config
from fastmam.finetuning.config import FinetuneConfig, schedule_steps

pytest.importorskip("torchvision", reason="fine-tuning augmentation needs torchvision (pip install -e .[finetune])")
pytest.importorskip("timm", reason="fine-tuning needs timm (pip install -e .[finetune])")

from fastmam.finetuning.augment import BatchAugment, ClipAugment, smooth_one_hot  # noqa: E402
from fastmam.finetuning.model import VideoClassifier, layer_decay_groups  # noqa: E402

PRESETS = ["ft_tiny", "ft_vit_b_k400", "ft_vit_b_ssv2", "ft_vit_b_ucf101", "ft_vit_b_hmdb51"]
SMALL = ["model.embed_dim=32", "model.depth=3", "model.num_heads=2", "data.num_frames=4", "data.img_size=32",
         "model.patch=8", "classifier.num_classes=5", "device=cpu"]


#: VideoMAE's recipe where ft_tiny departs from it (configs/ft_tiny.yaml): these tests check the recipe itself
RECIPE = ["augment.randaug=rand-m7-n4-mstd0.5-inc1", "augment.erasing=0.25", "classifier.drop_path=0.1",
          "classifier.pool=mean"]


def ft(*overrides):
    return load_config("ft_tiny", [*RECIPE, *overrides], root=FinetuneConfig)


@pytest.mark.parametrize("name", PRESETS)
def test_presets_validate(name):
    cfg = load_config(name, root=FinetuneConfig)
    assert cfg.optim.layer_decay <= 0.75
    if name == "ft_tiny":  # measured departures on the synthetic clips (configs/ft_tiny.yaml says why)
        assert cfg.augment.randaug_params() is None and cfg.augment.erasing == 0 and cfg.classifier.drop_path == 0
        assert cfg.classifier.pool == "max"
    else:  # VideoMAE's recipe
        assert cfg.augment.randaug_params()["num_ops"] == 4 and cfg.classifier.pool == "mean"
    assert cfg.data.flip is (name in ("ft_vit_b_k400", "ft_vit_b_ucf101", "ft_vit_b_hmdb51"))
    assert cfg.data.sampling == ("segment" if name == "ft_vit_b_ssv2" else "dense")


def test_config_kinds_are_named_not_listed_as_unknown_keys():
    with pytest.raises(ConfigError, match="pretraining config .* fastmam/pretrain.py"):
        load_config("tiny", root=FinetuneConfig)
    with pytest.raises(ConfigError, match="fine-tuning config .* fastmam/finetune.py"):
        load_config("ft_tiny")
    with pytest.raises(ConfigError, match="unknown config key 'augment.mixupp'"):
        ft("augment.mixupp=0.5")


def test_config_rules():
    assert ft("augment.randaug=rand-m7-n4-mstd0.5-inc1").augment.randaug_params() == {
        "num_ops": 4, "magnitude": 7.0, "magnitude_std": 0.5}
    assert ft("augment.randaug=").augment.randaug_params() is None
    assert load_config("ft_vit_b_k400", root=FinetuneConfig).augment.randaug_params() == {
        "num_ops": 4, "magnitude": 7.0, "magnitude_std": 0.5}
    with pytest.raises(ConfigError, match="classifier.pool"):
        ft("classifier.pool=cls")
    with pytest.raises(ConfigError, match="not a RandAugment spec"):
        ft("augment.randaug=autoaug-v0")
    with pytest.raises(ConfigError, match="inc0 is not supported"):
        ft("augment.randaug=rand-m9-n2-inc0")
    with pytest.raises(ConfigError, match="must be even with mixup"):
        ft("data.batch_size=7", "augment.mixup=0.8")
    ft("data.batch_size=7", "augment.mixup=0", "augment.cutmix=0")
    with pytest.raises(ConfigError, match="warmup_epochs"):
        ft("schedule.warmup_epochs=9", "schedule.epochs=2")


def test_schedule_counts_videos_per_step():
    cfg = ft("data.batch_size=16", "data.repeated_sampling=2", "deepspeed.gradient_accumulation_steps=2",
             "schedule.epochs=3", "schedule.warmup_epochs=1")
    # 16 clips = 8 videos per micro-step, 2 micro-steps, 2 ranks: 32 videos per optimizer step
    assert schedule_steps(cfg, 1000, 2) == (31, 93, 31)
    with pytest.raises(ConfigError, match="less than one optimizer step"):
        schedule_steps(cfg, 20, 2)


def test_layer_decay_groups_equal_videomae_formula():
    cfg = ft(*SMALL)
    model = VideoClassifier(cfg)
    groups = layer_decay_groups(model, weight_decay=0.05, layer_decay=0.75)
    depth = 3
    seen = {}
    for g in groups:
        for name in g["names"]:
            seen[name] = (g["lr_scale"], g["weight_decay"])
    assert set(seen) == {n for n, _ in model.named_parameters()}
    for name, (scale, wd) in seen.items():
        # VideoMAE get_num_layer_for_vit: patch_embed 0, blocks.i -> i + 1, the rest depth + 1
        layer = 0 if name.startswith("patch_embed") else int(name.split(".")[1]) + 1 if name.startswith("blocks.") \
            else depth + 1
        assert scale == pytest.approx(0.75 ** (depth + 1 - layer)), name
        one_d = dict(model.named_parameters())[name].ndim == 1
        assert wd == (0.0 if one_d or name.endswith(".bias") else 0.05), name
    assert seen["head.weight"] == (1.0, 0.05) and seen["patch_embed.weight"][0] == pytest.approx(0.75**4)
    assert seen["blocks.0.attn.q_bias"] == (pytest.approx(0.75**3), 0.0)


def test_head_init_scale_and_mean_pooling():
    cfg = ft(*SMALL)
    torch.manual_seed(0)
    model = VideoClassifier(cfg)
    # trunc_normal(std .02) x 0.001, as VideoMAE's init_scale; 160 draws: the sample std is within 30%
    assert 0.7 * 2e-5 < model.head.weight.std().item() < 1.3 * 2e-5 and not model.head.bias.any()
    clip = torch.randint(0, 256, (2, 4, 32, 32, 3), dtype=torch.uint8)
    model.eval()  # no stochastic depth
    tokens = model.forward_features(clip)
    expected = model.head(model.fc_norm(tokens.mean(1)))
    torch.testing.assert_close(model(clip), expected)
    # in training, stochastic depth drops residual branches per sample: outputs change
    assert not torch.allclose(model.train().forward_features(clip), tokens)


def test_max_pooling_takes_each_channels_largest_token():
    torch.manual_seed(0)
    model = VideoClassifier(ft(*SMALL, "classifier.pool=max")).eval()
    clip = torch.randint(0, 256, (2, 4, 32, 32, 3), dtype=torch.uint8)
    tokens = model.forward_features(clip)
    # plain Python over every (clip, channel): the largest of its token values
    pooled = torch.tensor([[max(tokens[b, :, c].tolist()) for c in range(tokens.shape[2])]
                           for b in range(tokens.shape[0])])
    torch.testing.assert_close(model(clip), model.head(model.fc_norm(pooled)))
    assert not torch.allclose(pooled, tokens.mean(1))


def _same_frames(b=4, t=6, s=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    frame = torch.randint(0, 256, (b, 1, s, s, 3), generator=g, dtype=torch.uint8)
    return frame.expand(b, t, s, s, 3).contiguous()


def test_randaugment_draws_once_per_clip_and_acts_on_every_frame():
    cfg = ft()
    aug = ClipAugment(cfg.augment, cfg.data.mean)
    clip = _same_frames(1, 8, 48)[0]
    changed = 0
    for key in range(12):
        out = aug(clip, key)
        assert out.shape == clip.shape and out.dtype == torch.uint8
        assert (out == out[:1]).all(), f"key {key}: frames were augmented differently"
        torch.testing.assert_close(aug(clip, key), out, rtol=0, atol=0)  # a pure function of the key
        changed += int(not torch.equal(out, clip))
    assert changed >= 10  # 4 ops at magnitude ~7 change nearly every clip


def test_erasing_one_box_per_clip_in_every_frame():
    cfg = ft("augment.erasing=1.0", "augment.mixup=0", "augment.cutmix=0", "augment.label_smoothing=0")
    aug = BatchAugment(cfg)
    clip = _same_frames(6, 8, 40)
    labels = torch.arange(6) % 9
    x, targets = aug(clip, labels, key=3)
    diff = x != clip.float()  # (B, T, H, W, C)
    assert torch.equal(targets, torch.nn.functional.one_hot(labels, 9).float())
    for i in range(6):
        region = diff[i].any(-1)  # (T, H, W)
        assert region[0].any(), "p=1 must erase a box"
        assert (region == region[:1]).all(), "the erased box differs between frames"
        rows, cols = region[0].any(1).nonzero().flatten(), region[0].any(0).nonzero().flatten()
        box = torch.zeros_like(region[0])
        box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
        assert region[0].sum() >= 0.95 * box.sum()  # a rectangle (a noise pixel may equal the input by chance)
    # pixel mode: N(0, 1) after the classifier's normalization
    mean, std = torch.tensor(cfg.data.mean) * 255, torch.tensor(cfg.data.std) * 255
    z = (x - mean) / std
    assert abs(z[diff].mean().item()) < 0.1 and abs(z[diff].std().item() - 1) < 0.1
    x2, _ = aug(clip, labels, key=3)
    assert torch.equal(x, x2)


@pytest.mark.parametrize("mode", ["mixup", "cutmix"])
def test_mixup_and_cutmix_act_identically_on_every_frame(mode):
    over = ["augment.erasing=0", "augment.mixup=0.8" if mode == "mixup" else "augment.mixup=0",
            "augment.cutmix=1.0" if mode == "cutmix" else "augment.cutmix=0"]
    cfg = ft(*over)
    aug = BatchAugment(cfg)
    clip = _same_frames(8, 6, 32, seed=1)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    x, targets = aug(clip, labels, key=11)
    assert (x == x[:, :1]).all(), "frames of a clip were mixed differently"
    assert torch.allclose(targets.sum(1), torch.ones(8))
    flipped = clip.flip(0).float()
    if mode == "mixup":
        # x = lam * clip + (1 - lam) * flipped, one lam for the batch
        own = targets[torch.arange(8), labels] - 0.1 / 9
        lam = (own / (1 - 0.1)).mean()
        # fp32: pixels up to 255 and lam recovered from fp32 targets (~1e-7 relative): ~5e-5 of error
        torch.testing.assert_close(x, lam * clip.float() + (1 - lam) * flipped, rtol=0, atol=2e-4)
    else:
        pasted = (x != clip.float()).any(-1)[:, 0]  # (B, H, W) where the mirror clip was pasted
        assert pasted.any(), "this key's draw must cut a box"
        same_everywhere = (pasted == pasted[:1]) | (clip[:, 0] == clip.flip(0)[:, 0]).all(-1)
        assert same_everywhere.all(), "cutmix's box differs between clips of the batch"
        assert torch.equal(x[(x != clip.float())], flipped[(x != clip.float())])


def test_label_smoothing_targets():
    t = smooth_one_hot(torch.tensor([2, 0]), 4, 0.1)
    torch.testing.assert_close(t, torch.tensor([[0.025, 0.025, 0.925, 0.025], [0.925, 0.025, 0.025, 0.025]]))
