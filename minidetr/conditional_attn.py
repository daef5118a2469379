"""Conditional cross-attention (Conditional DETR) and its anchor-box form (DAB-DETR, used by DN-DETR).

DETR's decoder adds one learned positional query to the content query, so a query must
learn from content alone where in the image to look, and training is slow. Conditional
DETR gives each query a reference point s and builds, per layer, a *spatial* query from
it that is compared only with the keys' positional encodings; DAB-DETR makes the
reference a 4-D anchor box that every layer refines. Both are the same decoder layer:
only what goes into the cross-attention changes, never how attention is computed.

Papers: Meng et al., "Conditional DETR for Fast Training Convergence", ICCV 2021
(arXiv 2108.06152), Sec. 3; Liu et al., "DAB-DETR: Dynamic Anchor Boxes are Better
Queries for DETR", ICLR 2022 (arXiv 2201.12329), Sec. 4. Numbered here, not as in the papers:

  Conditional DETR (per decoder layer, f = the previous layer's output, o = learned query)
    (C1) s = sigmoid(FFN(o))                     reference point, (x, y) in (0, 1), fixed over layers
    (C2) p_s = PE(s) = [PE(y), PE(x)]            sine encoding, C/2 channels per axis, T = 10000
    (C3) lambda_q = FFN(f)  (lambda_q = 1 in layer 0)     p_q = W (lambda_q * p_s)
         the conditional spatial query; W is `ca_qpos_sine_proj`
    (C4) per head:  logit = (c_q . c_k + p_q . p_k) / sqrt(2 d)
         with q = [c_q ; p_q], k = [c_k ; p_k] concatenated inside each head, where
         DETR adds, (c_q + p_q).(c_k + p_k), and gets two mixed terms c_q.p_k + p_q.c_k
    (C5) box = sigmoid(FFN(f) + [logit(s), 0, 0])
  DAB-DETR (A = (x, y, w, h) the current anchor, sigmoid space)
    (D1) P = MLP(PE(A)),  PE(A) = [PE(y), PE(x), PE(w), PE(h)]   positional query
    (D2) spatial query input = lambda_q * [PE(y), PE(x)]          as (C3), lambda_q from f
    (D3) (w_ref, h_ref) = sigmoid(MLP(f));  PE(x) part *= w_ref / w,  PE(y) part *= h_ref / h
         (width/height-modulated attention: the x-similarity is sharpened or widened
         with the anchor's width, the y-similarity with its height)
    (D4) A_{l+1} = sigmoid(FFN(f_l) + logit(A_l)), detached before it feeds layer l+1
    (D5) box_l = sigmoid(FFN(LN(f_l)) + logit(A_l))

Differs from vanilla DETR's decoder (transformer.DecoderLayer / Decoder) in:
  - content and position get separate projections (`*_content_proj`, `*_pos_proj`);
  - cross-attention concatenates [content ; spatial] inside each head (C4), so per-head
    query/key width is 2d and the scale 1/sqrt(2d); values stay d wide;
  - only layer 0 also adds the positional query to the content query and the key
    positions to the content keys (DETR-style); it alone owns `ca_qpos_proj`;
  - boxes are predicted relative to a reference: the decoder returns logit(reference)
    as `box_ref` (2-D point for Conditional DETR, refined 4-D anchor for DAB/DN).
"""
import torch
from einops import repeat
from torch import nn

from minidetr.backbone import sine_embed
from minidetr.box_ops import inverse_sigmoid
from minidetr.transformer import (MLP, Encoder, EncoderLayer, FeedForward, attention, attention_weights,
                                  cat_heads, clones, xavier_init)


# ---- sine embedding of points and boxes ----

def position_sine_embed(coords, dim):
    """PE of a point or box, one sine block of dim/2 channels per coordinate.

    coords: [..., 2] (x, y) or [..., 4] (x, y, w, h), in [0, 1].
    Returns [..., dim] for a point, [..., 2*dim] for a box, blocks ordered [y, x] or
    [y, x, w, h] (y first, as DETR's image encoding), T = 10000 and scale 2*pi in both
    papers, even where DAB-/DN-DETR encode the image with T = 20. The references hard-code
    128 channels per coordinate (hidden_dim 256); here it follows `dim`.
    """
    if dim % 4:
        raise ValueError(f"hidden_dim {dim} must be divisible by 4 (dim/2 sin/cos pairs per coordinate)")
    x, y, *wh = coords.unbind(-1)
    return torch.cat([sine_embed(c, dim // 2) for c in (y, x, *wh)], dim=-1)


# ---- the layer ----

class PreprojectedAttention(nn.Module):
    """Multi-head attention whose q, k, v the layer has already projected: only `out_proj`.

    Conditional DETR's attention modules have no input projection (the layer projects
    content and position separately), so their state_dict holds only `out_proj`.
    """

    def __init__(self, dim, heads, dropout):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.out_proj = nn.Linear(dim, dim)
        nn.init.zeros_(self.out_proj.bias)          # as the reference attention initialises it

    def forward(self, q, k, v, pad_mask=None, attn_mask=None):
        attn_out = attention(q, k, v, self.heads, pad_mask=pad_mask, attn_mask=attn_mask,
                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(attn_out)

    def attention_maps(self, q, k, v, pad_mask=None, attn_mask=None):
        """forward's softmax weights, recomputed: (weights [B, h, Q, N], None: no bias)."""
        return attention_weights(q, k, self.heads, pad_mask=pad_mask, attn_mask=attn_mask), None


class ConditionalDecoderLayer(nn.Module):
    """transformer.DecoderLayer with conditional cross-attention (C3)-(C4); post-norm.

    is_first: layer 0 adds the positional query to the content query (and the key
    positions to the content keys) as DETR does; later layers rely on the spatial
    query alone, and have no `ca_qpos_proj` at all (as the reference checkpoints).
    """

    def __init__(self, dim, heads, dim_feedforward, dropout=0.1, activation="relu", is_first=False):
        super().__init__()
        self.heads, self.is_first = heads, is_first
        # self-attention: separate content / position projections, summed (DETR-like)
        self.sa_qcontent_proj, self.sa_qpos_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.sa_kcontent_proj, self.sa_kpos_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.sa_v_proj = nn.Linear(dim, dim)
        self.self_attn = PreprojectedAttention(dim, heads, dropout)
        # cross-attention: content and spatial parts, concatenated per head
        self.ca_qcontent_proj = nn.Linear(dim, dim)
        self.ca_qpos_proj = nn.Linear(dim, dim) if is_first else None
        self.ca_kcontent_proj, self.ca_kpos_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.ca_v_proj = nn.Linear(dim, dim)
        self.ca_qpos_sine_proj = nn.Linear(dim, dim)      # W in (C3)
        self.cross_attn = PreprojectedAttention(dim, heads, dropout)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.ffn = FeedForward(dim, dim_feedforward, dropout, activation)

    def forward(self, tgt, memory, *, memory_pos, query_pos, query_sine_embed, pad_mask=None,
                self_attn_mask=None):
        """tgt, query_pos: [B, Q, C]; memory, memory_pos: [B, N, C];
        query_sine_embed: [B, Q, C] = lambda_q * PE(s), before `ca_qpos_sine_proj`.
        pad_mask: [B, N] True on padding; self_attn_mask: [Q, Q] True = blocked. Returns [B, Q, C].
        """
        q = self.sa_qcontent_proj(tgt) + self.sa_qpos_proj(query_pos)
        k = self.sa_kcontent_proj(tgt) + self.sa_kpos_proj(query_pos)
        attn_out = self.self_attn(q, k, self.sa_v_proj(tgt), attn_mask=self_attn_mask)
        tgt = self.norm1(tgt + self.dropout(attn_out))

        c_q = self.ca_qcontent_proj(tgt)                  # content query   [B, Q, C]
        c_k = self.ca_kcontent_proj(memory)               # content key     [B, N, C]
        p_k = self.ca_kpos_proj(memory_pos)               # spatial key     [B, N, C]
        if self.is_first:
            # Layer 0: no decoder embedding yet to predict lambda_q from, so the learned
            # positional query also enters the content part, DETR-style (c_q + o, c_k + p_k).
            c_q = c_q + self.ca_qpos_proj(query_pos)
            c_k = c_k + p_k
        p_q = self.ca_qpos_sine_proj(query_sine_embed)    # (C3) spatial query [B, Q, C]
        # (C4) [content ; spatial] inside each head: q.k = c_q.c_k + p_q.p_k, scale 1/sqrt(2d).
        # Content can no longer match a position (no c_q.p_k term): where to look is decided
        # by p_q.p_k alone, what to look for by c_q.c_k alone.
        attn_out = self.cross_attn(cat_heads(c_q, p_q, self.heads), cat_heads(c_k, p_k, self.heads),
                                   self.ca_v_proj(memory), pad_mask=pad_mask)
        tgt = self.norm2(tgt + self.dropout(attn_out))
        return self.ffn(tgt)


# ---- Conditional DETR: learned queries with a fixed reference point ----

class ConditionalQueries(nn.Module):
    """Object queries o (nn.Embedding(Q, C)) and their reference points s = sigmoid(FFN(o)) (C1)."""

    def __init__(self, num_queries, dim):
        super().__init__()
        self.dim = dim
        self.query_embed = nn.Embedding(num_queries, dim)     # o: the positional query
        self.ref_point_head = MLP(dim, dim, 2, 2)

    def forward(self, batch_size):
        """-> dict(tgt zeros [B, Q, C], query_pos [B, Q, C], ref_points [B, Q, 2] (x, y) in (0, 1))."""
        query_pos = repeat(self.query_embed.weight, 'q c -> b q c', b=batch_size)
        ref_points = self.ref_point_head(query_pos).sigmoid()           # (C1)
        return dict(tgt=torch.zeros_like(query_pos), query_pos=query_pos, ref_points=ref_points)

    def from_boxes(self, boxes):
        """Queries for given boxes [B, P, 4] cxcywh in [0, 1] (denoising): no parameters.

        The reference point is the box centre and its positional query PE(centre) (C2),
        the encoding a learned query's reference would get. No reference codebase feeds
        denoising queries to Conditional DETR; this is the natural plug.
        Returns dict(query_pos [B, P, C], ref_points [B, P, 2]).
        """
        centres = boxes[..., :2]
        return dict(query_pos=position_sine_embed(centres, self.dim), ref_points=centres)


class ConditionalDecoder(nn.Module):
    """Conditional DETR's decoder stack: lambda_q per layer (C3), reference points fixed.

    Returns hs [L, B, Q, C] (each through the shared final LayerNorm) and box_ref
    [L, B, Q, 2] = logit(s) (eps 1e-5, Conditional DETR's), the same at every layer (C5).
    """

    def __init__(self, layers, dim):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.dim = dim
        self.norm = nn.LayerNorm(dim)
        self.query_scale = MLP(dim, dim, dim, 2)              # lambda_q = FFN(f), (C3)

    def forward(self, tgt, memory, *, memory_pos, pad_mask, query_pos, ref_points, self_attn_mask=None):
        point_embed = position_sine_embed(ref_points, self.dim)        # (C2) p_s [B, Q, C]
        hs = []
        for i, layer in enumerate(self.layers):
            # lambda_q = 1 in layer 0; later, an FFN of the previous output (before the final norm)
            scale = 1.0 if i == 0 else self.query_scale(tgt)
            tgt = layer(tgt, memory, memory_pos=memory_pos, query_pos=query_pos,
                        query_sine_embed=scale * point_embed, pad_mask=pad_mask,
                        self_attn_mask=self_attn_mask)
            hs.append(self.norm(tgt))
        box_ref = inverse_sigmoid(ref_points, eps=1e-5)                # [B, Q, 2] (C5)
        return torch.stack(hs), repeat(box_ref, 'b q box -> l b q box', l=len(hs))


# ---- DAB-DETR / DN-DETR: 4-D anchor boxes refined layer by layer ----

class ScaledPositionEncoder(Encoder):
    """DETR's encoder stack, the positional encoding rescaled per channel before every layer
    by an MLP of the current tokens: pos_l = pos * MLP(x_l) (DAB-DETR's encoder query_scale)."""

    def __init__(self, layers, pos_scale):
        super().__init__(layers)
        self.pos_scale = pos_scale

    def forward(self, src, pos, pad_mask):
        """src, pos: [B, N, C]; pad_mask: [B, N]. Returns memory [B, N, C]."""
        for layer in self.layers:
            src = layer(src, pos * self.pos_scale(src), pad_mask)
        return src


class AnchorQueries(nn.Module):
    """Learned anchor boxes (DAB-DETR): refpoint_embed nn.Embedding(Q, 4) holds logit(x, y, w, h).

    Default N(0, 1) init as DAB-DETR's (anchors spread around the image centre).
    The content query is zero (DN-DETR's denoiser replaces it); there is no learned
    positional query: the decoder derives it from the anchor every layer (D1).
    """

    def __init__(self, num_queries, dim):
        super().__init__()
        self.dim = dim
        self.refpoint_embed = nn.Embedding(num_queries, 4)

    def forward(self, batch_size):
        """-> dict(tgt zeros [B, Q, C], ref_points [B, Q, 4] cxcywh in (0, 1)); no query_pos (D1)."""
        ref_points = repeat(self.refpoint_embed.weight.sigmoid(), 'q box -> b q box', b=batch_size)
        tgt = ref_points.new_zeros(batch_size, ref_points.shape[1], self.dim)
        return dict(tgt=tgt, ref_points=ref_points)

    def from_boxes(self, boxes):
        """Anchors for given boxes [B, P, 4] cxcywh in [0, 1]: dict(ref_points=anchors [B, P, 4]).

        DN-DETR hands the decoder logit(box) (eps 1e-3), so the anchor it sees is
        sigmoid(logit(box)): equal to the box inside [1e-3, 1 - 1e-3], never exactly 0 or 1
        (a zero width would divide by zero in (D3)). The round trip keeps those numerics.
        """
        return dict(ref_points=inverse_sigmoid(boxes, eps=1e-3).sigmoid())


class AnchorDecoder(nn.Module):
    """DAB-DETR's decoder (DN-DETR's `dn_dab_detr` defaults): (D1)-(D5) around the same layer.

    Defaults followed: query_scale_type 'cond_elewise' (lambda_q a C-vector), modulate_hw_attn
    on, keep_query_pos off (only layer 0 has ca_qpos_proj), box head shared over layers.
    bbox_embed: the model's box head MLP(C, C, 4, 3), the same module object, used here
    for (D4); kept as an attribute so the state_dict holds its keys twice, like DAB-DETR's.
    Returns hs [L, B, Q, C] and box_ref [L, B, Q, 4] = logit(anchor fed to layer l), eps 1e-3.
    """

    def __init__(self, layers, dim, bbox_embed):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.dim = dim
        self.norm = nn.LayerNorm(dim)
        self.query_scale = MLP(dim, dim, dim, 2)              # lambda_q, (D2)
        self.ref_point_head = MLP(2 * dim, dim, dim, 2)       # PE(A) [2C] -> P [C], (D1)
        self.ref_anchor_head = MLP(dim, dim, 2, 2)            # (w_ref, h_ref) logits, (D3)
        self.bbox_embed = bbox_embed

    def modulate_hw(self, spatial, anchors, tgt):
        """(D3): spatial [B, Q, C] = [y-part, x-part]; x-part *= w_ref / w, y-part *= h_ref / h."""
        ref_wh = self.ref_anchor_head(tgt).sigmoid()          # [B, Q, 2] (w_ref, h_ref) in (0, 1)
        y_part, x_part = spatial.chunk(2, dim=-1)
        x_part = x_part * (ref_wh[..., :1] / anchors[..., 2:3])
        y_part = y_part * (ref_wh[..., 1:] / anchors[..., 3:4])
        return torch.cat([y_part, x_part], dim=-1)

    def forward(self, tgt, memory, *, memory_pos, pad_mask, ref_points, self_attn_mask=None):
        """ref_points: [B, Q, 4] anchors cxcywh in (0, 1); the positional query is derived (D1)."""
        anchors = ref_points   # this layer's anchor boxes, with their gradient (what box_ref carries)
        hs, box_ref = [], []
        for i, layer in enumerate(self.layers):
            # (D4) layer 0 sees the learned anchors, the later ones their refinement as a constant
            # (no gradient through the chain of anchors); layer i's box loss still reaches the
            # step that made its anchor, through box_ref
            seen = anchors if i == 0 else anchors.detach()
            anchor_embed = position_sine_embed(seen, self.dim)        # PE(A) [B, Q, 2C]
            query_pos = self.ref_point_head(anchor_embed)              # (D1) P [B, Q, C]
            scale = 1.0 if i == 0 else self.query_scale(tgt)           # (D2) lambda_q
            query_sine_embed = self.modulate_hw(scale * anchor_embed[..., :self.dim], seen, tgt)
            tgt = layer(tgt, memory, memory_pos=memory_pos, query_pos=query_pos,
                        query_sine_embed=query_sine_embed, pad_mask=pad_mask,
                        self_attn_mask=self_attn_mask)
            hs.append(self.norm(tgt))
            box_ref.append(inverse_sigmoid(anchors, eps=1e-3))        # (D5) [B, Q, 4]
            if i + 1 < len(self.layers):   # (D4) refined from the output before the final norm
                anchors = (self.bbox_embed(tgt) + inverse_sigmoid(seen, eps=1e-3)).sigmoid()
        return torch.stack(hs), torch.stack(box_ref)


# ---- build ----

def conditional_layers(cfg):
    """The decoder stack of both: one layer deep-copied, as the references build it (equal
    biases in every layer); the copies after layer 0 lose ca_qpos_proj, as the references delete it."""
    layers = clones(ConditionalDecoderLayer(cfg.hidden_dim, cfg.nheads, cfg.dim_feedforward, cfg.dropout,
                                            cfg.activation, is_first=True), cfg.dec_layers)
    for later in layers[1:]:
        later.is_first, later.ca_qpos_proj = False, None
    return layers


def start_boxes_at_reference(bbox_embed):
    """Zero the box head's last layer: every first box is its reference point or anchor (C5, D5)."""
    nn.init.zeros_(bbox_embed.layers[-1].weight)
    nn.init.zeros_(bbox_embed.layers[-1].bias)


def build_conditional_parts(cfg, bbox_embed):
    """Conditional DETR's queries and decoder (cfg.variant 'conditional'), with their init.

    Init as the reference: xavier_uniform on every weight matrix of the decoder and of the
    reference-point head (both in its transformer), not on the learned queries; the box head
    keeps its own init, its last layer zeroed. Returns dict(queries=..., decoder=...).
    """
    start_boxes_at_reference(bbox_embed)
    layers = conditional_layers(cfg)
    queries = ConditionalQueries(cfg.num_queries, cfg.hidden_dim)
    decoder = ConditionalDecoder(layers, cfg.hidden_dim)
    xavier_init(decoder)
    xavier_init(queries.ref_point_head)      # part of the reference's decoder
    return dict(queries=queries, decoder=decoder)


def build_anchor_parts(cfg, bbox_embed):
    """DAB-DETR's anchor queries and decoder (cfg.variant 'dab', and 'dn' = dab + denoising).

    bbox_embed: the model's box head, shared with the anchor decoder for refinement (D4),
    its last layer zeroed; xavier_uniform on the decoder's own weight matrices, as DAB-DETR's
    transformer init, not on the anchors nor on the shared box head. Returns dict(queries, decoder).
    """
    start_boxes_at_reference(bbox_embed)
    layers = conditional_layers(cfg)
    queries = AnchorQueries(cfg.num_queries, cfg.hidden_dim)
    decoder = AnchorDecoder(layers, cfg.hidden_dim, bbox_embed)
    for child in decoder.children():
        if child is not bbox_embed:
            xavier_init(child)
    return dict(queries=queries, decoder=decoder)


def build_anchor_encoder(cfg):
    """DETR's encoder with DAB-DETR's pos_scale (its encoder `query_scale`), xavier-initialised."""
    pos_scale = MLP(cfg.hidden_dim, cfg.hidden_dim, cfg.hidden_dim, 2)   # drawn before the layers
    layer = EncoderLayer(cfg.hidden_dim, cfg.nheads, cfg.dim_feedforward, cfg.dropout, cfg.activation)
    encoder = ScaledPositionEncoder(clones(layer, cfg.enc_layers), pos_scale)
    xavier_init(encoder)
    return encoder
