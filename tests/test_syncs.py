"""Host synchronisations in one training step: train.py's loop, counted at the dispatcher.

The step is the real one: train.main runs each variant for two steps on tiny settings, and
a TorchDispatchMode counts aten ops from the start of a step (train.py's move_targets) to
its end (LossMeter.add, after optimizer.step), so forward, criterion, backward, clip and
step are all inside, data loading and logging outside (--log_every 0).

What counts as a synchronisation (on a GPU each makes the host wait for the device queue;
on the CPU nothing waits, so we count the calls that *would* wait):
  - aten._local_scalar_dense: every .item(), float(t), int(t), bool(t) and `if t:`;
  - ops whose output size depends on the values (nonzero, masked_select, boolean
    indexing, unique): the host must read the values to allocate the result;
  - copies to the host: Tensor.cpu() and Tensor.tolist() calls (on a CPU tensor neither
    reaches the dispatcher, so they are counted where Python calls them), and
    aten._to_copy with device=cpu (`.to("cpu")`) made by the step's own code: the autograd
    engine's _to_copy calls are not transfers (the backward of a dtype cast, e.g. of the
    bf16 backbone's autocast, casts the gradient back on the device its input was on, which
    on the CPU names device=cpu).
Not counted: host-to-device copies (asynchronous); reads of tensors that live on the host
on a GPU machine too: AdamW's `state["step"]` counters (torch keeps them on the CPU unless
capturable/fused, and its scalar reads come from torch/optim), and numpy work on what the
one copy brought over; Python ints such as len(target["labels"]) (shapes are on the host).

Budget (BUDGET below): one host transfer per step, the matching of all decoder layers
(the last and the auxiliary ones) in one copy of their cost matrices, because scipy's
Hungarian algorithm runs on the host. Nothing else: num_boxes comes from target lengths,
the losses index with integer pairs, box checks happen where data enters (the dataset,
box_ops.generalized_box_iou), and the loop checks the loss for NaN/inf every --log_every
steps and before every checkpoint (train.stop_if_non_finite), not every step.
"""
import os
import sys
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402

BUDGET = 1   # host transfers per training step: the one copy of every layer's cost matrices

TINY = ["--hidden_dim", "32", "--nheads", "4", "--dim_feedforward", "64", "--enc_layers", "1",
        "--dec_layers", "3", "--num_queries", "8", "--num_select", "8", "--batch_size", "2",
        "--shapes_train", "4", "--shapes_val", "2", "--epochs", "1", "--num_workers", "0",
        "--image_size", "48", "--max_steps", "2", "--log_every", "0"]
VARIANTS = {"detr": ["--variant", "detr"], "conditional": ["--variant", "conditional"],
            "conditional_dn": ["--variant", "conditional", "--dn"], "smca": ["--variant", "smca"],
            "smca_multiscale": ["--variant", "smca", "--smca_multiscale"],
            "dab": ["--variant", "dab"], "dn": ["--variant", "dn"]}

DATA_DEPENDENT = {"aten.nonzero", "aten.masked_select", "aten.unique", "aten._unique2",
                  "aten.unique_consecutive", "aten.unique_dim"}


def sync_kind(func, args, kwargs):
    """The kind of synchronisation an aten op makes, or None (see the module docstring)."""
    name = func.overloadpacket.__qualname__ if hasattr(func, "overloadpacket") else str(func)
    name = f"aten.{name.split('.')[-1]}"
    if name == "aten._local_scalar_dense":
        return None if called_from_optimizer() else "scalar read"
    if name in DATA_DEPENDENT:
        return name
    if name == "aten.index" and any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                                    for i in (args[1] if len(args) > 1 else []) if i is not None):
        return "boolean index"
    if (name == "aten._to_copy" and kwargs.get("device") == torch.device("cpu")
            and torch._C._current_autograd_node() is None):
        return "copy to host"
    return None


def called_from_optimizer():
    """True inside torch.optim (reads of its host-side step counters, see the docstring)."""
    frame = sys._getframe(1)
    while frame is not None:
        if f"torch{os.sep}optim{os.sep}" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


class SyncCounter(TorchDispatchMode):
    """Counts the ops `sync_kind` names, with where in minidetr each was called from."""

    def __init__(self):
        super().__init__()
        self.kinds, self.places = Counter(), Counter()
        self.active = False

    def record(self, kind):
        self.kinds[kind] += 1
        self.places[caller()] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = sync_kind(func, args, kwargs)
        if kind is not None:
            self.record(kind)
        return func(*args, **kwargs)

    def __enter__(self):
        self.active = True
        return super().__enter__()

    def __exit__(self, *exc):
        self.active = False
        return super().__exit__(*exc)


def caller():
    """file:line of the innermost frame in the project's own code (for the failure message)."""
    frame = sys._getframe(1)
    while frame is not None:
        path = frame.f_code.co_filename
        if ("minidetr" in path or path.endswith("train.py")) and "test_syncs" not in path:
            return f"{os.path.basename(path)}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


def count_step_syncs(argv, monkeypatch):
    """Run train.main(argv); return one SyncCounter per training step."""
    steps = []
    real_move, real_add = train.move_targets, train.LossMeter.add

    def move_targets(targets, device):          # the first thing a step does
        steps.append(SyncCounter())
        steps[-1].__enter__()
        return real_move(targets, device)

    def add(self, *args, **kwargs):              # the last thing a step does
        try:
            return real_add(self, *args, **kwargs)
        finally:
            steps[-1].__exit__(None, None, None)

    def counted(method, kind):                   # .cpu() / .tolist(): not dispatched on the CPU
        def wrapper(self, *args, **kwargs):
            if steps and steps[-1].active:
                steps[-1].record(kind)
            return method(self, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(train, "move_targets", move_targets)
    monkeypatch.setattr(train.LossMeter, "add", add)
    monkeypatch.setattr(torch.Tensor, "cpu", counted(torch.Tensor.cpu, "copy to host"))
    monkeypatch.setattr(torch.Tensor, "tolist", counted(torch.Tensor.tolist, "tolist"))
    train.main(argv)
    return steps


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("shapes"))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_one_training_step_stays_within_the_sync_budget(variant, data_dir, monkeypatch):
    """Each of two training steps makes at most BUDGET host synchronisations (all kinds)."""
    monkeypatch.setenv("MINIDETR_DATA", data_dir)
    torch.manual_seed(0)
    steps = count_step_syncs(VARIANTS[variant] + TINY, monkeypatch)
    assert len(steps) == 2
    for counter in steps:
        total = sum(counter.kinds.values())
        assert total <= BUDGET, (f"{variant}: {total} syncs in one step, budget {BUDGET}: "
                                 f"{dict(counter.kinds)} at {dict(counter.places)}")
    assert steps[-1].kinds["copy to host"] == 1         # the matching's copy is seen, so counted
