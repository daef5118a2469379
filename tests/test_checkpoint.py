"""checkpoint: atomic saves leave no partial file, loads are weights_only (Namespace allowed,
other pickled code refused), and the RNG state round-trips through a saved file. A full disk
while a run writes any of its files (checkpoint.pth, an epoch's copy made by
checkpoint.rotate_checkpoints, log.txt appended by train.write_log) ends in one line naming the
file and the bytes it needed, with every earlier file byte for byte as it was."""
import argparse
import errno
import json
import os
import random
import shutil
import sys

import numpy as np
import pytest
import torch

from minidetr import checkpoint
from minidetr.checkpoint import WriteError, cannot_write, load_safely, rng_state, save_atomic, set_rng_state

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402

FULL = os.strerror(errno.ENOSPC)   # "No space left on device"


class Payload:       # any class outside the allowlist: loading it would need its code
    pass


def test_save_atomic_round_trip_and_no_temp_file(tmp_path):
    path = tmp_path / "sub" / "ckpt.pth"
    save_atomic({"w": torch.arange(3), "args": argparse.Namespace(lr=1e-4)}, path)
    loaded = load_safely(str(path))
    assert torch.equal(loaded["w"], torch.arange(3)) and loaded["args"].lr == 1e-4
    assert os.listdir(tmp_path / "sub") == ["ckpt.pth"]


def test_pickled_code_is_refused_with_its_name(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"x": Payload()}, path)
    with pytest.raises(ValueError, match="refusing to load.*Payload"):
        load_safely(str(path))


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_safely(str(tmp_path / "nope.pth"))


def test_a_file_that_is_no_checkpoint_says_so(tmp_path):
    """Text and empty files are named as not checkpoints (the text one used to be reported as
    needing pickled code); torch.save's pre-1.6 pickle format still loads."""
    (tmp_path / "notes.pth").write_text("hello")
    with pytest.raises(ValueError, match="notes.pth' is not a checkpoint: .* starts with b'hell'"):
        load_safely(str(tmp_path / "notes.pth"))
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.pth' is empty \(0 bytes\)"):
        load_safely(str(tmp_path / "empty.pth"))
    torch.save({"w": torch.arange(4)}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    assert torch.equal(load_safely(str(tmp_path / "legacy.pth"))["w"], torch.arange(4))


def test_rng_state_survives_a_checkpoint(tmp_path):
    """Draws after restoring a saved state equal the draws right after saving it."""
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    save_atomic({"rng": rng_state()}, tmp_path / "r.pth")
    expected = (torch.rand(2), random.random(), np.random.rand())
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    set_rng_state(load_safely(str(tmp_path / "r.pth"))["rng"])
    got = (torch.rand(2), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


# ---- a full disk ----

def full_disk():
    return OSError(errno.ENOSPC, FULL)


def test_cannot_write_message_hand_worked(tmp_path):
    """One line: the file, the cause, the bytes needed in hand-converted units, what to do."""
    path = str(tmp_path / "log.txt")
    line = cannot_write(path, full_disk(), 1536, then="continue with --resume x.pth")
    assert line.startswith(f"cannot write {path}: {FULL} (needed 1.5 KiB, ") and "\n" not in line
    assert line.endswith(" free); the previous log.txt (if any) is unchanged; free some space, "
                         "then continue with --resume x.pth")
    assert "(needed 100 bytes, " in cannot_write(path, full_disk(), 100)
    assert "(needed 3.0 MiB, " in cannot_write(path, full_disk(), 3 * 1024 ** 2)
    denied = cannot_write(path, OSError(errno.EACCES, os.strerror(errno.EACCES)), None)
    assert denied.endswith("is unchanged; fix that, then run it again") and "needed" not in denied


def test_failed_save_names_the_file_and_the_tensor_bytes(tmp_path, monkeypatch):
    """save_atomic on a full disk: WriteError with the path and 4000 bytes needed (1000
    float32, a view of them not counted twice); the old file whole, no temporary file."""
    path = tmp_path / "checkpoint.pth"
    save_atomic({"w": torch.arange(3.0)}, path)
    old = path.read_bytes()

    def disk_fills(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")
        raise full_disk()
    monkeypatch.setattr(torch, "save", disk_fills)
    weights = torch.arange(1000.0)
    with pytest.raises(WriteError) as exc:
        save_atomic({"w": weights, "view": weights[10:20]}, path)
    assert (exc.value.filename, exc.value.errno, exc.value.needed) == (str(path), errno.ENOSPC, 4000)
    assert os.listdir(tmp_path) == ["checkpoint.pth"] and path.read_bytes() == old


def test_full_disk_on_an_epoch_copy(tmp_path, monkeypatch):
    """The disk fills half-way through checkpoint_e0002.pth: one line naming it and the 700
    bytes of checkpoint.pth it needed; checkpoint.pth and the epoch-1 copy are unchanged and
    no temporary file is left."""
    main, epoch_1 = os.urandom(700), os.urandom(500)
    (tmp_path / "checkpoint.pth").write_bytes(main)
    (tmp_path / "checkpoint_e0001.pth").write_bytes(epoch_1)

    def half_then_full(source, target, *args, **kwargs):
        target.write(source.read()[:350])
        raise full_disk()
    monkeypatch.setattr(shutil, "copyfileobj", half_then_full)
    with pytest.raises(OSError) as exc:
        checkpoint.rotate_checkpoints(str(tmp_path), 2, keep=3)
    line = checkpoint.checkpoint_write_failed(exc.value, str(tmp_path))
    resume = tmp_path / "checkpoint.pth"
    assert line.startswith(f"cannot write {tmp_path / 'checkpoint_e0002.pth'}: {FULL} (needed 700 bytes, ")
    assert line.endswith(f"; the previous checkpoint_e0002.pth (if any) is unchanged; free some space, "
                         f"then continue with --resume {resume}") and "\n" not in line
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth", "checkpoint_e0001.pth"]
    assert resume.read_bytes() == main and (tmp_path / "checkpoint_e0001.pth").read_bytes() == epoch_1


def test_full_disk_on_log_txt(tmp_path, monkeypatch):
    """The disk fills after half of an epoch's log line is written: train.write_log exits with
    one line naming log.txt and the line's bytes; the two earlier lines are byte for byte as
    they were (no half line left), and the next append, with space again, follows them."""
    (tmp_path / "checkpoint.pth").write_bytes(b"the epoch's checkpoint, written before its log line")
    log_path = tmp_path / "log.txt"
    earlier = b'{"epoch": 0, "train_loss": 1.5}\n{"epoch": 1, "train_loss": 1.25}\n'
    log_path.write_bytes(earlier)
    log = {"epoch": 2, "step": 6, "train_loss": 1.0, "test_coco_eval_bbox": [0.5] * 12}
    new_line = (json.dumps(log) + "\n").encode()
    real_write, log_inode, calls = os.write, log_path.stat().st_ino, []

    def half_then_full(fd, data):
        if os.fstat(fd).st_ino != log_inode:   # not log.txt: as usual
            return real_write(fd, data)
        calls.append(len(data))
        if len(calls) > 1:
            raise full_disk()
        return real_write(fd, bytes(data[: len(data) // 2]))   # a short write, as a filling disk does
    with monkeypatch.context() as patched:
        patched.setattr(os, "write", half_then_full)
        with pytest.raises(SystemExit) as exc:
            train.write_log(log, str(tmp_path))
    message = exc.value.code
    assert calls == [len(new_line), len(new_line) - len(new_line) // 2]
    assert message.startswith(f"error: cannot write {log_path}: {FULL} (needed {len(new_line)} bytes, ")
    assert message.endswith(f"; the previous log.txt (if any) is unchanged; free some space, then continue "
                            f"with --resume {tmp_path / 'checkpoint.pth'}") and "\n" not in message
    assert log_path.read_bytes() == earlier
    train.write_log(log, str(tmp_path))
    assert log_path.read_bytes() == earlier + new_line
