"""box_ops: format round trips, IoU / GIoU against hand-worked boxes, degenerate input errors."""
import pytest
import torch

from minidetr.box_ops import (box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh,
                              generalized_box_iou, inverse_sigmoid)


def test_format_round_trip_and_hand_values():
    """cxcywh (0.5, 0.5, 0.2, 0.4) is xyxy (0.4, 0.3, 0.6, 0.7), and back."""
    cxcywh = torch.tensor([[0.5, 0.5, 0.2, 0.4]], dtype=torch.float64)
    xyxy = box_cxcywh_to_xyxy(cxcywh)
    assert torch.allclose(xyxy, torch.tensor([[0.4, 0.3, 0.6, 0.7]], dtype=torch.float64))
    assert torch.allclose(box_xyxy_to_cxcywh(xyxy), cxcywh)


def test_giou_with_dn_detrs_epsilon():
    """With eps, union and enclosing area each get + eps: two 0.1 x 0.1 boxes offset by half
    a side in x and y have inter 0.0025, union 0.0175, enclosing 0.0225, so GIoU =
    0.0025 / (0.0175 + eps) - 0.005 / (0.0225 + eps); eps = 1e-6 moves it by ~2e-5 relative."""
    a = torch.tensor([[0.0, 0.0, 0.1, 0.1]], dtype=torch.float64)
    b = torch.tensor([[0.05, 0.05, 0.15, 0.15]], dtype=torch.float64)
    eps = 1e-6
    by_hand = 0.0025 / (0.0175 + eps) - 0.005 / (0.0225 + eps)
    assert generalized_box_iou(a, b, eps).item() == pytest.approx(by_hand, rel=1e-12)
    exact = generalized_box_iou(a, b).item()
    assert exact == pytest.approx(0.0025 / 0.0175 - 0.005 / 0.0225, rel=1e-12)
    assert abs(exact - by_hand) / abs(exact) > 1e-5      # the difference is real at this size


def test_iou_and_giou_hand_worked():
    """Two 2x2 squares overlapping in a 1x2 strip: IoU 2/6; enclosing 3x2 = union -> GIoU = IoU.
    Disjoint unit squares 1 apart: IoU 0, enclosing 3x1, union 2 -> GIoU = -1/3."""
    a = torch.tensor([[0., 0., 2., 2.], [0., 0., 1., 1.]], dtype=torch.float64)
    b = torch.tensor([[1., 0., 3., 2.], [2., 0., 3., 1.]], dtype=torch.float64)
    iou, union = box_iou(a, b)
    assert iou[0, 0].item() == pytest.approx(2 / 6)
    assert union[0, 0].item() == pytest.approx(6)
    giou = generalized_box_iou(a, b)
    assert giou[0, 0].item() == pytest.approx(2 / 6)
    assert giou[1, 1].item() == pytest.approx(-1 / 3)
    assert giou.shape == (2, 2)


def test_giou_identical_is_one_and_brute_force():
    """GIoU of a box with itself is 1; random boxes match a per-pair scalar computation."""
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(5, 2, generator=g, dtype=torch.float64)
    boxes = torch.cat([xy, xy + torch.rand(5, 2, generator=g, dtype=torch.float64)], 1)
    giou = generalized_box_iou(boxes, boxes)
    assert torch.allclose(giou.diagonal(), torch.ones(5, dtype=torch.float64))
    for i in range(5):
        for j in range(5):
            x1, y1, x2, y2 = boxes[i].tolist()
            u1, v1, u2, v2 = boxes[j].tolist()
            inter = max(0, min(x2, u2) - max(x1, u1)) * max(0, min(y2, v2) - max(y1, v1))
            union = (x2 - x1) * (y2 - y1) + (u2 - u1) * (v2 - v1) - inter
            hull = (max(x2, u2) - min(x1, u1)) * (max(y2, v2) - min(y1, v1))
            assert giou[i, j].item() == pytest.approx(inter / union - (hull - union) / hull)


def test_degenerate_box_is_a_clear_error():
    """x2 < x1 raises ValueError naming the box, not a silent NaN."""
    good = torch.tensor([[0., 0., 1., 1.]])
    bad = torch.tensor([[0., 0., 1., 1.], [0.6, 0., 0.5, 1.]])
    with pytest.raises(ValueError, match=r"boxes2\[1\].*degenerate"):
        generalized_box_iou(good, bad)
    with pytest.raises(ValueError, match="degenerate"):
        box_iou(torch.tensor([[0., float('nan'), 1., 1.]]), good)


def test_zero_area_boxes_give_zero_iou_not_nan():
    """Two identical points: union 0, IoU defined as 0."""
    p = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    iou, _ = box_iou(p, p)
    assert iou.item() == 0.0


def test_inverse_sigmoid_inverts_and_clamps():
    """logit(sigmoid(x)) = x; at 0 and 1 the result is finite, log(eps / (1 - eps))-like."""
    x = torch.linspace(-4, 4, 9, dtype=torch.float64)
    assert torch.allclose(inverse_sigmoid(x.sigmoid()), x, atol=1e-9)
    edge = inverse_sigmoid(torch.tensor([0.0, 1.0], dtype=torch.float64), eps=1e-3)
    assert torch.allclose(edge, torch.tensor([-6.907755278982137, 6.907755278982137], dtype=torch.float64))
