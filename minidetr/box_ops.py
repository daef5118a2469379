"""Box formats, IoU and generalized IoU.

DETR predicts boxes as normalised (cx, cy, w, h) in [0, 1] of the unpadded image, while
IoU-type quantities are easiest in corner form (x1, y1, x2, y2). This file converts between
the two and computes the pairwise overlaps the matcher and the losses need:

    IoU(A, B)  = |A n B| / |A u B|
    GIoU(A, B) = IoU(A, B) - (|C| - |A u B|) / |C|,   C = the smallest box enclosing A and B

(Rezatofighi et al., "Generalized Intersection over Union", CVPR 2019, arXiv 1902.09630).
GIoU is in [-1, 1] and, unlike IoU, still has a gradient when the boxes do not overlap.

It also holds `inverse_sigmoid`, the map from box coordinates in [0, 1] back to logits that
every variant with reference points uses (the box head predicts an offset in logit space).
"""
import torch


# ---- format conversions ----

def box_cxcywh_to_xyxy(boxes):
    """[..., 4] (cx, cy, w, h) -> [..., 4] (x1, y1, x2, y2), same units."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes):
    """[..., 4] (x1, y1, x2, y2) -> [..., 4] (cx, cy, w, h), same units."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1)


def inverse_sigmoid(x, eps=1e-5):
    """logit(x) = log(x / (1 - x)), with x clamped to [0, 1] and both terms to >= eps.

    The clamp keeps a reference point at exactly 0 or 1 finite. The eps differs between
    the reference codebases and is part of their numerics: 1e-5 in Conditional DETR,
    1e-3 in DAB-/DN-DETR; callers pass theirs.
    """
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


# ---- areas and overlaps (corner form) ----

def check_boxes_xyxy(boxes, name="boxes"):
    """Raise ValueError naming the first box with x2 < x1 or y2 < y1 (or a NaN).

    A degenerate box would otherwise give a negative area and a silently wrong (or NaN)
    IoU; a caller that passes one has a bug upstream (swapped format, bad annotation).
    """
    bad = ~((boxes[:, 2:] >= boxes[:, :2]).all(dim=-1))   # NaN compares False -> bad
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{name}[{i}] = {boxes[i].tolist()} is degenerate: expected x1 <= x2 and y1 <= y2 "
            "(xyxy format; convert cxcywh boxes with box_cxcywh_to_xyxy first)")


def box_area(boxes):
    """[N, 4] xyxy -> [N] areas."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(boxes1, boxes2):
    """Pairwise IoU.

    boxes1: [N, 4] xyxy, boxes2: [M, 4] xyxy, same units, x1 <= x2 and y1 <= y2.
    Returns (iou [N, M], union [N, M]). Raises ValueError naming the first degenerate box.
    """
    check_boxes_xyxy(boxes1, "boxes1")
    check_boxes_xyxy(boxes2, "boxes2")
    return _iou_and_union(boxes1, boxes2)


def _iou_and_union(boxes1, boxes2, eps=0.0):
    area1, area2 = box_area(boxes1), box_area(boxes2)
    top_left = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])       # [N, M, 2]
    bottom_right = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])   # [N, M, 2]
    inter_wh = (bottom_right - top_left).clamp(min=0)                    # 0 when disjoint
    inter = inter_wh[..., 0] * inter_wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    iou = inter / _safe_denominator(union, eps)
    return iou, union


def _safe_denominator(x, eps):
    """x + eps (DAB-/DN-DETR's 1e-6) or, with eps 0, x itself kept off 0, so that two
    zero-area boxes get IoU 0 by convention instead of 0/0 = NaN (DETR's exact form)."""
    return x + eps if eps else x.clamp(min=torch.finfo(x.dtype).tiny)


def generalized_box_iou(boxes1, boxes2, eps=0.0):
    """Pairwise generalized IoU (Rezatofighi et al., CVPR 2019), for boxes from outside.

    boxes1: [N, 4] xyxy, boxes2: [M, 4] xyxy, same units, x1 <= x2 and y1 <= y2.
    Returns [N, M] in [-1, 1]. GIoU = IoU - (|C| - |A u B|) / |C|, C the enclosing box.
    eps: added to |A u B| and |C| before dividing, as DAB-DETR and DN-DETR do (1e-6, in
    their loss and matching cost alike); 0 is DETR's exact form. For normalised boxes eps
    is not negligible: 1e-6 against a union of 1e-2 moves GIoU by 1e-4 relative.
    Raises ValueError naming the first degenerate box (the check reads the boxes on the
    host: the matcher and the losses call pairwise_giou, whose boxes are valid by construction).
    """
    check_boxes_xyxy(boxes1, "boxes1")
    check_boxes_xyxy(boxes2, "boxes2")
    return pairwise_giou(boxes1, boxes2, eps)


def pairwise_giou(boxes1, boxes2, eps=0.0):
    """generalized_box_iou without the validity check, for the training step's hot path.

    Its callers pass predictions (sigmoid cxcywh converted to xyxy: w, h >= 0, so x1 <= x2)
    and targets the dataset checked when it loaded them (data.py drops degenerate boxes and
    rejects non-finite ones); NaN predictions are caught by the matcher's finite check.
    """
    iou, union = _iou_and_union(boxes1, boxes2, eps)
    top_left = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])
    enclosing_wh = (bottom_right - top_left).clamp(min=0)
    enclosing = enclosing_wh[..., 0] * enclosing_wh[..., 1]              # |C|, [N, M]
    return iou - (enclosing - union) / _safe_denominator(enclosing, eps)
