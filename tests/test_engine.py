"""Tests for the training loop (train.py, on minidetr/engine.py's TrainingProgress, driven through train.main): a run split
by --max_steps or by SIGINT and resumed ends with exactly the weights of an uninterrupted
run; SIGTERM during evaluation stops before the next step; a non-finite loss stops with
epoch, step and term and keeps the last checkpoint; so does a disk that fills while a
checkpoint is written; a checkpoint from another version of minidetr (a config field missing,
an unknown one) resumes exactly; checkpoints are written atomically and rotated; only rank 0
writes.

Every run is a tiny model (1 encoder, 2 decoder layers, 32-d) on 8 shapes images of 32 px,
2 epochs of 2 steps, so a run takes a few seconds on two CPU cores.
"""
import errno
import io
import os
import signal
import sys

import pytest
import torch

import minidetr
from minidetr import checkpoint, distributed, engine
from minidetr.checkpoint import load_safely, save_atomic
from minidetr.engine import StopRequest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402

TINY_RUN = ["--hidden_dim", "32", "--nheads", "4", "--dim_feedforward", "64", "--enc_layers", "1",
            "--dec_layers", "2", "--num_queries", "8", "--num_select", "8", "--batch_size", "4",
            "--shapes_train", "8", "--shapes_val", "4", "--epochs", "2", "--num_workers", "0",
            "--image_size", "32", "--lr_backbone", "0"]   # backbone frozen, to save time
DN = ["--variant", "dn"] + TINY_RUN                           # dropout 0; RNG draws the dn noise
DETR = ["--variant", "detr", "--dropout", "0.1"] + TINY_RUN   # RNG draws the dropout masks


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(autouse=True)
def shapes_here(data_dir, monkeypatch):
    monkeypatch.setenv("MINIDETR_DATA", data_dir)


def straight_run(tmp_path_factory, data_dir, argv):
    out = tmp_path_factory.mktemp("straight")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINIDETR_DATA", data_dir)
        train.main(argv + ["--output_dir", str(out), "--keep_checkpoints", "2"])
    return out


@pytest.fixture(scope="module")
def straight_dn(tmp_path_factory, data_dir):
    return straight_run(tmp_path_factory, data_dir, DN)


@pytest.fixture(scope="module")
def straight_detr(tmp_path_factory, data_dir):
    return straight_run(tmp_path_factory, data_dir, DETR)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_state(a, b):
    """Bit-identical model weights (and buffers) and the same global RNG afterwards."""
    assert a["model"].keys() == b["model"].keys()
    differ = [name for name in a["model"] if not torch.equal(a["model"][name], b["model"][name])]
    assert differ == []
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"])


def build_with_hook(hook, training=True):
    """minidetr.build, with hook(call, losses) run on every training (or evaluation) call
    of the criterion."""
    def build(cfg):
        model, criterion, postprocess = minidetr.build(cfg)
        real_forward, calls = criterion.forward, []

        def forward(outputs, targets):
            losses = real_forward(outputs, targets)
            if model.training == training:
                hook(len(calls), losses)
                calls.append(1)
            return losses
        criterion.forward = forward
        return model, criterion, postprocess
    return build


# ---- resuming continues exactly ----

def test_max_steps_then_resume_equals_straight_run_with_dropout(tmp_path, straight_detr):
    """detr, dropout 0.1: 3 steps, stop mid-epoch 1, resume for the last step -> same weights."""
    out = str(tmp_path / "split")
    train.main(DETR + ["--output_dir", out, "--max_steps", "3"])
    first = load(os.path.join(out, "checkpoint.pth"))
    assert (first["epoch"], first["step"]) == (1, 1)
    train.main(DETR + ["--output_dir", out, "--resume", os.path.join(out, "checkpoint.pth")])
    final = load(os.path.join(out, "checkpoint.pth"))
    straight = load(straight_detr / "checkpoint.pth")
    assert_same_state(final, straight)
    assert not all(torch.equal(first["model"][k], final["model"][k]) for k in final["model"])


def test_resume_at_max_steps_trains_no_further(tmp_path):
    """A checkpoint already at --max_steps: resuming with the same budget leaves it as it is."""
    out = str(tmp_path / "budget")
    train.main(DN + ["--output_dir", out, "--max_steps", "2"])
    before = load(os.path.join(out, "checkpoint.pth"))
    train.main(DN + ["--output_dir", out, "--max_steps", "2", "--resume", os.path.join(out, "checkpoint.pth")])
    after = load(os.path.join(out, "checkpoint.pth"))
    assert (after["epoch"], after["step"]) == (before["epoch"], before["step"])
    assert_same_state(before, after)


def test_resume_of_a_finished_run_says_so(straight_dn, capsys):
    """A checkpoint that has done --epochs: resuming trains nothing and says why (it was silent)."""
    ckpt = str(straight_dn / "checkpoint.pth")
    train.main(DN + ["--resume", ckpt])
    assert "nothing to train: the checkpoint has done 2 epochs and --epochs is 2" in capsys.readouterr().out
    assert load(ckpt)["epoch"] == 2


def test_sigint_saves_returns_cleanly_and_resume_equals_straight_run(tmp_path, monkeypatch, straight_dn):
    """dn: SIGINT during epoch 0's last step -> the step finishes, checkpoint (epoch 1, step 0)
    before that epoch's evaluation, main returns normally with the signal handlers restored;
    resuming (which skips that evaluation) gives the straight run's weights."""
    out = str(tmp_path / "split")

    def interrupt(call, losses):
        if call == 1:
            os.kill(os.getpid(), signal.SIGINT)
    handler_before = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(train, "build", build_with_hook(interrupt))
    assert train.main(DN + ["--output_dir", out]) is None
    assert signal.getsignal(signal.SIGINT) is handler_before
    saved = load(os.path.join(out, "checkpoint.pth"))
    assert (saved["epoch"], saved["step"]) == (1, 0)
    assert not os.path.exists(os.path.join(out, "log.txt"))       # stopped before any evaluation
    monkeypatch.setattr(train, "build", minidetr.build)
    train.main(DN + ["--output_dir", out, "--resume", os.path.join(out, "checkpoint.pth")])
    assert_same_state(load(os.path.join(out, "checkpoint.pth")), load(straight_dn / "checkpoint.pth"))


def test_sigterm_during_evaluation_stops_before_the_next_step(tmp_path, monkeypatch):
    """SIGTERM while epoch 0 is evaluated: the evaluation finishes and is logged, then the run
    stops before epoch 1's first step, with the checkpoint at (epoch 1, step 0)."""
    out = tmp_path / "run"

    def terminate(call, losses):
        os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(train, "build", build_with_hook(terminate, training=False))
    train.main(DN + ["--output_dir", str(out)])              # returns: epoch 0's evaluation
    saved = load(out / "checkpoint.pth")
    assert (saved["epoch"], saved["step"]) == (1, 0)
    assert len((out / "log.txt").read_text().splitlines()) == 1


def test_stop_request_sigterm_repeat_and_restore():
    """SIGTERM sets the flag; a repeat within REPEAT_S is the same request, a later one
    raises KeyboardInterrupt; leaving the block restores the previous handlers."""
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        assert not stop.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.should_stop()
        os.kill(os.getpid(), signal.SIGINT)          # torchrun forwarding the same Ctrl-C
        stop._since -= StopRequest.REPEAT_S + 1      # ... and now a deliberate second one
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before


# ---- non-finite loss ----

def test_non_finite_loss_names_epoch_step_term_and_keeps_checkpoint(tmp_path, monkeypatch, straight_dn):
    """Resume from the end of epoch 0; loss_giou is NaN at the first step: SystemExit names
    epoch 1, step 0 and loss_giou, and checkpoint.pth is byte-for-byte the good one."""
    out = tmp_path / "run"
    out.mkdir()
    good = (straight_dn / "checkpoint_e0001.pth").read_bytes()
    (out / "checkpoint.pth").write_bytes(good)

    def poison(call, losses):
        if call == 0:
            losses["loss_giou"] = torch.tensor(float("nan"))
    monkeypatch.setattr(train, "build", build_with_hook(poison))
    with pytest.raises(SystemExit) as exc:
        train.main(DN + ["--output_dir", str(out), "--resume", str(out / "checkpoint.pth")])
    message = str(exc.value.code)
    assert "non-finite loss at epoch 1, step 0: loss_giou = [nan]" in message
    assert "--lr" in message                                      # says what to try
    assert (out / "checkpoint.pth").read_bytes() == good
    assert sorted(os.listdir(out)) == ["checkpoint.pth"]


# ---- checkpoint files ----

@pytest.mark.parametrize("failure", [OSError("No space left on device"), KeyboardInterrupt()])
def test_failed_save_keeps_old_checkpoint_and_leaves_no_temp_file(tmp_path, monkeypatch, failure):
    """torch.save writes half the file, then fails: the old checkpoint.pth still loads."""
    path = tmp_path / "checkpoint.pth"
    save_atomic({"w": torch.arange(3.0)}, path)
    real_save = torch.save

    def half_then_fail(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise failure
    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(type(failure)):
        save_atomic({"w": torch.arange(1000.0)}, path)
    assert os.listdir(tmp_path) == ["checkpoint.pth"]
    assert torch.equal(load_safely(path)["w"], torch.arange(3.0))


def test_disk_full_while_saving_stops_the_run_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch,
                                                                                straight_dn):
    """Resume from the end of epoch 0; the disk fills half-way through the next checkpoint
    (torch.save writes half, then ENOSPC): the run stops with one line saying so, and
    checkpoint.pth is byte-for-byte the previous one, with no temporary file beside it."""
    out = tmp_path / "run"
    out.mkdir()
    good = (straight_dn / "checkpoint_e0001.pth").read_bytes()
    (out / "checkpoint.pth").write_bytes(good)
    real_save = torch.save

    def disk_fills(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", disk_fills)
    path = str(out / "checkpoint.pth")
    with pytest.raises(SystemExit) as exc:
        train.main(DN + ["--output_dir", str(out), "--resume", path])
    assert exc.value.code.startswith(f"error: cannot write {path}: {os.strerror(errno.ENOSPC)} (needed ")
    assert exc.value.code.endswith(f"; the previous checkpoint.pth (if any) is unchanged; free some space, "
                                   f"then continue with --resume {path}")
    assert (out / "checkpoint.pth").read_bytes() == good
    assert sorted(os.listdir(out)) == ["checkpoint.pth"]


def test_resume_checkpoint_of_another_version_continues_exactly(tmp_path, straight_dn):
    """A checkpoint whose 'config' lacks a field of today's Config (giou_eps, added later) and
    holds one this version does not know: resuming it still ends at the straight run's weights
    (train.py takes its settings from the command line; the saved ones are only compared)."""
    ckpt = load(straight_dn / "checkpoint_e0001.pth")
    del ckpt["config"]["giou_eps"]
    ckpt["config"]["a_field_from_the_future"] = 1
    out = tmp_path / "run"
    save_atomic(ckpt, out / "checkpoint.pth")
    train.main(DN + ["--output_dir", str(out), "--resume", str(out / "checkpoint.pth")])
    assert_same_state(load(out / "checkpoint.pth"), load(straight_dn / "checkpoint.pth"))


def test_keep_checkpoints_rotation(tmp_path):
    """keep 3 over epochs 1..5 leaves copies of epochs 3, 4, 5 (each that epoch's file); a
    later keep 2 leaves 5 and 6."""
    for epoch in range(1, 6):
        (tmp_path / "checkpoint.pth").write_bytes(f"epoch {epoch}".encode())
        checkpoint.rotate_checkpoints(str(tmp_path), epoch, keep=3)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth", "checkpoint_e0003.pth",
                                            "checkpoint_e0004.pth", "checkpoint_e0005.pth"]
    assert (tmp_path / "checkpoint_e0004.pth").read_bytes() == b"epoch 4"
    checkpoint.rotate_checkpoints(str(tmp_path), 6, keep=2)     # resumed with a smaller K: 3 and 4 go
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth", "checkpoint_e0005.pth", "checkpoint_e0006.pth"]
    checkpoint.rotate_checkpoints(str(tmp_path), 7, keep=1)     # keep 1: checkpoint.pth only, no copies
    assert not (tmp_path / "checkpoint_e0007.pth").exists()


def test_straight_run_rotated_and_logged(straight_dn):
    """--keep_checkpoints 2 over 2 epochs: both epoch copies, the last equal to checkpoint.pth."""
    files = sorted(os.listdir(straight_dn))
    assert files == ["checkpoint.pth", "checkpoint_e0001.pth", "checkpoint_e0002.pth", "log.txt"]
    assert (straight_dn / "checkpoint_e0002.pth").read_bytes() == (straight_dn / "checkpoint.pth").read_bytes()
    assert (load(straight_dn / "checkpoint_e0001.pth")["epoch"], load(straight_dn / "checkpoint.pth")["epoch"]) == (1, 2)


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    """A rank other than 0 trains but creates no output folder, checkpoint or log."""
    monkeypatch.setattr(distributed, "is_main_process", lambda: False)
    train.main(DN + ["--output_dir", str(tmp_path / "out"), "--max_steps", "1"])
    assert os.listdir(tmp_path) == []


# ---- --time_limit: the preset's epochs, or as many as fit ----

class FakeClock:
    """time.time for TimeLimit: the readings given, or 0, 1000, 2000, ... seconds."""
    def __init__(self, readings=None):
        self.readings = list(readings) if readings else None
        self.now = -1000.0

    def __call__(self):
        if self.readings is not None:
            return self.readings.pop(0)
        self.now += 1000.0
        return self.now


def test_time_limit_stops_when_another_epoch_would_not_fit(monkeypatch):
    """By hand, the run started at 0: epoch 1 ran 1000-2000 s (t = 2000, 2000 + 1000 <= 4500:
    go on), epoch 2 ran 3000-4000 s (t = 4000, 4000 + 1000 > 4500: stop after 2 of 10; the drop
    after 8 never comes)."""
    from minidetr import Config

    cfg = Config.for_variant("dn", "tiny", time_limit=4500 / 60)
    assert (cfg.epochs, cfg.lr_drop) == (10, 8)
    monkeypatch.setattr(engine.TimeLimit, "clock", FakeClock())
    limit = engine.TimeLimit(cfg)
    limit.epoch_begins()
    assert limit.fit(cfg, 1) is cfg and limit.checkpoint_entry() == {}
    limit.epoch_begins()
    cut = limit.fit(cfg, 2)
    assert (cut.epochs, cut.lr_drop) == (2, 8)
    assert limit.checkpoint_entry() == {"schedule": {"epochs": 2}}
    assert engine.TimeLimit(cfg, {"schedule": {"epochs": 2}}).resumed(cfg) == cut


@pytest.mark.parametrize("limit_s, stops", [(6200, True), (6700, False)])
def test_time_limit_takes_the_mean_epoch(monkeypatch, limit_s, stops):
    """Epochs of 1000 s and 2000 s, t = 5000 s after the second: the mean (1500) says 6500 s,
    the first alone 6000, the last alone 7000; a limit of 6200 s stops, 6700 goes on."""
    from minidetr import Config

    cfg = Config.for_variant("dn", "tiny", time_limit=limit_s / 60)
    monkeypatch.setattr(engine.TimeLimit, "clock", FakeClock([0, 1000, 2000, 3000, 5000]))
    limit = engine.TimeLimit(cfg)
    limit.epoch_begins()
    assert limit.fit(cfg, 1) is cfg
    limit.epoch_begins()
    assert (limit.fit(cfg, 2).epochs == 2) == stops


def test_time_limit_defaults():
    """The tiny preset's length adapts; a length the user gave (--epochs, --max_steps) does not."""
    from minidetr.config import config_from_args

    def cfg(*argv):
        return config_from_args(train.get_args_parser().parse_args(["--variant", "dn", *argv]))
    assert cfg().time_limit == 9.75
    assert cfg("--epochs", "3").time_limit == 0 and cfg("--max_steps", "10").time_limit == 0
    assert cfg("--epochs", "3", "--time_limit", "2").time_limit == 2
    assert cfg("--coco_path", "somewhere").time_limit == 0          # the paper preset: never


def test_time_limit_cut_is_saved_and_a_resumed_run_keeps_it(tmp_path, monkeypatch, capsys):
    """Started at 0, epoch 1 from 1000 to 2000 s with a limit of 2500 s: the run stops after 1
    of its 2 epochs and says so; its checkpoint says so too, and a resumed run trains nothing."""
    monkeypatch.setattr(engine.TimeLimit, "clock", FakeClock())
    out = str(tmp_path / "cut")
    argv = DN + ["--output_dir", out, "--time_limit", str(2500 / 60)]
    train.main(argv)
    printed = capsys.readouterr().out
    assert "2 epochs, or as many as fit in 41.6667 minutes on this machine (--time_limit)" in printed
    assert ("time limit: an epoch takes 1000 s here and 33.3 of the 41.6667 minutes have passed, so the "
            "run stops after 1 of its 2 epochs; --time_limit 0 trains all 2") in printed
    saved = load(os.path.join(out, "checkpoint.pth"))
    assert saved["epoch"] == 1 and saved["schedule"] == {"epochs": 1} and saved["config"]["epochs"] == 1
    train.main(argv + ["--resume", os.path.join(out, "checkpoint.pth")])
    assert "nothing to train: the checkpoint has done 1 epochs and --epochs is 1" in capsys.readouterr().out
