"""Saving and loading checkpoints: atomic writes, safe loads, RNG state, resuming.

A run that dies while writing must never leave a corrupt `checkpoint.pth`, so every file is
written to a temporary name in the same folder, flushed to disk, then renamed over the old
one (a rename within one file system is atomic); log.txt is appended to and cut back if
the append fails. A write that fails (a full disk) raises WriteError, which cannot_write
turns into the one line a user sees: the file, what it needed, that the old one is whole. Loading always uses
`torch.load(..., weights_only=True)`, which unpickles only tensors and plain containers:
a checkpoint cannot run code on the loading machine. The official DETR-family checkpoints
store their settings as an `argparse.Namespace`; that one class is allowed, nothing else.
A run's --resume is read and checked against the run's settings here (read_resume) before
anything is built, then its weights and training state go back in (load_weights,
load_training_state); engine.TrainingProgress.save writes what they read.
"""
import argparse
import errno
import os
import random
import re
import shutil
import tempfile
from typing import NamedTuple

import numpy as np
import torch

from minidetr import distributed
from minidetr.categories import for_checkpoint
from minidetr.config import Config


# ---- writing: every file a run writes, whole or not at all ----

class WriteError(OSError):
    """Writing `filename` failed (a full disk, say); errno and strerror are the cause's.

    needed: the bytes the write needed (an int, or None if unknown), for cannot_write.
    The writers below raise it after undoing their partial write, so the file is as before.
    """

    def __init__(self, path, err, needed):
        super().__init__(err.errno, err.strerror or str(err), str(path))
        self.needed = needed


def cannot_write(path, err, needed, then="run it again"):
    """The one line to show a user when writing `path` failed with OSError `err`.

    needed: bytes the write needed (None: not said). then: how to go on once the cause is
    fixed, e.g. 'continue with --resume out/checkpoint.pth'. Every writer of a run (and
    anything else that writes a file, a drawing say) says it this way, e.g.
    "cannot write out/log.txt: No space left on device (needed 1.9 KiB, 0 bytes free);
    the previous log.txt (if any) is unchanged; free some space, then continue with ...".
    """
    sizes = [f"needed {_size(needed)}"] if needed is not None else []
    try:   # how far off the disk is: what to free (on a quota, the disk's free space can mislead)
        sizes.append(f"{_size(shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free)} free")
    except OSError:
        pass
    full = err.errno in (errno.ENOSPC, errno.EDQUOT)   # out of disk, out of quota
    return (f"cannot write {path}: {err.strerror or err}" + (f" ({', '.join(sizes)})" if sizes else "")
            + f"; the previous {os.path.basename(path)} (if any) is unchanged; "
            + f"{'free some space' if full else 'fix that'}, then {then}")


def _size(n):
    """1536 -> '1.5 KiB'; under 1 KiB in bytes."""
    if n < 1024:
        return f"{n} bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"


def _write_through_temp(path, write):
    """write(f) into a temporary file beside `path`, fsync it, rename it over `path`.

    The rename is atomic within a file system: a reader (or a crash) sees the old file or
    the new one, never a mix. On any failure, Ctrl-C included, the temporary file is removed.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp_{os.path.basename(path)}.", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())   # a full disk can show only here (delayed allocation, NFS)
        os.chmod(tmp, 0o644)       # mkstemp makes it owner-only; a plain open would not
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _tensor_bytes(obj):
    """The bytes of the tensor storages in obj (nested dicts, lists, tuples), each counted once.

    What torch.save needs, less its zip headers and the pickled structure: within a percent
    for a model's checkpoint. Said when a save fails, since the size is only known once the
    save succeeded.
    """
    storages, stack = {}, [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            storage = x.untyped_storage()    # torch.save writes the whole storage, once
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(x, dict):
            stack += list(x.values())
        elif isinstance(x, (list, tuple)):
            stack += list(x)
    return sum(storages.values())


def save_atomic(obj, path):
    """torch.save to `path` through a temporary file + fsync + rename.

    Raises WriteError (an OSError) naming `path` and the bytes needed when writing fails;
    the file there before, if any, is unchanged and no temporary file is left.
    """
    try:
        _write_through_temp(path, lambda f: torch.save(obj, f))
    except OSError as err:
        raise WriteError(path, err, _tensor_bytes(obj)) from err


def copy_atomic(src, dst):
    """Copy `src` to `dst` through a temporary file + fsync + rename (an epoch's checkpoint copy).

    Raises WriteError naming `dst` and src's size when writing fails; dst is as before.
    """
    needed = os.path.getsize(src)   # outside the try: a missing src is no write failure

    def copy(f):
        with open(src, "rb") as source:
            shutil.copyfileobj(source, f, 1 << 20)   # 1 MiB reads

    try:
        _write_through_temp(dst, copy)
    except OSError as err:
        raise WriteError(dst, err, needed) from err


def write_bytes_atomic(path, data):
    """Write `data` (bytes: an encoded drawing, a results json) to `path` through a temporary
    file + fsync + rename. Encoded in memory first, so the bytes needed are known; raises
    WriteError naming `path` and them when writing fails, the file there before unchanged."""
    try:
        _write_through_temp(path, lambda f: f.write(data))
    except OSError as err:
        raise WriteError(path, err, len(data)) from err


def append_line(path, line):
    """Append `line` (a str ending in a newline) to `path`, all of it or nothing (log.txt).

    Appended in place and cut back to the previous length if the write fails, rather than
    written to a copy that is renamed over the file: the file stays the same file, so a
    `tail -f log.txt` goes on showing the new lines, and a full disk needs room for the line
    alone, not for another copy of the log. One write() of a line of a few KB is not split
    by a kill in practice; the cut-back covers the failures that return (a full disk, a
    quota, an I/O error), which would otherwise leave half a line that no JSON reader takes.
    Raises WriteError naming `path` and the line's bytes; the earlier lines are unchanged.
    """
    data = line.encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        before = os.fstat(fd).st_size
        try:
            written = 0
            while written < len(data):   # os.write may write part (a disk filling up), then fail
                written += os.write(fd, data[written:])
            os.fsync(fd)                 # a full disk can show only here (delayed allocation, NFS)
        except OSError as err:
            os.ftruncate(fd, before)     # freeing space: needs none
            raise WriteError(path, err, len(data)) from err
    finally:
        os.close(fd)


# ---- reading ----

def load_safely(path, map_location="cpu"):
    """torch.load with weights_only=True, argparse.Namespace allowed; clear errors otherwise."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive (b"PK\x03\x04"), or before torch 1.6 a pickle (b"\x80")
    if not head:
        raise ValueError(f"{path!r} is empty (0 bytes): not a checkpoint")
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):
        raise ValueError(f"{path!r} is not a checkpoint: torch.save writes a zip archive "
                         f"(or, before torch 1.6, a pickle), and this file starts with {head!r}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # pickle errors come in many classes; the message says which
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            needed = re.search(r"GLOBAL (\S+)", str(err))   # what the file would have run
            raise ValueError(
                f"refusing to load {path!r}: it needs pickled code "
                f"({needed.group(1) if needed else 'see torch.load'}) beyond tensors, plain "
                f"containers and argparse.Namespace, and minidetr only loads checkpoints with "
                f"weights_only=True; if you trust the file, re-save just its tensors, e.g. "
                f"torch.save({{'model': model.state_dict()}}, path)") from None
        raise ValueError(f"cannot read checkpoint {path!r}: {err}") from None


def is_official_checkpoint(ckpt):
    """A loaded file saved by a reference codebase: 'args', or weights under official names."""
    if not isinstance(ckpt, dict) or "config" in ckpt:
        return False
    return "args" in ckpt or any(k.startswith("transformer.") for k in ckpt.get("model", {}))


class Contents(NamedTuple):
    """What a checkpoint holds for rebuilding its model (read_checkpoint, convert.read_any_checkpoint)."""
    settings: dict          # every Config field
    state_dict: dict        # minidetr's names
    categories: object      # categories.Categories, or None when the file does not say
    missing: list           # settings the file lacked (another version of minidetr): its preset's


def minidetr_contents(path, ckpt):
    """A loaded minidetr checkpoint -> Contents.

    A file from another version of minidetr: a setting it lacks takes its preset's value,
    one this version does not know is dropped (weights that then do not fit are an error
    where they are loaded). An official file (no 'config') is refused with what to do:
    convert.read_any_checkpoint, which train.py and eval.py use, converts it instead.
    """
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise ValueError(f"{path} has no 'model' entry; is it a minidetr or DETR checkpoint?")
    if "config" not in ckpt:
        what = "an official checkpoint" if is_official_checkpoint(ckpt) else "not a minidetr checkpoint"
        raise ValueError(f"{path} is {what} (no minidetr 'config'): convert it first, python -m "
                         f"minidetr.convert --variant {{detr,conditional,smca,dn,dab}} --src {path} "
                         f"--dst converted.pth")
    saved = dict(ckpt["config"])
    defaults = Config.for_variant(saved.get("variant", "detr"), saved.get("preset", "paper")).to_dict()
    settings = {**defaults, **{k: v for k, v in saved.items() if k in defaults}}
    return Contents(settings, ckpt["model"], for_checkpoint(ckpt), sorted(set(defaults) - set(saved)))


def read_checkpoint(path):
    """Contents of a minidetr checkpoint file (minidetr_contents)."""
    return minidetr_contents(path, load_safely(path))


# ---- random state, so a resumed run continues exactly ----

def rng_state():
    """Every generator the training loop draws from, in weights_only-loadable types."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(_tuplify(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x):
    """random.setstate wants nested tuples; a round trip through a checkpoint may give lists."""
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


# ---- resuming: what a run saved, checked against this run before anything is built ----

# settings that decide the model's weights and what they mean: a checkpoint cannot continue
# under others (num_classes is checked once the dataset has set it)
MODEL_KEYS = ("variant", "preset", "dn", "backbone", "backbone_stage", "dilation", "hidden_dim",
              "nheads", "enc_layers", "dec_layers", "dim_feedforward", "num_queries", "activation",
              "smca_scale", "smca_multiscale", "smca_ms_form")


def read_resume(path, cfg):
    """Load --resume and check it fits this run's model; ValueError says what to do if not.

    Runs before the dataset and the model are built, so a wrong file stops the run at once.
    """
    ckpt = load_safely(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{path} has no 'model' entry; is it a minidetr or DETR checkpoint?")
    if is_official_checkpoint(ckpt):   # its weights have the reference's names, not ours
        raise ValueError(f"{path} is an official DETR-family checkpoint; convert it first: python -m "
                         f"minidetr.convert --variant {cfg.variant} --src {path} --dst converted.pth, "
                         f"then --resume converted.pth")
    check_same_settings(path, ckpt, cfg, MODEL_KEYS)
    return ckpt


def check_same_settings(path, ckpt, cfg, keys):
    saved = ckpt.get("config", {})
    for key in keys:
        if key in saved and saved[key] != getattr(cfg, key, None):
            raise ValueError(f"{path} was trained with --{key} {saved[key]!r} but this run has "
                             f"{getattr(cfg, key, None)!r}; pass the same settings to resume")


def load_weights(path, ckpt, model, cfg):
    """model.load_state_dict(ckpt['model']), a mismatch told as what to do (ValueError)."""
    check_same_settings(path, ckpt, cfg, ("num_classes",))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:   # missing / unexpected / wrongly shaped weights
        detail = " ".join(str(err).split())   # torch lists every key: keep the start
        raise ValueError(f"the weights in {path} do not fit this model; resume with the settings "
                         f"it was trained with ({detail[:240]}{'...' * (len(detail) > 240)})") from None


def load_training_state(path, ckpt, cfg, optimizer, scheduler, scaler):
    """Optimiser, scheduler, scaler and this rank's RNG from a checkpoint read by read_resume."""
    if ckpt.get("step", 0):
        # mid-epoch, `step` counts batches of this size on this many ranks
        check_same_settings(path, ckpt, cfg, ("batch_size",))
        if ckpt.get("world_size", 1) != distributed.get_world_size():
            raise ValueError(f"{path} stopped mid-epoch with {ckpt.get('world_size', 1)} process(es) "
                             f"but this run has {distributed.get_world_size()}; resume with as many, "
                             f"or from an end-of-epoch checkpoint_eNNNN.pth")
    if "optimizer" in ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["lr_scheduler"])
        if ckpt.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(ckpt["scaler"])
        if "rng" in ckpt:   # one state per rank (a world of another size: from an epoch's end)
            rngs = ckpt["rng"] if isinstance(ckpt["rng"], list) else [ckpt["rng"]]
            set_rng_state(rngs[distributed.get_rank() % len(rngs)])


def rotate_checkpoints(out_dir, epoch, keep):
    """Copy checkpoint.pth to checkpoint_eEEEE.pth, then drop the copies of epochs <= epoch - keep.

    The copy goes through a temporary name too: a crash leaves no half-written epoch file,
    and a full disk raises WriteError (see checkpoint_write_failed) with no temporary file left.
    """
    if keep <= 1:
        return
    target = os.path.join(out_dir, f"checkpoint_e{epoch:04d}.pth")
    copy_atomic(os.path.join(out_dir, "checkpoint.pth"), target)
    for name in os.listdir(out_dir):
        old = re.fullmatch(r"checkpoint_e(\d+)\.pth", name)
        if old and int(old.group(1)) <= epoch - keep:
            os.remove(os.path.join(out_dir, name))


def checkpoint_write_failed(err, out_dir):
    """The one line when writing a file of the run failed (a full disk, say): checkpoint.pth,
    an epoch's copy or log.txt, named by the WriteError its writer raised with the bytes it
    needed; the writer left that file as it was, and checkpoint.pth (if written yet) is where
    to go on from."""
    resume = os.path.join(out_dir, "checkpoint.pth")
    return cannot_write(err.filename or resume, err, getattr(err, "needed", None),
                        then=f"continue with --resume {resume}" if os.path.isfile(resume) else "run it again")


