"""ResNet backbone, frozen BatchNorm, padding masks and the sine positional encoding.

DETR reads an image through a ResNet, takes the last stage's feature map C5
(2048 channels for ResNet-50, stride 32), and gives the transformer a fixed 2-D sine
positional encoding of every feature-map cell. This file builds all of that without
torchvision: the ResNet here has torchvision's module names, shapes and init, so an
ImageNet checkpoint saved from torchvision loads from a file (`load_backbone_weights`).

Papers: He et al., "Deep Residual Learning for Image Recognition", CVPR 2016
(arXiv 1512.03385); Carion et al., "End-to-End Object Detection with Transformers",
ECCV 2020 (arXiv 2005.12872); sine encoding from Vaswani et al., NeurIPS 2017.

Equations:
  (ResNet Eq. 1)  y = F(x, {W_i}) + x               identity shortcut
  (ResNet Eq. 2)  y = F(x, {W_i}) + W_s x           projection shortcut (`downsample`)
  FrozenBN:       y = (x - mean) / sqrt(var + eps) * w + b = x * scale + shift,
                  scale = w / sqrt(var + eps), shift = b - mean * scale
  Sine PE:        PE(p, 2i) = sin(p / T^(2i/F)),  PE(p, 2i+1) = cos(p / T^(2i/F)),
                  F channels per axis; DETR uses p = 2*pi * (cumulative row or column
                  index of the unpadded pixels) / (that axis' unpadded length),
                  output channels [y-part (F), x-part (F)].
"""
import math
import os
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

# ---- frozen batch norm ----


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (all four are buffers).

    DETR trains with batches of 2-4 images per GPU: batch statistics that small are
    noise, so the ImageNet statistics are frozen. eps sits inside the rsqrt (DETR's
    fix: without it non-torchvision weights with var = 0 give NaNs).
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # nn.BatchNorm2d checkpoints carry a step counter that a frozen layer has no use for
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()    # [C]
        shift = self.bias - self.running_mean * scale                  # [C]
        return x * rearrange(scale, "c -> 1 c 1 1") + rearrange(shift, "c -> 1 c 1 1")

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


# ---- ResNet (torchvision layout: names, shapes and init match torchvision.models.resnet) ----


def conv3x3(in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    # padding = dilation keeps the map size for stride 1 at any dilation
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs + shortcut (ResNet-18/34). Eq. (1) or, with `downsample`, Eq. (2)."""

    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, dilation=1, norm_layer=nn.BatchNorm2d):
        super().__init__()
        # torchvision refuses dilation here; we allow it (same keys) so DC5 works on ResNet-18/34
        self.conv1 = conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, dilation=dilation)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)   # W_s x of Eq. (2)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4) + shortcut (ResNet-50/101).

    The stride sits on the 3x3 conv (torchvision's "ResNet v1.5"); the paper put it on
    the first 1x1, which skips 3/4 of the input pixels. Shapes are the same either way.
    """

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, dilation=1, norm_layer=nn.BatchNorm2d):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes, stride, dilation)
        self.bn2 = norm_layer(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


class ResNet(nn.Module):
    """ImageNet ResNet: stem (7x7/2 conv, 3x3/2 max-pool), four stages, pool, fc.

    replace_stride_with_dilation: three bools for layer2..layer4; True keeps that stage
    at its input resolution and dilates its 3x3 convs instead (DETR's DC5 sets layer4).
    """

    def __init__(self, block, layers, norm_layer=nn.BatchNorm2d,
                 replace_stride_with_dilation=(False, False, False), num_classes=1000):
        super().__init__()
        self.inplanes, self.dilation = 64, 1
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0], 1, False, norm_layer)
        self.layer2 = self._make_layer(block, 128, layers[1], 2, replace_stride_with_dilation[0], norm_layer)
        self.layer3 = self._make_layer(block, 256, layers[2], 2, replace_stride_with_dilation[1], norm_layer)
        self.layer4 = self._make_layer(block, 512, layers[3], 2, replace_stride_with_dilation[2], norm_layer)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():   # torchvision's init (He et al. 2015, fan_out for conv maps)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes, blocks, stride, dilate, norm_layer):
        first_dilation = self.dilation   # the first block still sees the previous stage's grid
        if dilate:
            self.dilation *= stride      # trade the stride for dilation: same receptive field
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            # Eq. (2): 1x1 projection shortcut when the shape changes
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       norm_layer(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, first_dilation, norm_layer)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, dilation=self.dilation, norm_layer=norm_layer)
                   for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))       # [B, 64, H/4, W/4]
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # [B, 512*expansion, H/32, W/32]
        return self.fc(torch.flatten(self.avgpool(x), 1))          # [B, num_classes] logits


def _resnet(block, layers, norm_layer, dilation):
    return ResNet(block, layers, norm_layer, replace_stride_with_dilation=(False, False, dilation))


def resnet18(norm_layer=nn.BatchNorm2d, dilation=False):
    return _resnet(BasicBlock, [2, 2, 2, 2], norm_layer, dilation)


def resnet34(norm_layer=nn.BatchNorm2d, dilation=False):
    return _resnet(BasicBlock, [3, 4, 6, 3], norm_layer, dilation)


def resnet50(norm_layer=nn.BatchNorm2d, dilation=False):
    return _resnet(Bottleneck, [3, 4, 6, 3], norm_layer, dilation)


def resnet101(norm_layer=nn.BatchNorm2d, dilation=False):
    return _resnet(Bottleneck, [3, 4, 23, 3], norm_layer, dilation)


RESNETS = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50, "resnet101": resnet101}
LAYER_NAMES = ("layer1", "layer2", "layer3", "layer4")


def stage_channels(name):
    """Channels of each stage's map: 64, 128, 256, 512 (x4 for the Bottleneck ResNet-50/101)."""
    expansion = 4 if name in ("resnet50", "resnet101") else 1
    return {n: 64 * 2 ** i * expansion for i, n in enumerate(LAYER_NAMES)}


def stage_strides(dilation=False):
    """Pixels per cell of each stage's map: 4, 8, 16, 32 (DC5: layer4 stays at 16)."""
    return {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 16 if dilation else 32}

# ---- the detection backbone: feature maps + downsampled padding masks ----

PRECISIONS = ("fp32", "bf16", "auto")


# oneDNN's names for the instruction sets that compute bf16 natively (ONEDNN_MAX_CPU_ISA)
BF16_ISAS = {"AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512", "AVX512_CORE_AMX",
             "AVX10_1_512_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX_FP16", "ALL"}


def cpu_has_bf16() -> bool:
    """True where the CPU computes bf16 natively (x86 AVX-512 BF16 or AMX tiles).

    ONEDNN_MAX_CPU_ISA caps the instructions oneDNN's kernels use: capped below bf16 (AVX2,
    say, as benchmarks/RESULTS.md does to stand in for a CPU without bf16), its bf16
    convolutions would be emulated and slow, so the answer is no.
    """
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    if isa and isa not in BF16_ISAS:
        return False
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:   # a torch without these probes, or not an x86 build: assume not
        return False



class Backbone(nn.Module):
    """A ResNet without its classifier, returning chosen stages with their padding masks.

    name: 'resnet18' | 'resnet34' | 'resnet50' | 'resnet101'.
    frozen_bn: FrozenBatchNorm2d (DETR, pretrained) or trainable nn.BatchNorm2d (the
      `tiny` preset, which trains from random weights and needs BN to learn).
    freeze_stem: freeze conv1/bn1/layer1 (DETR trains only layer2-4: low-level ImageNet
      filters are good as they are). train_backbone=False freezes all (lr_backbone <= 0).
    dilation: DC5, layer4 keeps stride 16 with dilation 2 (DETR README, R50: 43.3 vs 42.0
      AP, at 4x the encoder tokens and 2.3x the inference time).
    return_layers: which stages to return, in this order.
    precision: 'fp32' | 'bf16' | 'auto', see `runs_in_bf16`.
    Attributes num_channels and strides: one entry per returned stage.
    """

    def __init__(self, name: str, frozen_bn: bool, freeze_stem: bool, train_backbone: bool,
                 dilation: bool, return_layers=("layer4",), precision: str = "fp32"):
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"backbone precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        self.precision = precision
        if name not in RESNETS:
            raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(RESNETS)}")
        unknown = [n for n in return_layers if n not in LAYER_NAMES]
        if unknown or not return_layers:
            raise ValueError(f"return_layers must be non-empty names from {LAYER_NAMES}, got {return_layers}")
        norm_layer = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
        self.body = RESNETS[name](norm_layer=norm_layer, dilation=dilation)
        del self.body.avgpool, self.body.fc   # detection keeps the map; keys = torchvision's minus fc.*
        self.return_layers = tuple(return_layers)
        # Stages past the deepest requested one are dropped, not just skipped: parameters that
        # never get a gradient would make DDP wait for them (the tiny preset stops at layer2/3).
        last = max(LAYER_NAMES.index(n) for n in self.return_layers)
        for name in LAYER_NAMES[last + 1:]:
            delattr(self.body, name)

        self.num_channels = [stage_channels(name)[n] for n in self.return_layers]
        self.strides = [stage_strides(dilation)[n] for n in self.return_layers]

        for param_name, param in self.body.named_parameters():
            trainable = train_backbone and (not freeze_stem or param_name.startswith(LAYER_NAMES[1:]))
            param.requires_grad_(trainable)

    def runs_in_bf16(self, device: torch.device) -> bool:
        """Whether the ResNet runs under bf16 autocast (its maps are cast back to float32).

        'auto' (the tiny preset) means bf16 on a CPU with bf16 instructions (AVX-512 BF16 or
        AMX): there a ResNet's forward and backward take about half the float32 time (the
        step of tiny dn: ~0.6x), while the transformer's small matrix products gain nothing
        from bf16 and would pay for the casts, so only the backbone switches. On a CPU
        without them bf16 is emulated and slower, and on a GPU `--amp` is the switch: fp32.
        """
        if self.precision == "auto":
            return device.type == "cpu" and cpu_has_bf16()
        return self.precision == "bf16"

    def train(self, mode: bool = True):
        super().train(mode)
        # A frozen trainable-type BN must not keep updating its running statistics either
        for m in self.body.modules():
            if isinstance(m, nn.BatchNorm2d) and not m.weight.requires_grad:
                m.eval()
        return self

    def forward(self, images: torch.Tensor, mask: torch.Tensor):
        """images [B, 3, H, W] normalised; mask [B, H, W] bool, True on padding.

        Returns a list, one (feat [B, C_i, H/s_i, W/s_i], mask [B, H/s_i, W/s_i] bool)
        per entry of return_layers, in that order.
        """
        body = self.body
        bf16 = self.runs_in_bf16(images.device)
        if bf16:   # oneDNN's bf16 convolutions want NHWC; the result is the same tensor either way
            images = images.contiguous(memory_format=torch.channels_last)
        feats = {}
        # only ever switch autocast on here: enabled=False would also switch off an outer
        # --amp autocast for the backbone
        bf16_autocast = torch.autocast(images.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
        with bf16_autocast:
            x = body.maxpool(body.relu(body.bn1(body.conv1(images))))   # [B, 64, H/4, W/4]
            last = max(LAYER_NAMES.index(n) for n in self.return_layers)
            for name in LAYER_NAMES[: last + 1]:
                x = getattr(body, name)(x)
                feats[name] = x
        levels = []
        for name in self.return_layers:
            feat = feats[name].float() if bf16 else feats[name]   # the transformer stays float32
            # nearest resize as DETR: cell (i, j) is padding iff pixel (i*H/y, j*W/x) is
            level_mask = F.interpolate(mask[None].float(), size=feat.shape[-2:]).bool()[0]   # [B, y, x]
            levels.append((feat, level_mask))
        return levels


def load_backbone_weights(backbone: Backbone, path) -> None:
    """Load a torchvision ImageNet ResNet state_dict file (.pth) into backbone.body.

    fc.* is dropped; all other keys must match exactly (strict). Raises ValueError
    naming the file and the missing / unexpected / wrongly-shaped keys on a mismatch
    (e.g. a ResNet-50 file into a ResNet-18), or when the file is not a plain
    state_dict readable with torch.load(weights_only=True).
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:   # pickle of arbitrary objects: refused by weights_only
        raise ValueError(f"cannot read backbone weights {path} with torch.load(weights_only=True); "
                         f"expected a plain torchvision ResNet state_dict: {err}") from err
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"backbone weights {path} is not a plain state_dict of tensors "
                         f"(top-level keys: {list(state)[:5] if isinstance(state, dict) else type(state)})")
    expected = backbone.body.state_dict()
    dropped = tuple(f"{n}." for n in LAYER_NAMES if not hasattr(backbone.body, n)) + ("fc.",)
    state = {k: v for k, v in state.items() if not k.startswith(dropped)}   # stages not built
    # num_batches_tracked: FrozenBN drops it, old torchvision files lack it; neither is an error
    counter = lambda k: k.endswith("num_batches_tracked")   # noqa: E731
    missing = [k for k in expected if k not in state and not counter(k)]
    unexpected = [k for k in state if k not in expected and not counter(k)]
    wrong_shape = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                   for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        raise ValueError(f"backbone weights {path} do not fit this {type(backbone.body.layer1[0]).__name__} "
                         f"ResNet: {len(missing)} missing keys {missing[:8]}, {len(unexpected)} unexpected "
                         f"keys {unexpected[:8]}, {len(wrong_shape)} shape mismatches {wrong_shape[:4]}")
    for k in expected:
        if counter(k) and k not in state:
            state[k] = expected[k]
    backbone.body.load_state_dict(state, strict=True)


# ---- sine positional encoding ----


def sine_embed(coords: torch.Tensor, num_feats: int, temperature: float = 10000,
               scale: float = 2 * math.pi) -> torch.Tensor:
    """Sine/cosine embedding of scalar coordinates: [...] -> [..., num_feats].

    a_i = coords * scale / T^(2i/num_feats) for i = 0..num_feats/2-1, output channels
    interleaved [sin a_0, cos a_0, sin a_1, cos a_1, ...] (DETR's PositionEmbeddingSine,
    Conditional DETR's gen_sineembed_for_position). Used for image cells (coords in
    [0, 1] after normalising) and for reference points / boxes in the variants.
    """
    if num_feats % 2:
        raise ValueError(f"num_feats must be even (sin/cos pairs), got {num_feats}")
    i = torch.arange(num_feats // 2, dtype=coords.dtype, device=coords.device)
    dim_t = temperature ** (2 * i / num_feats)                         # [F/2] wavelengths
    angles = (coords * scale)[..., None] / dim_t                       # [..., F/2]
    pairs = torch.stack((angles.sin(), angles.cos()), dim=-1)          # [..., F/2, 2]
    return rearrange(pairs, "... f two -> ... (f two)")                # [..., F] interleaved


class PositionEmbeddingSine(nn.Module):
    """DETR's fixed 2-D image positional encoding (no parameters).

    forward(mask [B, y, x] bool, True on padding) -> [B, 2*num_pos_feats, y, x] float32,
    channels [y-part, x-part]. Positions count only unpadded cells (cumsum from 1), so an
    image reads the same encoding whatever padding it gets in a batch when normalize.
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000, normalize: bool = True,
                 scale: float = 2 * math.pi):
        super().__init__()
        self.num_pos_feats, self.temperature = num_pos_feats, temperature
        self.normalize, self.scale = normalize, scale

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)   # [B, y, x] row index 1, 2, ... of real pixels
        x_embed = not_mask.cumsum(2, dtype=torch.float32)   # [B, y, x] column index
        scale = 1.0
        if self.normalize:   # divide by the unpadded length: coordinates in (0, 1]
            y_embed = y_embed / (y_embed[:, -1:, :] + 1e-6)
            x_embed = x_embed / (x_embed[:, :, -1:] + 1e-6)
            scale = self.scale
        pos_y = sine_embed(y_embed, self.num_pos_feats, self.temperature, scale)   # [B, y, x, F]
        pos_x = sine_embed(x_embed, self.num_pos_feats, self.temperature, scale)   # [B, y, x, F]
        return rearrange(torch.cat((pos_y, pos_x), dim=-1), "b y x c -> b c y x")
