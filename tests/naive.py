"""Scalar reference computations shared by several tests (independent of minidetr's code)."""


def naive_giou(a, b, eps=0.0):
    """GIoU of two (cx, cy, w, h) boxes given as plain sequences of floats, one pair at a time.
    eps: added to the union and the enclosing area (DAB-/DN-DETR's 1e-6)."""
    ax1, ay1, ax2, ay2 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx1, by1, bx2, by2 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = a[2] * a[3] + b[2] * b[3] - inter
    enclosing = (max(ax2, bx2) - min(ax1, bx1)) * (max(ay2, by2) - min(ay1, by1))
    return inter / (union + eps) - (enclosing - union) / (enclosing + eps)
