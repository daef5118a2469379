"""Tests for minidetr/losses.py: the set criterion, focal loss, aux and denoising losses.

References are independent: F.cross_entropy with its class weights written out, the focal
formula with math.exp/log, L1 and GIoU of hand-picked pairs with Python floats. A fixed
matcher (returns given pairs) makes the class-loss tests independent of the Hungarian solver.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import minidetr
import minidetr.losses as losses_mod
from minidetr.losses import (SetCriterion, build_weight_dict, loss_boxes, num_boxes_normaliser,
                             sigmoid_focal_loss, total_loss)
from minidetr.matcher import HungarianMatcher
from naive import naive_giou  # noqa: E402  (tests/naive.py)

K, B, Q = 3, 2, 5


class FixedMatcher:
    """Stands in for the Hungarian matcher: always returns the given pairs."""

    def __init__(self, indices):
        self.indices = [(torch.tensor(p), torch.tensor(t)) for p, t in indices]

    def __call__(self, outputs, targets):
        return self.indices

    def match_layers(self, layers, targets):
        return [self.indices for _ in layers]


def boxes(rows):
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, 4)


def targets_two_images():
    return [{"labels": torch.tensor([2, 0]), "boxes": boxes([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
            {"labels": torch.tensor([1]), "boxes": boxes([[0.5, 0.5, 0.4, 0.4]])}]


def random_outputs(gen, k_logits, q=Q, aux=0):
    def layer():
        return {"pred_logits": torch.randn(B, q, k_logits, generator=gen, dtype=torch.float64),
                "pred_boxes": 0.2 + 0.5 * torch.rand(B, q, 4, generator=gen, dtype=torch.float64)}
    out = layer()
    out["aux_outputs"] = [layer() for _ in range(aux)]
    return out


def naive_focal(x, t, alpha=0.25, gamma=2.0):
    p = 1 / (1 + math.exp(-x))
    return -alpha * (1 - p) ** gamma * math.log(p) if t else -(1 - alpha) * p ** gamma * math.log(1 - p)




def naive_pair_losses(logits, pred_boxes, targets, pairs, focal_alpha=0.25, negatives=True):
    """Hand-summed focal, L1 and 1 - GIoU over pairs [(b, q, j)]; unpaired slots are
    negatives if `negatives`, else skipped (dn). Returns unnormalised sums."""
    paired = {(b, q): j for b, q, j in pairs}
    ce = 0.0
    for b in range(logits.shape[0]):
        for q in range(logits.shape[1]):
            if (b, q) not in paired and not negatives:
                continue
            label = int(targets[b]["labels"][paired[(b, q)]]) if (b, q) in paired else None
            ce += sum(naive_focal(float(logits[b, q, c]), c == label, focal_alpha) for c in range(logits.shape[2]))
    l1 = giou = 0.0
    for b, q, j in pairs:
        pred, tgt = pred_boxes[b, q].tolist(), targets[b]["boxes"][j].tolist()
        l1 += sum(abs(u - v) for u, v in zip(pred, tgt))
        giou += 1 - naive_giou(pred, tgt)
    return ce, l1, giou


# ---- elementwise focal loss and normaliser ----

def test_sigmoid_focal_loss_matches_formula():
    """sigmoid_focal_loss equals -alpha_t (1-p_t)^gamma log p_t entry by entry (Lin et al. Eq. 5)."""
    x = torch.tensor([[-2.0, 0.3, 1.7], [0.0, 3.1, -0.4]], dtype=torch.float64)
    t = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    loss = sigmoid_focal_loss(x, t, alpha=0.25, gamma=2)
    for i in range(2):
        for j in range(3):
            assert float(loss[i, j]) == pytest.approx(naive_focal(float(x[i, j]), t[i, j] == 1), rel=1e-12)


def test_num_boxes_normaliser_all_reduce(monkeypatch):
    """Under distributed: SUM over processes / world size, clamped to >= 1."""
    others = {"count": 13.0}
    seen_ops = []

    def fake_all_reduce(tensor, op=torch.distributed.ReduceOp.SUM, **kwargs):
        seen_ops.append(op)
        tensor += others["count"]            # the other 3 processes hold 3 + 2 + 8 boxes

    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **kw: 4)
    monkeypatch.setattr(torch.distributed, "all_reduce", fake_all_reduce)
    assert num_boxes_normaliser(3) == pytest.approx((3 + 13) / 4)
    assert seen_ops == [torch.distributed.ReduceOp.SUM]
    others["count"] = 0.0
    assert num_boxes_normaliser(0) == 1.0      # no boxes anywhere: clamped
    assert num_boxes_normaliser(2) == 1.0      # 2 / 4 = 0.5 -> 1


def test_num_boxes_normaliser_single_process():
    """Without torch.distributed the count itself (clamped to >= 1) is returned."""
    assert num_boxes_normaliser(7) == 7.0 and num_boxes_normaliser(0) == 1.0


# ---- the matching part ----

def test_softmax_ce_with_eos_coef_matches_hand_weights():
    """loss_ce equals F.cross_entropy with weights [1, 1, 1, eos_coef] and no-object targets."""
    gen = torch.Generator().manual_seed(0)
    out = random_outputs(gen, K + 1)
    matcher = FixedMatcher([([4, 1], [0, 1]), ([2], [0])])
    crit = SetCriterion(K, matcher, {}, eos_coef=0.1, aux_loss=False)
    target = torch.full((B, Q), K)
    target[0, 4], target[0, 1], target[1, 2] = 2, 0, 1
    expected = F.cross_entropy(out["pred_logits"].reshape(-1, K + 1), target.reshape(-1),
                               weight=torch.tensor([1.0, 1.0, 1.0, 0.1], dtype=torch.float64))
    assert float(crit(out, targets_two_images())["loss_ce"]) == pytest.approx(float(expected), rel=1e-12)


def test_focal_class_and_box_losses_match_naive_sums():
    """Focal loss_ce, loss_bbox and loss_giou equal hand sums over all slots / pairs, / num_boxes."""
    gen = torch.Generator().manual_seed(1)
    out = random_outputs(gen, K)
    pairs = [(0, 4, 0), (0, 1, 1), (1, 2, 0)]
    crit = SetCriterion(K, FixedMatcher([([4, 1], [0, 1]), ([2], [0])]), {}, focal_alpha=0.25, aux_loss=False)
    got = crit(out, targets_two_images())
    ce, l1, giou = naive_pair_losses(out["pred_logits"], out["pred_boxes"], targets_two_images(), pairs)
    assert float(got["loss_ce"]) == pytest.approx(ce / 3, rel=1e-10)
    assert float(got["loss_bbox"]) == pytest.approx(l1 / 3, rel=1e-10)
    assert float(got["loss_giou"]) == pytest.approx(giou / 3, rel=1e-10)


@pytest.mark.parametrize("focal_alpha", [None, 0.25])
def test_perfect_boxes_give_zero_box_losses(focal_alpha):
    """Predicting every target box exactly (Hungarian matcher) gives L1 = GIoU loss = 0."""
    gen = torch.Generator().manual_seed(2)
    out = random_outputs(gen, K + 1 if focal_alpha is None else K)
    out["pred_logits"].zero_()                 # equal class costs: boxes decide the matching
    targets = targets_two_images()
    out["pred_boxes"][0, 3] = targets[0]["boxes"][0]
    out["pred_boxes"][0, 0] = targets[0]["boxes"][1]
    out["pred_boxes"][1, 4] = targets[1]["boxes"][0]
    crit = SetCriterion(K, HungarianMatcher(focal_alpha=focal_alpha), {}, focal_alpha=focal_alpha)
    got = crit(out, targets)
    assert float(got["loss_bbox"]) == 0.0
    assert float(got["loss_giou"]) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("focal_alpha", [None, 0.25])
def test_permuting_queries_leaves_losses_unchanged(focal_alpha):
    """Reordering the queries (same permutation for every tensor) changes no loss."""
    gen = torch.Generator().manual_seed(3)
    out = random_outputs(gen, K + 1 if focal_alpha is None else K, aux=2)
    crit = SetCriterion(K, HungarianMatcher(focal_alpha=focal_alpha), {}, focal_alpha=focal_alpha)
    perm = torch.tensor([3, 0, 4, 2, 1])

    def permute(layer):
        return {"pred_logits": layer["pred_logits"][:, perm], "pred_boxes": layer["pred_boxes"][:, perm]}
    permuted = permute(out)
    permuted["aux_outputs"] = [permute(a) for a in out["aux_outputs"]]
    before, after = crit(out, targets_two_images()), crit(permuted, targets_two_images())
    assert before.keys() == after.keys()
    for k in before:
        assert float(after[k]) == pytest.approx(float(before[k]), rel=1e-10, abs=1e-12), k


@pytest.mark.parametrize("focal_alpha", [None, 0.25])
def test_images_without_objects(focal_alpha):
    """No objects anywhere: box losses exactly 0, class loss = all queries negative, backward works."""
    gen = torch.Generator().manual_seed(4)
    out = random_outputs(gen, K + 1 if focal_alpha is None else K, aux=1)
    out["pred_logits"].requires_grad_(True)
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4, dtype=torch.float64)}] * B
    crit = SetCriterion(K, HungarianMatcher(focal_alpha=focal_alpha),
                        build_weight_dict(1, 5, 2, 2, True, False), focal_alpha=focal_alpha)
    got = crit(out, empty)
    assert float(got["loss_bbox"]) == 0.0 and float(got["loss_giou"]) == 0.0
    assert float(got["loss_bbox_0"]) == 0.0 and float(got["loss_giou_0"]) == 0.0
    logits = out["pred_logits"].detach()
    if focal_alpha is None:   # every target is no-object: weights all eos_coef, plain mean
        expected = F.cross_entropy(logits.reshape(-1, K + 1), torch.full((B * Q,), K)).item()
    else:                     # all-zero one-hot, sum / max(num_boxes, 1) = sum / 1
        expected = sum(naive_focal(float(v), False) for v in logits.flatten())
    assert got["loss_ce"].item() == pytest.approx(expected, rel=1e-10)
    total_loss(got, crit.weight_dict).backward()
    assert torch.isfinite(out["pred_logits"].grad).all()


def test_class_and_cardinality_error():
    """class_error = 100 - top-1 accuracy of matched queries; cardinality by hand."""
    logits = torch.full((B, Q, K + 1), -5.0, dtype=torch.float64)
    logits[..., K] = 5.0                                     # every query says no-object...
    logits[0, 4, 2] = logits[0, 1, 1] = logits[1, 2, 1] = 9  # ...except three
    out = {"pred_logits": logits, "pred_boxes": torch.full((B, Q, 4), 0.3, dtype=torch.float64)}
    crit = SetCriterion(K, FixedMatcher([([4, 1], [0, 1]), ([2], [0])]), {}, aux_loss=False)
    got = crit(out, targets_two_images())
    assert float(got["class_error"]) == pytest.approx(100 * (1 - 2 / 3))  # (0,1) says 1, label 0
    assert float(got["cardinality_error"]) == 0.0            # 2 vs 2 and 1 vs 1
    focal = SetCriterion(K, FixedMatcher([([4, 1], [0, 1]), ([2], [0])]), {}, focal_alpha=0.25, aux_loss=False)
    got = focal({"pred_logits": logits[..., :K], "pred_boxes": out["pred_boxes"]}, targets_two_images())
    assert float(got["cardinality_error"]) == 0.0            # sigmoid(9) > 0.5 thrice, sigmoid(-5) < 0.5


def test_wrong_number_of_logits_raises():
    """A softmax criterion checked against a head of K (not K + 1) logits raises a ValueError
    naming the sizes (build checks model and criterion once, not every loss call)."""
    with pytest.raises(ValueError, match="expected 4"):
        SetCriterion(K, HungarianMatcher(), {}).check_logits(K)
    SetCriterion(K, HungarianMatcher(), {}).check_logits(K + 1)
    with pytest.raises(ValueError, match="expected 3"):
        SetCriterion(K, HungarianMatcher(), {}, focal_alpha=0.25).check_logits(K + 1)


# ---- aux layers, weights ----

def test_aux_and_dn_keys_and_weight_dict():
    """weight_dict for dec_layers=3 with dn; the criterion produces every weighted key."""
    weights = build_weight_dict(2, 5, 2, dec_layers=3, aux_loss=True, dn=True)
    names = ["loss_ce", "loss_bbox", "loss_giou", "dn_loss_ce", "dn_loss_bbox", "dn_loss_giou"]
    assert list(weights) == names + [f"{n}_{i}" for i in range(2) for n in names]
    assert weights["dn_loss_ce_1"] == 2 and weights["loss_bbox_0"] == 5 and weights["dn_loss_giou"] == 2
    gen = torch.Generator().manual_seed(6)
    out = random_outputs(gen, K, aux=2)
    out["dn"] = random_outputs(gen, K, q=6, aux=2)
    out["dn"]["indices"] = [(torch.tensor([0, 1, 3, 4]), torch.tensor([0, 1, 0, 1])),
                            (torch.tensor([0, 3]), torch.tensor([0, 0]))]
    out["dn"]["num_dn"] = 6
    got = SetCriterion(K, HungarianMatcher(focal_alpha=0.25), weights, focal_alpha=0.25)(out, targets_two_images())
    assert set(weights) <= set(got)
    assert set(got) - set(weights) == {"class_error", "cardinality_error", "dn_class_error"}
    assert not any(k.endswith("_2") for k in got)            # 2 aux layers: _0, _1 only


def test_aux_loss_off_ignores_aux_outputs():
    """aux_loss=False: no suffixed keys, and build_weight_dict has none either."""
    gen = torch.Generator().manual_seed(7)
    crit = SetCriterion(K, HungarianMatcher(), {}, aux_loss=False)
    got = crit(random_outputs(gen, K + 1, aux=2), targets_two_images())
    assert not any(k[-2:] in ("_0", "_1") for k in got)
    assert list(build_weight_dict(1, 5, 2, 6, False, False)) == ["loss_ce", "loss_bbox", "loss_giou"]


def test_aux_layers_are_matched_on_their_own():
    """An aux layer equal to the last layer with its queries permuted gets the same losses."""
    gen = torch.Generator().manual_seed(8)
    out = random_outputs(gen, K + 1)
    perm = torch.tensor([2, 4, 0, 1, 3])
    out["aux_outputs"] = [{"pred_logits": out["pred_logits"][:, perm], "pred_boxes": out["pred_boxes"][:, perm]}]
    got = SetCriterion(K, HungarianMatcher(), {})(out, targets_two_images())
    for name in ("loss_ce", "loss_bbox", "loss_giou"):
        assert float(got[f"{name}_0"]) == pytest.approx(float(got[name]), rel=1e-12)


def test_total_loss_is_weighted_sum():
    """total_loss = sum of weight * loss over the weighted keys; logging keys ignored."""
    losses = {"loss_ce": torch.tensor(2.0), "loss_bbox": torch.tensor(0.5), "class_error": torch.tensor(50.0)}
    assert float(total_loss(losses, {"loss_ce": 3, "loss_bbox": 4, "loss_giou": 2})) == 8.0


# ---- denoising ----

def dn_case(gen, k_logits):
    dn = random_outputs(gen, k_logits, q=6, aux=1)
    # 2 groups x 2 slots (single_pad = 2): image 0 fills all, image 1 one slot per group.
    dn["indices"] = [(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 0, 1])),
                     (torch.tensor([0, 2]), torch.tensor([0, 0]))]
    dn["num_dn"] = 6
    pairs = [(0, 0, 0), (0, 1, 1), (0, 2, 0), (0, 3, 1), (1, 0, 0), (1, 2, 0)]
    return dn, pairs


def test_dn_losses_equal_hand_sums_with_given_indices():
    """dn losses: focal over the indexed slots only, L1 and GIoU of the given pairs, / num_dn."""
    gen = torch.Generator().manual_seed(9)
    out = random_outputs(gen, K)
    out["dn"], pairs = dn_case(gen, K)
    got = SetCriterion(K, HungarianMatcher(focal_alpha=0.25), {}, focal_alpha=0.25)(out, targets_two_images())
    for suffix, layer in (("", out["dn"]), ("_0", out["dn"]["aux_outputs"][0])):
        ce, l1, giou = naive_pair_losses(layer["pred_logits"], layer["pred_boxes"], targets_two_images(),
                                         pairs, negatives=False)
        assert float(got["dn_loss_ce" + suffix]) == pytest.approx(ce / 6, rel=1e-10)
        assert float(got["dn_loss_bbox" + suffix]) == pytest.approx(l1 / 6, rel=1e-10)
        assert float(got["dn_loss_giou" + suffix]) == pytest.approx(giou / 6, rel=1e-10)


def test_dn_padding_slots_get_no_loss():
    """Changing the predictions of unindexed (padding) dn slots changes no dn loss."""
    gen = torch.Generator().manual_seed(10)
    out = random_outputs(gen, K + 1)
    out["dn"], _ = dn_case(gen, K + 1)
    crit = SetCriterion(K, HungarianMatcher(), {})
    before = crit(out, targets_two_images())
    for layer in (out["dn"], out["dn"]["aux_outputs"][0]):
        layer["pred_logits"][0, 4:] += 7.0
        layer["pred_logits"][1, [1, 3, 4, 5]] -= 3.0
        layer["pred_boxes"][1, [1, 3]] = 0.9
    after = crit(out, targets_two_images())
    for k in before:
        assert float(after[k]) == pytest.approx(float(before[k]), rel=1e-12), k


def test_dn_softmax_ce_is_mean_over_indexed_slots():
    """Softmax head: dn_loss_ce = F.cross_entropy over the indexed slots' labels (no no-object)."""
    gen = torch.Generator().manual_seed(11)
    out = random_outputs(gen, K + 1)
    out["dn"], pairs = dn_case(gen, K + 1)
    got = SetCriterion(K, HungarianMatcher(), {})(out, targets_two_images())
    logits = torch.stack([out["dn"]["pred_logits"][b, q] for b, q, _ in pairs])
    labels = torch.tensor([int(targets_two_images()[b]["labels"][j]) for b, _, j in pairs])
    assert float(got["dn_loss_ce"]) == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-12)


def test_dn_box_loss_zero_when_predictions_equal_targets():
    """dn slots that predict their own object's box exactly give zero dn box losses."""
    gen = torch.Generator().manual_seed(12)
    out = random_outputs(gen, K)
    out["dn"], pairs = dn_case(gen, K)
    for b, q, j in pairs:
        out["dn"]["pred_boxes"][b, q] = targets_two_images()[b]["boxes"][j]
    got = SetCriterion(K, HungarianMatcher(focal_alpha=0.25), {}, focal_alpha=0.25)(out, targets_two_images())
    assert float(got["dn_loss_bbox"]) == 0.0
    assert float(got["dn_loss_giou"]) == pytest.approx(0.0, abs=1e-12)


def test_dn_normaliser_is_all_reduced(monkeypatch):
    """num_dn goes through the same all-reduce helper as num_boxes."""
    seen = []
    real = losses_mod.num_boxes_normaliser
    monkeypatch.setattr(losses_mod, "num_boxes_normaliser", lambda n, device=None: seen.append(n) or real(n, device))
    gen = torch.Generator().manual_seed(13)
    out = random_outputs(gen, K)
    out["dn"], _ = dn_case(gen, K)
    SetCriterion(K, HungarianMatcher(focal_alpha=0.25), {}, focal_alpha=0.25)(out, targets_two_images())
    assert seen == [3, 6]          # num_boxes, then num_dn


@pytest.mark.parametrize("eps", [0.0, 1e-6])
def test_loss_giou_with_dn_detrs_epsilon(eps):
    """loss_boxes' GIoU term equals the scalar loop with the same eps in both denominators
    (DN-DETR's box_ops), and the two forms really differ for boxes ~0.1 wide."""
    gen = torch.Generator().manual_seed(3)
    pred = torch.cat([0.3 + 0.2 * torch.rand(1, 4, 2, generator=gen, dtype=torch.float64),
                      0.05 + 0.1 * torch.rand(1, 4, 2, generator=gen, dtype=torch.float64)], -1)
    boxes = torch.cat([0.3 + 0.2 * torch.rand(3, 2, generator=gen, dtype=torch.float64),
                       0.05 + 0.1 * torch.rand(3, 2, generator=gen, dtype=torch.float64)], -1)
    targets = [{"boxes": boxes, "labels": torch.tensor([0, 1, 2])}]
    pairs = [(0, 1), (2, 0), (3, 2)]
    indices = [(torch.tensor([q for q, _ in pairs]), torch.tensor([j for _, j in pairs]))]
    _, loss_giou = loss_boxes(pred, targets, indices, 3.0, giou_eps=eps)
    naive = sum(1 - naive_giou(pred[0, q].tolist(), boxes[j].tolist(), eps) for q, j in pairs) / 3.0
    assert loss_giou.item() == pytest.approx(naive, rel=1e-12)
    exact = sum(1 - naive_giou(pred[0, q].tolist(), boxes[j].tolist()) for q, j in pairs) / 3.0
    assert (loss_giou.item() != pytest.approx(exact, rel=1e-7)) == (eps > 0)


def test_only_dn_uses_the_giou_epsilon():
    """dn's matcher and criterion take DN-DETR's 1e-6; DETR, Conditional DETR and SMCA keep
    DETR's exact GIoU (their reference box_ops divide by the plain union and area)."""
    for variant, eps in (("detr", 0.0), ("conditional", 0.0), ("smca", 0.0), ("dn", 1e-6)):
        _, criterion, _ = minidetr.build(variant, preset="tiny")
        assert criterion.giou_eps == eps and criterion.matcher.giou_eps == eps, variant
