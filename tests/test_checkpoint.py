"""checkpoint: atomic saves leave no partial file, loads are weights_only (Namespace allowed,
other pickled code refused), and the RNG state round-trips through a saved file."""
import argparse
import os
import random

import numpy as np
import pytest
import torch

from minidetr.checkpoint import load_safely, rng_state, save_atomic, set_rng_state


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
