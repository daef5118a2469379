"""SMCA multi-scale as released (--smca_ms_form released): the convolution encoder, the key
layout it hands the decoder, conversion of the released names, and equality with the
released code itself.

The equality tests need the released code (Multi_scale_SMCA.zip in gaopengcuhk/SMCA-DETR,
folder DMS-MH-GMCA-main_very_important): set MINIDETR_SMCA_RELEASED to that folder. Only its
models/transformer.py is imported (it needs torch alone); without it they are skipped.
"""
import copy
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from minidetr import smca
from minidetr.config import Config
from minidetr.convert import config_from_official_args, convert_official_checkpoint, rename
from minidetr.detr import build
from official_layouts import C, DEC, ENC, HEADS, official_shapes


def released_cfg(**overrides):
    return Config.for_variant("smca", "tiny", smca_multiscale=True, smca_ms_form="released",
                              num_classes=7, **overrides)


# ---- the layer's mixing, against a hand computation ----

def _bilinear_align_corners(a, size):
    """numpy float64 bilinear resize of a [y, x] map with align_corners=True, written out."""
    (h, w), (H, W) = a.shape, size
    out = np.zeros(size)
    for i in range(H):
        for j in range(W):
            y = i * (h - 1) / (H - 1) if H > 1 else 0.0
            x = j * (w - 1) / (W - 1) if W > 1 else 0.0
            y0, x0 = int(np.floor(y)), int(np.floor(x))
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            dy, dx = y - y0, x - x0
            out[i, j] = ((1 - dy) * (1 - dx) * a[y0, x0] + (1 - dy) * dx * a[y0, x1]
                         + dy * (1 - dx) * a[y1, x0] + dy * dx * a[y1, x1])
    return out


def test_conv_mix_layer_sums_a_level_with_its_neighbours():
    """With every depthwise filter a centre tap and both 1x1 convs the identity, what reaches
    norm1 is x_l + (x_l + p_l) + (the finer level, every second cell) + (the coarser level,
    resized bilinearly with aligned corners): checked against numpy on levels 3x5 and 2x3."""
    torch.manual_seed(0)
    dim = 2
    layer = smca.ConvMixLayer(dim, 4, 0.0, num_levels=2).double()
    with torch.no_grad():
        for conv in (layer.in_proj, layer.out_proj):
            conv.weight.copy_(torch.eye(dim).reshape(dim, dim, 1, 1)), conv.bias.zero_()
        for conv in [*layer.within, *layer.down, *layer.up]:
            conv.weight.zero_(), conv.bias.zero_()
            conv.weight[:, 0, 2, 2] = 1.0                      # the centre of the 5x5 window
    seen = []
    layer.norm1.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    x = [torch.randn(1, dim, 3, 5, dtype=torch.float64), torch.randn(1, dim, 2, 3, dtype=torch.float64)]
    p = [torch.randn_like(t) for t in x]
    layer(x, p)
    q = [(a + b)[0].numpy() for a, b in zip(x, p)]                # [C, y, x]
    for c in range(dim):
        fine = x[0][0, c].numpy() + q[0][c] + _bilinear_align_corners(q[1][c], (3, 5))
        coarse = x[1][0, c].numpy() + q[1][c] + q[0][c][::2, ::2]
        got_fine = seen[0][0, :, c].reshape(3, 5).numpy()        # tokens 'b (y x) c'
        got_coarse = seen[1][0, :, c].reshape(2, 3).numpy()
        np.testing.assert_allclose(got_fine, fine, rtol=0, atol=1e-12)
        np.testing.assert_allclose(got_coarse, coarse, rtol=0, atol=1e-12)


# ---- shapes and the decoder's key layout ----

def test_released_form_reads_four_levels_and_gives_the_decoder_the_stride_16_layout():
    model = build(released_cfg())[0].eval()
    images = torch.randn(2, 3, 128, 96)
    mask = torch.zeros(2, 128, 96, dtype=torch.bool)
    mask[1, :, 72:] = True
    memory, pos, pad, shapes = model.encode(images, mask)
    # strides 8, 16, 32, 64 of a 128 x 96 input: 16x12, 8x6, 4x3, 2x2; the stride-8 level is
    # downsampled into an 8x6 one and takes the stride-16 level's positions and padding
    assert shapes == [(8, 6), (8, 6), (4, 3), (2, 2)]
    assert memory.shape == (2, 48 + 48 + 12 + 4, model.encoder.level_embed.shape[1])
    assert pos.shape == memory.shape and pad.shape == memory.shape[:2]
    assert torch.equal(pos[:, :48], pos[:, 48:96]) and torch.equal(pad[:, :48], pad[:, 48:96])
    assert pad[1, :48].reshape(8, 6)[:, 5:].all() and not pad[1, :48].reshape(8, 6)[:, :4].any()
    out = model(images, mask)
    assert out["pred_boxes"].shape == (2, 40, 4) and torch.isfinite(out["pred_boxes"]).all()
    layer = model.decoder.layers[0]
    assert layer.num_levels == 4 and layer.level_weights == smca.RELEASED_LEVEL_WEIGHTS
    assert model.decoder.strides == [16, 16, 32, 64]


def test_attention_maps_are_drawn_on_the_decoders_first_key_level():
    """eval.py --attention: the maps of a released-form model lie on the downsampled stride-8
    level (8 x 6 at 128 x 96), the first of the decoder's keys, and each head's row of weights
    over that level is part of a softmax (<= 1, >= 0)."""
    from minidetr import draw
    model = build(released_cfg())[0].eval()
    _, maps = draw.attention_maps(model, torch.randn(1, 3, 128, 96), torch.zeros(1, 128, 96, dtype=torch.bool))
    assert maps.shape[-2:] == (8, 6)
    assert (maps >= 0).all() and (maps.sum((-2, -1)) <= 1 + 1e-5).all()


def test_level_weights_scale_each_levels_log_gaussian():
    torch.manual_seed(0)
    kw = dict(predicts_centre=True, scale="xy", beta=8.0, num_levels=4)
    plain = smca.SMCADecoderLayer(16, 2, 32, 0.0, **kw)
    weighted = smca.SMCADecoderLayer(16, 2, 32, 0.0, **kw, level_weights=(0.5, 0.5, 1.0, 2.0))
    weighted.load_state_dict(plain.state_dict())
    o, centre = torch.randn(1, 3, 16), torch.randn(1, 3, 2)
    shapes = [(4, 4), (4, 4), (2, 2), (1, 1)]
    sizes = torch.tensor([[[4.0, 4.0], [4.0, 4.0], [2.0, 2.0], [1.0, 1.0]]])
    for w, a, b in zip((0.5, 0.5, 1.0, 2.0), plain.log_gaussian(o, centre, sizes, shapes),
                       weighted.log_gaussian(o, centre, sizes, shapes)):
        torch.testing.assert_close(b, w * a)


def test_released_form_is_refused_without_multiscale_or_with_dilation():
    with pytest.raises(ValueError, match="--smca_multiscale"):
        Config.for_variant("smca", "tiny", smca_ms_form="released")
    with pytest.raises(ValueError, match="--dilation"):
        released_cfg(dilation=True)
    with pytest.raises(ValueError, match="paper or released"):
        Config.for_variant("smca", "tiny", smca_multiscale=True, smca_ms_form="conv")


# ---- conversion of the released names ----

def released_shapes():
    """The released multi-scale model's state_dict names and shapes, written out by hand from
    its models/detr.py and models/transformer.py, for official_layouts' tiny model."""
    shapes = {k: v for k, v in official_shapes("smca").items()
              if not k.startswith(("input_proj.", "transformer.encoder."))}
    for i, (name, c_in) in enumerate((("input_proj_512", 128), ("input_proj_1024", 256),
                                      ("input_proj_2048", 512))):
        shapes.update({f"{name}.weight": (C, c_in, 1, 1), f"{name}.bias": (C,)})
    shapes.update({"input_proj_2048_3.weight": (C, 512, 3, 3), "input_proj_2048_3.bias": (C,),
                   "transformer.conv.weight": (C, C, 3, 3), "transformer.conv.bias": (C,),
                   "transformer.level_embed": (4, C)})
    for i in range(ENC):
        p = f"transformer.encoder.layers.{i}"
        convs = [f"self_attn_{s}" for s in (8, 16, 32, 64)] + [f"{d}_{j}" for d in ("high_to_low", "low_to_high")
                                                               for j in (1, 2, 3)]
        for n in convs:
            shapes.update({f"{p}.{n}.weight": (C, 1, 5, 5), f"{p}.{n}.bias": (C,)})
        for n in ("conv_1", "conv_2"):
            shapes.update({f"{p}.{n}.weight": (C, C, 1, 1), f"{p}.{n}.bias": (C,)})
        shapes.update({f"{p}.linear1.weight": (2 * C, C), f"{p}.linear1.bias": (2 * C,),
                       f"{p}.linear2.weight": (C, 2 * C), f"{p}.linear2.bias": (C,)})
        for n in ("norm1", "norm2"):
            shapes.update({f"{p}.{n}.weight": (C,), f"{p}.{n}.bias": (C,)})
    for i in range(DEC):   # four levels: (dx, dy) and (s_x, s_y) per head and level; point4
        p = f"transformer.decoder.layers.{i}"
        for n in ("point2", "point3"):
            shapes.update({f"{p}.{n}.weight": (2 * HEADS * 4, C), f"{p}.{n}.bias": (2 * HEADS * 4,)})
        shapes.update({f"{p}.point4.weight": (4, C), f"{p}.point4.bias": (4,)})
    return shapes


def test_released_names_convert_and_set_the_released_form():
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) for k, s in released_shapes().items()}
    args = dict(backbone="resnet18", hidden_dim=C, nheads=HEADS, dim_feedforward=2 * C, enc_layers=ENC,
                dec_layers=DEC, num_queries=5, dropout=0.0, dynamic_scale="type3", smooth=8)
    cfg = config_from_official_args(args, "smca", sd)
    assert cfg.smca_multiscale and cfg.smca_ms_form == "released"
    ours = convert_official_checkpoint(sd, "smca", cfg)          # raises on any key left over
    model = build(cfg)[0]
    model.load_state_dict(ours)
    enc = model.encoder.layers[0]
    assert torch.equal(enc.within[2].weight, sd["transformer.encoder.layers.0.self_attn_32.weight"])
    assert torch.equal(enc.down[0].weight, sd["transformer.encoder.layers.0.high_to_low_1.weight"])
    assert torch.equal(enc.up[2].weight, sd["transformer.encoder.layers.0.low_to_high_3.weight"])
    assert torch.equal(model.input_proj.extra.weight, sd["input_proj_2048_3.weight"])
    assert torch.equal(model.encoder.memory_down.weight, sd["transformer.conv.weight"])
    # without args, from the shapes alone: the head count from point2's 2 x heads x 4 levels
    from minidetr.convert import infer_official_args
    assert infer_official_args(sd, "smca")["nheads"] == HEADS
    assert set(convert_official_checkpoint(sd, "smca")) == set(ours)


# ---- equality with the released code ----

def released_module():
    folder = os.environ.get("MINIDETR_SMCA_RELEASED")
    path = Path(folder) / "models" / "transformer.py" if folder else None
    if path is None or not path.is_file():
        pytest.skip("the released SMCA multi-scale code is not here: set MINIDETR_SMCA_RELEASED to "
                    "the folder DMS-MH-GMCA-main_very_important of Multi_scale_SMCA.zip "
                    "(gaopengcuhk/SMCA-DETR)")
    spec = importlib.util.spec_from_file_location("smca_released_transformer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _randomise(module, seed):
    """Every parameter drawn anew (point3's zeros too), so every path carries weight."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_norm_scale = ".norm" in name and name.endswith(".weight")   # a LayerNorm's scale
            p.copy_(1 + 0.1 * noise if is_norm_scale else 0.05 * noise)


@pytest.fixture(scope="module")
def pair():
    """The released Transformer (the code's hard-coded 256 channels, 8 heads, 6 decoder layers)
    with random weights, and ours built to the same settings with those weights converted."""
    released = released_module()
    torch.manual_seed(0)
    ref = released.Transformer(d_model=256, nhead=8, num_encoder_layers=2, num_decoder_layers=6,
                               dim_feedforward=64, dropout=0.0, return_intermediate_dec=True,
                               smooth=8, dynamic_scale="type3", head_mixture=False,
                               query_mixture=False).eval()
    _randomise(ref, 1)
    query_embed = 0.5 * torch.randn(7, 256, generator=torch.Generator().manual_seed(2))
    sd = {f"transformer.{k}": v for k, v in ref.state_dict().items()}
    sd["query_embed.weight"] = query_embed
    cfg = Config.for_variant("smca", "paper", backbone="resnet18", hidden_dim=256, nheads=8, enc_layers=2,
                             dec_layers=6, dim_feedforward=64, dropout=0.0, num_queries=7, num_classes=3,
                             smca_multiscale=True, smca_ms_form="released", smca_scale="xy", smooth=8.0)
    ours, _, unmapped = rename(sd, "smca")
    assert not unmapped
    model = build(cfg)[0].eval()
    missing, unexpected = model.load_state_dict(ours, strict=False)
    assert not unexpected
    assert all(k.startswith(("backbone.", "input_proj.", "class_embed.", "bbox_embed.")) for k in missing)
    return ref, model, query_embed


def _inputs(batch=2):
    """Four levels (strides 8..64 of a 80 x 104 image batch), image 1 padded on the right."""
    g = torch.Generator().manual_seed(3)
    shapes = [(10, 13), (5, 7), (3, 4), (2, 2)]
    srcs = [torch.randn(batch, 256, y, x, generator=g) for y, x in shapes]
    poss = [torch.randn(batch, 256, y, x, generator=g) for y, x in shapes]
    pixel = torch.zeros(batch, 80, 104, dtype=torch.bool)
    pixel[1:, :, 60:] = True
    masks = [torch.nn.functional.interpolate(pixel[None].float(), size=s).bool()[0] for s in shapes]
    sizes = smca.unpadded_sizes(pixel)                                  # [B, 2] (w, h)
    return shapes, srcs, poss, masks, sizes


def _tokens(maps):
    return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1)


def test_encoder_equals_the_released_code(pair):
    ref, model, _ = pair
    shapes, srcs, poss, masks, _ = _inputs()
    with torch.no_grad():
        pos_level = [p + e[None, :, None, None] for p, e in zip(poss, ref.level_embed)]
        maps = ref.encoder(srcs, src_key_padding_mask=[m.flatten(1) for m in masks], pos=pos_level)
        expected = _tokens([ref.conv(maps[0]), *maps[1:]])
        got = model.encoder(_tokens(srcs), _tokens(poss), _tokens([m[:, None] for m in masks])[..., 0],
                            spatial_shapes=shapes)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-4), (torch.float64, 1e-9)])
@pytest.mark.parametrize("image", [0, 1])
def test_transformer_equals_the_released_code(pair, image, dtype, atol):
    """Encoder and decoder, one image at a time: the released decoder weighs every image's
    scales with the first image's alphas (scale_attention[:, 0]), so only a batch of one
    computes what its paper and ours compute. Image 1 has padding. In float64 the two agree
    to ~1e-11, so the float32 tolerance covers rounding only."""
    ref, model, query_embed = (copy.deepcopy(m).to(dtype) for m in pair)
    shapes, srcs, poss, masks, sizes = _inputs()
    one = slice(image, image + 1)
    srcs, poss = [s[one].to(dtype) for s in srcs], [p[one].to(dtype) for p in poss]
    masks, sizes = [m[one] for m in masks], sizes[one]
    with torch.no_grad():
        hs_ref, points = ref(srcs, masks, query_embed, poss, sizes[None].to(dtype))
        pad = _tokens([m[:, None] for m in masks])[..., 0]
        memory = model.encoder(_tokens(srcs), _tokens(poss), pad, spatial_shapes=shapes)
        pos, pad, key_shapes = model.encoder.memory_layout(_tokens(poss), pad, shapes)
        hs, box_ref = model.decoder(memory=memory, memory_pos=pos, pad_mask=pad, **model.queries(1),
                                    spatial_shapes=key_shapes, image_sizes=sizes)
    torch.testing.assert_close(hs, hs_ref, rtol=0, atol=atol)
    torch.testing.assert_close(box_ref[0], points[0], rtol=0, atol=atol)   # layer 0's centre logits
