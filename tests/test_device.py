"""Device-agnostic checks, run on the `device` fixture (CPU here; CUDA under
benchmarks/gpu_check.sh): what must hold wherever a user trains.

- the shared attention on the device equals the float64 loop on the CPU (fused kernels and
  TF32 matmuls may differ by rounding only);
- every variant's model gives the same eval outputs on the device as on the CPU, from the
  same weights and batch;
- a training step under bf16 autocast (and fp16 with a GradScaler on CUDA) gives finite
  losses and gradients for every variant, denoising included.
"""
import pytest
import torch

import minidetr
from minidetr.transformer import attention
from naive import naive_attention, rand

VARIANTS = ("detr", "conditional", "smca", "dn")


def batch(device, seed=0):
    """Two padded images of different sizes and their targets (cxcywh in [0, 1])."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, 96, 112, generator=g)
    mask = torch.zeros(2, 96, 112, dtype=torch.bool)
    mask[1, 80:, :] = True
    mask[1, :, 96:] = True
    targets = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
               {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    return images.to(device), mask.to(device), targets


def test_attention_on_device_matches_the_float64_loop(device):
    """attention() on the device (float32) equals the naive float64 softmax loop."""
    q, k, v = rand(2, 5, 16, seed=1), rand(2, 12, 16, seed=2), rand(2, 12, 16, seed=3)
    pad = torch.zeros(2, 12, dtype=torch.bool)
    pad[1, 9:] = True
    out = attention(*(t.float().to(device) for t in (q, k, v)), heads=4, pad_mask=pad.to(device))
    assert torch.allclose(out.double().cpu(), naive_attention(q, k, v, 4, pad_mask=pad), atol=2e-3)


@pytest.mark.parametrize("variant", VARIANTS)
def test_eval_outputs_on_device_equal_the_cpu(variant, device, monkeypatch):
    """Same weights, same batch: the device's pred_logits / pred_boxes equal the CPU's.

    With TF32 off: PyTorch lets cuDNN run float32 convolutions in TF32 by default (10-bit
    mantissa, ~1e-3 relative per product), which over ResNet-18's 20 convolutions from random
    weights is more than this comparison's tolerance; the check is of minidetr's code on the
    device, not of TF32's rounding.

    With the backbone in float32 on both sides: the tiny preset's backbone_precision 'auto'
    runs the ResNet in bf16 on a CPU with bf16 instructions (a GPU host often has them) and
    in float32 on a GPU, so the two sides would differ by bf16's rounding (~1e-3 relative in
    the logits, seen on an H200's host)."""
    if device.type == "cpu":
        pytest.skip("the device is the CPU: comparing it with itself cannot fail "
                    "(benchmarks/gpu_check.sh runs this with MINIDETR_TEST_DEVICE=cuda)")
    if device.type == "cuda":
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.manual_seed(0)
    model = minidetr.build(variant, preset="tiny", backbone_precision="fp32")[0].eval()
    images, mask, _ = batch("cpu")
    with torch.no_grad():
        cpu_out = model(images, mask)
        dev_out = model.to(device)(images.to(device), mask.to(device))
    for key in ("pred_logits", "pred_boxes"):
        assert torch.allclose(dev_out[key].cpu(), cpu_out[key], atol=2e-3), key


@pytest.mark.parametrize("variant", VARIANTS)
def test_amp_training_step_is_finite(variant, device):
    """One forward + loss + backward under autocast: every loss and gradient finite.

    fp16 (CUDA only) trains through a GradScaler, as train.py does. Its first scale, 2**16,
    can overflow fp16 in the backward (inf / nan gradients); the scaler then skips that step
    and halves the scale. So a first try with non-finite gradients is normal, and what must
    hold is that a finite step comes within a few halvings (scale >= 2**6 here), with the
    loss itself finite every time."""
    torch.manual_seed(0)
    model, criterion, _ = minidetr.build(variant, preset="tiny")
    model.to(device).train()
    images, mask, targets = batch(device)
    for dtype in ([torch.bfloat16, torch.float16] if device.type == "cuda" else [torch.bfloat16]):
        scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)   # lr 0: the weights never move
        for attempt in range(11 if scaler else 1):
            model.zero_grad()
            with torch.autocast(device_type=device.type, dtype=dtype):
                losses = criterion(model(images, mask, targets), targets)
            total = sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses)
            assert torch.isfinite(total), (dtype, {k: float(v) for k, v in losses.items()})
            (scaler.scale(total) if scaler else total).backward()
            if scaler:
                scaler.unscale_(optimizer)
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            finite = bool(grads) and all(torch.isfinite(g).all() for g in grads)
            if finite or not scaler:
                break
            scale = scaler.get_scale()
            scaler.step(optimizer)    # skipped: the scaler saw the inf / nan
            scaler.update()           # and halves the scale
            assert scaler.get_scale() == scale / 2
        assert finite, (dtype, f"no finite step in {attempt + 1} tries" if scaler else "")