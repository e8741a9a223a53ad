"""bench/representation.py: --quick trains every objective, probes them and the controls, prints the table and
writes a JSON report whose numbers are in range. Which objective wins is not asserted: the benchmark reports it."""

import json
import math

import pytest

from bench import representation

PROBES = ("knn", "linear", "linear_time", "linear_max", "attentive")


@pytest.mark.slow
def test_quick_run_reports_every_objective_with_errors_and_baselines(tmp_path, capsys):
    out = tmp_path / "report.json"
    # 2 steps, 18 + 18 clips: the machinery, not the numbers (those are chance-level this short)
    assert representation.main(["--quick", "--steps", "2", "--train-clips", "18", "--val-clips", "18",
                                "--out-dir", str(tmp_path / "runs"), "--json", str(out), "--jobs", "2"]) == 0
    table = capsys.readouterr().out
    for name in (*representation.OBJECTIVES, "random", "control: frame_pixels", "control: frame_diffs"):
        assert name in table
    report = json.loads(out.read_text())
    assert report["environment"]["torch"] and "commit" in report["environment"]
    s = report["settings"]
    assert s["steps"] == 2 and s["seeds"] == [0] and s["train_clips"] == 18 and s["val_clips"] == 18
    assert s["num_classes"] == 9 and math.isclose(s["chance"], 100 / 9)
    assert set(report["summary"]) == {*representation.OBJECTIVES, "random"}
    rows = report["rows"]
    assert sorted(r["objective"] for r in rows) == sorted([*representation.OBJECTIVES, "random"])
    for row in rows:
        assert set(row["probes"]) == set(PROBES)
        for p in PROBES:
            top1, se = row["probes"][p]["top1"], row["probes"][p]["se"]
            assert 0 <= top1 <= 100 and 0 <= se <= 100 * math.sqrt(0.25 / 18) + 1e-9
            assert math.isclose(se, 100 * math.sqrt(top1 / 100 * (1 - top1 / 100) / 18), rel_tol=1e-6, abs_tol=1e-9)
        assert -1 <= row["pooled_cosine"] <= 1 and row["token_change"] >= 0
        if row["objective"] == "random":
            assert row["steps"] == 0
            continue
        assert row["steps"] == 2 and row["train_seconds"] > 0
        # the motion-only ablations weight the appearance term 0: no loss or baseline is reported for it
        has_appearance = "loss.appearance_weight=0" not in representation.OBJECTIVES[row["objective"]]
        assert (row["loss_appearance"] is not None) == has_appearance
        assert (row["baseline_appearance"] is not None) == has_appearance
        if has_appearance:
            assert row["loss_appearance"] > 0 and row["baseline_appearance"] > 0
        has_motion = row["objective"] != "videomae"
        assert (row["loss_motion"] is not None) == has_motion and (row["baseline_motion"] is not None) == has_motion
    for name, entry in report["summary"].items():
        for p in PROBES:
            assert 0 <= entry[p]["mean"] <= 100 and entry[p]["seed_std"] == 0.0  # one seed: no spread
        if name != "random":
            assert set(entry["vs_random_in_se"]) <= set(PROBES)
    for name in ("frame_pixels", "frame_diffs"):
        for p in ("knn", "linear"):
            (c,) = report["controls"][name][p]
            assert 0 <= c["top1"] <= 100 and c["se"] >= 0


def test_run_config_has_the_objective_overrides_last(tmp_path):
    cfg = representation.run_config("tiny", "videomae", 3, 100, tmp_path / "r", ["optim.base_lr=1e-2"])
    assert "seed=3" in cfg and "schedule.steps=100" in cfg and "checkpoint.every_steps=100" in cfg
    assert cfg[-3:] == representation.OBJECTIVES["videomae"] and "optim.base_lr=1e-2" in cfg


def test_summary_standard_errors_and_spread():
    rows = [{"objective": o, "seed": s, "probes": {"knn": {"top1": v, "se": 2.0}}}
            for o, s, v in (("random", 0, 10.0), ("random", 1, 12.0), ("mam2", 0, 30.0), ("mam2", 1, 34.0))]
    out = representation.summarize(rows, ("knn",))
    assert out["mam2"]["knn"]["mean"] == 32.0 and math.isclose(out["mam2"]["knn"]["se"], math.sqrt(8) / 2)
    assert math.isclose(out["mam2"]["knn"]["seed_std"], math.sqrt(8))
    assert math.isclose(out["mam2"]["vs_random_in_se"]["knn"], 21.0 / 2.0)
