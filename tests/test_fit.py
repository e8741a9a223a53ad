"""bench/fit.py, the which-preset-fits benchmark, keeps working on CPU (the GPU numbers need a GPU run)."""

import json

import pytest

from bench import fit


@pytest.mark.slow
def test_fit_rows_for_a_run_that_trains_and_one_that_fails(tmp_path, capsys):
    assert fit.main(["--presets", "tiny", "--steps", "2", "--batch", "2", "--out", str(tmp_path),
                     "--overrides", "deepspeed.zero_stage=3", "model.activation_checkpointing=true",
                     "model.depth=2"]) == 0
    out = capsys.readouterr().out
    assert "largest that trains here: tiny" in out
    (path,) = tmp_path.glob("fit_cpu_*.json")
    (row,) = json.loads(path.read_text())
    assert row["fits"] is True and row["batch"] == 2 and row["exit_status"] == 0
    assert row["params_m"] > 0 and row["estimate_gib"] > 0 and row["clips_per_s"] > 0
    assert row["peak_mem_gib"] is None and row["device_type"] == "cpu" and "commit" in row  # no GPU: no peak

    # a run that fails for another reason than memory is reported as a failure, not as "does not fit"
    assert fit.main(["--presets", "tiny", "--steps", "2", "--overrides", "deepspeed.zero_stage=7"]) == 1
    assert "failed:" in capsys.readouterr().out
