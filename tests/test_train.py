"""Tests for train.py's command line: each mistake (unknown variant or preset, a COCO folder
without the official layout, --num_classes below the largest category id, a checkpoint of
another variant or preset, one that needs pickled code, a missing or corrupt one) stops
with one line saying what to do, no traceback; a dataset with errors stops before the model
is built, with every error of both splits in one message; under torchrun a failing rank
names itself and exits instead of hanging, and a rank killed mid-epoch does not leave the
other waiting.
"""
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from PIL import Image

from minidetr.checkpoint import save_atomic
from minidetr.config import Config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import train  # noqa: E402
TINY_RUN = ["--hidden_dim", "32", "--nheads", "4", "--dim_feedforward", "64", "--enc_layers", "1",
            "--dec_layers", "2", "--num_queries", "8", "--num_select", "8", "--batch_size", "4",
            "--shapes_train", "4", "--shapes_val", "2", "--num_workers", "0", "--image_size", "32"]


def error_of(argv):
    """The message main(argv) exits with (what the user sees on stderr, exit status 1)."""
    with pytest.raises(SystemExit) as exc:
        train.main(argv)
    assert isinstance(exc.value.code, str), "a message, not a bare exit status"
    return exc.value.code


def test_cli_error_is_one_line_without_traceback():
    """The real command: exit status 1, the message on stderr, no traceback."""
    done = subprocess.run([sys.executable, "train.py", "--variant", "detrr"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1] == \
        "error: unknown variant 'detrr': choose one of detr, conditional, smca, dab, dn"


def test_unknown_preset():
    assert error_of(["--preset", "small"]) == \
        "error: unknown preset 'small': choose one of paper, tiny"


def test_coco_path_without_the_layout(tmp_path):
    """An existing folder lacking train2017/: the missing piece and the expected layout."""
    (tmp_path / "annotations").mkdir()
    message = error_of(["--coco_path", str(tmp_path)])
    assert message == (f"error: COCO layout: {tmp_path / 'train2017'} is missing (expected "
                       f"train2017/, val2017/, annotations/instances_*.json)")


def test_shapes_folder_that_is_not_ours(tmp_path, monkeypatch):
    """$MINIDETR_DATA holding a folder of the user's where the shapes would go: not touched."""
    monkeypatch.setenv("MINIDETR_DATA", str(tmp_path))
    (tmp_path / "n4_v2").mkdir()
    (tmp_path / "n4_v2" / "notes.txt").write_text("mine")
    assert error_of(TINY_RUN) == (f"error: {tmp_path / 'n4_v2'} exists and is not a minidetr shapes "
                                  f"dataset (no manifest.json); refusing to overwrite it")
    assert (tmp_path / "n4_v2" / "notes.txt").read_text() == "mine"


def write_custom(folder, category_ids):
    """Two 40x30 images, one box each; the categories listed are `category_ids`."""
    (folder / "img").mkdir(parents=True)
    images = [{"id": i, "file_name": f"{i}.png", "width": 40, "height": 30} for i in (1, 2)]
    for info in images:
        Image.new("RGB", (40, 30), 128).save(folder / "img" / info["file_name"])
    anns = [{"id": i, "image_id": i, "category_id": category_ids[-1], "bbox": [2, 2, 10, 8]}
            for i in (1, 2)]
    (folder / "ann.json").write_text(json.dumps({
        "images": images, "annotations": anns,
        "categories": [{"id": c, "name": f"c{c}"} for c in category_ids]}))
    return str(folder / "ann.json"), str(folder / "img")


@pytest.mark.parametrize("split_with_id_5", ["train", "val"])
def test_num_classes_below_largest_category_id(tmp_path, split_with_id_5):
    """Category id 5 in either split needs --num_classes >= 6; the message names the file."""
    argv = ["--num_classes", "3"]
    for split in ("train", "val"):
        json_file, folder = write_custom(tmp_path / split, [1, 2, 5] if split == split_with_id_5 else [1, 2])
        argv += [f"--{split}_json", json_file, f"--{split}_images", folder]
    message = error_of(argv)
    assert message == (f"error: --num_classes 3 is smaller than the largest category id + 1 = 6 "
                       f"in {tmp_path / split_with_id_5 / 'ann.json'}; pass --num_classes 6 or more")


# ---- the dataset is checked at the door: every error at once, before the model is built ----

def door_error(monkeypatch, tmp_path, edit_train=None, edit_val=None):
    """train.main on write_custom's splits after edit_<split>(json dict); the message it exits
    with. build() fails the test if reached: the check must come before the model."""
    monkeypatch.setattr(train, "build", lambda cfg: pytest.fail("the model was built"))
    argv = ["--preset", "tiny", *TINY_RUN]
    for split, edit in (("train", edit_train), ("val", edit_val)):
        json_file, folder = write_custom(tmp_path / split, [1, 2])
        data = json.loads(open(json_file).read())
        (edit or (lambda d: None))(data)
        open(json_file, "w").write(json.dumps(data))
        argv += [f"--{split}_json", json_file, f"--{split}_images", folder]
    return error_of(argv)


def test_empty_training_split_stops_before_training(monkeypatch, tmp_path):
    """'images': [] (was KeyError: 'loss' after the first epoch)."""
    message = door_error(monkeypatch, tmp_path, edit_train=lambda d: d.update(images=[], annotations=[]))
    assert message.startswith("error: the dataset has 1 error(s); nothing was trained.")
    assert f"    {tmp_path / 'train' / 'ann.json'}: 'images' is empty" in message.splitlines()


def test_split_empty_after_filtering_stops_before_training(monkeypatch, tmp_path):
    """Both boxes crowd regions: nothing left to train on, said before training."""
    def all_crowd(data):
        for ann in data["annotations"]:
            ann["iscrowd"] = 1
    message = door_error(monkeypatch, tmp_path, edit_train=all_crowd)
    assert (f"    {tmp_path / 'train' / 'ann.json'}: none of its 2 annotations is usable: every one is "
            f"dropped (see the warnings)") in message.splitlines()


def test_duplicate_image_id_names_the_id_and_both_files(monkeypatch, tmp_path):
    """Images 1.png and 2.png both id 1 (trained silently on wrong targets before)."""
    def same_id(data):
        data["images"][1]["id"] = 1
        data["annotations"][1]["image_id"] = 1
    message = door_error(monkeypatch, tmp_path, edit_train=same_id)
    assert f"    {tmp_path / 'train' / 'ann.json'}, image id 1: used by both 1.png and 2.png" in message.splitlines()


def test_missing_image_stops_before_training(monkeypatch, tmp_path):
    """A file missing before the run is found at the door, not when a batch reaches it."""
    message = door_error(monkeypatch, tmp_path, edit_val=lambda d: d["images"][1].update(file_name="gone.png"))
    assert f"    {tmp_path / 'val' / 'ann.json'}, image id 2: gone.png is not in {tmp_path / 'val' / 'img'}" \
        in message.splitlines()


def test_errors_of_both_splits_listed_at_once(monkeypatch, tmp_path):
    """A NaN box in train and an unknown category in val: one message holds both."""
    message = door_error(monkeypatch, tmp_path,
                         edit_train=lambda d: d["annotations"][0].update(bbox=[2, 2, float("nan"), 8]),
                         edit_val=lambda d: d["annotations"][1].update(category_id=9))
    lines = message.splitlines()
    assert message.startswith("error: the dataset has 2 error(s)")
    assert f"    {tmp_path / 'train' / 'ann.json'}, image id 1, annotation id 1: bbox [2, 2, nan, 8] is not " \
           f"four finite numbers [x, y, w, h]" in lines
    assert f"    {tmp_path / 'val' / 'ann.json'}, image id 2, annotation id 2: category_id 9 is not in " \
           f"'categories'" in lines


def test_skipped_boxes_named_once_on_stderr(tmp_path, capsys):
    """A box of no width in train: one warning line naming the kind and the annotation id."""
    argv = ["--preset", "tiny", *TINY_RUN]
    for split in ("train", "val"):
        json_file, folder = write_custom(tmp_path / split, [1, 2])
        argv += [f"--{split}_json", json_file, f"--{split}_images", folder]
    train_json = tmp_path / "train" / "ann.json"
    data = json.loads(train_json.read_text())
    data["annotations"][1]["bbox"] = [2, 2, 0, 8]          # annotation 2, of image 2
    train_json.write_text(json.dumps(data))
    cfg = train.config_from_args(train.get_args_parser().parse_args(argv))
    train_set, _ = train.build_datasets(cfg)
    assert [len(train_set._objects[i]) for i in (1, 2)] == [1, 0]
    warnings = [line for line in capsys.readouterr().err.splitlines() if str(train_json) in line]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: {train_json}: ")
    assert "1 w or h <= 0 (dropped; e.g. annotation ids [2])" in warnings[0]


# ---- --resume with a checkpoint that cannot continue this run ----

def fake_checkpoint(path, variant, preset):
    save_atomic({"model": {}, "config": Config.for_variant(variant, preset).to_dict(),
                 "epoch": 1, "step": 0}, path)
    return str(path)


def test_resume_checkpoint_of_another_variant(tmp_path):
    path = fake_checkpoint(tmp_path / "detr.pth", "detr", "tiny")
    assert error_of(["--variant", "dn", "--resume", path]) == (
        f"error: {path} was trained with --variant 'detr' but this run has 'dn'; "
        f"pass the same settings to resume")


def test_resume_checkpoint_of_another_preset(tmp_path):
    """Trained with the paper preset, resumed without a dataset (so the tiny preset)."""
    path = fake_checkpoint(tmp_path / "paper.pth", "dn", "paper")
    assert error_of(["--variant", "dn", "--resume", path]) == (
        f"error: {path} was trained with --preset 'paper' but this run has 'tiny'; "
        f"pass the same settings to resume")


def _touch(path):       # what a malicious checkpoint would run on loading
    open(path, "w").close()


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return _touch, (self.marker,)


def test_resume_checkpoint_needing_pickled_code_is_refused_unrun(tmp_path):
    """weights_only=True refuses the file, names why, and the payload never runs."""
    marker, path = tmp_path / "ran", tmp_path / "evil.pth"
    torch.save({"model": {}, "extra": Payload(str(marker))}, path)
    message = error_of(["--resume", str(path)])
    assert message.startswith(f"error: refusing to load {str(path)!r}: it needs pickled code")
    assert "weights_only=True" in message and "_touch" in message
    assert not marker.exists()


def test_resume_missing_or_corrupt_checkpoint(tmp_path):
    missing = str(tmp_path / "nope.pth")
    assert error_of(["--resume", missing]) == f"error: checkpoint {missing!r} does not exist"
    corrupt = tmp_path / "half.pth"
    save_atomic({"model": {"w": torch.zeros(100)}}, corrupt)
    corrupt.write_bytes(corrupt.read_bytes()[:200])
    assert error_of(["--resume", str(corrupt)]).startswith(f"error: cannot read checkpoint {str(corrupt)!r}")


def test_resume_official_checkpoint_says_convert_first(tmp_path):
    """A reference codebase's file (official weight names): the conversion command."""
    path = tmp_path / "detr-r50.pth"
    save_atomic({"model": {"transformer.encoder.layers.0.linear1.weight": torch.zeros(2, 2)}}, path)
    assert error_of(["--variant", "detr", "--resume", str(path)]) == (
        f"error: {path} is an official DETR-family checkpoint; convert it first: python -m "
        f"minidetr.convert --variant detr --src {path} --dst converted.pth, then --resume converted.pth")


def test_resume_weights_that_do_not_fit(tmp_path, monkeypatch):
    """A checkpoint without our config (e.g. another code base) whose weights mismatch."""
    monkeypatch.setenv("MINIDETR_DATA", str(tmp_path / "data"))
    path = tmp_path / "other.pth"
    save_atomic({"model": {"class_embed.weight": torch.zeros(3, 3)}}, path)
    message = error_of(["--variant", "dn", "--resume", str(path)] + TINY_RUN)
    assert message.startswith(f"error: the weights in {path} do not fit this model; resume with "
                              f"the settings it was trained with (Error(s) in loading state_dict")
    assert "Missing key(s)" in message and message.endswith("...)")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda():
    assert error_of(["--device", "cuda"]) == \
        "error: --device cuda, but this torch sees no CUDA device; use --device cpu"


def test_output_dir_that_cannot_be_created(tmp_path):
    (tmp_path / "file").write_text("")
    out = str(tmp_path / "file" / "out")
    assert error_of(["--output_dir", out]) == f"error: cannot create --output_dir {out}: Not a directory"


# ---- torchrun: a failing rank says who it is and exits ----

class Exited(Exception):
    pass


def _exit(code):
    raise Exited(code)


@pytest.mark.parametrize("failure, expected", [
    (SystemExit("error: --num_classes 3 is too small"), "[rank 1] error: --num_classes 3 is too small\n"),
    (RuntimeError("boom"), "RuntimeError: boom"),
    # a sample a loader worker could not load: one line under torchrun too (it was a traceback)
    (train.DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback ...\n"
                     "minidetr.data.DataError: image id 2: 2.png is missing"),
     "[rank 1] error: image id 2: 2.png is missing (fix or remove it from the annotation file)\n"),
])
def test_failing_rank_prints_rank_and_exits_at_once(monkeypatch, capsys, failure, expected):
    """Under torchrun (WORLD_SIZE 2): the message with the rank on stderr, then os._exit(1),
    which skips the teardown that could wait on the other ranks."""
    def failing_main(argv=None):
        raise failure
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(train, "main", failing_main)
    monkeypatch.setattr(os, "_exit", _exit)
    with pytest.raises(Exited) as exc:
        train.run([])
    assert exc.value.args == (1,)
    err = capsys.readouterr().err
    assert err.startswith("[rank 1] ") and expected in err
    assert ("Traceback" in err) == (type(failure) is RuntimeError)


def test_single_process_errors_pass_through(monkeypatch):
    """Without torchrun, run is main: SystemExit propagates unchanged (exit status 1)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(train, "main", lambda argv=None: sys.exit("error: x"))
    with pytest.raises(SystemExit, match="error: x"):
        train.run([])


def write_driver(tmp_path, rank1_code):
    """A script that runs train.run after rank 1 has run `rank1_code` (its sabotage)."""
    driver = tmp_path / "driver.py"
    driver.write_text(f"import os, signal, sys\nsys.path.insert(0, {REPO!r})\nimport minidetr, train\n"
                      f"if os.environ['RANK'] == '1':\n{rank1_code}train.run(sys.argv[1:])\n")
    return str(driver)


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_rank_failure_brings_the_job_down(tmp_path):
    """Two gloo ranks; rank 1 fails while rank 0 waits for it in a collective: the job ends
    within seconds with a non-zero status and rank 1's message, rather than hanging."""
    driver = write_driver(tmp_path, "    def fail(cfg):\n"
                                    "        raise ValueError('rank 1 cannot read its data')\n"
                                    "    train.build_datasets = fail\n")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), driver, *TINY_RUN],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MINIDETR_DATA": str(tmp_path / "data")})
    assert done.returncode != 0
    assert "[rank 1] error: rank 1 cannot read its data\n" in done.stderr


# rank 1 kills itself (SIGKILL: no message, no clean-up, as the OOM killer would) in its
# second training step, after one gradient all-reduce went through
KILLED_MID_EPOCH = """\
    def build(cfg):
        model, criterion, postprocess = minidetr.build(cfg)
        forward, calls = criterion.forward, []
        def dying(outputs, targets):
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return forward(outputs, targets)
        criterion.forward = dying
        return model, criterion, postprocess
    train.build = build
"""


def test_rank_killed_mid_epoch_the_other_exits_with_a_message(tmp_path):
    """Two gloo ranks started without torchrun (so no agent stops the survivor for us): rank 1
    is killed mid-epoch; rank 0, waiting for it in an all-reduce, exits non-zero within 60 s of
    the kill (the process group's timeout is 30 minutes) saying which rank it is and that its
    peer went away."""
    driver = write_driver(tmp_path, KILLED_MID_EPOCH)
    argv = [sys.executable, driver, *TINY_RUN, "--batch_size", "2", "--shapes_train", "8"]   # 2 steps per rank
    env = {**os.environ, "MINIDETR_DATA": str(tmp_path / "data"), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2", "LOCAL_RANK": "0", "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen(argv, env={**env, "RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        assert ranks[1].wait(timeout=180) == -signal.SIGKILL
        _, err = ranks[0].communicate(timeout=60)
    finally:
        for rank in ranks:
            rank.kill()
    assert ranks[0].returncode == 1
    # gloo's words depend on when the peer vanished: a closed or a reset connection
    assert "[rank 0] Traceback" in err and re.search(r"Connection (closed|reset) by peer", err), err[-2000:]


@pytest.mark.parametrize("workers", [0, 1])
def test_missing_image_met_while_training_is_one_line(tmp_path, monkeypatch, workers):
    """An image file deleted after the dataset was checked and built: one line naming it, no
    traceback, also when a DataLoader worker met it. (Deleted before the run, it stops the
    run at the door: test_missing_image_stops_before_training.)"""
    argv = ["--preset", "tiny", *TINY_RUN, "--epochs", "1", "--num_workers", str(workers)]
    for split in ("train", "val"):
        json_file, folder = write_custom(tmp_path / split, [1, 2])
        argv += [f"--{split}_json", json_file, f"--{split}_images", folder]
    build_datasets = train.build_datasets

    def build_then_delete(*args):
        datasets = build_datasets(*args)
        os.remove(tmp_path / "train" / "img" / "2.png")
        return datasets
    monkeypatch.setattr(train, "build_datasets", build_then_delete)
    with pytest.raises(SystemExit) as exc:
        train.run(argv)
    message = exc.value.code
    assert message.startswith("error: image id 2") and "2.png" in message, message
    assert "Traceback" not in message and "\n" not in message
