"""bench/supervised.py: --quick trains the ViT (mean- and max-pooled heads) and the 3D CNN on the motion labels and
reports held-out curves with their standard errors. What each model reaches is not asserted: the script reports it."""

import json
import math

import pytest

from bench import supervised


@pytest.mark.slow
def test_quick_run_reports_both_models(tmp_path, capsys):
    out = tmp_path / "supervised.json"
    assert supervised.main(["--quick", "--json", str(out)]) == 0
    assert "vit" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["environment"]["torch"] and report["num_classes"] == 9 and math.isclose(report["chance"], 100 / 9)
    assert [r["model"] for r in report["results"]] == ["vit", "vit_max", "cnn"]
    n = report["settings"]["val_videos"]
    for r in report["results"]:
        assert r["parameters"] > 0 and r["init"] == "random"
        assert [c["step"] for c in r["curve"]] == [2, 4]
        for c in r["curve"]:
            assert 0 <= c["top1"] <= 100 and c["clips_seen"] == c["step"] * report["settings"]["batch"]
            assert math.isclose(c["se"], 100 * math.sqrt(c["top1"] / 100 * (1 - c["top1"] / 100) / n), abs_tol=1e-9)


def test_bad_arguments_are_named(capsys):
    with pytest.raises(SystemExit):
        supervised.parse_args(["--steps", "0"])
    assert "--steps must be >= 1, got 0" in capsys.readouterr().err
