import json

import pytest

from fastmam.data.annotations import AnnotationError, read_list


def test_videomae_list_relative_to_root(tmp_path):
    lst = tmp_path / "train.csv"
    lst.write_text("k400/abc.mp4 3\n\n# comment\n/abs/x.mp4 0 120\n")
    out = read_list(lst, tmp_path / "videos")
    assert out.paths == [str(tmp_path / "videos/k400/abc.mp4"), "/abs/x.mp4"]
    assert out.labels == [3, 0] and out.num_frames == [None, 120]
    # without a data root, paths start from the list's folder
    assert read_list(lst).paths[0] == str(tmp_path / "k400/abc.mp4")
    # a comma-separated line is accepted too
    lst.write_text("a.mp4,5\n")
    assert read_list(lst, fmt="videomae").labels == [5]


def test_videomae_list_errors_name_the_line(tmp_path):
    lst = tmp_path / "train.csv"
    lst.write_text("a.mp4 1\nb.mp4\n")
    with pytest.raises(AnnotationError, match=r"train.csv:2: expected 'path label'"):
        read_list(lst)
    lst.write_text("a.mp4 cat\n")
    with pytest.raises(AnnotationError, match=r"train.csv:1: label 'cat' is not an integer"):
        read_list(lst)
    lst.write_text("my video.mp4 1 20\n")
    with pytest.raises(AnnotationError, match="rename the file"):
        read_list(lst)
    lst.write_text("\n")
    with pytest.raises(AnnotationError, match="lists no videos"):
        read_list(lst)
    with pytest.raises(AnnotationError, match="does not exist.*fastmam.data.prepare"):
        read_list(tmp_path / "nope.csv")


def test_ucf101_split_files(tmp_path):
    (tmp_path / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 Archery\n")
    (tmp_path / "trainlist01.txt").write_text("Archery/v_Archery_g01_c01.avi 2\nApplyEyeMakeup/v_A_g08_c01.avi 1\n")
    (tmp_path / "testlist01.txt").write_text("Archery/v_Archery_g02_c01.avi\n")
    train = read_list(tmp_path / "trainlist01.txt", "/ucf")
    assert train.labels == [1, 0] and train.paths[0] == "/ucf/Archery/v_Archery_g01_c01.avi"
    test = read_list(tmp_path / "testlist01.txt", "/ucf")
    assert test.labels == [1]


def test_hmdb51_split_folder(tmp_path):
    (tmp_path / "brush_hair_test_split1.txt").write_text("a.avi 1\nb.avi 2\nc.avi 0\n")
    (tmp_path / "cartwheel_test_split1.txt").write_text("d.avi 1 \n")
    (tmp_path / "cartwheel_test_split2.txt").write_text("e.avi 1\n")
    out = read_list(tmp_path, "/hmdb")
    assert out.paths == ["/hmdb/brush_hair/a.avi", "/hmdb/cartwheel/d.avi"] and out.labels == [0, 1]
    assert read_list(tmp_path, "/hmdb", hmdb51_split=2).paths == ["/hmdb/cartwheel/e.avi"]
    with pytest.raises(AnnotationError, match="no HMDB51 split files"):
        read_list(tmp_path, "/hmdb", hmdb51_split=3)


def test_ssv2_json(tmp_path):
    (tmp_path / "something-something-v2-labels.json").write_text(
        json.dumps({"Holding something next to something": "7", "Pushing something from left to right": "12"}))
    entries = [{"id": "78687", "template": "Holding [something] next to [something]", "label": "x"},
               {"id": "42", "template": "Pushing [something] from left to right", "label": "y"}]
    (tmp_path / "something-something-v2-train.json").write_text(json.dumps(entries))
    out = read_list(tmp_path / "something-something-v2-train.json", "/ssv2")
    assert out.paths == ["/ssv2/78687.webm", "/ssv2/42.webm"] and out.labels == [7, 12]
    (tmp_path / "something-something-v2-labels.json").unlink()
    with pytest.raises(AnnotationError, match="labels.json is missing"):
        read_list(tmp_path / "something-something-v2-train.json")
