"""Matching instability: how often the Hungarian matching changes its mind during training.

DETR trains each query on the ground truth the bipartite matching (matcher.py, Eq. 1) pairs
it with. Early in training small changes in the predictions flip that matching, so the same
object teaches one query in one epoch and another query in the next, and every query keeps
chasing new targets. DN-DETR blames slow convergence on this and shows that denoising
reduces it: Li, Zhang, Liu, Guo, Ni, Zhang, "DN-DETR: Accelerate DETR Training by
Introducing Query DeNoising", CVPR 2022, arXiv 2203.01305, Sec. 3.1 and Fig. 2.

The paper, for one training image with decoder predictions O^i_0..O^i_{N-1} in epoch i and
ground truths T_0..T_{M-1}, stores the matching as a vector indexed by prediction,

    (1)  V^i_n = m if O^i_n matches T_m, -1 if O^i_n matches nothing     (n = 0..N-1)
    (2)  IS^i  = sum over n of 1(V^i_n != V^{i-1}_n)

We index the same matching by ground truth instead (issue 27), and report a fraction:

    (1') A^i_m = the query matched to T_m at evaluation i, -1 if none (only when M > N)
    (2') changed^i = sum over images, over m, of 1(A^i_m != A^{i-1}_m)
         train_instability^i = changed^i / (number of ground truths over those images)

Both are zero exactly when no image's matching changed. They count a change differently: a
ground truth that moves from query a to a previously unmatched query b is 1 change in (2')
and 2 in (2) (V_a and V_b both change); two ground truths swapping their queries are 2 in
both. So IS lies between changed and 2 * changed; the fraction has the advantage of a fixed
scale, 0 (nothing moved) to 1 (every ground truth on another query), whatever the number of
queries and objects.

How it is measured (`measure_assignment`): the same N training images each time (the first
N by id, --instability_images, 200 by default), with the validation transforms (no flip,
no crop: an augmentation would change the matching by itself), the model in eval mode
under torch.no_grad (no dropout, and no denoising queries: the denoiser adds them only in
training), the LAST decoder layer's predictions matched with the run's own matcher. The
paper records V^i during the training epoch itself; measuring a fixed, unaugmented set
with frozen weights at each evaluation isolates the change of the weights between two
evaluations from the change of the images' augmentation, and adds nothing to the
training step.

`InstabilityLog` is what train.py keeps for --log_instability: it measures before each
evaluation's checkpoint (so that checkpoint.pth holds the assignment, and --resume
compares with exactly what an uninterrupted run would), and gives the log line its
`train_instability` (None at the first measurement: nothing to compare with).
"""
import copy

import torch
from torch.utils.data import DataLoader

from minidetr import distributed
from minidetr.data import SeededDataset, collate_fn, make_transforms
from minidetr.evaluation import autocast


# ---- the score, on assignments (pure functions, host tensors) ----

def query_per_target(pred_idx, tgt_idx, num_targets):
    """The matcher's pairs of one image as Eq. (1'): the query of each ground truth.

    pred_idx, tgt_idx: int64 [m] as HungarianMatcher returns them (pred_idx ascending, m =
    min(Q, T)), query pred_idx[k] matched to ground truth tgt_idx[k]. num_targets: T.
    Returns int64 [T] in ground-truth order: A[tgt_idx[k]] = pred_idx[k], -1 for a ground
    truth left without a query (only when T > Q).
    """
    assignment = torch.full((num_targets,), -1, dtype=torch.int64)
    assignment[tgt_idx] = pred_idx          # i.e. pred_idx sorted by tgt_idx
    return assignment


def count_changes(previous, current):
    """Eq. (2'): (ground truths whose query changed, ground truths), summed over images.

    previous, current: lists of int64 [T_i] assignments (query per ground truth, -1 for
    none) of the same images in the same order, as `measure_assignment` returns them.
    A ground truth unmatched both times (-1 twice) has not changed.
    Raises ValueError if the two do not describe the same images (count or T_i differ).
    """
    if len(previous) != len(current):
        raise ValueError(f"count_changes: {len(previous)} images before, {len(current)} now")
    changed = total = 0
    for i, (before, now) in enumerate(zip(previous, current)):
        if before.shape != now.shape:
            raise ValueError(f"count_changes: image {i} had {len(before)} ground truths, now {len(now)}")
        changed += int((before != now).sum())     # host tensors: no device sync
        total += len(now)
    return changed, total


def fraction_changed(previous, current):
    """changed / total of `count_changes`, in [0, 1]; None when the images hold no ground truth."""
    changed, total = count_changes(previous, current)
    return changed / total if total else None


# ---- the measurement: forward the fixed images, match the last layer ----

@torch.no_grad()
def measure_assignment(model, matcher, batches, device, amp="none"):
    """The matching of every image of `batches`, as Eq. (1'): a list of int64 [T_i], CPU.

    model: a minidetr DETR (not DDP-wrapped); put in eval mode for the measurement (no
        dropout, no denoising queries) and back in its mode afterwards.
    matcher: the run's HungarianMatcher (criterion.matcher), so the costs are the training's.
    batches: iterable of (images [B, 3, H, W], mask [B, H, W], targets) as collate_fn makes
        them; targets' labels int64 [t], boxes [t, 4] cxcywh in [0, 1], on the CPU.
    amp: 'none' | 'bf16' | 'fp16', the forward's autocast (the matcher computes in float32).
    Images in batch order; within an image, ground truths in the targets' order.
    """
    was_training = model.training
    model.eval()
    outputs, targets = [], []
    try:
        for images, mask, batch_targets in batches:
            with autocast(device, amp):
                out = model(images.to(device, non_blocking=True), mask.to(device, non_blocking=True))
            # the last decoder layer only (aux_outputs are the earlier layers): [B, Q, K'], [B, Q, 4]
            outputs.append({"pred_logits": out["pred_logits"], "pred_boxes": out["pred_boxes"]})
            targets.append(batch_targets)
    finally:
        model.train(was_training)
    # Every forward is queued before the first match: the matcher's one device -> host copy
    # of its costs per batch then waits for the device once, not between every two forwards.
    assignment = []
    for out, batch_targets in zip(outputs, targets):
        for (pred_idx, tgt_idx), target in zip(matcher(out, batch_targets), batch_targets):
            assignment.append(query_per_target(pred_idx, tgt_idx, len(target["labels"])))
    return assignment


def fixed_images(train_set, cfg):
    """The measurement's images: the first cfg.instability_images training images by id,
    with the validation transforms, as a loader of fixed batches (the same ones every time).

    Loaded again at each measurement rather than kept: 200 images at the paper's 800 px are
    ~2.5 GB as float tensors. SeededDataset fixes each image's random draws (the resize
    draws a choice from a list of one size) and names a file that fails to load.
    """
    images = copy.copy(train_set)        # the same files and labels, another transform
    images.transforms = make_transforms("val", cfg.preset, cfg.image_size)
    images.ids = images.ids[:cfg.instability_images]      # ids are sorted: the first N by id
    return DataLoader(SeededDataset(images, cfg.seed), batch_size=cfg.batch_size, shuffle=False,
                      collate_fn=collate_fn, num_workers=cfg.num_workers,
                      generator=torch.Generator().manual_seed(cfg.seed))   # not torch's global one


# ---- what train.py keeps: the previous assignment, the checkpoint entry, the log entry ----

class InstabilityLog:
    """--log_instability: measure before each evaluation, log the fraction that changed.

    Made by `for_run`; without --log_instability every method does nothing (as train.py's
    disabled GradScaler passes through), so the loop calls them unconditionally.
    Only rank 0 measures (it alone writes log.txt and checkpoint.pth); the other ranks
    only take part in the stop check. `previous` is the assignment of the last measurement
    (None before the first), `score` the fraction to log at the evaluation that follows.
    """

    def __init__(self, loader, image_ids, matcher, device, amp, previous=None):
        self.loader, self.image_ids = loader, image_ids      # loader None: switched off
        self.matcher, self.device, self.amp = matcher, device, amp
        self.previous, self.score = previous, None

    @classmethod
    def for_run(cls, cfg, train_set, matcher, device, ckpt=None):
        """The run's log, with the previous assignment of --resume's checkpoint if it holds one
        for the same images (other images, e.g. another --instability_images: it starts afresh)."""
        if not cfg.log_instability or train_set is None:   # (no training: --eval)
            return cls(None, [], matcher, device, cfg.amp)
        log = cls(fixed_images(train_set, cfg), list(train_set.ids[:cfg.instability_images]),
                  matcher, device, cfg.amp)
        saved = (ckpt or {}).get("instability")
        if saved and list(saved["image_ids"]) == log.image_ids:
            log.previous = list(saved["assignment"])
        elif saved and distributed.is_main_process():
            print(f"instability: {cfg.resume} measured other images than these "
                  f"{len(log.image_ids)}; the first train_instability will be None")
        return log

    def measure_if_evaluating(self, model, progress, finished):
        """Call on every rank after progress.end_epoch(), before progress.save(): measures if the
        loop will evaluate next (progress.should_evaluate, and no stop requested)."""
        if self.loader is None:
            return
        # should_stop is a collective (every rank calls it). A stop skips the measurement, as
        # the loop then saves and ends without evaluating: the checkpoint keeps the assignment
        # of the last evaluation (and a SIGTERM's grace time is not spent on a forward pass).
        # A stop that arrives while the checkpoint is written still skips the evaluation:
        # that one measurement is kept for the next comparison without having been logged.
        if not progress.should_evaluate(finished) or progress.stop.should_stop():
            return
        if not distributed.is_main_process():
            return
        # the loader's workers and the model may not draw from the training's random
        # streams: whether a measurement ran must not change the training
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            current = measure_assignment(model, self.matcher, self.loader, self.device, self.amp)
        self.score = None if self.previous is None else fraction_changed(self.previous, current)
        self.previous = current

    def checkpoint_entry(self):
        """{'instability': {'image_ids': [N], 'assignment': N int64 [T_i]}} for checkpoint.pth
        (tensors and plain containers: torch.load(weights_only=True) reads it); {} before the
        first measurement and when off."""
        if self.previous is None:
            return {}
        return {"instability": {"image_ids": self.image_ids, "assignment": self.previous}}

    def log_entry(self):
        """{'train_instability': the fraction of ground truths on another query than at the
        last measurement, None at the first}; {} when off."""
        if self.loader is None:
            return {}
        return {"train_instability": None if self.score is None else round(self.score, 5)}
