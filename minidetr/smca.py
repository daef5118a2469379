"""SMCA: DETR's decoder co-attention modulated by a Gaussian around a predicted box centre.

Each object query predicts where its object is (a centre) and how large it is (a scale);
a Gaussian-like weight map G around that centre is added, as log G, to the query's
cross-attention ("co-attention") logits, so from the first epoch a query attends near its
own estimate instead of over the whole image. That prior is what makes training converge
several times faster. Optionally, the encoder runs over three feature scales and each query
chooses, with softmax weights, how much to read from each scale; the paper describes that
encoder with self-attention, the released code builds it from convolutions (both are here).

Gao, Zheng, Wang, Dai, Li, "Fast Convergence of DETR with Spatially Modulated
Co-Attention", ICCV 2021, arXiv 2101.07448 (Sec. 3.2 single scale, Sec. 3.3 multi-scale).
Equations as implemented (numbered here, in the paper's order; O_q = the query's embedding):

    (1) DETR co-attention     C = softmax(K^T Q / sqrt(d)) V
    (2) centre                (cw_n, ch_n) = sigmoid(MLP(O_q));  cw = cw_n * W,  ch = ch_n * H
                              (W, H: the unpadded feature map's width and height, in cells)
    (3) scale                 (sw, sh) = FC(O_q)
    (4) weight map            G(i, j) = exp(-(i - cw)^2 / (beta sw^2) - (j - ch)^2 / (beta sh^2))
                              i = column 0..W-1, j = row 0..H-1, beta = 8 (--smooth)
    (5) SMCA co-attention     C = softmax(K^T Q / sqrt(d) + log G) V
    (6) multi-head            head m: centre (cw + dx_m, ch + dy_m), its own scale, its own G_m
    (7) scale selection       (a_16, a_32, a_64) = softmax(FC(O_q))
    (8) multi-scale           C_m = sum_s a_s softmax(K_ms^T Q_m / sqrt(d) + log G_ms) V_ms
    encoder (Sec. 3.3): intra-scale self-attention (tokens attend within their own scale)
    around one multi-scale self-attention block (all scales' tokens together).

Differs from vanilla DETR in:
  - the decoder's cross-attention logits get + log G (through DecoderLayer's cross_bias;
    multi-scale: a MultiScalePrior for its own cross-attention, through cross_kwargs);
  - each decoder layer has query_norm (O_q = query_norm(tgt + query_pos)) and heads
    offset_head (per-head offsets, Eq. 6) and scale_head (per-head scales, Eq. 3); layer 0
    also has centre_head (the centre, Eq. 2), which later layers reuse (the released
    checkpoints call them norm4, point2, point3, point1; convert.py renames them);
  - the box head predicts (cx, cy) as offsets, in logit space, from that centre (box_ref);
  - classification is sigmoid focal over the classes (set by the config, not here);
  - optionally (smca_multiscale): strides 16/32/64, the intra/multi-scale encoder and Eq. 7-8;
    or, with smca_ms_form 'released', the released code's form: strides 8/16/32/64, an
    encoder of depthwise convolutions (ConvMixLayer), Eq. 7-8 over four key levels.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from minidetr.backbone import stage_channels, stage_strides
from minidetr.transformer import (MLP, Decoder, DecoderLayer, EncoderLayer, FeedForward,
                                  LearnedQueries, MultiheadAttention, xavier_init)

SCALE_WIDTH = {"fixed": 0, "shared": 1, "xy": 2}   # scale_head outputs per head and scale level


# ---- the Gaussian prior ----

def gaussian_log_weight(centers, scales, spatial_shape, beta):
    """log G of Eq. (4) for every query, head and feature-map cell.

    centers: [B, Q, h, 2] (x, y) in grid cells (column, row); scales: [B, Q, h, 2] (s_x, s_y);
    spatial_shape: (y, x) rows and columns of the map; beta: the smoothing constant.
    Returns [B, h, Q, N], N = y*x tokens in row-major order (as 'b c y x -> b (y x) c').

    The reference code learns the inverse width, so that is what `scales` are:
        log G(i, j) = -(s_x^2 (i - c_x)^2 + s_y^2 (j - c_y)^2) / beta
    which is the paper's Eq. (4) with s_w = 1 / s_x, s_h = 1 / s_y. Keeping the code's form
    lets the released checkpoints convert unchanged (their point3, our scale_head, predicts s).
    """
    y, x = spatial_shape
    cols = torch.arange(x, dtype=centers.dtype, device=centers.device)   # i, the x coordinate
    rows = torch.arange(y, dtype=centers.dtype, device=centers.device)   # j, the y coordinate
    (cx, cy), (sx, sy) = centers.unbind(-1), scales.unbind(-1)           # each [B, Q, h]
    per_cell = 'b q h -> b q h 1'                                         # against every column / row
    dist_x = (cols - rearrange(cx, per_cell)) ** 2 * rearrange(sx * sx, per_cell)   # [B, Q, h, x]
    dist_y = (rows - rearrange(cy, per_cell)) ** 2 * rearrange(sy * sy, per_cell)   # [B, Q, h, y]
    # Eq. (4): log G(i, j) = -(s_x^2 (i - c_x)^2 + s_y^2 (j - c_y)^2) / beta
    log_g = -(rearrange(dist_x, 'b q h x -> b q h 1 x') + rearrange(dist_y, 'b q h y -> b q h y 1')) / beta
    return rearrange(log_g, 'b q h y x -> b h q (y x)')


# ---- multi-scale input and encoder (Sec. 3.3) ----

class MultiScaleProjection(nn.Module):
    """Backbone stages -> maps of width `dim`, one per stage, plus one at twice C5's stride.

    in_channels: the stages' channels, e.g. (1024, 2048) for ResNet-50's C4, C5 (the paper's
    strides 16, 32, 64) or (512, 1024, 2048) with C3 (the released code's 8, 16, 32, 64).
    Each stage gets a 1x1 conv; the extra, coarsest map is a 3x3 stride-2 conv on the raw C5
    features, as in the released code.
    """

    def __init__(self, in_channels, dim):
        super().__init__()
        self.proj = nn.ModuleList(nn.Conv2d(c, dim, kernel_size=1) for c in in_channels)
        self.extra = nn.Conv2d(in_channels[-1], dim, kernel_size=3, stride=2, padding=1)

    def forward(self, levels):
        """levels: [(C [B, Ci, y, x], mask), ..., (C5, mask)] -> one more (src [B, dim, y, x], mask)."""
        out = [(proj(feat), mask) for proj, (feat, mask) in zip(self.proj, levels)]
        c5, c5_mask = levels[-1]
        src = self.extra(c5)                                                   # stride 64
        mask = F.interpolate(c5_mask[None].float(), size=src.shape[-2:]).bool()[0]   # nearest
        return out + [(src, mask)]


def encoder_pattern(num_layers):
    """The paper's order of encoder blocks, e.g. 5 -> (intra, intra, multi, intra, intra).

    One multi-scale block in the middle (index num_layers // 2), intra-scale elsewhere.
    """
    return tuple("multi" if i == num_layers // 2 else "intra" for i in range(num_layers))


class SMCAMultiScaleEncoder(nn.Module):
    """Intra-scale and multi-scale self-attention blocks over three scales (Sec. 3.3).

    Every block is DETR's EncoderLayer. An "intra" block runs it on each scale's tokens
    separately (attention stays within a scale; one set of weights for all scales), a
    "multi" block on all tokens at once. A learned level embedding [S, C] is added to each
    scale's positional encoding so the multi-scale block can tell the scales apart.

    Not the released code: its multi-scale encoder mixes scales with depthwise convolutions
    and no self-attention (that form is SMCAConvEncoder, --smca_ms_form released); this one
    follows the paper's description.
    """

    def __init__(self, dim, heads, dim_feedforward, dropout, pattern, num_levels=3, activation="relu"):
        super().__init__()
        if set(pattern) - {"intra", "multi"}:
            raise ValueError(f"pattern entries must be 'intra' or 'multi', got {pattern}")
        self.pattern = tuple(pattern)
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, dim_feedforward, dropout, activation)
                                    for _ in pattern)
        self.level_embed = nn.Parameter(torch.empty(num_levels, dim))
        # drawn here so that the encoder works on its own; build() draws it once more after its
        # xavier pass, the reference's order. Both draws stay: dropping one would shift every
        # later tensor's random numbers, and the built models (and every run measured with
        # them) would no longer be the same bit for bit
        nn.init.normal_(self.level_embed)

    def forward(self, src, pos, pad_mask, spatial_shapes):
        """src, pos: [B, N, C]; pad_mask: [B, N] True on padding; spatial_shapes: S (y, x).

        Returns memory [B, N, C], the scales' tokens in the order given.
        """
        if len(spatial_shapes) != len(self.level_embed):
            raise ValueError(f"expected {len(self.level_embed)} levels, got {len(spatial_shapes)}")
        sizes = [y * x for y, x in spatial_shapes]      # no int(): ONNX export keeps them symbolic
        if pad_mask is None:
            pad_mask = torch.zeros(src.shape[:2], dtype=torch.bool, device=src.device)
        level_pos = torch.cat([repeat(e, 'c -> n c', n=n) for e, n in zip(self.level_embed, sizes)])  # [N, C]
        pos = pos + level_pos
        for layer, kind in zip(self.layers, self.pattern):
            if kind == "multi":
                src = layer(src, pos, pad_mask)
            else:   # the same layer on each scale alone: no token sees another scale
                per_level = zip(src.split(sizes, 1), pos.split(sizes, 1), pad_mask.split(sizes, 1))
                src = torch.cat([layer(s, p, m) for s, p, m in per_level], dim=1)
        return src


# ---- the released code's multi-scale encoder: depthwise convolutions, no attention ----

class ConvMixLayer(nn.Module):
    """One layer of the released multi-scale encoder: each level mixed by convolutions with itself
    and with its neighbours, then DETR's FFN.

    The released code (Multi_scale_SMCA.zip in gaopengcuhk/SMCA-DETR, folder
    DMS-MH-GMCA-main_very_important, models/transformer.py: TransformerEncoderLayer, the path
    its encoder takes) keeps DETR's layer shape but replaces the self-attention by
    convolutions. Levels l = 0 .. S-1, finest first; x_l [B, C, y_l, x_l], p_l its positions
    (with the level embedding):

        a_l    = DW_l(P_in(x_l + p_l))           P_in: 1x1 conv (one for all levels);
                                                 DW_l: depthwise 5x5 conv of level l
        down_l = DWdown_l(a_{l-1})               (l > 0)   depthwise 5x5, stride 2: the finer
                                                           level brought down to this one
        up_l   = bilinear(DWup_l(a_{l+1}))       (l < S-1) depthwise 5x5 at the coarser level,
                                                           then resized to this one (align corners)
        x_l    = LN1(x_l + P_out(a_l + down_l + up_l))     P_out: 1x1 conv (one for all levels)
        x_l    = FFN(x_l)                        DETR's Eq. (4), one for all levels

    So information travels one level per layer, and only through 5x5 windows: with one
    layer, a cell sees 5x5 cells of its own level and of its two neighbours. The padding
    mask is not used (the convolutions read padded cells too), as in the released code.
    The released names: self_attn_8 .. self_attn_64 (our within), high_to_low_1..3 (down),
    low_to_high_1..3 (up), conv_1 (in_proj), conv_2 (out_proj); convert.py maps them.
    """

    def __init__(self, dim, dim_feedforward, dropout, num_levels, activation="relu", kernel=5):
        super().__init__()

        def depthwise(stride=1):   # one 5x5 filter per channel: mixes positions, not channels
            return nn.Conv2d(dim, dim, kernel, stride=stride, padding=kernel // 2, groups=dim)

        self.in_proj, self.out_proj = nn.Conv2d(dim, dim, 1), nn.Conv2d(dim, dim, 1)
        self.within = nn.ModuleList(depthwise() for _ in range(num_levels))
        self.down = nn.ModuleList(depthwise(stride=2) for _ in range(num_levels - 1))
        self.up = nn.ModuleList(depthwise() for _ in range(num_levels - 1))
        self.norm1, self.dropout = nn.LayerNorm(dim), nn.Dropout(dropout)
        self.ffn = FeedForward(dim, dim_feedforward, dropout, activation)

    def forward(self, maps, pos_maps):
        """maps, pos_maps: per level [B, C, y_l, x_l], finest first -> the new maps."""
        a = [within(self.in_proj(x + p)) for within, x, p in zip(self.within, maps, pos_maps)]
        out = []
        for l, x in enumerate(maps):
            mixed = a[l]
            if l > 0:                                  # from the finer level: stride-2 conv
                mixed = mixed + self.down[l - 1](a[l - 1])
            if l < len(maps) - 1:                      # from the coarser level: conv, then resize
                mixed = mixed + F.interpolate(self.up[l](a[l + 1]), size=x.shape[-2:],
                                              mode="bilinear", align_corners=True)
            tokens = rearrange(x + self.dropout(self.out_proj(mixed)), 'b c y x -> b (y x) c')
            tokens = self.ffn(self.norm1(tokens))
            out.append(rearrange(tokens, 'b (y x) c -> b c y x', y=x.shape[-2]))
        return out


class SMCAConvEncoder(nn.Module):
    """The released multi-scale encoder: ConvMixLayers over four levels (strides 8, 16, 32, 64),
    then the stride-8 level brought to stride 16 for the decoder.

    The released model's decoder reads four key sets: the stride-8 memory after a 3x3
    stride-2 conv (memory_down, the released Transformer.conv), and the stride-16, 32 and 64
    memories. The downsampled level takes the stride-16 level's place in the layout (its
    positions, padding and grid): `memory_layout` gives the decoder that layout.
    """

    def __init__(self, dim, dim_feedforward, dropout, num_layers, num_levels=4, activation="relu"):
        super().__init__()
        self.layers = nn.ModuleList(ConvMixLayer(dim, dim_feedforward, dropout, num_levels, activation)
                                    for _ in range(num_layers))
        self.level_embed = nn.Parameter(torch.empty(num_levels, dim))
        nn.init.normal_(self.level_embed)
        self.memory_down = nn.Conv2d(dim, dim, 3, stride=2, padding=1)

    def forward(self, src, pos, pad_mask, spatial_shapes):
        """src, pos: [B, N, C], the levels' tokens finest first; pad_mask: unused (see
        ConvMixLayer); spatial_shapes: the levels' (y, x). Returns memory [B, N', C] in the
        layout of memory_layout: the stride-8 level downsampled, then the other levels."""
        if len(spatial_shapes) != len(self.level_embed):
            raise ValueError(f"expected {len(self.level_embed)} levels, got {len(spatial_shapes)}")
        sizes = [y * x for y, x in spatial_shapes]

        def to_maps(tokens):
            return [rearrange(t, 'b (y x) c -> b c y x', y=y, x=x)
                    for t, (y, x) in zip(tokens.split(sizes, 1), spatial_shapes)]

        maps = to_maps(src)
        pos_maps = [p + rearrange(e, 'c -> c 1 1') for p, e in zip(to_maps(pos), self.level_embed)]
        for layer in self.layers:
            maps = layer(maps, pos_maps)
        maps[0] = self.memory_down(maps[0])            # stride 8 -> 16: [B, C, y_1, x_1]
        return torch.cat([rearrange(m, 'b c y x -> b (y x) c') for m in maps], 1)

    @staticmethod
    def key_levels(levels):
        """Per-level entries (positions, padding, grid shapes) -> the decoder's: the finest
        level's replaced by the next level's, where its downsampled memory now lives."""
        return [levels[1], *levels[1:]]

    def memory_layout(self, pos, pad_mask, spatial_shapes):
        """The decoder's key layout: (pos [B, N', C], pad_mask [B, N'], spatial_shapes)."""
        sizes = [y * x for y, x in spatial_shapes]
        return (torch.cat(self.key_levels(pos.split(sizes, 1)), 1),
                torch.cat(self.key_levels(pad_mask.split(sizes, 1)), 1), self.key_levels(spatial_shapes))


# ---- the decoder ----

class MultiScalePrior(NamedTuple):
    """What the multi-scale cross-attention needs instead of one bias tensor (its `prior`)."""
    log_g: list         # per scale [B, h, Q, N_s], Eq. (4) on that scale's grid
    alpha: torch.Tensor  # [B, Q, S] scale-selection weights, Eq. (7), sum to 1 over S
    sizes: list         # N_s tokens per scale


class ScaleSelectionCrossAttention(MultiheadAttention):
    """Eq. (8): one softmax per scale, each with its own log G, mixed by the query's alpha.

    Same parameters (q/k/v/out_proj) as MultiheadAttention. The out projection is affine,
    and the alphas sum to one, so sum_s a_s out_proj(x_s) = out_proj(sum_s a_s x_s): running
    the plain attention once per scale and mixing afterwards is exactly Eq. (8).
    Against the released code: (a) it multiplied every image's attention by batch element
    0's alphas (harmless only at one image per GPU); here each image uses its own. (b) Its
    decoder keys carry the level embedding; under a per-scale softmax that adds q . W_k e_s,
    a constant over each scale's keys, so the keys here (plain memory_pos) give the same.
    """

    def forward(self, query, key, value, pad_mask=None, bias=None, *, prior):
        """query: [B, Q, C]; key, value: [B, N, C], the scales' tokens one scale after another;
        pad_mask: [B, N] True on padding; prior: MultiScalePrior (each scale's log G, alpha).
        bias is the vanilla layer's cross_bias, None here: each scale brings its own log G.
        Returns [B, Q, C].
        """
        attn_out = 0
        for s, (k, v, pad, log_g) in enumerate(self._per_scale(key, value, pad_mask, prior)):
            out = super().forward(query, k, v, pad_mask=pad, bias=log_g)
            attn_out = attn_out + rearrange(prior.alpha[..., s], 'b q -> b q 1') * out   # [B, Q, C]
        return attn_out

    def attention_maps(self, query, key, value, pad_mask=None, bias=None, *, prior):
        """forward's per-scale softmax weights and log G, scale after scale along the keys:
        (weights [B, h, Q, N], log G [B, h, Q, N]); each scale's N_s columns sum to 1 on
        their own (alpha mixes the scales' outputs, not these weights)."""
        weights = []
        for k, v, pad, log_g in self._per_scale(key, value, pad_mask, prior):
            weights.append(super().attention_maps(query, k, v, pad_mask=pad, bias=log_g)[0])
        return torch.cat(weights, -1), torch.cat(prior.log_g, -1)

    @staticmethod
    def _per_scale(key, value, pad_mask, prior):
        """Split keys, values and padding into the scales: per scale (k, v, pad, log G)."""
        if pad_mask is None:
            pad_mask = torch.zeros(key.shape[:2], dtype=torch.bool, device=key.device)
        return zip(key.split(prior.sizes, 1), value.split(prior.sizes, 1),
                   pad_mask.split(prior.sizes, 1), prior.log_g)


class SMCADecoderLayer(DecoderLayer):
    """DETR's decoder layer (unchanged, statement for statement) + the Gaussian prior.

    predicts_centre: True for layer 0 (has centre_head, the centre MLP of Eq. 2); later layers
    reuse layer 0's centre, as the reference. scale: 'fixed' (scale 1, no scale_head), 'shared'
    (one scale per head, scale_head = Linear(C, h)) or 'xy' (s_x, s_y per head, Linear(C, 2h);
    the reference's README setting `--dynamic_scale type3`). beta: Eq. (4)'s constant.
    num_levels > 1: per-scale offsets and scales, scale_select_head (Eq. 7) and Eq. (8).
    level_weights: a factor per level on log G (the released multi-scale code's 0.5, 0.5, 1, 2:
    the Gaussian narrower, in cells, on the coarser maps); None = 1 everywhere (the paper).
    The reference names these heads norm4 and point1..point4; convert.py maps them here.
    """

    def __init__(self, dim, heads, dim_feedforward, dropout=0.1, activation="relu", *,
                 predicts_centre, scale="xy", beta=8.0, num_levels=1, level_weights=None):
        super().__init__(dim, heads, dim_feedforward, dropout, activation)
        if scale not in SCALE_WIDTH:
            raise ValueError(f"unknown smca_scale {scale!r}: expected one of {list(SCALE_WIDTH)}")
        self.heads, self.scale, self.beta, self.num_levels = heads, scale, beta, num_levels
        self.level_weights = tuple(level_weights or (1.0,) * num_levels)
        self.predicts_centre = predicts_centre
        self.query_norm = nn.LayerNorm(dim)                   # O_q = query_norm(tgt + query_pos)
        if predicts_centre:
            self.centre_head = MLP(dim, dim, 2, 3)            # Eq. (2): (cx, cy) logits
        self.offset_head = nn.Linear(dim, num_levels * heads * 2)   # Eq. (6): (dx, dy) per head, cells
        if SCALE_WIDTH[scale]:
            self.scale_head = nn.Linear(dim, num_levels * heads * SCALE_WIDTH[scale])   # Eq. (3)
            self.reset_scale_head()
        if num_levels > 1:
            self.scale_select_head = nn.Linear(dim, num_levels)   # Eq. (7): scale-selection logits
            self.cross_attn = ScaleSelectionCrossAttention(dim, heads, dropout)

    def reset_scale_head(self):
        """scale_head starts at weight 0, bias 1: every scale 1, as the reference initialises it."""
        if hasattr(self, "scale_head"):
            nn.init.zeros_(self.scale_head.weight)
            nn.init.ones_(self.scale_head.bias)

    def log_gaussian(self, o, centre_logits, grid_sizes, spatial_shapes):
        """Eq. (2)-(4), (6) on every scale: a list of log G [B, h, Q, N_s].

        o: [B, Q, C]; centre_logits: [B, Q, 2] (cx, cy) before the sigmoid;
        grid_sizes: [B, S, 2] unpadded (width, height) per scale in cells.
        """
        levels, heads = self.num_levels, self.heads
        centre = centre_logits.sigmoid()                                  # [B, Q, 2] in [0, 1]
        offsets = rearrange(self.offset_head(o), 'b q (s h xy) -> s b q h xy', s=levels, h=heads)
        if self.scale == "fixed":
            scales = torch.ones_like(offsets)
        elif self.scale == "shared":      # one s per head, used for both axes
            scales = repeat(self.scale_head(o), 'b q (s h) -> s b q h xy', s=levels, xy=2)
        else:                             # 'xy': (s_x, s_y) per head
            scales = rearrange(self.scale_head(o), 'b q (s h xy) -> s b q h xy', s=levels, h=heads)
        log_g = []
        for s, shape in enumerate(spatial_shapes):
            size = rearrange(grid_sizes[:, s], 'b xy -> b 1 1 xy').to(o.dtype)   # (W, H) in cells
            # Eq. (2), (6): (cw, ch) = (cw_n * W, ch_n * H), + (dx_m, dy_m) for head m
            centres = rearrange(centre, 'b q xy -> b q 1 xy') * size + offsets[s]   # [B, Q, h, 2] cells
            log_g.append(gaussian_log_weight(centres, scales[s], shape, self.beta) * self.level_weights[s])
        return log_g

    def forward(self, tgt, memory, *, memory_pos, query_pos, pad_mask=None, self_attn_mask=None,
                centre_logits=None, grid_sizes, spatial_shapes):
        """tgt, query_pos: [B, Q, C]; memory, memory_pos: [B, N, C]; centre_logits: [B, Q, 2]
        from layer 0 (None in layer 0 itself). Returns (tgt [B, Q, C], centre_logits)."""
        o = self.query_norm(tgt + query_pos)          # from the layer's input, before self-attention
        if self.predicts_centre:
            centre_logits = self.centre_head(o)                           # [B, Q, 2], Eq. (2)
        log_g = self.log_gaussian(o, centre_logits, grid_sizes, spatial_shapes)
        if self.num_levels == 1:      # one bias tensor: the vanilla layer's cross_bias
            cross = dict(cross_bias=log_g[0])                             # Eq. (5)
        else:                         # ScaleSelectionCrossAttention's own argument, passed through
            alpha = self.scale_select_head(o).softmax(-1)                 # [B, Q, S], Eq. (7)
            cross = dict(prior=MultiScalePrior(log_g, alpha, [y * x for y, x in spatial_shapes]))
        tgt = super().forward(tgt, memory, memory_pos=memory_pos, query_pos=query_pos,
                              pad_mask=pad_mask, self_attn_mask=self_attn_mask, **cross)
        return tgt, centre_logits


class SMCADecoder(Decoder):
    """The decoder stack: layer 0's centre is passed on to every later layer.

    Returns hs [L, B, Q, C] (each through the shared final LayerNorm) and box_ref
    [L, B, Q, 2]: layer 0's centre logits (before the sigmoid), which the model adds to
    the box head's (cx, cy) logits at every layer, as the reference does.
    """

    def __init__(self, layers, dim, strides):
        super().__init__(layers, dim)
        self.strides = strides     # pixels per cell of each level, to place centres (see forward)

    def forward(self, tgt, memory, *, memory_pos, pad_mask, query_pos, self_attn_mask=None,
                spatial_shapes, image_sizes):
        """spatial_shapes: the levels' (y, x); image_sizes: [B, 2] (w, h) of each unpadded image
        in pixels (both from `decoder_inputs`, which the model calls with the pixel mask).

        The grid size is w / stride, h / stride as floats, exactly the reference's
        targets['size'] / 32 (the reference needs targets for it even at inference; the
        pixel mask holds the same sizes, so the model runs on images alone).
        """
        shapes = [(y, x) for y, x in spatial_shapes]   # no int(): ONNX export keeps y, x symbolic
        strides = torch.tensor(self.strides, dtype=torch.float32, device=tgt.device)
        grid_sizes = image_sizes.float()[:, None, :] / strides[None, :, None]            # [B, S, 2]
        hs, centre_logits = [], None
        for layer in self.layers:
            tgt, centre_logits = layer(tgt, memory, memory_pos=memory_pos, query_pos=query_pos,
                                       pad_mask=pad_mask, self_attn_mask=self_attn_mask,
                                       centre_logits=centre_logits, grid_sizes=grid_sizes,
                                       spatial_shapes=shapes)
            hs.append(self.norm(tgt))
        box_ref = repeat(centre_logits, 'b q xy -> l b q xy', l=len(self.layers))
        return torch.stack(hs), box_ref


# ---- what SMCA reads from the image besides the memory: the map layout ----

def unpadded_sizes(mask):
    """mask [B, H, W] True on padding -> [B, 2] (w, h) of each image in pixels."""
    real = ~mask
    return torch.stack([real.any(1).sum(-1), real.any(2).sum(-1)], -1)


def decoder_inputs(mask, spatial_shapes):
    """The SMCA decoder's inputs beyond DETR's: the maps' (y, x) and the unpadded image sizes
    (to lay the Gaussians on the grid, Eq. 2). The model calls this with the pixel mask."""
    return dict(spatial_shapes=spatial_shapes, image_sizes=unpadded_sizes(mask))


def encoder_inputs(mask, spatial_shapes):
    """The multi-scale encoder's input beyond DETR's: the levels' (y, x), to split the tokens."""
    return dict(spatial_shapes=spatial_shapes)


# ---- queries and build ----

# SMCA's queries are DETR's (its centres come from the decoder's layer 0, not the queries)
SMCAQueries = LearnedQueries


# the released multi-scale code's factors on each level's log G (its `distance_8 * 0.5, ...`),
# levels at strides 16 (the stride-8 memory, downsampled), 16, 32, 64
RELEASED_LEVEL_WEIGHTS = (0.5, 0.5, 1.0, 2.0)


def build_parts(cfg, bbox_embed):
    """The SMCA pieces of the model from the config (the only place here that reads it).

    bbox_embed is unused (SMCA's box reference comes from the decoder). Returns
    dict(queries, decoder, decoder_inputs) and, with cfg.smca_multiscale, also encoder,
    encoder_inputs, input_proj and return_layers: the paper's form (smca_ms_form 'paper':
    C4, C5, self-attention encoder, 3 levels) or the released code's ('released': C3, C4,
    C5, ConvMixLayer encoder, 4 key levels in the decoder with RELEASED_LEVEL_WEIGHTS).
    """
    dim, heads = cfg.hidden_dim, cfg.nheads
    released = cfg.smca_multiscale and cfg.smca_ms_form == "released"
    levels = (4 if released else 3) if cfg.smca_multiscale else 1
    layers = [SMCADecoderLayer(dim, heads, cfg.dim_feedforward, cfg.dropout, cfg.activation,
                               predicts_centre=(i == 0), scale=cfg.smca_scale, beta=cfg.smooth,
                               num_levels=levels, level_weights=RELEASED_LEVEL_WEIGHTS if released else None)
              for i in range(cfg.dec_layers)]
    # Pixels per cell of each level. The reference divides by 32 even for DC5 (stride 16);
    # we use the real stride of the map the Gaussian is laid on. Multi-scale: C4, C5 and C5
    # downsampled once more (released: the stride-8 memory, downsampled, in front).
    stride = stage_strides(cfg.dilation)
    strides = [stride[cfg.backbone_stage]]
    if cfg.smca_multiscale:
        strides = [stride["layer3"], stride["layer4"], 2 * stride["layer4"]]
        if released:
            strides = [stride["layer3"]] + strides
    decoder = SMCADecoder(layers, dim, strides)
    xavier_init(decoder)                  # DETR's init first (the reference's _reset_parameters)
    for layer in decoder.layers:
        layer.reset_scale_head()          # then scale 1 at the start
    parts = dict(queries=SMCAQueries(cfg.num_queries, dim), decoder=decoder, decoder_inputs=decoder_inputs)
    if cfg.smca_multiscale:
        stages = ("layer2", "layer3", "layer4") if released else ("layer3", "layer4")
        channels = stage_channels(cfg.backbone)
        if released:
            encoder = SMCAConvEncoder(dim, cfg.dim_feedforward, cfg.dropout, cfg.enc_layers, levels,
                                      cfg.activation)
            xavier_init(encoder.layers)   # the released _reset_parameters; memory_down keeps
            nn.init.normal_(encoder.level_embed)   # torch's conv init (made after it), as there
        else:
            encoder = SMCAMultiScaleEncoder(dim, heads, cfg.dim_feedforward, cfg.dropout,
                                            encoder_pattern(cfg.enc_layers), levels, cfg.activation)
            xavier_init(encoder)
            nn.init.normal_(encoder.level_embed)
        parts.update(encoder=encoder, encoder_inputs=encoder_inputs, return_layers=stages,
                     input_proj=MultiScaleProjection([channels[s] for s in stages], dim))
    return parts
