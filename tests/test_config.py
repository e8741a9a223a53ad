import json

import pytest

from fastmam.config import PRESET_DIR, ConfigError, build_config, deepspeed_config, load_config, peak_lr
from fastmam.pretrain import main

PRESETS = sorted(p.stem for p in PRESET_DIR.glob("*.yaml") if not p.stem.startswith("ft_"))  # ft_*: test_recipe.py


def test_presets_exist():
    assert {"tiny", "vit_s", "vit_b", "vit_l", "vit_h", "vit_g", "videomae_vit_b"} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_loads(name):
    cfg = load_config(name)
    assert cfg.num_tokens > 0
    if not name.startswith("tiny"):
        # the VideoMAE / MAM2 recipe: 16x224, tubelet 2, patch 16, 90% tube masking, AdamW 0.9/0.95, 1.5e-4 / 256
        assert (cfg.data.num_frames, cfg.data.img_size, cfg.model.tubelet, cfg.model.patch) == (16, 224, 2, 16)
        # MME's scripts mask 70% (configs/mme_vit_b.yaml)
        assert (cfg.masking.kind, cfg.masking.ratio) == ("tube", 0.7 if name == "mme_vit_b" else 0.9)
        assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.base_lr == 1.5e-4 and cfg.optim.weight_decay == 0.05


def test_dataset_presets_layer_over_their_base():
    b, k400, ssv2 = load_config("vit_b"), load_config("vit_b_k400"), load_config("vit_b_ssv2")
    assert k400.model == b.model and k400.optim == b.optim and ssv2.model == b.model
    assert (k400.data.source, k400.data.backend, k400.data.stride, k400.data.flip) == ("video", "dali", 4, True)
    assert (ssv2.data.stride, ssv2.data.flip) == (2, False)  # SSv2's labels name directions
    tv = load_config("tiny_video")
    assert tv.model == load_config("tiny").model and tv.data.source == "video" and tv.data.backend == "pyav"


def test_base_key(tmp_path):
    (tmp_path / "parent.yaml").write_text("base: tiny\nmodel:\n  depth: 3\n")
    (tmp_path / "child.yaml").write_text("base: parent.yaml\nmodel:\n  embed_dim: 64\n")
    cfg = load_config(str(tmp_path / "child.yaml"))
    assert (cfg.model.depth, cfg.model.embed_dim, cfg.model.patch) == (3, 64, 8)  # child > parent > tiny
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="form a cycle"):
        load_config(str(tmp_path / "loop.yaml"))
    (tmp_path / "bad.yaml").write_text("base: [tiny]\n")
    with pytest.raises(ConfigError, match="'base' must name one preset"):
        load_config(str(tmp_path / "bad.yaml"))


def test_video_data_rules():
    with pytest.raises(ConfigError, match="needs data.train_list"):
        build_config({}, ["data.source=video"])
    with pytest.raises(ConfigError, match="rgb_diff_dense' needs data.source='video'"):
        build_config({}, ["targets.motion=rgb_diff_dense"])
    with pytest.raises(ConfigError, match="'data.backend': Input should be 'pyav', 'decord' or 'dali'"):
        build_config({}, ["data.backend=opencv"])


def test_load_by_path_and_overrides(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nmodel:\n  depth: 3\n")
    cfg = load_config(str(path), ["model.depth=5", "optim.betas=[0.8, 0.9]", "targets.motion=none", "name=x"])
    assert cfg.model.depth == 5 and cfg.optim.betas == (0.8, 0.9) and cfg.targets.motion == "none"
    assert cfg.name == "x" and str(cfg.run_dir) == "runs/x"


@pytest.mark.parametrize("overrides,message", [
    (["model.dpth=3"], r"unknown config key 'model.dpth'.*allowed: tubelet, patch"),
    (["modle.depth=3"], r"'modle' is not a key of the top level"),
    (["model.depth.x=1"], r"'model.depth' is a value, not a section"),
    (["optim.base_lr=-1"], r"'optim.base_lr': Input should be greater than 0 \(got -1\)"),
    (["masking.kind=cube"], r"'masking.kind': Input should be 'tube' or 'random'"),
    (["masking.ratio=1.0"], r"'masking.ratio': Input should be less than 1"),
    (["masking.ratio=0.001"], r"hides 0 of 196 positions"),
    (["data.img_size=100"], r"data.img_size=100 must be a multiple of model.patch=16"),
    (["data.num_frames=15"], r"multiple of model.tubelet"),
    (["model.tubelet=1", "data.num_frames=16"], r"rgb_diff' needs model.tubelet >= 2"),
    (["schedule.warmup_steps=10", "schedule.steps=5"], r"warmup_steps=10 exceeds"),
    (["model.depth"], r"must look like key.sub=value"),
    (["deepspeed.zero_stage=4"], r"less than or equal to 3"),
    (["targets.appearance=vqgan", "model.patch=8"], r"model.patch=8 but the VQGAN downsamples by 16"),
    (["targets.appearance=vqgan", "targets.codebook_size=1024"],
     r"targets.codebook_size=1024 contradicts targets.vqgan.n_embed=16384"),
    (["targets.appearance=vqgan", "targets.vqgan.ch=48"], r"channels \[48\] .* not multiples of 32"),
    (["targets.codes=cached"], r"targets.codes='cached' needs targets.appearance='vqgan'"),
    (["targets.appearance=vqgan", "targets.codes=cached"], r"needs targets.code_cache"),
    (["targets.appearance=vqgan", "targets.codes=cached", "targets.code_cache=/c"], r"needs data.source='video'"),
    (["targets.code_frame=last"], r"'targets.code_frame': Input should be 'first', 'middle' or 'all'"),
])
def test_bad_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_config({}, overrides)


def test_bad_yaml_and_unknown_preset(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  depth: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    nested = tmp_path / "nested.yaml"
    nested.write_text("model:\n  decoder:\n    depth: 2\n")
    with pytest.raises(ConfigError, match="unknown config key 'model.decoder'"):
        load_config(str(nested))
    with pytest.raises(ConfigError, match="presets: .*tiny"):
        load_config("no_such_preset")


def test_cli_reports_config_errors(capsys):
    assert main(["--config", "tiny", "optim.lr=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'optim.lr'" in err and "base_lr" in err


def test_deepspeed_json_is_derived():
    cfg = build_config({}, ["data.batch_size=8", "deepspeed.gradient_accumulation_steps=4", "deepspeed.zero_stage=3",
                            "optim.grad_clip=0.5"])
    ds = deepspeed_config(cfg, world_size=2, device_type="cuda")
    assert ds["train_batch_size"] == 64 and ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 4 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] is True
    # our guard skips non-finite steps on the device; DeepSpeed's per-step host check is off where it exists
    assert ds["bf16"].get("check_grad_overflow", False) is False
    assert deepspeed_config(cfg, 2, "cpu")["bf16"] == {"enabled": False}
    assert "offload_optimizer" not in ds["zero_optimization"] and "zero_force_ds_cpu_optimizer" not in ds
    json.dumps(ds)  # serializable as the JSON DeepSpeed reads
    assert peak_lr(cfg, 2) == pytest.approx(1.5e-4 * 64 / 256)
    with pytest.raises(ConfigError, match="bf16' needs a CUDA device"):
        deepspeed_config(build_config({}, ["deepspeed.precision=bf16"]), 1, "cpu")


def test_offload_json_and_rules():
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    cfg = build_config({}, ["deepspeed.zero_stage=3", "deepspeed.offload_optimizer=true",
                            "deepspeed.offload_params=true"])
    ds = deepspeed_config(cfg, world_size=1, device_type="cuda")
    zero = ds["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert ds["zero_force_ds_cpu_optimizer"] is False  # our fused AdamW runs the offloaded step
    # DeepSpeed's own config models accept what we derive (they reject unknown keys)
    parsed = DeepSpeedZeroConfig(**zero)
    assert parsed.stage == 3 and parsed.offload_optimizer.device == "cpu" and parsed.offload_param.device == "cpu"
    DeepSpeedBF16Config(**ds["bf16"])
    assert deepspeed_config(cfg, 1, "cpu")["zero_optimization"]["offload_optimizer"]["pin_memory"] is False
    with pytest.raises(ConfigError, match=r"offload_optimizer needs deepspeed.zero_stage >= 1 \(got 0\)"):
        build_config({}, ["deepspeed.offload_optimizer=true"])
    with pytest.raises(ConfigError, match=r"offload_params needs deepspeed.zero_stage=3 \(got 2\)"):
        build_config({}, ["deepspeed.zero_stage=2", "deepspeed.offload_params=true"])
    with pytest.raises(ConfigError, match="safety.nonfinite"):
        build_config({}, ["safety.nonfinite=ignore"])


def test_vqgan_codebook_comes_from_the_tokenizer_config():
    cfg = build_config({}, ["targets.appearance=vqgan", "targets.vqgan.n_embed=1024"])
    assert cfg.targets.num_codes == 1024 and cfg.targets.vqgan.downsample == 16
    assert build_config({}, ["targets.appearance=random_codes", "targets.codebook_size=64"]).targets.num_codes == 64
    # stating the same number twice is allowed; only a contradiction is an error
    assert build_config({}, ["targets.appearance=vqgan", "targets.vqgan.n_embed=1024",
                             "targets.codebook_size=1024"]).targets.num_codes == 1024
    vq = load_config("vit_b_vqgan")
    assert vq.targets.appearance == "vqgan" and vq.targets.vqgan.checkpoint.endswith("last.ckpt")


def test_a_saved_vqgan_config_reads_back():
    """config.yaml of a VQGAN run validates again (the written codebook_size default once contradicted n_embed)."""
    import yaml

    from fastmam.config import dump_config, readable_tree

    cfg = build_config({}, ["targets.appearance=vqgan", "targets.vqgan.n_embed=1024"])
    again = build_config(yaml.safe_load(dump_config(cfg)))
    assert again == cfg and again.targets.num_codes == 1024
    # a file written before the fix (it holds codebook_size) is read by the run loaders through readable_tree
    old = cfg.model_dump(mode="json")
    with pytest.raises(ConfigError, match="contradicts targets.vqgan.n_embed"):
        build_config(old)
    assert build_config(readable_tree(old)) == cfg


def test_decoder_masking_options():
    """masking.decoder (VideoMAE V2's decoder masking) is an option of every pretraining preset; off by default."""
    for name in PRESETS:
        if name != "videomaev2_vit_b":
            assert load_config(name).masking.decoder == "none", name
        cfg = load_config(name, ["masking.decoder=running_cell"])
        assert (cfg.masking.decoder, cfg.masking.decoder_ratio) == ("running_cell", 0.5)
    v2, v1 = load_config("videomaev2_vit_b"), load_config("videomae_vit_b")
    assert (v2.masking.decoder, v2.masking.decoder_ratio) == ("running_cell", 0.5)
    assert v2.model == v1.model and v2.targets == v1.targets and v2.loss == v1.loss and v2.data == v1.data
    assert load_config("tiny", ["masking.decoder=random", "masking.decoder_ratio=0.3"]).masking.decoder_ratio == 0.3


@pytest.mark.parametrize("overrides,message", [
    (["masking.decoder=sparse"], r"masking.decoder.*'none', 'running_cell' or 'random'"),
    (["masking.decoder=running_cell", "masking.decoder_ratio=0"], r"masking.decoder_ratio': Input should be greater"),
    (["masking.decoder=random", "masking.decoder_ratio=1.0"], r"masking.decoder_ratio': Input should be less"),
    (["masking.decoder=running_cell", "masking.decoder_ratio=0.6"], r"must be 0.25, 0.5 or 0.75 \(got 0.6\)"),
    (["masking.decoder_ratio=0.25"], r"decoder_ratio=0.25 has no effect with masking.decoder='none'"),
    (["masking.decoder=running_cell", "data.img_size=56"], r"7x7 patch grid.*even number of rows and columns"),
    (["masking.decoder=random", "masking.decoder_ratio=0.01", "data.img_size=32", "data.num_frames=2"],
     r"decoder_ratio=0.01 drops 0 of the 12 masked tokens"),
])
def test_decoder_masking_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", overrides)
