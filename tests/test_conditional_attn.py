"""conditional_attn: conditional cross-attention against per-head float64 loops, the sine
embedding of points/boxes against math.sin/cos, the first-layer exception, box_ref and the
DAB anchor refinement / w-h modulation computed by hand, at hidden_dim 16, 64 and 256."""
import math
from types import SimpleNamespace

import pytest
import torch

from minidetr.conditional_attn import (AnchorDecoder, AnchorQueries, ConditionalDecoder,
                                       ConditionalDecoderLayer, ConditionalQueries, ScaledPositionEncoder,
                                       build_anchor_parts, build_conditional_parts,
                                       position_sine_embed)
from minidetr.transformer import MLP, Encoder, EncoderLayer

B, Q, N, D, H = 2, 5, 12, 16, 4


def unpack(queries):
    """A queries module's dict -> (tgt, query_pos, ref_points), None where it has none."""
    return queries.get("tgt"), queries.get("query_pos"), queries.get("ref_points")


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def uniform(*shape, seed=0, lo=0.05, hi=0.95):
    u = torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return lo + (hi - lo) * u


def config(variant, dim=D, heads=H, layers=3):
    return SimpleNamespace(variant=variant, hidden_dim=dim, nheads=heads, dim_feedforward=2 * dim,
                           dropout=0.0, activation="relu", dec_layers=layers, num_queries=Q)


def naive_sine(value, feats):
    """DETR's sine encoding of one scalar, written out: [sin a_0, cos a_0, sin a_1, ...]."""
    out = []
    for j in range(feats):
        a = value * 2 * math.pi / 10000 ** (2 * (j // 2) / feats)
        out.append(math.sin(a) if j % 2 == 0 else math.cos(a))
    return out


def naive_embed(coords, dim):
    """[..., r] -> [..., r * dim/2]: blocks [y, x] or [y, x, w, h], dim/2 channels each."""
    flat = coords.reshape(-1, coords.shape[-1]).tolist()
    rows = []
    for c in flat:
        order = [c[1], c[0]] + c[2:]
        rows.append([v for value in order for v in naive_sine(value, dim // 2)])
    return torch.tensor(rows, dtype=torch.float64).reshape(*coords.shape[:-1], -1)


def naive_logit(p, eps):
    return math.log(max(min(max(p, 0.0), 1.0), eps) / max(1 - min(max(p, 0.0), 1.0), eps))


def naive_layer_norm(x, norm):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def capture_inputs(module, store):
    """Record every call's keyword arguments (the decoders call layers with keywords)."""
    return module.register_forward_pre_hook(lambda m, args, kwargs: store.append(kwargs), with_kwargs=True)


def capture_outputs(module, store):
    return module.register_forward_hook(lambda m, args, out: store.append(out))


def inputs(dim=D, seed=10):
    memory, memory_pos = rand(B, N, dim, seed=seed), rand(B, N, dim, seed=seed + 1)
    pad = torch.zeros(B, N, dtype=torch.bool)
    pad[0, 8:] = True                                   # image 0: last 4 tokens are padding
    return memory, memory_pos, pad


def randomise_final_norm(decoder, dim):
    """A fresh LayerNorm applied to a LayerNorm output is the identity; make using it (or not) visible."""
    with torch.no_grad():
        decoder.norm.weight.copy_(uniform(dim, seed=11, lo=0.5, hi=2.0))
        decoder.norm.bias.copy_(rand(dim, seed=12))
    return decoder


def conditional_parts(dim=D, heads=H, layers=3):
    torch.manual_seed(0)
    parts = build_conditional_parts(config("conditional", dim, heads, layers), MLP(dim, dim, 4, 3))
    return parts["queries"].double().eval(), randomise_final_norm(parts["decoder"].double().eval(), dim)


def anchor_parts(dim=D, heads=H, layers=3):
    torch.manual_seed(0)
    bbox_embed = MLP(dim, dim, 4, 3)
    parts = build_anchor_parts(config("dn", dim, heads, layers), bbox_embed)
    torch.nn.init.normal_(bbox_embed.layers[-1].weight, std=0.1)   # not the zero init: refinement
    torch.nn.init.normal_(bbox_embed.layers[-1].bias, std=0.1)     # deltas must not be 0 here
    return parts["queries"].double().eval(), randomise_final_norm(parts["decoder"].double().eval(), dim)


def run(queries, decoder, dim=D, self_attn_mask=None):
    memory, memory_pos, pad = inputs(dim)
    return decoder(memory=memory, memory_pos=memory_pos, pad_mask=pad, self_attn_mask=self_attn_mask,
                   **queries(B))


# ---- the layer ----

def naive_conditional_attention(c_q, p_q, c_k, p_k, v, heads, pad_mask):
    """softmax((c_q.c_k + p_q.p_k) / sqrt(2d)) v, one image, head and query at a time."""
    d = c_q.shape[-1] // heads
    out = torch.zeros(c_q.shape[0], c_q.shape[1], v.shape[-1], dtype=torch.float64)
    for b in range(c_q.shape[0]):
        for h in range(heads):
            sl = slice(h * d, (h + 1) * d)
            for i in range(c_q.shape[1]):
                logits = []
                for j in range(c_k.shape[1]):
                    s = ((c_q[b, i, sl] * c_k[b, j, sl]).sum().item()
                         + (p_q[b, i, sl] * p_k[b, j, sl]).sum().item())
                    logits.append(-math.inf if pad_mask[b, j] else s / math.sqrt(2 * d))
                m = max(logits)
                w = [math.exp(s - m) for s in logits]
                for j in range(c_k.shape[1]):
                    out[b, i, sl] += w[j] / sum(w) * v[b, j, sl]
    return out


@pytest.mark.parametrize("is_first", [True, False])
def test_cross_attention_matches_per_head_loops(is_first):
    """Cross-attention = per-head softmax((c_q.c_k + p_q.p_k)/sqrt(2d)) v with padding; layer 0
    also adds ca_qpos_proj(query_pos) to c_q and p_k to c_k."""
    torch.manual_seed(1)
    layer = ConditionalDecoderLayer(D, H, 32, dropout=0.0, is_first=is_first).double().eval()
    memory, memory_pos, pad = inputs()
    tgt, query_pos, sine = rand(B, Q, D, seed=1), rand(B, Q, D, seed=2), rand(B, Q, D, seed=3)
    after_self, attn_in = [], []
    capture_outputs(layer.norm1, after_self)
    layer.cross_attn.out_proj.register_forward_pre_hook(lambda m, args: attn_in.append(args[0]))
    with torch.no_grad():
        layer(tgt, memory, memory_pos=memory_pos, query_pos=query_pos, query_sine_embed=sine, pad_mask=pad)
        t = after_self[0]
        c_q, c_k = layer.ca_qcontent_proj(t), layer.ca_kcontent_proj(memory)
        p_k, p_q = layer.ca_kpos_proj(memory_pos), layer.ca_qpos_sine_proj(sine)
        if is_first:
            c_q, c_k = c_q + layer.ca_qpos_proj(query_pos), c_k + p_k
        ref = naive_conditional_attention(c_q, p_q, c_k, p_k, layer.ca_v_proj(memory), H, pad)
    assert torch.allclose(attn_in[0], ref, atol=1e-10)


def test_self_attention_matches_loops_with_blocking_mask():
    """Self-attention: q = Wqc t + Wqp p, k = Wkc t + Wkp p, v = Wv t, blocked pairs get no weight."""
    torch.manual_seed(2)
    layer = ConditionalDecoderLayer(D, H, 32, dropout=0.0, is_first=False).double().eval()
    memory, memory_pos, pad = inputs()
    tgt, query_pos, sine = rand(B, Q, D, seed=4), rand(B, Q, D, seed=5), rand(B, Q, D, seed=6)
    block = torch.zeros(Q, Q, dtype=torch.bool)
    block[:3, 3:] = True                                # queries 0-2 may not see 3-4 (a DN-style mask)
    attn_in = []
    layer.self_attn.out_proj.register_forward_pre_hook(lambda m, args: attn_in.append(args[0]))
    with torch.no_grad():
        layer(tgt, memory, memory_pos=memory_pos, query_pos=query_pos, query_sine_embed=sine,
              self_attn_mask=block)
        q = layer.sa_qcontent_proj(tgt) + layer.sa_qpos_proj(query_pos)
        k = layer.sa_kcontent_proj(tgt) + layer.sa_kpos_proj(query_pos)
        v = layer.sa_v_proj(tgt)
    d = D // H
    for b in range(B):
        for h in range(H):
            sl = slice(h * d, (h + 1) * d)
            for i in range(Q):
                allowed = [j for j in range(Q) if not block[i, j]]
                s = [(q[b, i, sl] * k[b, j, sl]).sum().item() / math.sqrt(d) for j in allowed]
                w = [math.exp(x - max(s)) for x in s]
                expected = sum(wj / sum(w) * v[b, j, sl] for wj, j in zip(w, allowed))
                assert torch.allclose(attn_in[0][b, i, sl], expected, atol=1e-10)


def test_only_layer_zero_has_ca_qpos_proj():
    """Layer 0 owns ca_qpos_proj; later layers have none (checkpoint keys as the reference)."""
    _, decoder = conditional_parts()
    keys = [set(layer.state_dict()) for layer in decoder.layers]
    assert {"ca_qpos_proj.weight", "ca_qpos_proj.bias"} <= keys[0]
    assert all(not any(k.startswith("ca_qpos_proj") for k in ks) for ks in keys[1:])
    assert keys[0] - keys[1] == {"ca_qpos_proj.weight", "ca_qpos_proj.bias"}
    for name in ("sa_qcontent_proj", "sa_qpos_proj", "sa_kcontent_proj", "sa_kpos_proj", "sa_v_proj",
                 "self_attn.out_proj", "ca_qcontent_proj", "ca_kcontent_proj", "ca_kpos_proj",
                 "ca_v_proj", "ca_qpos_sine_proj", "cross_attn.out_proj", "norm1", "norm2",
                 "ffn.linear1", "ffn.linear2", "ffn.norm"):
        assert f"{name}.weight" in keys[1]


# ---- sine embedding ----

def test_sine_embed_of_a_point_and_a_box_by_hand():
    """PE((x, y)) = [PE(y), PE(x)], PE((x, y, w, h)) = [PE(y), PE(x), PE(w), PE(h)], C/2 each, T=10000."""
    point = torch.tensor([[0.3, 0.7]], dtype=torch.float64)
    expected = naive_sine(0.7, 8) + naive_sine(0.3, 8)
    assert torch.allclose(position_sine_embed(point, 16)[0], torch.tensor(expected, dtype=torch.float64))
    # spot values written out: channel 0 = sin(2 pi 0.7), channel 3 = cos(2 pi 0.7 / 10000^(2/8))
    assert math.isclose(expected[0], math.sin(2 * math.pi * 0.7))
    assert math.isclose(expected[3], math.cos(2 * math.pi * 0.7 / 10000 ** 0.25))
    box = torch.tensor([[0.3, 0.7, 0.2, 0.5]], dtype=torch.float64)
    expected = naive_sine(0.7, 8) + naive_sine(0.3, 8) + naive_sine(0.2, 8) + naive_sine(0.5, 8)
    assert torch.allclose(position_sine_embed(box, 16)[0], torch.tensor(expected, dtype=torch.float64))


# ---- Conditional DETR ----

def test_conditional_queries_by_hand():
    """ref = sigmoid(W2 relu(W1 o + b1) + b2); from_boxes: PE(centre) and the centre, no parameters."""
    queries, _ = conditional_parts()
    tgt, query_pos, ref = unpack(queries(B))
    o = queries.query_embed.weight
    l1, l2 = queries.ref_point_head.layers
    hidden = (o @ l1.weight.T + l1.bias).clamp(min=0)
    expected = 1 / (1 + torch.exp(-(hidden @ l2.weight.T + l2.bias)))
    assert torch.allclose(ref, expected.expand(B, Q, 2)) and torch.equal(query_pos[1], o)
    assert torch.equal(tgt, torch.zeros(B, Q, D, dtype=torch.float64))
    boxes = uniform(B, 3, 4, seed=5)
    pos, centre = unpack(queries.from_boxes(boxes))[1:]
    assert torch.equal(centre, boxes[..., :2])
    assert torch.allclose(pos, naive_embed(boxes[..., :2], D))


def test_lambda_is_one_in_layer_zero_then_ffn_of_previous_output():
    """Layer 0's spatial input is PE(s) whatever query_scale holds; layer 1's is
    query_scale(layer-0 output before the final norm) * PE(s)."""
    queries, decoder = conditional_parts()
    with torch.no_grad():
        hs, _ = run(queries, decoder)
        for p in decoder.query_scale.parameters():
            p.add_(0.5)
        calls, outs = [], []
        capture_inputs(decoder.layers[1], calls)
        capture_outputs(decoder.layers[0], outs)
        hs2, _ = run(queries, decoder)
        ref = queries(B)["ref_points"]
        lam = decoder.query_scale(outs[0])
    assert torch.allclose(hs[0], hs2[0], atol=1e-12)
    assert not torch.allclose(hs[1], hs2[1], atol=1e-6)
    assert torch.allclose(calls[0]["query_sine_embed"], lam * naive_embed(ref, D))


def test_conditional_box_ref_is_logit_of_reference():
    """box_ref[l] = log(s / (1 - s)) at every layer, clamped at eps = 1e-5."""
    queries, decoder = conditional_parts()
    memory, memory_pos, pad = inputs()
    tgt, query_pos, _ = unpack(queries(B))
    ref = uniform(B, Q, 2, seed=3)
    ref[0, 0, 0], ref[1, 2, 1] = 0.0, 1.0               # on the boundary: clamped, still finite
    hs, box_ref = decoder(tgt, memory, memory_pos=memory_pos, pad_mask=pad, query_pos=query_pos,
                          ref_points=ref)
    expected = torch.tensor([[[naive_logit(p, 1e-5) for p in pt] for pt in img] for img in ref.tolist()],
                            dtype=torch.float64)
    assert box_ref.shape == (3, B, Q, 2) and hs.shape == (3, B, Q, D)
    for layer_ref in box_ref:
        assert torch.allclose(layer_ref, expected)
    assert math.isclose(expected[0, 0, 0].item(), math.log(1e-5))


@pytest.mark.parametrize("parts", [conditional_parts, anchor_parts])
def test_hs_is_each_layer_output_through_the_shared_final_norm(parts):
    """hs[l] = LayerNorm_final(output of layer l), written out (both decoders)."""
    queries, decoder = parts()
    outs = []
    for layer in decoder.layers:
        capture_outputs(layer, outs)
    with torch.no_grad():
        hs, _ = run(queries, decoder)
    for l, out in enumerate(outs):
        assert torch.allclose(hs[l], naive_layer_norm(out, decoder.norm), atol=1e-10)


def test_padding_tokens_do_not_change_the_queries():
    """Memory under the padding mask can change freely without changing any decoder output."""
    queries, decoder = conditional_parts()
    memory, memory_pos, pad = inputs()
    tgt, query_pos, ref = unpack(queries(B))
    kwargs = dict(memory_pos=memory_pos, pad_mask=pad, query_pos=query_pos, ref_points=ref)
    with torch.no_grad():
        hs, _ = decoder(tgt, memory, **kwargs)
        memory2 = memory.clone()
        memory2[0, 8:] += 50.0
        kwargs["memory_pos"] = memory_pos.clone()
        kwargs["memory_pos"][0, 8:] -= 30.0
        hs2, _ = decoder(tgt, memory2, **kwargs)
    assert torch.allclose(hs, hs2, atol=1e-10)


# ---- DAB-DETR anchors ----

def test_anchor_queries():
    """ref = 1/(1+exp(-weight)), no query_pos, zero content; from_boxes keeps boxes inside [1e-3, 1-1e-3]."""
    queries, _ = anchor_parts()
    tgt, query_pos, ref = unpack(queries(B))
    w = queries.refpoint_embed.weight
    assert query_pos is None and torch.equal(tgt, torch.zeros(B, Q, D, dtype=torch.float64))
    assert torch.allclose(ref, (1 / (1 + torch.exp(-w))).expand(B, Q, 4))
    boxes = uniform(B, 3, 4, seed=7)
    pos, anchors = unpack(queries.from_boxes(boxes))[1:]
    assert pos is None and torch.allclose(anchors, boxes, atol=1e-12)
    boxes[0, 0, 2] = 0.0                                 # a zero width becomes DN-DETR's ~1e-3
    assert math.isclose(queries.from_boxes(boxes)["ref_points"][0, 0, 2].item(), 1e-3 / (1 + 1e-3))


def test_anchor_positional_query_and_first_box_ref_by_hand():
    """Layer 0: P = ref_point_head(PE(A) with [y, x, w, h] blocks), box_ref[0] = logit(A) (eps 1e-3)."""
    queries, decoder = anchor_parts()
    calls = []
    capture_inputs(decoder.layers[0], calls)
    with torch.no_grad():
        _, box_ref = run(queries, decoder)
        anchors = queries(B)["ref_points"]
        expected_pos = decoder.ref_point_head(naive_embed(anchors, D))
    assert torch.allclose(calls[0]["query_pos"], expected_pos, atol=1e-12)
    expected = torch.tensor([[[naive_logit(p, 1e-3) for p in a] for a in img] for img in anchors.tolist()],
                            dtype=torch.float64)
    assert box_ref.shape == (3, B, Q, 4) and torch.allclose(box_ref[0], expected)


def test_anchor_refinement_by_hand():
    """A_{l+1} = sigmoid(bbox_embed(layer-l output before the norm) + logit(A_l)): it is what
    box_ref[l+1] holds and what layer l+1's positional query is made from."""
    queries, decoder = anchor_parts()
    calls, outs = [], []
    capture_inputs(decoder.layers[1], calls)
    capture_outputs(decoder.layers[0], outs)
    with torch.no_grad():
        _, box_ref = run(queries, decoder)
        a0 = queries(B)["ref_points"]
        delta = decoder.bbox_embed(outs[0])
    logit_a1 = torch.tensor([[[d + naive_logit(p, 1e-3) for d, p in zip(dq, aq)]
                              for dq, aq in zip(db, ab)] for db, ab in zip(delta.tolist(), a0.tolist())],
                            dtype=torch.float64)
    a1 = 1 / (1 + torch.exp(-logit_a1))
    assert delta.abs().max() > 1e-3                      # the test means something
    assert torch.allclose(box_ref[1], logit_a1, atol=1e-10)
    with torch.no_grad():
        assert torch.allclose(calls[0]["query_pos"], decoder.ref_point_head(naive_embed(a1, D)), atol=1e-10)


def test_anchors_fed_to_the_next_layer_are_detached():
    """No gradient reaches bbox_embed through later layers' outputs (anchors are constants there),
    while box_ref[1] itself keeps its gradient to bbox_embed, as DAB-DETR returns it."""
    queries, decoder = anchor_parts()
    hs, box_ref = run(queries, decoder)
    params = list(decoder.bbox_embed.parameters())
    grads = torch.autograd.grad(hs[1:].sum(), params, allow_unused=True, retain_graph=True)
    assert all(g is None for g in grads)
    grads = torch.autograd.grad(box_ref[1].sum(), params, allow_unused=True, retain_graph=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    # layer 0 itself sees the learned anchors with their gradient (refpoint_embed is trained)
    (g,) = torch.autograd.grad(hs[0].sum(), [queries.refpoint_embed.weight])
    assert g.abs().sum() > 0


def force_ref_wh(decoder, w_ref, h_ref):
    """Make sigmoid(ref_anchor_head(f)) = (w_ref, h_ref) for every input."""
    last = decoder.ref_anchor_head.layers[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([math.log(w_ref / (1 - w_ref)), math.log(h_ref / (1 - h_ref))]))


@pytest.mark.parametrize("w_ref, h_ref, x_factor, y_factor", [(0.3, 0.6, 1.0, 1.0),    # identity
                                                              (0.6, 0.15, 2.0, 0.25)])
def test_hw_modulation_scales_x_by_w_and_y_by_h(w_ref, h_ref, x_factor, y_factor):
    """Layer-0 spatial input = [PE(y) * h_ref/h, PE(x) * w_ref/w]: identity when (w_ref, h_ref) = (w, h)."""
    queries, decoder = anchor_parts()
    memory, memory_pos, pad = inputs()
    anchors = uniform(B, Q, 4, seed=8)
    anchors[..., 2], anchors[..., 3] = 0.3, 0.6           # every anchor w = 0.3, h = 0.6
    force_ref_wh(decoder, w_ref, h_ref)
    calls = []
    capture_inputs(decoder.layers[0], calls)
    tgt = torch.zeros(B, Q, D, dtype=torch.float64)
    with torch.no_grad():
        decoder(tgt, memory, memory_pos=memory_pos, pad_mask=pad, ref_points=anchors)
    pe = naive_embed(anchors[..., :2], D)                 # [PE(y), PE(x)]
    expected = torch.cat([pe[..., :D // 2] * y_factor, pe[..., D // 2:] * x_factor], dim=-1)
    assert torch.allclose(calls[0]["query_sine_embed"], expected, atol=1e-10)


def test_build_parts_shares_the_box_head_and_leaves_its_init():
    """Each variant gets its parts; the anchor decoder holds the model's bbox_embed itself (both
    state_dict keys), not xavier-redrawn: only its last layer zeroed (boxes start at the anchors)."""
    bbox_embed = MLP(D, D, 4, 3)
    torch.nn.init.zeros_(bbox_embed.layers[-1].weight)    # DAB's zero-init of the last layer
    torch.nn.init.zeros_(bbox_embed.layers[-1].bias)
    before = {k: v.clone() for k, v in bbox_embed.state_dict().items()}
    parts = build_anchor_parts(config("dn"), bbox_embed)
    assert isinstance(parts["queries"], AnchorQueries) and isinstance(parts["decoder"], AnchorDecoder)
    decoder = parts["decoder"]
    assert decoder.bbox_embed is bbox_embed
    assert all(torch.equal(before[k], v) for k, v in bbox_embed.state_dict().items())
    keys = decoder.state_dict()
    assert "bbox_embed.layers.2.weight" in keys and keys["ref_point_head.layers.0.weight"].shape == (D, 2 * D)
    assert "ca_qpos_proj.weight" not in "".join(k for k in keys if k.startswith("layers.1."))
    parts = build_conditional_parts(config("conditional"), bbox_embed)
    assert isinstance(parts["queries"], ConditionalQueries) and isinstance(parts["decoder"], ConditionalDecoder)
    assert "bbox_embed.layers.0.weight" not in parts["decoder"].state_dict()
    assert torch.all(bbox_embed.layers[-1].weight == 0) and torch.all(bbox_embed.layers[-1].bias == 0)


def test_encoder_pos_scale_rescales_positions():
    """With pos_scale returning ones, the DAB encoder equals the DETR encoder."""
    torch.manual_seed(0)
    layers = [EncoderLayer(D, H, 32, dropout=0.0) for _ in range(2)]
    plain = Encoder(layers).double()
    ones = ScaledPositionEncoder(layers, pos_scale=lambda x: torch.ones_like(x)).double()
    src, pos = rand(B, 12, D, seed=16), rand(B, 12, D, seed=17)
    assert torch.allclose(plain(src, pos, None), ones(src, pos, None))


# ---- any hidden size ----

@pytest.mark.parametrize("dim", [16, 64, 256])
def test_works_at_any_hidden_dim(dim):
    """At hidden_dim 16/64/256 both decoders run and their layer-0 spatial inputs are the hand PE
    (the references hard-code 128 channels per coordinate)."""
    memory, memory_pos, pad = inputs(dim)
    queries, decoder = conditional_parts(dim, layers=2)
    calls = []
    capture_inputs(decoder.layers[0], calls)
    with torch.no_grad():
        hs, box_ref = run(queries, decoder, dim)
    assert hs.shape == (2, B, Q, dim) and box_ref.shape == (2, B, Q, 2) and torch.isfinite(hs).all()
    assert torch.allclose(calls[0]["query_sine_embed"], naive_embed(queries(B)["ref_points"], dim), atol=1e-10)

    queries, decoder = anchor_parts(dim, layers=2)
    force_ref_wh(decoder, 0.5, 0.5)
    calls = []
    capture_inputs(decoder.layers[0], calls)
    anchors = uniform(B, Q, 4, seed=9)
    anchors[..., 2:] = 0.5                                 # w_ref / w = h_ref / h = 1
    with torch.no_grad():
        hs, box_ref = decoder(torch.zeros(B, Q, dim, dtype=torch.float64), memory, memory_pos=memory_pos,
                              pad_mask=pad, ref_points=anchors)
        expected_pos = decoder.ref_point_head(naive_embed(anchors, dim))
    assert hs.shape == (2, B, Q, dim) and box_ref.shape == (2, B, Q, 4) and torch.isfinite(hs).all()
    assert torch.allclose(calls[0]["query_sine_embed"], naive_embed(anchors[..., :2], dim), atol=1e-10)
    assert torch.allclose(calls[0]["query_pos"], expected_pos, atol=1e-10)
