import os

import pytest

from fastmam import fileio


def test_write_text_atomic_replaces_whole_or_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "latest"
    fileio.write_text_atomic(path, "step_1")
    assert path.read_text() == "step_1" and sorted(os.listdir(path.parent)) == ["latest"]

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(fileio.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        fileio.write_text_atomic(path, "step_2")
    assert path.read_text() == "step_1"  # the old content, and no temporary left behind
    assert sorted(os.listdir(path.parent)) == ["latest"]
