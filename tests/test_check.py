"""Tests for minidetr/check.py: each kind of defect, planted in a small COCO json the test
writes, is found with the ids the test planted, has its severity (errors: exit status 1,
warnings: 0), and shows in the printed report; both splits' errors are reported together;
`python -m minidetr.check` runs as a command.

The base dataset is clean: images 1 (1.png) and 2 (2.png), 40x30; categories 1 'a' and
2 'b'; annotations 10 (image 1, 'a') and 20 (image 2, 'b'). Each case adds one defect.
"""
import copy
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from minidetr.check import (ERROR, KINDS, WARNING, DatasetError, box_fate, check_before_training,
                            check_split, check_splits, main)

W, H = 40, 30
BASE = {
    "images": [{"id": 1, "file_name": "1.png", "width": W, "height": H},
               {"id": 2, "file_name": "2.png", "width": W, "height": H}],
    "annotations": [{"id": 10, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 6], "area": 60, "iscrowd": 0},
                    {"id": 20, "image_id": 2, "category_id": 2, "bbox": [5, 5, 8, 8], "area": 64, "iscrowd": 0}],
    "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
}


def ann(ann_id, image_id=1, category_id=1, bbox=(5, 5, 4, 4), **extra):
    fields = {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": list(bbox)}
    return {**fields, "area": 16, "iscrowd": 0, **extra}


def write_split(folder, data=None, sizes=None):
    """BASE (or `data`) as folder/ann.json and its images as folder/img/*.png; returns argv."""
    data = BASE if data is None else data
    os.makedirs(folder / "img", exist_ok=True)
    for info in data.get("images", []):
        if isinstance(info, dict) and isinstance(info.get("file_name"), str):
            size = (sizes or {}).get(info["file_name"], (W, H))
            Image.new("RGB", size, 128).save(folder / "img" / info["file_name"])
    (folder / "ann.json").write_text(json.dumps(data))
    return ["--train_json", str(folder / "ann.json"), "--train_images", str(folder / "img")]


def planted(findings, kind):
    """(image id, annotation id) of every finding of `kind`."""
    return [(f.image_id, f.ann_id) for f in findings if f.kind == kind]


def with_(section, *entries):
    data = copy.deepcopy(BASE)
    data[section] += list(entries)
    return data


# kind, the dataset with one planted defect, the (image id, annotation id) planted, words
# the message must hold (from the planted values)
CASES = [
    ("duplicate image id", with_("images", {"id": 2, "file_name": "3.png", "width": W, "height": H}),
     [(2, None)], ["2.png", "3.png"]),
    ("duplicate file name", with_("images", {"id": 3, "file_name": "1.png", "width": W, "height": H}),
     [(3, None)], ["1.png", "image id 1"]),
    ("duplicate annotation id", with_("annotations", ann(10, image_id=2)), [(2, 10)], []),
    ("duplicate category id", with_("categories", {"id": 2, "name": "c"}), [(None, None)], ["'b'", "'c'"]),
    ("bad category id", with_("categories", {"id": -1, "name": "neg"}), [(None, None)], ["-1", "'neg'"]),
    ("unknown image", with_("annotations", ann(30, image_id=99)), [(99, 30)], ["image_id 99"]),
    ("unknown category", with_("annotations", ann(30, category_id=7)), [(1, 30)], ["category_id 7"]),
    ("malformed bbox", with_("annotations", ann(30, bbox=(1, 2, 3))), [(1, 30)], ["[1, 2, 3]"]),
    ("non-finite bbox", with_("annotations", ann(30, bbox=(1, float("nan"), 3, 4)),
                              ann(31, bbox=(1, 2, float("inf"), 4))), [(1, 30), (1, 31)], ["nan"]),
    ("malformed entry", with_("images", {"id": 3, "file_name": "3.png", "height": H}),
     [(None, None)], ["'width'", "id 3"]),
    ("empty split", {"images": [], "annotations": [], "categories": BASE["categories"]},
     [(None, None)], ["'images' is empty"]),
    ("empty split", {**BASE, "annotations": []}, [(None, None)], ["'annotations' is empty"]),
    ("empty split", {**BASE, "annotations": [ann(10, iscrowd=1), ann(20, image_id=2, bbox=(5, 5, 0, 4))]},
     [(None, None)], ["none of its 2 annotations"]),                       # all dropped
    ("w or h <= 0", with_("annotations", ann(30, bbox=(5, 5, 0, 4)), ann(31, bbox=(5, 5, 4, -1))),
     [(1, 30), (1, 31)], ["[5, 5, 0, 4]"]),
    ("wholly outside", with_("annotations", ann(30, bbox=(W + 10, 5, 5, 5))), [(1, 30)],
     [f"lies 10 px beyond the right edge of the {W}x{H} image"]),
    ("clipped", with_("annotations", ann(30, bbox=(-3, H - 4, 10, 10))), [(1, 30)],
     ["3 px past the left edge", "6 px past the bottom edge"]),   # y + h - H = 26 + 10 - 30
    ("iscrowd", with_("annotations", ann(30, iscrowd=1)), [(1, 30)], []),
    ("missing area or iscrowd", with_("annotations", {"id": 30, "image_id": 2, "category_id": 1,
                                                      "bbox": [1, 1, 4, 4]}), [(2, 30)], ["'area'"]),
    ("unused category", with_("categories", {"id": 5, "name": "e"}), [(None, None)], ["category id 5", "'e'"]),
    ("unused category", {**BASE, "annotations": [BASE["annotations"][0], ann(20, image_id=2, category_id=2,
                                                                           bbox=(5, 5, 0, 4))]},
     [(None, None)], ["category id 2", "'b'"]),                             # its only box is dropped
]


@pytest.mark.parametrize("kind, data, ids, words", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_each_defect_found_with_its_ids_and_exit_status(tmp_path, capsys, kind, data, ids, words):
    """The planted defect, and only it among the errors: kind, ids, message, exit status, report."""
    argv = write_split(tmp_path, data)
    _, findings = check_split(str(tmp_path / "ann.json"), str(tmp_path / "img"))
    assert planted(findings, kind) == ids
    message = next(f.message for f in findings if f.kind == kind)
    assert all(word in message for word in words), message
    errors = {f.kind for f in findings if f.severity == ERROR}
    assert errors == ({kind} if KINDS[kind][0] == ERROR else set())
    status = main(argv)
    out = capsys.readouterr().out
    assert status == (1 if KINDS[kind][0] == ERROR else 0)
    assert f"  {kind}: {len(ids)} (" in out
    assert out.rstrip().endswith("fix the errors before training" if status else "ready to train")


def test_clean_dataset_has_no_findings(tmp_path, capsys):
    argv = write_split(tmp_path)
    assert check_split(str(tmp_path / "ann.json"), str(tmp_path / "img"), pixels=True)[1] == []
    assert main(argv + ["--images"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("0 error(s), 0 warning(s): ready to train")


@pytest.mark.parametrize("text, words", [
    ('{"images": [', "malformed or incomplete json"),
    ('[1, 2]', "top level must be an object, got list"),
])
def test_json_that_does_not_parse(tmp_path, text, words):
    (tmp_path / "ann.json").write_text(text)
    data, findings = check_split(str(tmp_path / "ann.json"))
    assert data is None and [f.kind for f in findings] == ["unreadable json"]
    assert words in findings[0].message
    assert main(["--val_json", str(tmp_path / "ann.json"), "--val_images", str(tmp_path)]) == 1


def test_missing_sections_each_named(tmp_path):
    (tmp_path / "ann.json").write_text(json.dumps({"images": [], "annotations": {}}))
    _, findings = check_split(str(tmp_path / "ann.json"))
    assert [(f.kind, f.message) for f in findings] == [
        ("missing section", "missing or non-list 'annotations'"),
        ("missing section", "missing or non-list 'categories'")]


def test_missing_image_file_found_without_decoding(tmp_path, capsys):
    """A deleted file is named by the default check (which reads headers only)."""
    argv = write_split(tmp_path)
    os.remove(tmp_path / "img" / "2.png")
    _, findings = check_split(str(tmp_path / "ann.json"), str(tmp_path / "img"))
    assert planted(findings, "missing image file") == [(2, None)]
    assert main(argv) == 1 and "2.png is not in" in capsys.readouterr().out


def test_missing_image_folder_is_one_finding(tmp_path):
    write_split(tmp_path)
    _, findings = check_split(str(tmp_path / "ann.json"), str(tmp_path / "nowhere"))
    assert [(f.kind, f.image_id) for f in findings] == [("missing image file", None)]
    assert "does not exist (2 images" in findings[0].message


def test_unreadable_image_only_with_images_flag(tmp_path):
    argv = write_split(tmp_path)
    path = tmp_path / "img" / "2.png"
    path.write_bytes(path.read_bytes()[:60])     # a PNG cut short
    assert main(argv) == 0                       # its header is whole: only a decode sees the cut
    _, findings = check_split(str(tmp_path / "ann.json"), str(tmp_path / "img"), pixels=True)
    assert planted(findings, "unreadable image") == [(2, None)]
    assert main(argv + ["--images"]) == 1
    import numpy as np   # float pixels decode, but training refuses them (no range): so does --images
    data = copy.deepcopy(BASE)
    data["images"][1]["file_name"] = "2.tif"
    argv = write_split(tmp_path / "float", data)
    Image.fromarray(np.full((H, W), 0.5, np.float32)).save(tmp_path / "float" / "img" / "2.tif")
    _, findings = check_split(str(tmp_path / "float" / "ann.json"), str(tmp_path / "float" / "img"), pixels=True)
    assert planted(findings, "unreadable image") == [(2, None)]
    assert findings[0].message.startswith("2.tif: F pixels")


def test_image_size_mismatch_with_images_flag(tmp_path):
    """--images finds a wrong size by decoding, as the default check does from the header."""
    argv = write_split(tmp_path, sizes={"2.png": (W + 1, H)})
    _, findings = check_split(str(tmp_path / "ann.json"), str(tmp_path / "img"), pixels=True)
    assert planted(findings, "image size mismatch") == [(2, None)]
    assert f"is {W + 1}x{H} px (w x h), the json says {W}x{H}" in findings[0].message
    assert main(argv) == 1 and main(argv + ["--images"]) == 1


def test_default_check_names_an_image_whose_size_differs_from_the_json(tmp_path, capsys):
    """Without --images, and at train.py's door: the json file, the image id, the file name
    and both sizes of an image stored at another size than its json entry says."""
    argv = write_split(tmp_path, sizes={"2.png": (W + 3, H - 2)})
    json_file = str(tmp_path / "ann.json")
    _, findings = check_split(json_file, str(tmp_path / "img"))
    assert [(f.kind, f.file, f.image_id) for f in findings] == [("image size mismatch", json_file, 2)]
    assert findings[0].message == f"2.png is {W + 3}x{H - 2} px (w x h), the json says {W}x{H}"
    assert main(argv) == 1
    assert f"{json_file}, image id 2: 2.png is {W + 3}x{H - 2} px" in capsys.readouterr().out
    with pytest.raises(DatasetError, match=f"image size mismatch: 1 .*\n.*image id 2: 2.png is {W + 3}x"):
        check_before_training({"train": (json_file, str(tmp_path / "img"))}, verbose=False)


def test_default_check_names_a_file_that_is_no_image(tmp_path):
    """A file PIL cannot identify from its header is named, with its image id, by default."""
    write_split(tmp_path)
    (tmp_path / "img" / "2.png").write_text("not an image, though the name says png")
    _, findings = check_split(str(tmp_path / "ann.json"), str(tmp_path / "img"))
    assert planted(findings, "unreadable image") == [(2, None)]
    assert findings[0].message.startswith("2.png: cannot identify image file")
    assert [f.kind for f in findings] == ["unreadable image"]


def test_images_of_the_right_size_pass_in_every_format_and_order_is_kept(tmp_path):
    """600 images (more than one thread's share) in five formats, each of the size its json
    entry says: no finding; swapping width and height in three entries names exactly those
    three, in the json's order."""
    formats = ["png", "jpg", "bmp", "gif", "tif"]
    images = [{"id": i, "file_name": f"{i}.{formats[i % 5]}", "width": 20 + i % 7, "height": 10 + i % 3}
              for i in range(600)]
    data = {"images": images, "annotations": [ann(1, image_id=0)], "categories": [{"id": 1, "name": "a"}]}
    write_split(tmp_path, data, sizes={img["file_name"]: (img["width"], img["height"]) for img in images})
    assert check_split(str(tmp_path / "ann.json"), str(tmp_path / "img"))[1] == []
    for i in (5, 300, 599):   # none square: 20 + i % 7 > 10 + i % 3 always
        images[i]["width"], images[i]["height"] = images[i]["height"], images[i]["width"]
    (tmp_path / "ann.json").write_text(json.dumps(data))
    _, findings = check_split(str(tmp_path / "ann.json"), str(tmp_path / "img"))
    assert planted(findings, "image size mismatch") == [(5, None), (300, None), (599, None)]


@pytest.mark.parametrize("val_images, how", [("same folder", "the same file"),
                                             ("a copy", "a copy: same name, same bytes"),
                                             ("other pixels", None)])
def test_train_and_val_sharing_images(tmp_path, capsys, val_images, how):
    """val lists train's 2.png: the very file (one folder), a copy of it, or another image
    that only shares the name and id (not shared: two datasets may both count from 1)."""
    train_argv = write_split(tmp_path / "train")
    val = {**BASE, "images": [BASE["images"][1]], "annotations": [BASE["annotations"][1]]}
    write_split(tmp_path / "val", val)
    if val_images == "other pixels":   # the same size (the json's), another grey
        Image.new("RGB", (W, H), 7).save(tmp_path / "val" / "img" / "2.png")
    val_folder = tmp_path / ("train" if val_images == "same folder" else "val")
    argv = train_argv + ["--val_json", str(tmp_path / "val" / "ann.json"), "--val_images", str(val_folder / "img")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    if how is None:
        assert "overlap" not in out
    else:
        assert "train/val overlap: 1" in out and "2.png is also train image id 2" in out and how in out


def test_both_splits_errors_reported_together(tmp_path, capsys):
    """check_before_training: one DatasetError holding train's and val's errors; warnings
    (train's unused category) are one line per split on stderr when there is no error."""
    write_split(tmp_path / "train", with_("images", {"id": 2, "file_name": "3.png", "width": W, "height": H}))
    write_split(tmp_path / "val", with_("annotations", ann(30, category_id=7)))
    files = {s: (str(tmp_path / s / "ann.json"), str(tmp_path / s / "img")) for s in ("train", "val")}
    with pytest.raises(DatasetError) as exc:
        check_before_training(files)
    assert [(f.kind, f.file, f.image_id, f.ann_id) for f in exc.value.findings] == [
        ("duplicate image id", files["train"][0], 2, None), ("unknown category", files["val"][0], 1, 30)]
    assert "duplicate image id: 1" in str(exc.value) and "unknown category: 1" in str(exc.value)
    write_split(tmp_path / "ok", with_("categories", {"id": 5, "name": "e"}))
    data = check_before_training({"train": (str(tmp_path / "ok" / "ann.json"), str(tmp_path / "ok" / "img"))})
    assert [img["id"] for img in data["train"]["images"]] == [1, 2]
    err = capsys.readouterr().err
    assert err.startswith("warning: ") and "1 unused category" in err and len(err.splitlines()) == 1


def test_one_file_for_both_splits_is_reported_once(tmp_path):
    """train and val given the same json and folder: its error once (not once per split), and
    every val image is a train image (the overlap warning names both of them)."""
    write_split(tmp_path, with_("annotations", ann(30, category_id=7)))
    files = {s: (str(tmp_path / "ann.json"), str(tmp_path / "img")) for s in ("train", "val")}
    with pytest.raises(DatasetError) as exc:
        check_before_training(files)
    assert [(f.kind, f.image_id, f.ann_id) for f in exc.value.findings] == [("unknown category", 1, 30)]
    write_split(tmp_path / "ok")
    files = {s: (str(tmp_path / "ok" / "ann.json"), str(tmp_path / "ok" / "img")) for s in ("train", "val")}
    data, findings = check_splits(files)
    assert data["train"]["images"] == data["val"]["images"]
    assert planted(findings, "train/val overlap") == [(1, None), (2, None)]
    assert [f.kind for f in findings if f.kind != "train/val overlap"] == []


def test_examples_are_capped_with_a_count(tmp_path, capsys):
    """12 unknown categories, --examples 3: the count 12, three examples, '... and 9 more'."""
    data = with_("annotations", *[ann(100 + i, category_id=50 + i) for i in range(12)])
    argv = write_split(tmp_path, data)
    assert main(argv + ["--examples", "3"]) == 1
    out = capsys.readouterr().out
    assert "unknown category: 12 (" in out and "... and 9 more" in out
    assert "annotation id 102:" in out and "annotation id 103:" not in out


def test_box_fate_hand_worked():
    """A 40x30 image: kept, clipped (to the image), and the three kinds that are dropped."""
    assert box_fate([2, 3, 10, 6], W, H) == (None, [2, 3, 12, 9])
    assert box_fate([30, 20, 20, 20], W, H) == ("clipped", [30, 20, 40, 30])
    assert box_fate([-5, -5, 10, 10], W, H) == ("clipped", [0, 0, 5, 5])
    assert box_fate([50, 5, 5, 5], W, H) == ("wholly outside", None)
    assert box_fate([5, 5, 0, 4], W, H) == ("w or h <= 0", None)
    assert box_fate([5, 5, 4, 4], W, H, iscrowd=1) == ("iscrowd", None)


def test_every_kind_has_a_severity():
    assert {severity for severity, _ in KINDS.values()} == {ERROR, WARNING}


def test_command_line_entry_point(tmp_path):
    """`python -m minidetr.check`: the report on stdout, exit status 1 for an error."""
    argv = write_split(tmp_path, with_("images", {"id": 2, "file_name": "3.png", "width": W, "height": H}))
    done = subprocess.run([sys.executable, "-m", "minidetr.check", *argv], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "duplicate image id: 1" in done.stdout and "image id 2: used by both 2.png and 3.png" in done.stdout
    done = subprocess.run([sys.executable, "-m", "minidetr.check"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "give --coco_path" in done.stderr


def test_coco_path_layout(tmp_path, capsys):
    """--coco_path reads train2017/, val2017/ and annotations/instances_*.json; a missing
    piece is named (exit status 1) before anything is read."""
    root = tmp_path / "coco"
    assert main(["--coco_path", str(root)]) == 1
    assert f"COCO layout: {root} is missing" in capsys.readouterr().err
    for split in ("train", "val"):
        write_split(tmp_path / split)
        os.makedirs(root / "annotations", exist_ok=True)
        os.rename(tmp_path / split / "img", root / f"{split}2017")
        os.rename(tmp_path / split / "ann.json", root / "annotations" / f"instances_{split}2017.json")
    os.remove(root / "val2017" / "1.png")
    assert main(["--coco_path", str(root)]) == 1
    out = capsys.readouterr().out
    assert "instances_val2017.json, image id 1: 1.png is not in" in out
    assert "train/val overlap: 1" in out     # 2.png: write_split's images are equal grey, copies
