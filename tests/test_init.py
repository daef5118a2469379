"""Initial weights: every tensor drawn as the reference implementations draw it.

The expected value of each tensor is worked out here from the rule the reference code
applies to it (PyTorch's default layer init, DETR's xavier_uniform over the transformer,
torch's packed nn.MultiheadAttention projection, torchvision's ResNet init, each paper's
constants), as plain fan arithmetic on the tensor's shape, never by calling minidetr's init:

    xavier_uniform            U(-a, a), a = sqrt(6 / (fan_in + fan_out)), std a / sqrt(3)
    nn.Linear / Conv2d        weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)), std 1/sqrt(3 fan_in)
    kaiming_normal fan_out    N(0, 2 / fan_out), fan_out = out_channels * k * k (torchvision ResNet)
    nn.Embedding              N(0, 1)

The rule for a name is chosen by the table below, first match wins. A std is checked within
sampling error (5 standard errors of the sample std); a uniform draw also may not exceed
its bound.
"""
import math
import re

import pytest
import torch

import minidetr

PRIOR_BIAS = -math.log((1 - 0.01) / 0.01)    # focal heads: prior probability 0.01


def fan_in(shape):
    return shape[1] * (math.prod(shape[2:]) if len(shape) > 2 else 1)


def xavier(shape):
    return ("uniform", math.sqrt(6 / (shape[0] + fan_in(shape))))


def torch_default(fan):
    return ("uniform", 1 / math.sqrt(fan))


def rule(variant, name, shape, params):
    """("const", value) | ("uniform", bound) | ("normal", std) for one parameter, or None."""
    weight_shape = lambda: tuple(params[name[: -len("bias")] + "weight"].shape)   # noqa: E731
    in_transformer = name.startswith(("encoder.", "decoder.")) and not name.startswith("decoder.bbox_embed.")
    if variant == "conditional" and name.startswith("queries.ref_point_head."):
        in_transformer = True            # part of Conditional DETR's decoder
    if re.search(r"(norm\d*|\.bn\d|downsample\.1)\.weight$", name):
        return ("const", 1.0)            # LayerNorm, BatchNorm
    if re.search(r"(norm\d*|\.bn\d|downsample\.1)\.bias$", name):
        return ("const", 0.0)
    if name.endswith("activation.weight"):
        return ("const", 0.25)           # PReLU's default slope (DAB/DN-DETR)
    if name.endswith(("query_embed.weight", "refpoint_embed.weight", "label_enc.weight")):
        return ("normal", 1.0)           # nn.Embedding
    if name.startswith("backbone."):     # torchvision ResNet: kaiming_normal_, fan_out, relu
        return ("normal", math.sqrt(2 / (shape[0] * math.prod(shape[2:]))))
    if name.startswith("input_proj."):   # the detector's 1x1 Conv2d, PyTorch default
        return torch_default(fan_in(shape if name.endswith("weight") else weight_shape()))
    if variant == "smca" and re.search(r"scale_head\.weight$", name):
        return ("const", 0.0)            # SMCA: scale head starts at 0 weight, bias 1
    if variant == "smca" and re.search(r"scale_head\.bias$", name):
        return ("const", 1.0)
    if re.search(r"(self_attn|cross_attn)\.(q|k|v|out)_proj\.bias$", name):
        return ("const", 0.0)            # torch's MultiheadAttention (and the refs' copies)
    if re.search(r"(self_attn|cross_attn)\.(q|k|v)_proj\.weight$", name):
        # one packed in_proj_weight [3C, C]: fan_in + fan_out = C + 3C
        return ("uniform", math.sqrt(6 / (shape[1] + 3 * shape[0])))
    if in_transformer and name.endswith("weight"):
        return xavier(shape)             # DETR's _reset_parameters: every matrix
    if in_transformer and name.endswith("bias"):
        return torch_default(fan_in(weight_shape()))
    if name.startswith("class_embed."):
        if name.endswith("bias") and variant != "detr":
            return ("const", PRIOR_BIAS)
        return torch_default(fan_in(shape if name.endswith("weight") else weight_shape()))
    if name.startswith(("bbox_embed.", "decoder.bbox_embed.")):
        if variant in ("conditional", "dn") and ".layers.2." in name:
            return ("const", 0.0)        # box head's last layer: start at the reference point
        return torch_default(fan_in(shape if name.endswith("weight") else weight_shape()))
    return None


CASES = [(v, p) for p in ("tiny", "paper") for v in ("detr", "conditional", "smca", "dn")]


@pytest.mark.parametrize("variant,preset", CASES)
def test_every_tensor_drawn_as_the_reference_draws_it(variant, preset):
    """Each parameter's std (or constant) is the one its reference init rule implies."""
    torch.manual_seed(0)
    model = minidetr.build(variant, preset=preset)[0]
    params = dict(model.named_parameters())
    failures, unchecked = [], []
    for name, p in params.items():
        expected = rule(variant, name, tuple(p.shape), params)
        x = p.detach().double().flatten()
        if expected is None:
            unchecked.append(name)
            continue
        kind, value = expected
        if kind == "const":
            if not torch.all((x - value).abs() <= 1e-6 * max(1.0, abs(value))):   # float32 rounding
                failures.append(f"{name}: expected all {value}, got mean {x.mean():.4g} std {x.std():.4g}")
            continue
        std = value / math.sqrt(3) if kind == "uniform" else value
        if x.numel() < 16:
            continue                     # too few numbers to judge a distribution
        tolerance = 5 * (0.45 if kind == "uniform" else 0.71) / math.sqrt(x.numel())
        if abs(x.std().item() / std - 1) > tolerance:
            failures.append(f"{name} {tuple(p.shape)}: std {x.std():.4g}, expected {std:.4g} ({kind})")
        if kind == "uniform" and x.abs().max() > value * (1 + 1e-6):
            failures.append(f"{name}: max |x| {x.abs().max():.4g} beyond the uniform bound {value:.4g}")
    assert not unchecked, f"no rule for {unchecked}"
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("variant", ["detr", "conditional", "smca", "dn"])
def test_stacks_are_copies_of_one_layer_as_in_the_references(variant):
    """Every reference builds its encoder and decoder by deep-copying one layer, so each
    Linear bias (which DETR's xavier pass leaves alone) starts equal in every layer; SMCA
    alone builds its decoder layers one by one, so there they differ."""
    torch.manual_seed(0)
    model = minidetr.build(variant, preset="paper")[0]   # 6 + 6 layers
    per_layer = {}
    for name, p in model.named_parameters():
        m = re.match(r"(encoder|decoder)\.layers\.(\d+)\.(.+\.bias)$", name)
        if m and p.numel() > 1 and p.std() > 0:
            per_layer.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = p.detach()
    assert per_layer
    for (stack, rest), layers in per_layer.items():
        tensors = list(layers.values())
        if len(tensors) == 1:            # a part of layer 0 alone (SMCA's centre_head, ca_qpos_proj)
            continue
        equal = all(torch.equal(tensors[0], t) for t in tensors[1:])
        if variant == "smca" and stack == "decoder":
            assert not equal, f"{stack}.layers.*.{rest}: SMCA's decoder layers are drawn one by one"
        else:
            assert equal, f"{stack}.layers.*.{rest} differs between layers"
