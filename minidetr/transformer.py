"""The attention function every variant uses, and DETR's encoder and decoder.

DETR (Carion et al., "End-to-End Object Detection with Transformers", ECCV 2020,
arXiv 2005.12872) runs a plain Transformer (Vaswani et al., NeurIPS 2017) over the
backbone's feature map and a set of learned object queries:

    (1) Attention(Q, K, V) = softmax(Q K^T / sqrt(d) + B) V      per head, d = per-head width
    (2) encoder layer:  z = LN(x + SelfAttn(q = k = x + pos, v = x));  out = LN(z + FFN(z))
    (3) decoder layer:  t = LN(t + SelfAttn(q = k = t + query_pos, v = t))
                        t = LN(t + CrossAttn(q = t + query_pos, k = memory + pos, v = memory))
                        out = LN(t + FFN(t))
    (4) FFN(x) = W2 dropout(act(W1 x))

B in (1) is an additive bias: -inf where a key is padding or a query may not look
(denoising groups), log G for SMCA's Gaussian prior, 0 otherwise. The positional
encodings are added to queries and keys at every layer, never to the values, and the
layers are post-norm (LayerNorm after the residual sum), DETR's default.

Every variant computes attention through `attention` below: Conditional DETR changes the
*inputs* (queries and keys concatenated per head), SMCA adds a bias, DN-DETR passes a
mask. None of them re-implements the softmax. Underneath is
torch.nn.functional.scaled_dot_product_attention, which picks a fused kernel when it can.
"""
import copy

import torch
import torch.nn.functional as F
from einops import einsum, rearrange, repeat
from torch import nn


# ---- the one attention function ----

def _additive_mask(pad_mask, attn_mask, bias, dtype):
    """Fold padding mask, blocking mask and bias into one float [B|1, h|1, Q|1, N] term."""
    mask = torch.zeros((), dtype=dtype, device=_device_of(pad_mask, attn_mask, bias))
    if bias is not None:
        mask = mask + bias.to(dtype)
    blocked = None
    if pad_mask is not None:
        blocked = rearrange(pad_mask, 'b n -> b 1 1 n')            # True = padded key
    if attn_mask is not None:
        m = attn_mask if attn_mask.dim() == 3 else attn_mask[None]  # [B|1, Q, N]
        m = rearrange(m, 'b q n -> b 1 q n')
        blocked = m if blocked is None else (blocked | m)
    if blocked is not None:
        mask = mask.masked_fill(blocked, float('-inf'))
    return mask


def _device_of(*tensors):
    return next(t.device for t in tensors if t is not None)


def attention(q, k, v, heads, pad_mask=None, attn_mask=None, bias=None, dropout_p=0.0):
    """Multi-head scaled dot-product attention on already-projected inputs, Eq. (1).

    q: [B, Q, h*dq], k: [B, N, h*dq], v: [B, N, h*dv]. The per-head query/key width dq may
    differ from the value width dv (Conditional DETR concatenates two 32-d halves, dq = 64,
    dv = 32); the scale is 1/sqrt(dq).
    pad_mask: [B, N] bool, True on padded keys. attn_mask: [Q, N] or [B, Q, N] bool, True
    where a query may NOT look. bias: float, broadcastable to [B, h, Q, N], added to the
    logits before the softmax. Returns [B, Q, h*dv].
    """
    q, k, v = (rearrange(t, 'b n (h d) -> b h n d', h=heads) for t in (q, k, v))
    mask = None
    if pad_mask is not None or attn_mask is not None or bias is not None:
        mask = _additive_mask(pad_mask, attn_mask, bias, q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    return rearrange(out, 'b h q d -> b q (h d)')


def attention_weights(q, k, heads, pad_mask=None, attn_mask=None, bias=None):
    """The softmax of Eq. (1) written out, for inspection: softmax(Q K^T / sqrt(d) + B).

    Same q, k, masks and bias as `attention` (no values); returns [B, h, Q, N], each row a
    distribution over the keys (0 where blocked). The fused kernel `attention` calls does
    not return its weights, so the attention modules' `attention_maps` recompute them here.
    """
    q, k = (rearrange(t, 'b n (h d) -> b h n d', h=heads) for t in (q, k))
    logits = einsum(q, k, 'b h q d, b h n d -> b h q n') / q.shape[-1] ** 0.5
    if pad_mask is not None or attn_mask is not None or bias is not None:
        logits = logits + _additive_mask(pad_mask, attn_mask, bias, q.dtype)
    return logits.softmax(-1)                                            # [B, h, Q, N]


def cat_heads(a, b, heads):
    """Concatenate two tensors inside each head: [B, N, h*da], [B, N, h*db] -> [B, N, h*(da+db)].

    With q = cat_heads(c_q, p_q) and k = cat_heads(c_k, p_k), the per-head dot product is
    q.k = c_q.c_k + p_q.p_k: content and position are compared separately and summed.
    """
    a = rearrange(a, 'b n (h d) -> b n h d', h=heads)
    b = rearrange(b, 'b n (h d) -> b n h d', h=heads)
    return rearrange(torch.cat([a, b], dim=-1), 'b n h d -> b n (h d)')


class MultiheadAttention(nn.Module):
    """Projections around `attention`: q, k, v each [B, *, C] -> [B, Q, C].

    Separate q/k/v Linear layers (torch's nn.MultiheadAttention packs them into one
    `in_proj_weight` [3C, C]; checkpoint conversion splits that into these three).
    `attention_maps` takes forward's arguments and returns what its softmax weighed; every
    attention module has one, for recorders hooked onto it (draw.record_attention).
    """

    def __init__(self, dim, heads, dropout=0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout     # dim % heads == 0: checked by Config.validate
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.out_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self):
        """nn.MultiheadAttention's init, which every reference uses for this block.

        torch keeps q, k, v as one packed `in_proj_weight` [3C, C] and draws it with ONE
        xavier_uniform, whose fan is C + 3C = 4C: std sqrt(2 / 4C), 1/sqrt(2) of what three
        separate [C, C] draws give (sqrt(2 / 2C)). At C = 128 that is 0.0625 against 0.088,
        so separate draws would start every attention logit q.k about 2x larger. Drawing the
        packed matrix and splitting it keeps the reference's distribution. out_proj: xavier
        [C, C] (DETR's _reset_parameters redraws it); all biases 0, as torch sets them.
        """
        dim = self.q_proj.in_features
        packed = nn.init.xavier_uniform_(torch.empty(3 * dim, dim))              # [3C, C]
        with torch.no_grad():
            for lin, weight in zip((self.q_proj, self.k_proj, self.v_proj), packed.chunk(3)):
                lin.weight.copy_(weight)
        nn.init.xavier_uniform_(self.out_proj.weight)
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.zeros_(lin.bias)

    def forward(self, query, key, value, pad_mask=None, attn_mask=None, bias=None):
        attn_out = attention(self.q_proj(query), self.k_proj(key), self.v_proj(value), self.heads,
                             pad_mask=pad_mask, attn_mask=attn_mask, bias=bias,
                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(attn_out)

    def attention_maps(self, query, key, value, pad_mask=None, attn_mask=None, bias=None):
        """forward's softmax weights, recomputed: (weights [B, h, Q, N], bias [B, h, Q, N] or None).

        The bias (SMCA's log G) is returned beside the weights it shaped, to draw it too.
        """
        weights = attention_weights(self.q_proj(query), self.k_proj(key), self.heads,
                                    pad_mask=pad_mask, attn_mask=attn_mask, bias=bias)
        return weights, None if bias is None else bias.expand_as(weights)


class MLP(nn.Module):
    """num_layers Linear layers with ReLU between them (DETR's box head and small MLPs)."""

    def __init__(self, in_dim, hidden_dim, out_dim, num_layers):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


def make_activation(name):
    """'relu' (DETR) or 'prelu' (DAB-/DN-DETR: one learnable slope per layer)."""
    if name == "relu":
        return nn.ReLU()
    if name == "prelu":
        return nn.PReLU()
    raise ValueError(f"unknown activation {name!r}: expected 'relu' or 'prelu'")


# ---- layers ----

class FeedForward(nn.Module):
    """Eq. (4) with its residual and LayerNorm: out = LN(x + dropout(W2 dropout(act(W1 x))))."""

    def __init__(self, dim, dim_feedforward, dropout, activation):
        super().__init__()
        self.linear1, self.linear2 = nn.Linear(dim, dim_feedforward), nn.Linear(dim_feedforward, dim)
        self.activation = make_activation(activation)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        ffn_out = self.linear2(self.dropout(self.activation(self.linear1(x))))
        return self.norm(x + self.dropout(ffn_out))


class EncoderLayer(nn.Module):
    """Eq. (2): self-attention over the image tokens, then the FFN; post-norm."""

    def __init__(self, dim, heads, dim_feedforward, dropout=0.1, activation="relu"):
        super().__init__()
        self.self_attn = MultiheadAttention(dim, heads, dropout)
        self.norm1, self.dropout = nn.LayerNorm(dim), nn.Dropout(dropout)
        self.ffn = FeedForward(dim, dim_feedforward, dropout, activation)

    def forward(self, src, pos, pad_mask=None):
        """src, pos: [B, N, C]; pad_mask: [B, N] True on padding. Returns [B, N, C]."""
        q = k = src + pos                                     # position in q and k, not v
        attn_out = self.self_attn(q, k, src, pad_mask=pad_mask)
        src = self.norm1(src + self.dropout(attn_out))
        return self.ffn(src)


class DecoderLayer(nn.Module):
    """Eq. (3): self-attention among queries, cross-attention to the memory, FFN; post-norm.

    `cross_bias` ([B, h, Q, N]) is the seam SMCA uses to add log G to the cross-attention
    logits; `self_attn_mask` ([Q, Q], True = blocked) is the one DN-DETR uses to keep
    denoising groups apart. `cross_kwargs` go untouched to `self.cross_attn`: DETR passes
    none; a variant that swaps in a cross-attention module taking more than one bias
    (SMCA's multi-scale `prior`) passes that module's own arguments there.
    """

    def __init__(self, dim, heads, dim_feedforward, dropout=0.1, activation="relu"):
        super().__init__()
        self.self_attn = MultiheadAttention(dim, heads, dropout)
        self.cross_attn = MultiheadAttention(dim, heads, dropout)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.ffn = FeedForward(dim, dim_feedforward, dropout, activation)

    def forward(self, tgt, memory, *, memory_pos, query_pos, pad_mask=None, self_attn_mask=None,
                cross_bias=None, **cross_kwargs):
        """tgt, query_pos: [B, Q, C]; memory, memory_pos: [B, N, C]. Returns [B, Q, C]."""
        q = k = tgt + query_pos
        attn_out = self.self_attn(q, k, tgt, attn_mask=self_attn_mask)
        tgt = self.norm1(tgt + self.dropout(attn_out))
        attn_out = self.cross_attn(tgt + query_pos, memory + memory_pos, memory,
                                   pad_mask=pad_mask, bias=cross_bias, **cross_kwargs)
        tgt = self.norm2(tgt + self.dropout(attn_out))
        return self.ffn(tgt)


# ---- stacks ----

class Encoder(nn.Module):
    """A stack of encoder layers, Eq. (2) repeated; the same positional encoding at every layer."""

    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, src, pos, pad_mask):
        """src, pos: [B, N, C]; pad_mask: [B, N]. Returns memory [B, N, C]."""
        for layer in self.layers:
            src = layer(src, pos, pad_mask)
        return src


class Decoder(nn.Module):
    """DETR's decoder stack: the same learned query_pos at every layer, no reference points.

    Returns every layer's output through one shared final LayerNorm (DETR normalises the
    intermediate outputs too, so the shared heads see the same statistics at every depth):
    hs [L, B, Q, C], and box_ref None (the box head predicts absolute boxes).
    """

    def __init__(self, layers, dim):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tgt, memory, *, memory_pos, pad_mask, query_pos, self_attn_mask=None):
        hs = []
        for layer in self.layers:
            tgt = layer(tgt, memory, memory_pos=memory_pos, query_pos=query_pos,
                        pad_mask=pad_mask, self_attn_mask=self_attn_mask)
            hs.append(self.norm(tgt))
        return torch.stack(hs), None


class LearnedQueries(nn.Module):
    """DETR's object queries: a learned positional query per slot, content starting at 0."""

    def __init__(self, num_queries, dim):
        super().__init__()
        self.query_embed = nn.Embedding(num_queries, dim)

    def forward(self, batch_size):
        """-> the decoder's query inputs: dict(tgt [B, Q, D] zeros, query_pos [B, Q, D])."""
        query_pos = repeat(self.query_embed.weight, 'q c -> b q c', b=batch_size)
        return dict(tgt=torch.zeros_like(query_pos), query_pos=query_pos)

    def from_boxes(self, boxes):
        raise NotImplementedError("denoising needs queries that carry a reference point or box "
                                  "(variant conditional or dn); DETR's and SMCA's learned queries "
                                  "have none (SMCA predicts its centres inside the decoder)")


def xavier_init(module):
    """DETR's transformer init: xavier_uniform on every weight matrix (dim > 1).

    A MultiheadAttention inside is drawn as torch's packed [3C, C] in-projection (see its
    reset_parameters), the matrix the reference's loop meets there, not as three [C, C].
    """
    if isinstance(module, MultiheadAttention):
        module.reset_parameters()
        return
    for p in module.parameters(recurse=False):
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)
    for child in module.children():
        xavier_init(child)


def clones(layer, n):
    """n deep copies of one layer, as the references' _get_clones builds their stacks.

    Copies start equal; xavier_init then redraws every weight matrix per layer, so what stays
    shared is what it leaves alone: each Linear's bias (PyTorch's default uniform draw),
    equal in every layer of a reference model, and so here.
    """
    return [copy.deepcopy(layer) for _ in range(n)]


# ---- build ----

def build_encoder(cfg):
    """DETR's encoder: one layer deep-copied enc_layers times, then xavier_uniform (DETR's init)."""
    layer = EncoderLayer(cfg.hidden_dim, cfg.nheads, cfg.dim_feedforward, cfg.dropout, cfg.activation)
    encoder = Encoder(clones(layer, cfg.enc_layers))
    xavier_init(encoder)
    return encoder


def build_parts(cfg, bbox_embed):
    """DETR's learned queries and decoder (cfg.variant 'detr'); bbox_embed keeps its init.

    Returns dict(queries=..., decoder=...), the decoder xavier-initialised.
    """
    layers = clones(DecoderLayer(cfg.hidden_dim, cfg.nheads, cfg.dim_feedforward, cfg.dropout,
                                 cfg.activation), cfg.dec_layers)
    decoder = Decoder(layers, cfg.hidden_dim)
    xavier_init(decoder)
    return dict(queries=LearnedQueries(cfg.num_queries, cfg.hidden_dim), decoder=decoder)
