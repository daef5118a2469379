"""Tests for minidetr/optim.py: AdamW and StepDrop against torch.optim's own classes (bit for
bit, checkpoints both ways), the update against the paper's equations in a float64 loop, and
the reason the module exists: training never imports torch's compiler.
"""
import copy
import math
import subprocess
import sys

import pytest
import torch

from minidetr.optim import AdamW, StepDrop


def _two_groups(seed=0):
    """A 'backbone' and a 'transformer' parameter group, as build_optimizer makes them."""
    g = torch.Generator().manual_seed(seed)
    backbone = [torch.randn(4, 3, generator=g, requires_grad=True), torch.randn(3, generator=g, requires_grad=True)]
    rest = [torch.randn(5, 2, generator=g, requires_grad=True), torch.randn(2, generator=g, requires_grad=True)]
    return rest, backbone


def _clone(params):
    return [p.detach().clone().requires_grad_(True) for p in params]


def _groups(rest, backbone):
    return [{"params": rest, "lr": 1e-2}, {"params": backbone, "lr": 1e-3}]


def _set_grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(params):
        # the last tensor gets no gradient at step 1: skipped, its state created later
        p.grad = None if (step == 1 and i == len(params) - 1) else torch.randn(p.shape, generator=g)


def test_adamw_and_step_drop_equal_torch_bit_for_bit():
    """6 steps over 3 epochs, lr dropped 10x after epoch 2, weight decay on, one gradient
    missing once: every parameter and moment equal to torch.optim.AdamW + StepLR's."""
    rest, backbone = _two_groups()
    ours_rest, ours_backbone = _clone(rest), _clone(backbone)
    theirs = torch.optim.AdamW(_groups(rest, backbone), lr=1e-2, weight_decay=0.1)
    theirs_sched = torch.optim.lr_scheduler.StepLR(theirs, 2)
    ours = AdamW(_groups(ours_rest, ours_backbone), lr=1e-2, weight_decay=0.1)
    ours_sched = StepDrop(ours, 2)
    for step in range(6):
        for opt, params in ((theirs, rest + backbone), (ours, ours_rest + ours_backbone)):
            opt.zero_grad(set_to_none=True)
            _set_grads(params, step)
            opt.step()
        if step % 2 == 1:   # an epoch's end
            theirs_sched.step()
            ours_sched.step()
    assert [g["lr"] for g in ours.param_groups] == [g["lr"] for g in theirs.param_groups] == [1e-3, 1e-4]
    for a, b in zip(rest + backbone, ours_rest + ours_backbone):
        assert torch.equal(a, b)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(theirs.state[a][key], ours.state[b][key]), key


def test_one_step_is_the_papers_update():
    """Two steps of the docstring's equations in a float64 loop, against float32 AdamW."""
    lr, wd, (b1, b2), eps = 1e-2, 0.1, (0.9, 0.999), 1e-8
    p = torch.tensor([0.5, -1.5, 2.0], requires_grad=True)
    opt = AdamW([{"params": [p]}], lr=lr, weight_decay=wd)
    grads = [[0.3, -0.2, 1e-3], [-0.1, 0.4, 2.0]]
    x, m, v = [0.5, -1.5, 2.0], [0.0] * 3, [0.0] * 3
    for t, grad in enumerate(grads, start=1):
        p.grad = torch.tensor(grad)
        opt.step()
        for i, g in enumerate(grad):
            x[i] *= 1 - lr * wd
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            x[i] -= lr * (m[i] / (1 - b1 ** t)) / (math.sqrt(v[i] / (1 - b2 ** t)) + eps)
    assert torch.allclose(p.detach().double(), torch.tensor(x, dtype=torch.float64), rtol=0, atol=1e-6)


def test_checkpoints_move_between_torch_and_ours():
    """torch's state_dict -> ours (a checkpoint from before minidetr/optim.py) and ours ->
    torch's: the next step equal on both sides, the saved (dropped) lr restored."""
    rest, backbone = _two_groups()
    theirs = torch.optim.AdamW(_groups(rest, backbone), lr=1e-2, weight_decay=0.1)
    for step in range(2):
        _set_grads(rest + backbone, step)
        theirs.step()
    theirs.param_groups[0]["lr"] = 1e-3                  # as after a drop
    ours_params = _clone(rest), _clone(backbone)
    ours = AdamW(_groups(*ours_params), lr=1e-2, weight_decay=0.1)
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))   # as read from a file: no shared tensors
    assert ours.param_groups[0]["lr"] == 1e-3
    back_params = _clone(rest), _clone(backbone)
    back = torch.optim.AdamW(_groups(*back_params), lr=1e-2, weight_decay=0.1)
    back.load_state_dict(copy.deepcopy(ours.state_dict()))
    for opt, params in ((theirs, rest + backbone), (ours, sum(ours_params, [])), (back, sum(back_params, []))):
        _set_grads(params, 2)
        opt.step()
    for a, b, c in zip(rest + backbone, sum(ours_params, []), sum(back_params, [])):
        assert torch.equal(a, b) and torch.equal(a, c)
    sched = StepDrop(ours, 8)
    sched.load_state_dict(torch.optim.lr_scheduler.StepLR(theirs, 8).state_dict() | {"last_epoch": 5})
    assert sched.last_epoch == 5


def test_a_state_of_another_model_is_refused_with_its_sizes():
    rest, backbone = _two_groups()
    ours = AdamW(_groups(rest, backbone), lr=1e-2, weight_decay=0.1)
    other = AdamW([{"params": rest + backbone}], lr=1e-2, weight_decay=0.1)
    with pytest.raises(ValueError, match=r"sizes \[4\], this model \[2, 2\]"):
        ours.load_state_dict(other.state_dict())


def test_training_never_imports_torchs_compiler():
    """The point of minidetr/optim.py: build_optimizer, a step and a checkpoint's state_dict
    leave torch._dynamo (and its sympy, ~70 MiB) unimported. torch.optim.AdamW would import it."""
    code = """
import sys, torch
from minidetr import build
from minidetr.config import Config
from minidetr.optim import build_optimizer
cfg = Config.for_variant("detr", "tiny")
model, criterion, _ = build(cfg)
optimizer, scheduler = build_optimizer(model, cfg)
sum(p.sum() for p in model.parameters()).backward()
optimizer.step(); optimizer.zero_grad(); scheduler.step(); optimizer.state_dict()
print(sorted(m for m in ("torch._dynamo", "sympy") if m in sys.modules))
torch.optim.AdamW(model.parameters())
print(sorted(m for m in ("torch._dynamo", "sympy") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["[]", "['sympy', 'torch._dynamo']"], out


def test_a_grad_scaler_drives_it_as_it_drives_torchs():
    """--amp fp16's path (train.py: scale, backward, unscale_, clip, step, update) with an
    overflow on the second step, which the scaler must skip: equal to torch.optim.AdamW's."""
    rest, backbone = _two_groups()
    ours_params = _clone(rest + backbone)
    sides = [(torch.optim.AdamW(_groups(rest, backbone), lr=1e-2, weight_decay=0.1), rest + backbone),
             (AdamW(_groups(ours_params[:2], ours_params[2:]), lr=1e-2, weight_decay=0.1), ours_params)]
    for optimizer, params in sides:
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        for step in range(4):
            optimizer.zero_grad(set_to_none=True)
            loss = sum((p * (step + 1)).sum() for p in params) * (float("inf") if step == 1 else 1.0)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, 0.1)
            scaler.step(optimizer)
            scaler.update()
        assert scaler.get_scale() == 2.0 ** 9    # halved once, at the overflow
    for a, b in zip(rest + backbone, ours_params):
        assert torch.equal(a, b)
    assert all(float(s["step"]) == 3 for s in sides[1][0].state.values())   # the overflow skipped
