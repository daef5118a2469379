"""Hungarian matcher: the one-to-one assignment of queries to ground-truth objects.

DETR predicts a fixed set of Q boxes per image and has no anchors and no NMS, so before a
loss can be computed every ground-truth object must be paired with exactly one query. The
pairing is the minimum-cost bipartite matching, found with the Hungarian algorithm
(scipy.optimize.linear_sum_assignment); queries left unpaired are trained to predict
"no object". Carion et al., "End-to-End Object Detection with Transformers", ECCV 2020,
arXiv 2005.12872, Sec. 3.1:

    (1)  sigma_hat = argmin over sigma in S_Q of  sum_i L_match(y_i, yhat_sigma(i))
         L_match(y_i, yhat_j) = -1{c_i != no-object} * p_j(c_i)
                                + 1{c_i != no-object} * L_box(b_i, b_j)
         L_box(b, b') = lambda_L1 * ||b - b'||_1 + lambda_iou * (1 - GIoU(b, b'))

Only real objects enter the cost (a target's "no object" slots cost the same for every
query), so the matrix is [Q, T] per image and T <= Q objects get a query each.

The class term comes in two forms, picked by `focal_alpha`:
  - None (DETR): softmax over K + 1 logits,   C_class = -p(c)
  - a float (Conditional DETR, Meng et al., ICCV 2021, arXiv 2108.06152; also SMCA and
    DN-DETR): the sigmoid focal-loss cost over K logits (Lin et al., ICCV 2017), p = sigmoid,
        C_class = alpha * (1-p)^gamma * (-log(p + 1e-8))
                  - (1-alpha) * p^gamma * (-log(1 - p + 1e-8))
    i.e. the focal loss of calling the query positive for c minus that of calling it
    negative: the change in classification loss if this query is assigned to the object.
"""
import numpy as np
import torch
from einops import rearrange
from scipy.optimize import linear_sum_assignment
from torch import nn

from minidetr.box_ops import box_cxcywh_to_xyxy, pairwise_giou


# ---- the class term of the cost ----

def softmax_class_cost(logits, tgt_labels):
    """DETR's class cost. logits: [N, K+1] (last = no-object), tgt_labels: int64 [T].

    Returns [N, T] = -softmax(logits)[n, label_t].
    """
    # Eq. (1) uses -p, not -log p: DETR Sec. 3.1 says the probability makes the class term
    # commensurable with L_box (both bounded, a few units at most) and worked better.
    # -p approximates the NLL by 1 - p; the constant 1 is dropped because every complete
    # assignment of an image's T objects picks exactly T cost entries, so a constant added
    # to all of them adds T * 1 to every candidate's total and cannot change the argmin.
    return -logits.softmax(-1)[:, tgt_labels]


def focal_class_cost(logits, tgt_labels, alpha=0.25, gamma=2.0):
    """Conditional DETR's class cost. logits: [N, K] (no no-object column), tgt_labels: [T].

    Returns [N, T] = FL(p, positive) - FL(p, negative) at p = sigmoid(logits)[n, label_t].
    """
    p = logits[:, tgt_labels].sigmoid()                     # [N, T]: only the needed columns
    # The 1e-8 keeps log finite at p = 0 or 1 (Conditional DETR's constant; its matcher
    # hard-codes alpha = 0.25, gamma = 2, we take them as arguments).
    positive = alpha * (1 - p) ** gamma * (-(p + 1e-8).log())
    negative = (1 - alpha) * p ** gamma * (-(1 - p + 1e-8).log())
    return positive - negative


# ---- the matcher ----

class HungarianMatcher(nn.Module):
    """Minimum-cost one-to-one matching of queries to targets, per image (Eq. 1).

    cost = cost_class * C_class + cost_bbox * L1(cxcywh) + cost_giou * (-GIoU(xyxy)).
    Defaults 1 / 5 / 2 are DETR's --set_cost_class/bbox/giou; Conditional and DN-DETR use
    2 / 5 / 2 with focal_alpha = 0.25. The -GIoU here is 1 - GIoU without the constant 1,
    dropped for the same reason as in `softmax_class_cost`.
    """

    def __init__(self, cost_class=1.0, cost_bbox=5.0, cost_giou=2.0,
                 focal_alpha=None, focal_gamma=2.0, giou_eps=0.0):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all three cost weights are 0, nothing to match on")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.giou_eps = giou_eps   # DN-DETR's 1e-6 in the GIoU denominators (box_ops)

    def class_cost(self, logits, tgt_labels):
        """[N, K'] logits, [T] labels -> [N, T] class cost (softmax or focal, see module doc)."""
        if self.focal_alpha is None:
            return softmax_class_cost(logits, tgt_labels)
        return focal_class_cost(logits, tgt_labels, self.focal_alpha, self.focal_gamma)

    def cost_terms(self, outputs, tgt_labels, tgt_boxes):
        """The three cost terms of one layer, each [B*Q, T_total] (see forward for the inputs)."""
        # At least float32, so that AMP half-precision logits do not round the costs into ties.
        dtype = torch.promote_types(outputs["pred_logits"].dtype, torch.float32)
        logits = rearrange(outputs["pred_logits"], "b q k -> (b q) k").to(dtype)
        boxes = rearrange(outputs["pred_boxes"], "b q box -> (b q) box").to(dtype)   # [B*Q, 4] cxcywh
        tgt_boxes = tgt_boxes.to(boxes)
        # Predicted boxes are sigmoid cxcywh (w, h >= 0) and targets were checked where they
        # were loaded, so box_ops.pairwise_giou skips generalized_box_iou's validity check.
        return {
            "class": self.class_cost(logits, tgt_labels.to(logits.device)),
            "bbox (L1)": torch.cdist(boxes, tgt_boxes, p=1),
            "giou": -pairwise_giou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes), self.giou_eps),
        }

    @torch.no_grad()
    def forward(self, outputs, targets):
        """Match each image's targets to its queries.

        outputs: dict with pred_logits [B, Q, K'] (K' = K + 1 softmax, K focal) and
            pred_boxes [B, Q, 4] cxcywh in [0, 1]; other keys are ignored.
        targets: list of B dicts with labels int64 [t] and boxes [t, 4] cxcywh; t may be 0.
        Returns a list of B pairs (pred_idx int64 [m], tgt_idx int64 [m]) on the CPU,
        m = min(Q, t), as linear_sum_assignment returns them: pred_idx ascending.
        Raises ValueError if a cost term is NaN or infinite (naming the term).
        """
        return self.match_layers([outputs], targets)[0]

    @torch.no_grad()
    def match_layers(self, layers, targets):
        """`forward` for several decoder layers' outputs at once (the last and the aux ones),
        with ONE device -> host copy of all their cost matrices.

        layers: list of L output dicts, each as `forward` takes, all with the same [B, Q].
        Returns L lists of B (pred_idx, tgt_idx) pairs, each layer matched on its own and
        exactly as `forward` would match it alone.
        """
        sizes = [len(t["labels"]) for t in targets]
        if sum(sizes) == 0:  # nothing to match: skip the device work entirely
            return [[(torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64))
                     for _ in targets] for _ in layers]

        # Per layer, the whole batch in one go: [B*Q, T_total], every query against every
        # target of every image; the off-diagonal (query of image i, target of image j) blocks
        # are wasted work but cost less than B small launches.
        tgt_labels = torch.cat([t["labels"] for t in targets])
        tgt_boxes = torch.cat([t["boxes"] for t in targets])                    # [T_total, 4] cxcywh
        terms, costs = [], []
        for outputs in layers:
            terms.append(self.cost_terms(outputs, tgt_labels, tgt_boxes))
            costs.append(self.cost_class * terms[-1]["class"] + self.cost_bbox * terms[-1]["bbox (L1)"]
                         + self.cost_giou * terms[-1]["giou"])
        # The one device -> host copy of the step (a .cpu() waits for the device): every
        # layer's costs together, [L, B, Q, T_total]; from here on numpy, on the host.
        b = layers[0]["pred_logits"].shape[0]
        cost = rearrange(torch.stack(costs), "l (b q) t -> l b q t", b=b).cpu().double().numpy()
        finite = np.isfinite(cost).all(axis=(1, 2, 3))                           # [L] on the host
        if not finite.all():
            _raise_non_finite(terms[int(np.argmin(finite))])
        return [self.assign(layer_cost, sizes) for layer_cost in cost]

    @staticmethod
    def assign(cost, sizes):
        """Eq. (1) per image on one layer's host costs [B, Q, T_total] (numpy float64)."""
        indices, start = [], 0
        for i, t in enumerate(sizes):
            # image i: its Q queries against its own t targets only
            rows, cols = linear_sum_assignment(cost[i, :, start:start + t])
            indices.append((torch.as_tensor(rows, dtype=torch.int64),
                            torch.as_tensor(cols, dtype=torch.int64)))
            start += t
        return indices


def _raise_non_finite(terms):
    """Name the first cost term holding NaN/inf (only runs on the error path)."""
    for name, term in terms.items():
        if not torch.isfinite(term).all():
            raise ValueError(
                f"HungarianMatcher: the {name} cost has non-finite entries "
                "(NaN/inf in pred_logits or pred_boxes? diverged training or a bad target box)")
    raise ValueError("HungarianMatcher: the weighted cost is non-finite (inf * 0 in a weight?)")
