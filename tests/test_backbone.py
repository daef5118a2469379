"""Tests for minidetr/backbone.py: torchvision-identical ResNets, FrozenBatchNorm2d,
freezing, DC5, padding masks, sine embeddings and weight loading.

References are independent: torchvision's published parameter counts and key names
written out by hand, nn.BatchNorm2d itself, hand-worked masks, math.sin/cos loops.
"""
import copy
import math

import pytest
import torch
from torch import nn

from minidetr.backbone import (Backbone, FrozenBatchNorm2d, cpu_has_bf16, PositionEmbeddingSine, load_backbone_weights,
                               resnet18, resnet34, resnet50, resnet101, sine_embed)


@pytest.mark.parametrize("ctor, count", [(resnet18, 11_689_512), (resnet34, 21_797_672),
                                         (resnet50, 25_557_032), (resnet101, 44_549_160)])
def test_parameter_counts_match_torchvision(ctor, count):
    """Parameter counts with fc equal torchvision's published ones."""
    assert sum(p.numel() for p in ctor().parameters()) == count


def test_state_dict_keys_and_shapes_match_torchvision():
    """Hand-listed torchvision key names and shapes exist (or not) as in torchvision."""
    sd50, sd18 = resnet50().state_dict(), resnet18().state_dict()
    expected50 = {
        "conv1.weight": (64, 3, 7, 7), "bn1.running_var": (64,), "bn1.num_batches_tracked": (),
        "layer1.0.conv1.weight": (64, 64, 1, 1), "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer1.0.downsample.1.running_var": (256,), "layer2.0.conv2.weight": (128, 128, 3, 3),
        "layer3.5.bn3.weight": (1024,), "layer4.1.conv3.weight": (2048, 512, 1, 1),
        "layer4.0.downsample.0.weight": (2048, 1024, 1, 1), "fc.weight": (1000, 2048), "fc.bias": (1000,),
    }
    for key, shape in expected50.items():
        assert tuple(sd50[key].shape) == shape, key
    assert "layer1.0.downsample.1.running_var" not in sd18   # 64 -> 64 channels: identity shortcut
    assert "layer2.0.downsample.1.running_var" in sd18
    assert "layer4.1.conv3.weight" not in sd18
    assert tuple(sd18["layer4.1.conv2.weight"].shape) == (512, 512, 3, 3)
    assert tuple(sd18["fc.weight"].shape) == (1000, 512)
    assert len(sd50) == 320 and len(sd18) == 122              # torchvision's state_dict lengths
    assert "layer3.22.bn3.running_mean" in resnet101().state_dict()


def test_backbone_body_is_torchvision_minus_fc():
    """Backbone.body keys = torchvision's minus fc.* (FrozenBN also without num_batches_tracked)."""
    full = set(resnet50().state_dict())
    trainable_bn = Backbone("resnet50", False, False, True, False)
    assert set(trainable_bn.body.state_dict()) == {k for k in full if not k.startswith("fc.")}
    frozen_bn = Backbone("resnet50", True, True, True, False)
    assert set(frozen_bn.body.state_dict()) == {k for k in full if not k.startswith("fc.")
                                               and not k.endswith("num_batches_tracked")}
    assert frozen_bn.num_channels == [2048] and frozen_bn.strides == [32]


def _grads_after_backward(backbone):
    images, mask = torch.randn(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.bool)
    feat, _ = backbone(images, mask)[0]
    feat.sum().backward()
    return {name: p.grad is not None for name, p in backbone.body.named_parameters()}


def test_paper_mode_freezes_stem_and_layer1():
    """DETR: conv1/bn1/layer1 get no gradient, every layer2-4 parameter does."""
    has_grad = _grads_after_backward(Backbone("resnet18", True, True, True, False))
    for name, got in has_grad.items():
        assert got == name.startswith(("layer2", "layer3", "layer4")), name
    assert not has_grad["conv1.weight"] and has_grad["layer2.0.conv1.weight"]


def test_tiny_mode_trains_everything_and_no_train_backbone_freezes_all():
    """frozen_bn=False, no freezing: every parameter (BN included) gets a gradient; train_backbone=False: none."""
    has_grad = _grads_after_backward(Backbone("resnet18", False, False, True, False))
    assert all(has_grad.values()) and "bn1.weight" in has_grad
    frozen = Backbone("resnet18", False, True, False, False)
    assert not any(p.requires_grad for p in frozen.parameters())


def test_frozen_trainable_bn_keeps_running_stats_in_train_mode():
    """nn.BatchNorm2d in a frozen stage does not update its statistics; in a trained stage it does."""
    backbone = Backbone("resnet18", False, True, True, False).train()
    stem_before = backbone.body.bn1.running_mean.clone()
    layer2_before = backbone.body.layer2[0].bn1.running_mean.clone()
    backbone(torch.randn(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.bool))
    assert torch.equal(backbone.body.bn1.running_mean, stem_before)
    assert not torch.equal(backbone.body.layer2[0].bn1.running_mean, layer2_before)


def test_frozen_bn_equals_batchnorm_in_eval():
    """FrozenBatchNorm2d loaded from a BatchNorm2d state_dict gives BatchNorm2d's eval output."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6).double().eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0), bn.bias.normal_()
        bn.running_mean.normal_(), bn.running_var.uniform_(0.1, 3.0)
    frozen = FrozenBatchNorm2d(6).double()
    frozen.load_state_dict(bn.state_dict())       # has num_batches_tracked: must be dropped
    x = torch.randn(2, 6, 5, 4, dtype=torch.float64)
    torch.testing.assert_close(frozen(x), bn(x))
    assert len(list(frozen.parameters())) == 0


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_dc5_output_stride(name):
    """DC5 keeps layer4 at stride 16 (4x4 on 64x64) instead of 32 (2x2), with the same keys."""
    images, mask = torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool)
    plain, dc5 = Backbone(name, True, True, True, False), Backbone(name, True, True, True, True)
    assert plain(images, mask)[0][0].shape[-2:] == (2, 2) and plain.strides == [32]
    assert dc5(images, mask)[0][0].shape[-2:] == (4, 4) and dc5.strides == [16]
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in dc5.state_dict().items()}


def test_multi_level_outputs_and_mask_downsampling():
    """All four stages in the requested order; masks resized by nearest neighbour (hand-worked)."""
    backbone = Backbone("resnet50", True, True, True, False, return_layers=("layer3", "layer4", "layer1"))
    assert backbone.num_channels == [1024, 2048, 256] and backbone.strides == [16, 32, 4]
    mask = torch.zeros(2, 64, 64, dtype=torch.bool)
    mask[1, 40:, :] = True     # image 1 is 40 rows x 24 columns, padded bottom/right
    mask[1, :, 24:] = True
    levels = backbone(torch.randn(2, 3, 64, 64), mask)
    assert [tuple(f.shape) for f, _ in levels] == [(2, 1024, 4, 4), (2, 2048, 2, 2), (2, 256, 16, 16)]
    F_, T_ = False, True
    # stride 16: cells sample pixels 0, 16, 32, 48 -> rows padded from 48, cols from 32
    layer3 = torch.tensor([[F_, F_, T_, T_], [F_, F_, T_, T_], [F_, F_, T_, T_], [T_, T_, T_, T_]])
    layer4 = torch.tensor([[F_, T_], [F_, T_]])   # stride 32: pixels 0, 32
    assert torch.equal(levels[0][1][1], layer3) and torch.equal(levels[1][1][1], layer4)
    assert not levels[0][1][0].any() and levels[0][1].dtype == torch.bool
    assert torch.equal(levels[2][1][1], mask[1, ::4, ::4])


def test_sine_embed_known_point():
    """sine_embed of 0.3 equals [sin a0, cos a0, sin a1, ...] worked out with math.sin/cos."""
    num_feats, temperature, coord = 8, 10000, 0.3
    expected = []
    for i in range(num_feats // 2):
        angle = coord * 2 * math.pi / temperature ** (2 * i / num_feats)
        expected += [math.sin(angle), math.cos(angle)]
    got = sine_embed(torch.tensor([coord], dtype=torch.float64), num_feats, temperature)
    torch.testing.assert_close(got, torch.tensor([expected], dtype=torch.float64))
    batched = sine_embed(torch.full((2, 3), coord, dtype=torch.float64), num_feats, temperature)
    assert batched.shape == (2, 3, num_feats) and torch.allclose(batched[1, 2], got[0])
    with pytest.raises(ValueError):
        sine_embed(torch.zeros(1), 7)


def _naive_position_embedding(mask, num_feats, temperature, normalize, scale=2 * math.pi):
    """Float64 loops: count unpadded cells up to (y, x) along each axis, then sin/cos per channel."""
    b_size, rows, cols = mask.shape
    out = torch.zeros(b_size, 2 * num_feats, rows, cols, dtype=torch.float64)
    for b in range(b_size):
        for y in range(rows):
            for x in range(cols):
                coord_y = sum(not mask[b, r, x] for r in range(y + 1))
                coord_x = sum(not mask[b, y, c] for c in range(x + 1))
                if normalize:
                    coord_y = coord_y / (sum(not mask[b, r, x] for r in range(rows)) + 1e-6) * scale
                    coord_x = coord_x / (sum(not mask[b, y, c] for c in range(cols)) + 1e-6) * scale
                for axis, coord in enumerate((coord_y, coord_x)):
                    for i in range(num_feats):
                        angle = coord / temperature ** (2 * (i // 2) / num_feats)
                        out[b, axis * num_feats + i, y, x] = math.sin(angle) if i % 2 == 0 else math.cos(angle)
    return out


@pytest.mark.parametrize("temperature, normalize", [(10000, True), (20, True), (10000, False)])
def test_position_embedding_sine_matches_naive_loop(temperature, normalize):
    """PositionEmbeddingSine on a padded batch equals a naive float64 loop ([y-part, x-part])."""
    mask = torch.zeros(2, 5, 7, dtype=torch.bool)
    mask[1, 3:, :] = True
    mask[1, :, 4:] = True
    got = PositionEmbeddingSine(8, temperature, normalize)(mask)
    assert got.shape == (2, 16, 5, 7)
    expected = _naive_position_embedding(mask, 8, temperature, normalize)
    torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=0)
    # unpadded part of image 1 gets the encoding of a 3x4 image (normalised coordinates)
    if normalize:
        alone = PositionEmbeddingSine(8, temperature, normalize)(torch.zeros(1, 3, 4, dtype=torch.bool))
        torch.testing.assert_close(got[1, :, :3, :4], alone[0])


def test_load_backbone_weights_round_trip(tmp_path):
    """A saved torchvision-style state_dict (with fc.*) loads into body with equal tensors."""
    torch.manual_seed(0)
    source = resnet18()
    with torch.no_grad():
        for name, buf in source.named_buffers():
            if "running" in name:
                buf.uniform_(0.5, 1.5)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    saved = source.state_dict()
    for frozen_bn in (True, False):
        backbone = Backbone("resnet18", frozen_bn, True, True, False)
        load_backbone_weights(backbone, path)
        for key, value in backbone.body.state_dict().items():
            assert torch.equal(value, saved[key]), key


def test_load_backbone_weights_errors(tmp_path):
    """A ResNet-50 file into ResNet-18, or a non-state_dict pickle, raises ValueError naming the file."""
    wrong = tmp_path / "r50.pth"
    torch.save(resnet50().state_dict(), wrong)
    with pytest.raises(ValueError, match="r50.pth") as err:
        load_backbone_weights(Backbone("resnet18", True, True, True, False), wrong)
    assert "layer1.0.conv3.weight" in str(err.value)           # an unexpected key is named
    pickled_module = tmp_path / "module.pth"
    torch.save(nn.Linear(2, 2), pickled_module)                # whole module: refused by weights_only
    with pytest.raises(ValueError, match="module.pth"):
        load_backbone_weights(Backbone("resnet18", True, True, True, False), pickled_module)


def test_precision_switch_and_auto():
    """fp32 never, bf16 always, auto only on a CPU that has bf16 instructions (never on a GPU)."""
    make = lambda p: Backbone("resnet18", False, False, True, False, ("layer2",), precision=p)  # noqa: E731
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert not make("fp32").runs_in_bf16(cpu) and make("bf16").runs_in_bf16(cpu)
    assert make("auto").runs_in_bf16(cpu) == cpu_has_bf16() and not make("auto").runs_in_bf16(gpu)
    with pytest.raises(ValueError, match="precision"):
        make("fp16")


@pytest.mark.parametrize("isa, capped", [("AVX2", True), ("avx512_core", True), ("AVX512_CORE_BF16", False),
                                         ("AVX512_CORE_AMX", False), ("ALL", False)])
def test_onednn_isa_cap_below_bf16_means_no_bf16(monkeypatch, isa, capped):
    """ONEDNN_MAX_CPU_ISA below AVX512_CORE_BF16 (oneDNN's list) would emulate bf16: 'auto' is
    fp32 then; at or above it the CPU's own answer stands."""
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    native = cpu_has_bf16()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
    assert cpu_has_bf16() == (False if capped else native)


def test_bf16_backbone_is_close_to_float64_and_trains_in_float32():
    """The bf16 backbone returns float32 maps within bf16's rounding of a float64 forward of the
    same weights (8-bit mantissa: ~0.4% per op, a few % after ResNet-18 to layer2), and every
    gradient it gives its float32 parameters is float32 and finite."""
    torch.manual_seed(0)
    net = Backbone("resnet18", frozen_bn=False, freeze_stem=False, train_backbone=True, dilation=False,
                   return_layers=("layer2",), precision="bf16").eval()
    images, mask = torch.randn(2, 3, 64, 80), torch.zeros(2, 64, 80, dtype=torch.bool)
    feat, _ = net(images, mask)[0]
    assert feat.dtype == torch.float32 and feat.shape == (2, 128, 8, 10)
    ref = copy.deepcopy(net).double()
    ref.precision = "fp32"
    with torch.no_grad():
        want, _ = ref(images.double(), mask)[0]
    rel = (feat.double() - want).norm() / want.norm()
    assert rel < 0.05, rel
    net.train()
    net(images, mask)[0][0].square().mean().backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_fp32_backbone_leaves_an_outer_amp_autocast_on():
    """--amp bf16 with the fp32 backbone: the backbone must not switch the outer autocast off
    (its maps come out in bf16, as every other autocast op's); with the bf16 backbone they are
    cast back to float32 for the transformer."""
    images, mask = torch.randn(1, 3, 32, 32), torch.zeros(1, 32, 32, dtype=torch.bool)
    for precision, dtype in (("fp32", torch.bfloat16), ("bf16", torch.float32)):
        net = Backbone("resnet18", False, False, True, False, ("layer2",), precision=precision).eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            feat, _ = net(images, mask)[0]
        assert feat.dtype == dtype, precision
