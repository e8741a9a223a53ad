import json

from bench.throughput import main


def test_quick_benchmark_writes_rows(tmp_path, capsys):
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    rows = json.loads(next(tmp_path.glob("throughput_cpu_*.json")).read_text())
    ops = {r["op"] for r in rows}
    assert {"tube_mask_gather", "pixel_target", "rgb_diff_target", "dual_decoder_loss", "train_step"} <= ops
    for r in rows:
        assert r["ms_q20"] <= r["ms_median"] <= r["ms_q80"] and r["ms_median"] > 0
        assert r["device_type"] == "cpu" and r["torch"] and "shape" in r and "commit" in r
    assert "tube_mask_gather" in capsys.readouterr().out
