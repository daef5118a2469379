"""Saving and loading checkpoints: atomic writes, safe loads, RNG state.

A run that dies while writing must never leave a corrupt `checkpoint.pth`, so every file is
written to a temporary name in the same folder, flushed to disk, then renamed over the old
one (a rename within one file system is atomic). Loading always uses
`torch.load(..., weights_only=True)`, which unpickles only tensors and plain containers:
a checkpoint cannot run code on the loading machine. The official DETR-family checkpoints
store their settings as an `argparse.Namespace`; that one class is allowed, nothing else.
"""
import argparse
import os
import random
import re
import tempfile

import numpy as np
import torch


# ---- writing ----

def save_atomic(obj, path):
    """torch.save to `path` through a temporary file + fsync + rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".pth", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)     # mkstemp makes it owner-only; torch.save would not
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


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
