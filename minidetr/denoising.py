"""Query denoising: noised copies of the ground truth fed to the decoder during training.

DN-DETR (Li et al., "DN-DETR: Accelerate DETR Training by Introducing Query DeNoising",
CVPR 2022, arXiv 2203.01305) blames DETR's slow convergence on the Hungarian matching:
early in training a query is matched to one object in one epoch and another in the next,
so its regression target keeps jumping. DN adds a second set of decoder queries built
from the ground truth itself, each with its label and box slightly corrupted, and trains
the decoder to reconstruct the originals. These "denoising" (dn) queries need no matching:
slot k of a group is always supervised by the object it was made from, which gives the
decoder a stable regression task from the first iteration. At inference there are no
targets, hence no dn queries; the model is unchanged.

The noise, per ground-truth object with box (x, y, w, h) in [0, 1] and label c:
    (1) centre shifting: x' = x + dx, y' = y + dy,  |dx| <= lambda1 * w/2, |dy| <= lambda1 * h/2
    (2) box scaling:     w' in [(1 - lambda2) w, (1 + lambda2) w], likewise h'
    (3) label flipping:  with probability p, c' = a class drawn uniformly from [0, K)
dx, dy and the scale factors are uniform in their ranges, then the box is clamped to the
image. DN-DETR's code draws both from one flag, --box_noise_scale 0.4, so
lambda1 = lambda2 = 0.4; --label_noise_scale 0.2 is p.

Groups. Each image's objects are copied into `num_groups` groups (DN-DETR's --scalar 5),
each group with its own independent noise: several noisy views of every object per
iteration, at little cost (the decoder is small next to the backbone). All images in a
batch share one query layout, so a group has group_size = max #objects in the batch slots;
an image with fewer objects leaves the rest of its slots as padding.

    query axis:  [ group 0 | group 1 | ... | group G-1 | Q matching queries ]
                   <-- P = G * group_size dn slots -->

Attention mask (the paper's "attention mask" section, P groups of M slots, N matching):
    a_ij = 1 (i may not attend to j)  if j < P*M and floor(i/M) != floor(j/M),
    a_ij = 0 otherwise.
Rows i >= P*M (the matching queries) have floor(i/M) >= P, so they see no dn slot. Why:
  - a dn query is the answer plus a little noise; a matching query that could read it
    would learn to copy it, and at inference (no dn queries) it would have nothing to copy;
  - two groups hold noisy copies of the same objects; a group that could read another
    would average the two views instead of learning to denoise.
dn queries may read the matching queries (nothing leaks that way), and within a group
every slot sees every other, padding included (as DN-DETR's code does).

Buckets (--dn_bucket N, off by default). group_size changes with the batch's largest object
count, so the decoder's query count changes almost every batch: fine for eager PyTorch, a
recompilation each time for torch.compile or CUDA graphs on a GPU. With a bucket, a group
has ceil(max #objects / N) * N slots; the slots past the batch's max are masked out as keys
for every query, so every real slot and every matching query computes what it computed
without the bucket (to float rounding) and those extra slots are never supervised.

Content queries. DN-DETR encodes the (noised) label with a learned embedding of width
C - 1 and appends an indicator channel: 1 for dn queries, 0 for matching queries. The
matching queries, whose class is unknown, get the embedding of an extra "unknown" class K
(this replaces DAB-DETR's all-zero content query, in training and at inference).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn


# ---- noise (pure functions; global torch RNG unless a generator is given) ----

def noise_labels(labels, num_classes, flip_prob, generator=None):
    """Eq. (3), label flipping. labels: int64 [N] in [0, K). Returns int64 [N].

    Each label independently, with probability flip_prob, is replaced by a class drawn
    uniformly from [0, num_classes). The draw may return the original class, so the
    fraction that actually changes is flip_prob * (1 - 1/K). The "unknown" class K is
    never drawn. generator: a torch.Generator on labels' device, or None for the global RNG.
    """
    flip = torch.rand(labels.shape, generator=generator, device=labels.device) < flip_prob
    new = torch.randint(0, num_classes, labels.shape, generator=generator, device=labels.device)
    return torch.where(flip, new, labels)


def noise_boxes(boxes, scale, center_scale=None, size_scale=None, generator=None):
    """Eqs. (1)-(2), centre shifting and box scaling. boxes: [N, 4] cxcywh in [0, 1].

    (cx, cy, w, h) += u * (lambda1 * w/2, lambda1 * h/2, lambda2 * w, lambda2 * h), with u
    uniform in [-1, 1) per coordinate, then every coordinate is clamped to [0, 1].
    lambda1 = center_scale, lambda2 = size_scale; both default to `scale` (DN-DETR's single
    --box_noise_scale 0.4). Returns [N, 4] cxcywh in [0, 1].
    """
    center_scale = scale if center_scale is None else center_scale
    size_scale = scale if size_scale is None else size_scale
    wh = boxes[:, 2:]                                                  # [N, 2]
    # the largest allowed change of each coordinate: the shift of the centre is relative
    # to the half size (it stays inside the box for lambda1 < 1), the size change to the size
    max_change = torch.cat([center_scale * wh / 2, size_scale * wh], dim=-1)    # [N, 4]
    u = 2 * torch.rand(boxes.shape, generator=generator, device=boxes.device,
                       dtype=boxes.dtype) - 1                           # [N, 4] in [-1, 1)
    # Clamp each of the four numbers to [0, 1], as DN-DETR does; the box's edges may
    # still stick out of the image (cx + w/2 > 1 is not clamped away)
    return (boxes + u * max_change).clamp(0.0, 1.0)


# ---- the attention mask ----

def dn_attention_mask(num_groups, group_size, num_queries, device=None, used=None):
    """Self-attention mask for [dn group 0 | ... | dn group G-1 | matching queries].

    Returns bool [P + Q, P + Q], P = num_groups * group_size, True = query i may NOT attend
    to key j (the convention of transformer.attention's attn_mask). P = 0 gives [Q, Q] all
    False: then the decoder runs exactly as without denoising. used: the slots of each group
    the batch fills or pads without a bucket (the largest object count); the group's slots
    past it (a bucket's) are hidden from every query. None: all group_size.
    """
    num_dn = num_groups * group_size
    total = num_dn + num_queries
    if num_dn == 0:
        return torch.zeros(total, total, dtype=torch.bool, device=device)
    # Label every slot with a group id; all matching queries share the extra id G, so
    # "different id" alone blocks both group -> other group and matching -> any group.
    slot = torch.arange(total, device=device)
    group = torch.where(slot < num_dn, slot // group_size, num_groups)           # [P + Q]
    key_is_dn = rearrange(slot < num_dn, 'q -> 1 q')                            # columns: keys
    other_group = rearrange(group, 'q -> q 1') != rearrange(group, 'q -> 1 q')   # [P+Q, P+Q]
    # Keys among the matching queries (j >= P) are never blocked: nothing leaks that way.
    # No row is ever fully blocked (each sees its own group or the matching queries), so
    # the softmax never meets a row of only -inf.
    blocked = key_is_dn & other_group
    if used is not None and used < group_size:   # a bucket's extra slots: no query reads them
        blocked |= rearrange((slot < num_dn) & (slot % group_size >= used), 'k -> 1 k')
    return blocked


# ---- bookkeeping: which slot holds which object, and splitting the outputs ----

def dn_indices(num_objects, num_groups, group_size, device=None):
    """Where each image's real dn queries sit and which target each was made from.

    num_objects: list of B ints (objects per image). Object k of image b is copied into
    slot g * group_size + k of every group g. Returns a list of B pairs (slot_idx, tgt_idx),
    each int64 [G * n_b], group by group: slots (0, 1, .., n-1, s, s+1, ..), targets
    (0, 1, .., n-1, 0, 1, ..). The same (slot_idx, tgt_idx) form as the matcher's output,
    so the denoising loss reuses the matched-loss code with no matching.
    """
    group_start = torch.arange(num_groups, device=device) * group_size          # [G]
    indices = []
    for n in num_objects:
        obj = torch.arange(n, device=device)                                    # [n]
        slot_idx = rearrange(group_start, 'g -> g 1') + rearrange(obj, 't -> 1 t')
        tgt_idx = repeat(obj, 't -> g t', g=num_groups)
        indices.append((rearrange(slot_idx, 'g t -> (g t)'), rearrange(tgt_idx, 'g t -> (g t)')))
    return indices


def split_dn(x, pad_size, dim=1):
    """Split decoder outputs [.., P + Q, ..] along the query axis `dim` into
    (dn part [.., P, ..], matching part [.., Q, ..]); P = pad_size may be 0.

    dim=1 for [B, P+Q, K] heads' outputs, dim=2 for the stacked [L, B, P+Q, K].
    """
    total = x.shape[dim]
    if not 0 <= pad_size <= total:
        raise ValueError(f"split_dn: pad_size {pad_size} outside [0, {total}] (axis {dim})")
    dn_part, match_part = torch.split(x, [pad_size, total - pad_size], dim=dim)
    return dn_part, match_part


# ---- the module that builds the queries ----

@dataclass
class DenoisingQueries:
    """The dn half of the decoder input for one batch, and how to read its outputs.

    content: [B, P, C] label embedding of the noised label + indicator 1 at real slots;
             padding slots all zeros (indicator 0 too), as DN-DETR.
    boxes:   [B, P, 4] noised cxcywh in [0, 1]; padding slots (0.5, 0.5, 0.5, 0.5), the
             sigmoid of DN-DETR's zero anchor logits.
    indices: list of B (slot_idx, tgt_idx) int64 pairs, see dn_indices.
    num_groups, group_size: G and s, so P = pad_size = G * s.
    num_dn:  number of real dn queries in the batch, sum_b n_b * G (DN-DETR's loss
             normaliser, counted on this process only).
    used:    the slots of a group the batch uses, its largest object count (< group_size
             only with a bucket, whose extra slots the mask hides).
    """
    content: torch.Tensor
    boxes: torch.Tensor
    indices: list
    num_groups: int
    group_size: int
    num_dn: int
    used: int = None

    @property
    def pad_size(self):
        """P = G * group_size, the number of dn slots in front of the matching queries."""
        return self.num_groups * self.group_size

    def attn_mask(self, num_queries):
        """bool [P + Q, P + Q] decoder self-attention mask, True = blocked."""
        return dn_attention_mask(self.num_groups, self.group_size, num_queries,
                                 self.content.device, used=self.used)


class Denoiser(nn.Module):
    """Builds DN-DETR's denoising queries from the targets, and the matching content query.

    Defaults are DN-DETR's: --scalar 5 groups, --label_noise_scale 0.2 (flip probability),
    --box_noise_scale 0.4 (lambda1 = lambda2). The model calls join before its decoder
    (training and inference) and split after its heads; forward builds the noised queries.
    """

    def __init__(self, num_classes, hidden_dim, num_groups=5, label_noise_prob=0.2,
                 box_noise_scale=0.4, bucket=0):
        super().__init__()
        self.num_classes, self.hidden_dim, self.num_groups = num_classes, hidden_dim, num_groups
        self.bucket = bucket   # --dn_bucket: group slots a multiple of it (0: the batch's max)
        self.label_noise_prob, self.box_noise_scale = label_noise_prob, box_noise_scale
        # K real classes + the "unknown" class K; width C - 1 leaves room for the indicator.
        # nn.Embedding's N(0, 1) init, as DN-DETR.
        self.label_enc = nn.Embedding(num_classes + 1, hidden_dim - 1)

    def match_content(self, batch_size, num_queries):
        """[B, Q, C] content of the matching queries: "unknown" embedding + indicator 0."""
        unknown = F.pad(self.label_enc.weight[self.num_classes], (0, 1), value=0.0)   # [C]
        return repeat(unknown, 'c -> b q c', b=batch_size, q=num_queries)

    def join(self, queries, query_maker, targets=None):
        """The decoder's queries with denoising: the one place where DN-DETR meets the model.

        queries: the matching queries, dict(tgt [B, Q, C], and query_pos [B, Q, C] and/or
        ref_points [B, Q, r]); query_maker: the model's queries module, whose from_boxes turns
        the noised boxes into the same inputs (no parameters). The matching content becomes
        the "unknown" class embedding (training and inference). With targets (training), the
        dn queries go in front on the query axis, [dn groups (P) | matching (Q)], with the
        attention mask that hides them from the matching queries and from each other.
        Returns (queries, dn): the decoder's keyword inputs (+ self_attn_mask) and the
        DenoisingQueries to split the outputs with, or None without targets.
        """
        batch_size, num_queries = queries["tgt"].shape[:2]
        tgt = self.match_content(batch_size, num_queries).to(queries["tgt"].dtype)
        queries = dict(queries, tgt=tgt)
        if targets is None:
            return queries, None
        dn = self(targets)
        dn_queries = dict(tgt=dn.content, **query_maker.from_boxes(dn.boxes))
        joined = {k: torch.cat([dn_queries[k].to(v.dtype), v], dim=1) for k, v in queries.items()}
        return dict(joined, self_attn_mask=dn.attn_mask(num_queries)), dn

    @staticmethod
    def split(dn, *outputs):
        """The inverse of join's splice on head outputs [L, B, P + Q, *] (query axis 2):
        -> (matching parts [L, B, Q, *], dn parts [L, B, P, *]), each a tuple like `outputs`."""
        dn_parts, match_parts = zip(*(split_dn(x, dn.pad_size, dim=2) for x in outputs))
        return match_parts, dn_parts

    def forward(self, targets, generator=None):
        """targets: list of B dicts with labels int64 [n_b], boxes [n_b, 4] cxcywh in [0, 1].

        Returns DenoisingQueries; P = 0 (empty [B, 0, C], [B, 0, 4]) when no image has an
        object. The mask is `queries.attn_mask(num_queries)`, since Q belongs to the model.
        generator: a torch.Generator on the module's device, or None for the global RNG.
        """
        device = self.label_enc.weight.device
        num_objects = [len(t["labels"]) for t in targets]
        used = max(num_objects, default=0)
        group_size = -(-used // self.bucket) * self.bucket if self.bucket else used
        pad_size = self.num_groups * group_size
        indices = dn_indices(num_objects, self.num_groups, group_size, device)
        batch_idx, slot_idx, labels, boxes = _gather_targets(targets, indices, device)

        # Eqs. (1)-(3): every copy gets its own noise, so the G groups differ
        labels = noise_labels(labels, self.num_classes, self.label_noise_prob, generator)
        boxes = noise_boxes(boxes, self.box_noise_scale, generator=generator)

        # Scatter into the shared layout; slots no object fills keep the padding values
        content = self.label_enc.weight.new_zeros(len(targets), pad_size, self.hidden_dim)
        content[batch_idx, slot_idx] = F.pad(self.label_enc(labels), (0, 1), value=1.0)
        dn_boxes = boxes.new_full((len(targets), pad_size, 4), 0.5)    # [B, P, 4] cxcywh
        dn_boxes[batch_idx, slot_idx] = boxes
        return DenoisingQueries(content, dn_boxes, indices, self.num_groups, group_size,
                                num_dn=sum(num_objects) * self.num_groups, used=used)


def _gather_targets(targets, indices, device):
    """Flatten the batch's dn copies: (batch_idx, slot_idx, labels, boxes), each [M] or
    [M, 4], M = sum_b G * n_b, in the order of dn_indices (un-noised, on `device`)."""
    batch_idx, slot_idx, labels, boxes = [], [], [], []
    for b, (t, (slot, tgt)) in enumerate(zip(targets, indices)):
        batch_idx.append(torch.full_like(slot, b))
        slot_idx.append(slot)
        labels.append(t["labels"].to(device).long()[tgt])
        boxes.append(t["boxes"].to(device).reshape(-1, 4)[tgt])   # [0] or [0, 4] when empty
    return torch.cat(batch_idx), torch.cat(slot_idx), torch.cat(labels), torch.cat(boxes)
