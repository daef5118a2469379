"""transformer: the shared attention against a naive float64 loop; DETR layers and stacks."""
import torch
from einops import rearrange

from minidetr.transformer import (Decoder, DecoderLayer, EncoderLayer, MultiheadAttention,
                                  attention, attention_weights, cat_heads)
from naive import naive_attention, naive_attention_weights, rand

B, Q, N, D, H = 2, 5, 12, 16, 4


def test_attention_matches_naive_with_padding_mask_and_bias():
    """Padding mask + additive bias + blocking mask agree with the naive loop."""
    q, k, v = rand(B, Q, D, seed=1), rand(B, N, D, seed=2), rand(B, N, D, seed=3)
    pad = torch.zeros(B, N, dtype=torch.bool)
    pad[1, 8:] = True
    bias = rand(B, H, Q, N, seed=4)
    block = torch.zeros(Q, N, dtype=torch.bool)
    block[0, :3] = True
    ours = attention(q, k, v, H, pad_mask=pad, attn_mask=block, bias=bias)
    ref = naive_attention(q, k, v, H, pad_mask=pad, attn_mask=block, bias=bias)
    assert torch.allclose(ours, ref, atol=1e-10)


def test_attention_wider_queries_than_values():
    """dq = 2 dv (Conditional DETR's concatenation): scale is 1/sqrt(dq), values keep dv."""
    q, k, v = rand(B, Q, 2 * D, seed=5), rand(B, N, 2 * D, seed=6), rand(B, N, D, seed=7)
    assert torch.allclose(attention(q, k, v, H), naive_attention(q, k, v, H), atol=1e-10)


def test_cat_heads_gives_sum_of_dot_products():
    """Per head, cat(c_q, p_q) . cat(c_k, p_k) = c_q . c_k + p_q . p_k."""
    cq, pq, ck, pk = (rand(1, 1, D, seed=s) for s in range(4))
    q, k = cat_heads(cq, pq, H), cat_heads(ck, pk, H)
    d = D // H
    for h in range(H):
        lhs = (q[0, 0, 2 * d * h:2 * d * (h + 1)] * k[0, 0, 2 * d * h:2 * d * (h + 1)]).sum()
        rhs = (cq[0, 0, d * h:d * (h + 1)] * ck[0, 0, d * h:d * (h + 1)]).sum() + \
              (pq[0, 0, d * h:d * (h + 1)] * pk[0, 0, d * h:d * (h + 1)]).sum()
        assert torch.allclose(lhs, rhs)


def test_padded_keys_do_not_change_output():
    """Changing the memory under the padding mask leaves the encoder output of real tokens unchanged."""
    torch.manual_seed(0)
    layer = EncoderLayer(D, H, 32, dropout=0.0).double().eval()
    src, pos = rand(1, N, D, seed=8), rand(1, N, D, seed=9)
    pad = torch.zeros(1, N, dtype=torch.bool)
    pad[0, 9:] = True
    out1 = layer(src, pos, pad)
    src2 = src.clone()
    src2[0, 9:] += 100.0
    out2 = layer(src2, pos, pad)
    assert torch.allclose(out1[0, :9], out2[0, :9], atol=1e-10)


def test_multihead_attention_equals_torch_reference():
    """Our module with the same weights equals torch.nn.MultiheadAttention (batch_first)."""
    torch.manual_seed(0)
    ours = MultiheadAttention(D, H).double()
    ref = torch.nn.MultiheadAttention(D, H, batch_first=True).double()
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]))
        ref.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
        ref.out_proj.weight.copy_(ours.out_proj.weight)
        ref.out_proj.bias.copy_(ours.out_proj.bias)
    x, mem = rand(B, Q, D, seed=10), rand(B, N, D, seed=11)
    pad = torch.zeros(B, N, dtype=torch.bool)
    pad[0, -2:] = True
    expected, _ = ref(x, mem, mem, key_padding_mask=pad)
    assert torch.allclose(ours(x, mem, mem, pad_mask=pad), expected, atol=1e-10)


def test_decoder_returns_every_layer_through_shared_norm():
    """hs has one entry per layer; the last equals running the layers by hand then the norm."""
    torch.manual_seed(0)
    layers = [DecoderLayer(D, H, 32, dropout=0.0) for _ in range(3)]
    dec = Decoder(layers, D).double().eval()
    tgt, qpos, mem, mpos = rand(B, Q, D, seed=12), rand(B, Q, D, seed=13), rand(B, N, D, seed=14), rand(B, N, D, seed=15)
    hs, box_ref = dec(tgt, mem, memory_pos=mpos, pad_mask=None, query_pos=qpos)
    assert hs.shape == (3, B, Q, D) and box_ref is None
    x = tgt
    for layer in layers:
        x = layer(x, mem, memory_pos=mpos, query_pos=qpos)
    assert torch.allclose(hs[-1], dec.norm(x))


def test_attention_weights_match_naive_softmax_and_respect_padding():
    """The written-out weights equal a float64 loop (padding, blocking mask, bias), are
    distributions over keys, and give padding zero weight."""
    q, k = rand(B, Q, D, seed=18), rand(B, N, D, seed=19)
    pad = torch.zeros(B, N, dtype=torch.bool)
    pad[0, -3:] = True
    block = torch.zeros(Q, N, dtype=torch.bool)
    block[1, :4] = True
    bias = rand(B, H, Q, N, seed=20)
    w = attention_weights(q, k, H, pad_mask=pad, attn_mask=block, bias=bias)
    assert w.shape == (B, H, Q, N)
    torch.testing.assert_close(w, naive_attention_weights(q, k, H, pad, block, bias), rtol=0, atol=1e-12)
    assert torch.allclose(w.sum(-1), torch.ones(B, H, Q, dtype=torch.float64))
    assert (w[0, :, :, -3:] == 0).all() and (w[:, :, 1, :4] == 0).all()


def test_attention_maps_are_the_weights_forward_applies():
    """MultiheadAttention.attention_maps: its weights times the projected values, through
    out_proj, give forward's output; the bias comes back as given, full [B, h, Q, N]."""
    torch.manual_seed(0)
    attn = MultiheadAttention(D, H).double()
    query, key, value = rand(B, Q, D, seed=21), rand(B, N, D, seed=22), rand(B, N, D, seed=23)
    pad = torch.zeros(B, N, dtype=torch.bool)
    pad[1, 5:] = True
    bias = rand(B, H, 1, N, seed=24)                            # broadcast over queries
    weights, got_bias = attn.attention_maps(query, key, value, pad_mask=pad, bias=bias)
    v = rearrange(attn.v_proj(value), 'b n (h d) -> b h n d', h=H)
    mixed = rearrange(weights @ v, 'b h q d -> b q (h d)')
    torch.testing.assert_close(attn.out_proj(mixed), attn(query, key, value, pad_mask=pad, bias=bias))
    assert torch.equal(got_bias, bias.expand(B, H, Q, N))
    assert attn.attention_maps(query, key, value)[1] is None
