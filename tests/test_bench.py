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
        if r["pass"] == "fwd" and r["op"] != "train_step":
            assert r["gb_per_s"] > 0 and r["pct_copy_bw"] > 0
    out = capsys.readouterr().out
    assert "measured copy bandwidth" in out and "tube_mask_gather" in out
    if importlib.util.find_spec("matplotlib"):
        assert path.with_suffix(".png").stat().st_size > 1000
