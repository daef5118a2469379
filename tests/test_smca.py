"""Tests for minidetr/smca.py: the Gaussian log-prior, the SMCA decoder layer and stack,
the grid size read from the pixel mask, scale selection and the multi-scale encoder.

References are independent of the code under test: the paper's Eq. (4) in explicit loops,
hand-counted masks, hand-written LayerNorm / MLP / softmax from the modules' weights, a
naive per-scale attention loop, and vanilla DETR's DecoderLayer itself.
"""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from minidetr import transformer
from minidetr.smca import (MultiScaleProjection, SMCADecoder, SMCADecoderLayer,
                           SMCAMultiScaleEncoder, SMCAQueries, ScaleSelectionCrossAttention,
                           build_parts, encoder_pattern, gaussian_log_weight, unpadded_sizes)

B, Q, D, H, FF = 2, 5, 16, 4, 32
Y, X = 3, 4                      # one 3x4 feature map, N = 12 tokens


@pytest.fixture(autouse=True)
def float64():
    """Every tensor and module in these tests is float64; restored afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def unpack(queries):
    """A queries module's dict -> (tgt, query_pos, ref_points), None where it has none."""
    return queries.get("tgt"), queries.get("query_pos"), queries.get("ref_points")


def naive_log_g(centres, scales, y, x, beta):
    """log of the paper's Eq. (4) with s_w = 1/s_x, s_h = 1/s_y, in loops -> [B, h, Q, y*x]."""
    b_, q_, h_, _ = centres.shape
    out = torch.empty(b_, h_, q_, y * x)
    for b in range(b_):
        for q in range(q_):
            for m in range(h_):
                cw, ch = centres[b, q, m].tolist()
                sw, sh = (1 / s for s in scales[b, q, m].tolist())
                for j in range(y):          # row
                    for i in range(x):      # column
                        out[b, m, q, j * x + i] = (-(i - cw) ** 2 / (beta * sw ** 2)
                                                   - (j - ch) ** 2 / (beta * sh ** 2))
    return out


def linear(x, lin):
    return x @ lin.weight.T + lin.bias


def hand_o(layer, tgt, query_pos):
    """query_norm(tgt + query_pos) written out: (x - mean) / sqrt(var + eps) * w + b."""
    x = tgt + query_pos
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * layer.query_norm.weight + layer.query_norm.bias


def hand_centre_head(layer, o):
    l0, l1, l2 = layer.centre_head.layers
    return linear(torch.relu(linear(torch.relu(linear(o, l0)), l1)), l2)


def make_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    tgt, query_pos = torch.randn(B, Q, D, generator=g), torch.randn(B, Q, D, generator=g)
    memory, memory_pos = torch.randn(B, Y * X, D, generator=g), torch.randn(B, Y * X, D, generator=g)
    pad = torch.zeros(B, Y, X, dtype=torch.bool)
    pad[1, :, 3] = True                        # image 1: last column and last row are padding
    pad[1, 2, :] = True
    return tgt, query_pos, memory, memory_pos, pad.flatten(1)


def make_layer(scale="xy", beta=8.0, levels=1, seed=1):
    torch.manual_seed(seed)
    layer = SMCADecoderLayer(D, H, FF, dropout=0.0, predicts_centre=True, scale=scale, beta=beta,
                             num_levels=levels).eval()
    if hasattr(layer, "scale_head"):               # move away from the all-ones init
        torch.nn.init.normal_(layer.scale_head.weight, std=0.3)
    return layer


def capture_biases(module):
    """Record the bias reaching every cross-attention module inside `module` (forward pre-hooks)."""
    seen = []
    for name, m in module.named_modules():
        if name.endswith("cross_attn"):
            m.register_forward_pre_hook(lambda mod, args, kw: seen.append(kw["bias"]), with_kwargs=True)
    return seen


# (W, H) in cells of the unpadded part of each image (make_inputs' padding counted by hand)
GRID = torch.tensor([[[4.0, 3.0]], [[3.0, 2.0]]])                     # [B, S=1, 2]


def run_layer(layer, inputs, centre_logits=None, shapes=((Y, X),), grid_sizes=None):
    tgt, query_pos, memory, memory_pos, pad = inputs
    sizes = GRID if grid_sizes is None else grid_sizes
    return layer(tgt, memory, memory_pos=memory_pos, query_pos=query_pos, pad_mask=pad,
                 centre_logits=centre_logits, grid_sizes=sizes, spatial_shapes=list(shapes))


# ---- the prior ----

def test_gaussian_log_weight_matches_paper_loops():
    """log G equals the paper's Eq. (4) (s_w = 1/s_x) computed cell by cell, row-major tokens."""
    g = torch.Generator().manual_seed(3)
    centres = torch.rand(B, Q, H, 2, generator=g) * torch.tensor([X, Y])     # (x, y) in cells
    centres = centres + 0.3 * torch.randn(B, Q, H, 2, generator=g)             # some off the grid
    scales = 0.5 + torch.rand(B, Q, H, 2, generator=g)
    got = gaussian_log_weight(centres, scales, (Y, X), beta=8.0)
    assert got.shape == (B, H, Q, Y * X)
    torch.testing.assert_close(got, naive_log_g(centres, scales, Y, X, 8.0))


def test_gaussian_axes_by_hand():
    """A centre at column 2, row 0 with unit scales: log G at token (row 1, col 3) = -(1+1)/beta."""
    centres = torch.tensor([2.0, 0.0]).expand(1, 1, 1, 2)
    got = gaussian_log_weight(centres, torch.ones(1, 1, 1, 2), (Y, X), beta=2.0)
    assert got[0, 0, 0, 0 * X + 2] == 0                  # the centre itself
    assert got[0, 0, 0, 1 * X + 3] == -1.0               # (1^2 + 1^2) / 2
    assert got[0, 0, 0, 2 * X + 2] == -2.0               # two rows down: 4 / 2


# ---- the grid size ----

def test_decoder_grid_size_is_image_size_over_stride():
    """Image 1 is 40x70 pixels in a 96x128 padded batch: the layers get (70, 40) / stride per
    level as floats (the reference's size / 32, here 2.19 and 1.25), not whole cells."""
    torch.manual_seed(0)
    layers = [SMCADecoderLayer(D, H, FF, 0.0, predicts_centre=True, scale="xy", num_levels=2)]
    dec = SMCADecoder(layers, D, strides=[32, 64]).eval()
    mask = torch.ones(2, 96, 128, dtype=torch.bool)
    mask[0] = False                       # image 0 fills the batch
    mask[1, :40, :70] = False
    shapes = [(3, 4), (2, 2)]
    seen = []
    dec.layers[0].register_forward_pre_hook(lambda mod, args, kw: seen.append(kw["grid_sizes"]),
                                            with_kwargs=True)
    memory = torch.randn(B, 16, D)
    with torch.no_grad():
        dec(torch.zeros(B, Q, D), memory, memory_pos=torch.randn(B, 16, D), pad_mask=None,
            query_pos=torch.randn(B, Q, D), spatial_shapes=shapes, image_sizes=unpadded_sizes(mask))
    expected = torch.tensor([[[128 / 32, 96 / 32], [128 / 64, 96 / 64]],
                             [[70 / 32, 40 / 32], [70 / 64, 40 / 64]]])
    torch.testing.assert_close(seen[0], expected.to(seen[0].dtype))


# ---- the decoder layer ----

@pytest.mark.parametrize("scale", ["fixed", "shared", "xy"])
def test_layer_passes_log_g_as_cross_bias(scale):
    """The bias reaching the cross-attention equals log G built by hand from the layer's weights."""
    layer, inputs = make_layer(scale), make_inputs()
    seen = capture_biases(layer)
    with torch.no_grad():
        _, centre_logits = run_layer(layer, inputs)
        tgt, query_pos = inputs[:2]
        o = hand_o(layer, tgt, query_pos)
        logits = hand_centre_head(layer, o)
        offsets = linear(o, layer.offset_head).reshape(B, Q, H, 2)        # (dx, dy) interleaved per head
        if scale == "fixed":
            scales = torch.ones(B, Q, H, 2)
        elif scale == "shared":
            scales = linear(o, layer.scale_head).reshape(B, Q, H, 1).expand(B, Q, H, 2)
        else:
            scales = linear(o, layer.scale_head).reshape(B, Q, H, 2)
        size = torch.tensor([[4.0, 3.0], [3.0, 2.0]])[:, None, None, :]   # hand counts (W, H)
        centres = torch.sigmoid(logits)[:, :, None, :] * size + offsets
        expected = naive_log_g(centres, scales, Y, X, 8.0)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], expected)
    torch.testing.assert_close(centre_logits, logits)


def test_huge_beta_equals_vanilla_layer():
    """With beta = 1e12, log G is ~0 and the SMCA layer equals DETR's DecoderLayer with its weights."""
    layer, inputs = make_layer("xy", beta=1e12), make_inputs()
    vanilla = transformer.DecoderLayer(D, H, FF, dropout=0.0).eval()
    result = vanilla.load_state_dict(layer.state_dict(), strict=False)
    assert result.missing_keys == []
    assert all(k.split(".")[0] in {"query_norm", "centre_head", "offset_head", "scale_head"} for k in result.unexpected_keys)
    tgt, query_pos, memory, memory_pos, pad = inputs
    with torch.no_grad():
        got, _ = run_layer(layer, inputs)
        want = vanilla(tgt, memory, memory_pos=memory_pos, query_pos=query_pos, pad_mask=pad)
        normal, _ = run_layer(make_layer("xy", beta=8.0), inputs)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
    assert not torch.allclose(normal, want, atol=1e-3)            # the prior does matter at beta 8


def test_scale_options_widths_and_fixed_is_scale_one():
    """scale_head is absent / h / 2h wide; 'fixed' equals 'shared' and 'xy' at their scale-1 init."""
    widths = {s: getattr(make_layer(s), "scale_head", None) for s in ["fixed", "shared", "xy"]}
    assert widths["fixed"] is None
    assert widths["shared"].out_features == H and widths["xy"].out_features == 2 * H
    assert make_layer("xy", levels=3).scale_head.out_features == 3 * 2 * H
    assert make_layer("xy").offset_head.out_features == 2 * H
    inputs, outs = make_inputs(), {}
    base = make_layer("fixed").state_dict()
    for scale in ["fixed", "shared", "xy"]:
        layer = SMCADecoderLayer(D, H, FF, dropout=0.0, predicts_centre=True, scale=scale).eval()
        layer.load_state_dict(base, strict=False)               # scale_head keeps weight 0, bias 1
        if scale != "fixed":
            assert torch.all(layer.scale_head.weight == 0) and torch.all(layer.scale_head.bias == 1)
        with torch.no_grad():
            outs[scale] = run_layer(layer, inputs)[0]
    assert torch.equal(outs["fixed"], outs["xy"]) and torch.equal(outs["fixed"], outs["shared"])
    with pytest.raises(ValueError, match="smca_scale"):
        SMCADecoderLayer(D, H, FF, predicts_centre=True, scale="type3")


def test_single_scale_layer_state_dict_keys():
    """Layer 0 keeps DETR's names plus query_norm and the centre, offset and scale heads
    (convert.py maps the reference's norm4 and point1-3 onto them)."""
    keys = set(make_layer("xy").state_dict())
    attn = {f"{a}.{p}.{t}" for a in ["self_attn", "cross_attn"]
            for p in ["q_proj", "k_proj", "v_proj", "out_proj"] for t in ["weight", "bias"]}
    rest = {f"{m}.{t}" for m in ["norm1", "norm2", "query_norm", "ffn.linear1", "ffn.linear2", "ffn.norm",
                                 "centre_head.layers.0", "centre_head.layers.1", "centre_head.layers.2",
                                 "offset_head", "scale_head"] for t in ["weight", "bias"]}
    assert keys == attn | rest


# ---- multi-scale: scale selection and the encoder ----

def naive_scale_selection(attn, query, key, value, pad, log_g, alpha, sizes):
    """Eq. (8) with explicit per-scale softmaxes, per image, head and query, then out_proj."""
    q, k, v = linear(query, attn.q_proj), linear(key, attn.k_proj), linear(value, attn.v_proj)
    d = D // H
    mixed = torch.zeros(B, Q, D)
    starts = [sum(sizes[:s]) for s in range(len(sizes))]
    for b in range(B):
        for m in range(H):
            hd = slice(m * d, (m + 1) * d)
            for i in range(Q):
                for s, (n0, n) in enumerate(zip(starts, sizes)):
                    logits = [(q[b, i, hd] @ k[b, n0 + t, hd]).item() / math.sqrt(d)
                              + log_g[s][b, m, i, t].item() for t in range(n)]
                    logits = [-math.inf if pad[b, n0 + t] else z for t, z in enumerate(logits)]
                    top = max(logits)
                    w = [math.exp(z - top) for z in logits]
                    w = [x / sum(w) for x in w]
                    mixed[b, i, hd] += alpha[b, i, s] * sum(w[t] * v[b, n0 + t, hd] for t in range(n))
    return linear(mixed, attn.out_proj)


def test_scale_selection_weights_and_per_scale_softmax():
    """alpha = softmax(scale_select_head(o)) sums to one per image and query; Eq. (8) matches a naive loop."""
    shapes = [(3, 4), (2, 2), (1, 2)]
    sizes = [12, 4, 2]
    layer = make_layer("xy", levels=3)
    g = torch.Generator().manual_seed(5)
    tgt, query_pos = torch.randn(B, Q, D, generator=g), torch.randn(B, Q, D, generator=g)
    memory, memory_pos = torch.randn(B, 18, D, generator=g), torch.randn(B, 18, D, generator=g)
    pad = torch.zeros(B, 18, dtype=torch.bool)
    pad[1, [3, 7, 11, 13, 15, 17]] = True            # image 1: last column padded on every level
    priors = []
    layer.cross_attn.register_forward_pre_hook(lambda mod, args, kw: priors.append(kw["prior"]),
                                               with_kwargs=True)
    with torch.no_grad():
        # (W, H) per level, hand-counted: image 1 loses its last column on every level
        grid = torch.tensor([[[4.0, 3.0], [2.0, 2.0], [2.0, 1.0]], [[3.0, 3.0], [1.0, 2.0], [1.0, 1.0]]])
        run_layer(layer, (tgt, query_pos, memory, memory_pos, pad), shapes=shapes, grid_sizes=grid)
        prior = priors[0]
        z = linear(hand_o(layer, tgt, query_pos), layer.scale_select_head)
        alpha = torch.exp(z) / torch.exp(z).sum(-1, keepdim=True)
        torch.testing.assert_close(prior.alpha, alpha)
        torch.testing.assert_close(prior.alpha.sum(-1), torch.ones(B, Q))
        assert not torch.allclose(prior.alpha[0], prior.alpha[1])    # each image its own weights
        assert [t.shape[-1] for t in prior.log_g] == sizes
        query, key = tgt + query_pos, memory + memory_pos
        got = layer.cross_attn(query, key, memory, pad_mask=pad, prior=prior)
        want = naive_scale_selection(layer.cross_attn, query, key, memory, pad, prior.log_g, alpha, sizes)
    torch.testing.assert_close(got, want)
    assert isinstance(layer.cross_attn, ScaleSelectionCrossAttention)


def test_encoder_pattern():
    """The paper's order for 5 layers; one multi-scale block in the middle otherwise."""
    assert encoder_pattern(5) == ("intra", "intra", "multi", "intra", "intra")
    assert encoder_pattern(6).count("multi") == 1 and encoder_pattern(1) == ("multi",)


@pytest.mark.parametrize("pattern, mixes", [(("intra", "intra"), False), (("multi",), True)])
def test_intra_scale_blocks_do_not_mix_scales(pattern, mixes):
    """Perturbing scale 1's tokens leaves the other scales' outputs bit-identical under intra
    blocks, and changes them under a multi-scale block."""
    torch.manual_seed(0)
    enc = SMCAMultiScaleEncoder(D, H, FF, 0.0, pattern).eval()
    shapes, sizes = [(2, 3), (2, 2), (1, 1)], [6, 4, 1]
    src, pos = torch.randn(B, 11, D), torch.randn(B, 11, D)
    pad = torch.zeros(B, 11, dtype=torch.bool)
    pad[1, 5] = True
    bumped = src.clone()
    bumped[:, 6:10] += torch.randn(B, 4, D)
    with torch.no_grad():
        a = enc(src, pos, pad, shapes).split(sizes, 1)
        b = enc(bumped, pos, pad, shapes).split(sizes, 1)
    assert not torch.allclose(a[1], b[1])
    for s in (0, 2):
        assert torch.equal(a[s], b[s]) != mixes


def test_multiscale_projection_levels_and_masks():
    """C4, C5 -> strides 16, 32, 64; the extra level's mask is C5's mask taken nearest."""
    proj = MultiScaleProjection((8, 12), D)
    c5_mask = torch.zeros(B, 4, 4, dtype=torch.bool)
    c5_mask[1, :, 2:] = True                            # image 1: right half padded
    c5_mask[1, 3, :] = True
    levels = proj([(torch.randn(B, 8, 8, 8), torch.zeros(B, 8, 8, dtype=torch.bool)),
                   (torch.randn(B, 12, 4, 4), c5_mask)])
    assert [tuple(src.shape) for src, _ in levels] == [(B, D, 8, 8), (B, D, 4, 4), (B, D, 2, 2)]
    # nearest 4x4 -> 2x2 keeps rows/columns 0 and 2
    assert torch.equal(levels[2][1][1], torch.tensor([[False, True], [False, True]]))
    assert not levels[2][1][0].any()


# ---- the stack, queries and build ----

def test_decoder_box_ref_is_layer0_centre_logits_reused():
    """box_ref repeats layer 0's pre-sigmoid centre for every layer; layer 1's prior uses it."""
    torch.manual_seed(2)
    layers = [SMCADecoderLayer(D, H, FF, 0.0, predicts_centre=(i == 0), scale="xy") for i in range(2)]
    dec = SMCADecoder(layers, D, strides=[1]).eval()      # stride 1: pixels are cells
    assert not hasattr(dec.layers[1], "centre_head")
    _, query_pos, memory, memory_pos, pad = make_inputs()
    tgt = torch.zeros(B, Q, D)
    layer_outs = []
    dec.layers[0].register_forward_hook(lambda mod, args, out: layer_outs.append(out[0]))
    seen = capture_biases(dec)
    with torch.no_grad():
        hs, box_ref = dec(tgt, memory, memory_pos=memory_pos, pad_mask=pad, query_pos=query_pos,
                          spatial_shapes=[(Y, X)], image_sizes=torch.tensor([[4, 3], [3, 2]]))
        centre = hand_centre_head(dec.layers[0], hand_o(dec.layers[0], tgt, query_pos))
        layer1 = dec.layers[1]
        o1 = hand_o(layer1, layer_outs[0], query_pos)
        size = torch.tensor([[4.0, 3.0], [3.0, 2.0]])[:, None, None, :]
        centres = torch.sigmoid(centre)[:, :, None, :] * size + linear(o1, layer1.offset_head).reshape(B, Q, H, 2)
        want1 = naive_log_g(centres, linear(o1, layer1.scale_head).reshape(B, Q, H, 2), Y, X, 8.0)
    assert hs.shape == (2, B, Q, D) and box_ref.shape == (2, B, Q, 2)
    torch.testing.assert_close(box_ref[0], centre)
    torch.testing.assert_close(box_ref[1], centre)
    torch.testing.assert_close(seen[1], want1)


def test_queries_and_from_boxes():
    """Zeros content, learned query_pos, no reference points; from_boxes refuses denoising."""
    queries = SMCAQueries(Q, D)
    tgt, query_pos, ref = unpack(queries(B))
    assert torch.equal(tgt, torch.zeros(B, Q, D)) and ref is None
    assert torch.equal(query_pos[1], queries.query_embed.weight)
    with pytest.raises(NotImplementedError, match="denoising"):
        queries.from_boxes(torch.rand(B, 3, 4))


def test_build_parts_multiscale_end_to_end():
    """build_parts inits scale_head to scale 1, sizes the projection per backbone, and the parts run."""
    cfg = SimpleNamespace(hidden_dim=D, nheads=H, dim_feedforward=FF, dropout=0.0, dec_layers=3,
                          enc_layers=5, num_queries=Q, smooth=8.0, smca_scale="xy",
                          smca_multiscale=True, smca_ms_form="paper", activation="relu", backbone="resnet18",
                          dilation=False, backbone_stage="layer4")
    parts = build_parts(cfg, bbox_embed=None)
    assert set(parts) == {"queries", "decoder", "decoder_inputs", "encoder", "encoder_inputs",
                          "input_proj", "return_layers"}
    assert parts["return_layers"] == ("layer3", "layer4")
    assert parts["encoder"].pattern == encoder_pattern(5)
    for layer in parts["decoder"].layers:
        assert torch.all(layer.scale_head.weight == 0) and torch.all(layer.scale_head.bias == 1)
        assert layer.scale_select_head.out_features == 3
    levels = parts["input_proj"]([(torch.randn(B, 256, 8, 8), torch.zeros(B, 8, 8, dtype=torch.bool)),
                                  (torch.randn(B, 512, 4, 4), torch.zeros(B, 4, 4, dtype=torch.bool))])
    shapes = [tuple(src.shape[-2:]) for src, _ in levels]
    src = torch.cat([s.flatten(2).transpose(1, 2) for s, _ in levels], dim=1)
    pad = torch.cat([m.flatten(1) for _, m in levels], dim=1)
    pos = torch.randn_like(src)
    with torch.no_grad():
        memory = parts["encoder"](src, pos, pad, shapes)
        queries = parts["queries"](B)
        assert set(queries) == {"tgt", "query_pos"}                   # no reference points
        hs, box_ref = parts["decoder"](memory=memory, memory_pos=pos, pad_mask=pad, spatial_shapes=shapes,
                                       image_sizes=torch.tensor([[128, 128]] * B),   # 8x8 at stride 16
                                       **queries)
    assert hs.shape == (3, B, Q, D) and box_ref.shape == (3, B, Q, 2) and torch.isfinite(hs).all()
    single_cfg = SimpleNamespace(**{**vars(cfg), "smca_multiscale": False, "smca_scale": "fixed"})
    single = build_parts(single_cfg, bbox_embed=None)
    assert set(single) == {"queries", "decoder", "decoder_inputs"} and not hasattr(single["decoder"].layers[0], "scale_head")


@pytest.mark.parametrize("stage", ["layer2", "layer3", "layer4"])
def test_decoder_stride_is_the_backbone_map_stride(stage):
    """The Gaussians are placed with w / stride: that stride must be the one of the map the
    decoder attends to, measured here as image size / map size on a real forward pass."""
    import minidetr
    model, _, _ = minidetr.build("smca", preset="tiny", backbone_stage=stage, hidden_dim=32,
                                 nheads=4, dim_feedforward=64, num_queries=4, num_select=4)
    (feat, _), = model.backbone(torch.randn(1, 3, 64, 96), torch.zeros(1, 64, 96, dtype=torch.bool))[:1]
    assert model.decoder.strides == [64 // feat.shape[-2]] == [96 // feat.shape[-1]]


def test_unpadded_sizes_from_the_pixel_mask():
    """(w, h) per image = real columns and rows of the padding mask (SMCA places its centres with them)."""
    mask = torch.ones(2, 5, 7, dtype=torch.bool)
    mask[0, :3, :7] = False
    mask[1, :5, :2] = False
    assert unpadded_sizes(mask).tolist() == [[7, 3], [2, 5]]
