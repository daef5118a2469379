"""Scalar reference computations shared by several tests (independent of minidetr's code)."""
import math

import torch


def naive_giou(a, b, eps=0.0):
    """GIoU of two (cx, cy, w, h) boxes given as plain sequences of floats, one pair at a time.
    eps: added to the union and the enclosing area (DAB-/DN-DETR's 1e-6)."""
    ax1, ay1, ax2, ay2 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx1, by1, bx2, by2 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = a[2] * a[3] + b[2] * b[3] - inter
    enclosing = (max(ax2, bx2) - min(ax1, bx1)) * (max(ay2, by2) - min(ay1, by1))
    return inter / (union + eps) - (enclosing - union) / (enclosing + eps)


def naive_attention(q, k, v, heads, pad_mask=None, attn_mask=None, bias=None):
    """softmax(q k^T / sqrt(d) + bias, -inf where masked) v, one head and one query at a time."""
    weights = naive_attention_weights(q, k, heads, pad_mask, attn_mask, bias)   # [B, h, Q, N]
    dv = v.shape[-1] // heads
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=torch.float64)
    for b in range(q.shape[0]):
        for h in range(heads):
            for i in range(q.shape[1]):
                for j in range(k.shape[1]):
                    out[b, i, h * dv:(h + 1) * dv] += weights[b, h, i, j] * v[b, j, h * dv:(h + 1) * dv]
    return out


def naive_attention_weights(q, k, heads, pad_mask=None, attn_mask=None, bias=None):
    """softmax(q k^T / sqrt(d) + bias, -inf where masked) as [B, h, Q, N], entry by entry."""
    dq = q.shape[-1] // heads
    weights = torch.zeros(q.shape[0], heads, q.shape[1], k.shape[1], dtype=torch.float64)
    for b in range(q.shape[0]):
        for h in range(heads):
            for i in range(q.shape[1]):
                logits = []
                for j in range(k.shape[1]):
                    s = sum(q[b, i, h * dq + t].item() * k[b, j, h * dq + t].item() for t in range(dq))
                    s = s / math.sqrt(dq) + (0.0 if bias is None else bias[b, h, i, j].item())
                    blocked = (pad_mask is not None and pad_mask[b, j]) or \
                              (attn_mask is not None and attn_mask[i, j])
                    logits.append(-math.inf if blocked else s)
                top = max(logits)
                w = [math.exp(s - top) for s in logits]
                for j in range(k.shape[1]):
                    weights[b, h, i, j] = w[j] / sum(w)
    return weights


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
