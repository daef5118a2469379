"""Set criterion: DETR's Hungarian loss, its auxiliary-layer copies and the denoising loss.

Once the matcher has paired queries with objects (matcher.py, Eq. 1), the loss of one
decoder layer is (Carion et al., "End-to-End Object Detection with Transformers",
ECCV 2020, arXiv 2005.12872, Sec. 3.1):

    (2)  L_Hungarian = sum_i [ -log p_sigma(i)(c_i) + 1{c_i != no-object} L_box(b_i, b_sigma(i)) ]
         L_box(b, b') = lambda_L1 * ||b - b'||_1 + lambda_iou * (1 - GIoU(b, b'))

with the no-object log-probability down-weighted by eos_coef = 0.1 "to account for class
imbalance", and the box terms summed over matched pairs and divided by num_boxes, the
number of objects in the batch averaged over processes. Auxiliary decoding losses (DETR
Sec. 3.2): the same loss on every decoder layer's output, each with its own matching.

Sigmoid heads (Conditional DETR, Meng et al., ICCV 2021, arXiv 2108.06152; SMCA; DN-DETR)
replace the softmax cross-entropy by the sigmoid focal loss over K binary classifiers,
one-hot targets, unmatched queries all negative, summed and divided by num_boxes
(Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017, arXiv 1708.02002):

    (5)  FL(p_t) = -alpha_t * (1 - p_t)^gamma * log(p_t)
         p_t = p if the target is 1 else 1 - p,  alpha_t = alpha if 1 else 1 - alpha

Denoising (Li et al., "DN-DETR", CVPR 2022, arXiv 2203.01305, Sec. 3): noised copies of
the ground truth are fed as extra queries and trained to reconstruct the original boxes and
labels. The query-to-object pairing is known by construction, so the same loss functions run
with the given indices instead of the matcher's; only the indexed dn slots get a class loss
(padding slots are excluded, as in DN-DETR), and the normaliser is num_dn, the number of dn
queries that carry an object. Keys: dn_loss_ce, dn_loss_bbox, dn_loss_giou (+ _i).

Every loss below is a function of (predictions, targets, indices, normaliser); the matching
part and the dn part differ only in where the indices come from and in what unpaired slots
are told (no-object vs. nothing).
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from minidetr.box_ops import box_cxcywh_to_xyxy, pairwise_giou

IGNORE = -1   # class target of a slot that gets no class loss (dn padding slots)


# ---- elementwise focal loss and the normaliser ----

def sigmoid_focal_loss(logits, targets_onehot, alpha=0.25, gamma=2.0):
    """Elementwise sigmoid focal loss, Lin et al. ICCV 2017 Eq. (5).

    logits, targets_onehot: same shape, targets in {0, 1} (float). alpha None: no alpha_t.
    Returns the unreduced loss, same shape. 0.25 / 2 are RetinaNet's and Conditional DETR's.
    """
    p = logits.sigmoid()
    # -log(p_t), computed stably from the logits rather than as log(sigmoid(x)).
    ce = F.binary_cross_entropy_with_logits(logits, targets_onehot, reduction="none")
    p_t = p * targets_onehot + (1 - p) * (1 - targets_onehot)
    loss = ce * (1 - p_t) ** gamma       # easy examples (p_t -> 1) are down-weighted
    if alpha is not None:
        loss = (alpha * targets_onehot + (1 - alpha) * (1 - targets_onehot)) * loss
    return loss


def num_boxes_normaliser(count, device=None):
    """Number of boxes per process that every summed loss is divided by (DETR's num_boxes).

    count: this process's number of boxes (int). Under torch.distributed the counts are
    summed over processes and divided by the world size, so that each process divides by
    the same average and DDP's gradient averaging gives sum over all boxes / all boxes.
    Clamped to >= 1 so that a batch without objects gives finite losses. Returns a float.
    In one process the count is a Python int from the targets' lengths: no device round trip.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return max(float(count), 1.0)
    n = torch.as_tensor([float(count)], device=device)
    dist.all_reduce(n)                     # default op: SUM; the collective needs a tensor
    n = n / dist.get_world_size()
    return max(float(n.item()), 1.0)


# ---- gathering the paired slots ----

def paired_slots(indices, device):
    """Per-image (slot_idx, tgt_idx) pairs -> (batch_idx [M], slot_idx [M]) for indexing [B, Q, ...]."""
    batch_idx = torch.cat([torch.full_like(slot, i) for i, (slot, _) in enumerate(indices)])
    slot_idx = torch.cat([slot for slot, _ in indices])
    return batch_idx.to(device), slot_idx.to(device)


def paired_labels(targets, indices, device):
    """[M] labels of the paired objects, in the order of `paired_slots`."""
    labels = [t["labels"][tgt.to(t["labels"].device)] for t, (_, tgt) in zip(targets, indices)]
    return torch.cat(labels).to(device)


def class_targets(logits, targets, indices, fill):
    """[B, Q] int64 class target per slot: the paired object's label, `fill` elsewhere.

    fill = num_classes (no-object) for the matching queries; IGNORE for dn slots.
    """
    target_classes = torch.full(logits.shape[:2], fill, dtype=torch.int64, device=logits.device)
    target_classes[paired_slots(indices, logits.device)] = paired_labels(targets, indices, logits.device)
    return target_classes


# ---- the loss terms: one implementation for matching, aux and dn ----

def loss_labels(logits, target_classes, normaliser, focal_alpha=None, class_weight=None, gamma=2.0):
    """Classification loss of one layer, slots with target IGNORE excluded.

    logits: [B, Q, K'] (K' = K + 1 softmax, K focal), target_classes: [B, Q] int64 in
    [0, K] or IGNORE (K = no-object: for focal an all-zero one-hot row).
    focal_alpha None: DETR's weighted cross-entropy mean, sum_i w_i CE_i / sum_i w_i with
    w = class_weight[target] (1, or eos_coef for no-object); the normaliser is not used,
    as in DETR. A float: Eq. (5) summed over slots and classes / normaliser.
    Returns a scalar tensor (0 if no slot counts).
    """
    kept = (target_classes != IGNORE).to(logits.dtype)                    # [B, Q]
    classes = target_classes.clamp(min=0)                                 # IGNORE -> any valid id
    if focal_alpha is None:
        ce = F.cross_entropy(rearrange(logits, "b q k -> b k q"), classes, reduction="none")
        # DETR's weighted mean. For dn slots (fill IGNORE) every kept slot holds a real
        # label of weight 1, so this is the plain mean over the indexed dn slots.
        weight = class_weight[classes] * kept                             # [B, Q]
        return (weight * ce).sum() / weight.sum().clamp(min=torch.finfo(weight.dtype).tiny)
    k = logits.shape[-1]
    # One-hot over the K classes: the no-object id K matches no column, so unmatched queries
    # are negatives for every class (Conditional DETR), the sigmoid head has no "no object"
    # output. Written as a comparison: F.one_hot reads min and max of its input on the host.
    class_ids = torch.arange(k, device=classes.device)
    onehot = (classes[..., None] == class_ids).to(logits.dtype)          # [B, Q, K]
    focal = sigmoid_focal_loss(logits, onehot, focal_alpha, gamma)
    return (focal * kept[..., None]).sum() / normaliser


def loss_boxes(pred_boxes, targets, indices, normaliser, giou_eps=0.0):
    """L1 and GIoU losses of the paired slots (DETR Sec. 3.1, L_box).

    pred_boxes: [B, Q, 4] cxcywh in [0, 1]; targets: list of B dicts with boxes [t, 4] cxcywh.
    giou_eps: see box_ops.generalized_box_iou (DN-DETR 1e-6, DETR 0).
    Targets were checked where they were loaded, so the GIoU skips the box check (pairwise_giou).
    Returns (loss_bbox, loss_giou): sum over pairs of ||b - b'||_1 and of 1 - GIoU(b, b'),
    each / normaliser. Exactly 0 (still attached to the graph) when there are no pairs.
    """
    src = pred_boxes[paired_slots(indices, pred_boxes.device)]            # [M, 4]
    tgt = torch.cat([t["boxes"][j.to(t["boxes"].device)] for t, (_, j) in zip(targets, indices)])
    tgt = tgt.to(src)                                                     # [M, 4] cxcywh
    loss_bbox = F.l1_loss(src, tgt, reduction="none").sum() / normaliser
    # Pairwise [M, M] GIoU and keep the diagonal: M is a few hundred at most (as DETR).
    giou = torch.diag(pairwise_giou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt), giou_eps))
    loss_giou = (1 - giou).sum() / normaliser
    return loss_bbox, loss_giou


# ---- logging-only metrics (not in weight_dict, no gradient) ----

@torch.no_grad()
def class_error(logits, targets, indices):
    """100 - top-1 accuracy (%) over the paired slots; 0 when there are none."""
    labels = paired_labels(targets, indices, logits.device)
    if labels.numel() == 0:
        return logits.new_zeros(())
    predicted = logits[paired_slots(indices, logits.device)].argmax(-1)
    return 100 - 100 * (predicted == labels).float().mean()


@torch.no_grad()
def cardinality_error(logits, targets, focal):
    """Mean over images of |#queries predicting an object - #targets|.

    Softmax: a query predicts an object when its argmax is not the last (no-object) class.
    Focal: there is no no-object class, so DETR's rule would count every query; instead a
    query counts when its highest sigmoid probability exceeds 0.5 (our choice; the
    reference codebases log the meaningless softmax rule for sigmoid heads too).
    """
    if focal:
        predicted = (logits.sigmoid().amax(-1) > 0.5).sum(1)
    else:
        predicted = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1)
    num_targets = torch.as_tensor([len(t["labels"]) for t in targets], device=logits.device)
    return (predicted.float() - num_targets.float()).abs().mean()


# ---- the criterion ----

def at_least_float32(x):
    """Half/bfloat16 (AMP) -> float32, so the losses are not summed in half; float64 kept."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class SetCriterion(nn.Module):
    """DETR's set criterion, with focal classification, aux layers and denoising.

    num_classes: K object classes (ids 0..K-1; id K is no-object for the softmax head).
    matcher: HungarianMatcher. weight_dict: loss name -> weight (see build_weight_dict).
    eos_coef: no-object weight of the softmax CE (0.1 = DETR's --eos_coef).
    focal_alpha: None = softmax CE over K + 1 logits, a float = sigmoid focal over K logits.
    aux_loss: also supervise outputs['aux_outputs'].
    giou_eps: added to the GIoU denominators (DN-DETR 1e-6; 0 = DETR's exact GIoU).
    forward returns named, unweighted losses; combine them with total_loss. The outputs'
    logit width is checked once, where model and criterion meet (check_logits, in build).
    """

    def __init__(self, num_classes, matcher, weight_dict, eos_coef=0.1, focal_alpha=None,
                 aux_loss=True, giou_eps=0.0):
        super().__init__()
        self.num_classes, self.matcher, self.weight_dict = num_classes, matcher, weight_dict
        self.eos_coef, self.focal_alpha = eos_coef, focal_alpha
        self.aux_loss, self.giou_eps = aux_loss, giou_eps
        # float64 so that eos_coef is not rounded before it meets float64 logits; layer_losses
        # casts it to the logits' dtype.
        class_weight = torch.ones(num_classes + 1, dtype=torch.float64)
        class_weight[-1] = eos_coef            # DETR: no-object log-prob down-weighted x10
        self.register_buffer("class_weight", class_weight, persistent=False)

    @property
    def num_logits(self):
        """K + 1 (softmax, with DETR's no-object class) or K (sigmoid focal) logits per query."""
        return self.num_classes + (1 if self.focal_alpha is None else 0)

    def check_logits(self, num_logits):
        """Raise ValueError unless a model with `num_logits` outputs per query fits this criterion."""
        if num_logits != self.num_logits:
            raise ValueError(f"SetCriterion: pred_logits has {num_logits} classes, expected "
                             f"{self.num_logits} (num_classes={self.num_classes}, focal_alpha={self.focal_alpha})")

    def layer_losses(self, out, targets, indices, normaliser, fill):
        """The losses of one layer's {pred_logits, pred_boxes} for given pairs.

        fill: class target of unpaired slots (num_classes = no-object, or IGNORE).
        Returns {'loss_ce', 'loss_bbox', 'loss_giou'}, unweighted.
        """
        losses = {}
        logits = at_least_float32(out["pred_logits"])
        target_classes = class_targets(logits, targets, indices, fill)
        # to the logits' device (host -> device, asynchronous), then their dtype
        class_weight = self.class_weight.to(logits.device).to(logits.dtype)
        losses["loss_ce"] = loss_labels(logits, target_classes, normaliser, self.focal_alpha, class_weight)
        losses["loss_bbox"], losses["loss_giou"] = loss_boxes(
            at_least_float32(out["pred_boxes"]), targets, indices, normaliser, self.giou_eps)
        return losses

    def forward(self, outputs, targets):
        """outputs: the model's dict (pred_logits, pred_boxes, aux_outputs, optional dn);
        targets: list of B dicts (labels int64 [t], boxes [t, 4] cxcywh). Returns a dict:
        loss_ce, loss_bbox, loss_giou, the same with _0.._{L-2} for aux layers, dn_ versions
        when outputs has 'dn', and the logging-only class_error, cardinality_error.
        """
        logits = outputs["pred_logits"]
        no_object = self.num_classes
        num_boxes = num_boxes_normaliser(sum(len(t["labels"]) for t in targets), logits.device)

        # Eq. (1) on the last decoder layer and on every aux layer, each matched on its own,
        # to the pairing that is best for *its* predictions (DETR Sec. 3.2), not the last
        # layer's; all in one call, so that their costs reach the host in one copy.
        aux_layers = outputs.get("aux_outputs", []) if self.aux_loss else []
        indices, *aux_indices = self.matcher.match_layers([outputs, *aux_layers], targets)
        # Eq. (2) on the last layer, then on each aux layer
        losses = self.layer_losses(outputs, targets, indices, num_boxes, fill=no_object)
        losses["class_error"] = class_error(logits, targets, indices)
        losses["cardinality_error"] = cardinality_error(logits, targets, self.focal_alpha is not None)
        for i, (aux, aux_idx) in enumerate(zip(aux_layers, aux_indices)):
            aux_losses = self.layer_losses(aux, targets, aux_idx, num_boxes, no_object)
            losses.update({f"{k}_{i}": v for k, v in aux_losses.items()})

        if "dn" in outputs:
            losses.update(self.dn_losses(outputs["dn"], targets))
        return losses

    def dn_losses(self, dn, targets):
        """DN-DETR's reconstruction loss: the given (slot_idx, tgt_idx) pairs, no matching.

        dn: dict with pred_logits [B, P, K'], pred_boxes [B, P, 4], aux_outputs, indices.
        Unpaired dn slots (padding) get no loss at all: fill = IGNORE.
        """
        indices = dn["indices"]
        # num_dn = dn queries that carry an object (groups x objects); counted from the
        # indices, so it cannot disagree with the pairs that are actually supervised.
        num_dn = num_boxes_normaliser(sum(len(slot) for slot, _ in indices), dn["pred_logits"].device)
        layers = [("", dn)]
        if self.aux_loss:
            layers += [(f"_{i}", aux) for i, aux in enumerate(dn.get("aux_outputs", []))]
        losses = {}
        for suffix, out in layers:
            layer = self.layer_losses(out, targets, indices, num_dn, fill=IGNORE)
            losses.update({f"dn_{k}{suffix}": v for k, v in layer.items()})
        losses["dn_class_error"] = class_error(dn["pred_logits"], targets, indices)
        return losses


# ---- weights ----

def build_weight_dict(cls_loss_coef, bbox_loss_coef, giou_loss_coef, dec_layers, aux_loss, dn):
    """Loss name -> weight. DETR: 1 / 5 / 2; Conditional: 2 / 5 / 2; DN-DETR: 1 / 5 / 2.

    dn keys get the same weights as their matching counterparts (DN-DETR's build()); aux
    keys _0.._{dec_layers-2} likewise (DETR). class_error etc. are left out: logging only.
    """
    base = {"loss_ce": cls_loss_coef, "loss_bbox": bbox_loss_coef, "loss_giou": giou_loss_coef}
    if dn:
        base.update({f"dn_{k}": v for k, v in list(base.items())})
    weight_dict = dict(base)
    if aux_loss:
        for i in range(dec_layers - 1):
            weight_dict.update({f"{k}_{i}": v for k, v in base.items()})
    return weight_dict


def total_loss(losses, weight_dict):
    """sum over k in weight_dict of losses[k] * weight_dict[k] (keys missing from losses skipped).

    Summed in weight_dict's order, so that train.py, evaluation and the benchmarks get the
    same float from the same losses. ValueError if no loss has a weight.
    """
    terms = [losses[k] * w for k, w in weight_dict.items() if k in losses]
    if not terms:
        raise ValueError("total_loss: no loss in `losses` has a weight in `weight_dict`")
    return sum(terms)
