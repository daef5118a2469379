"""COCO evaluation: run a model over a loader and score it with pycocotools' COCOeval.

The same function serves train.py (after each epoch), eval.py and the benchmarks, so every
number the project reports comes from the official metric computed one way:

    AP  = mean over IoU thresholds 0.50:0.05:0.95 and over categories of the area under the
          101-point interpolated precision/recall curve (COCOeval's first statistic)

Detections are the post-processed boxes (xyxy pixels of the original image) converted to
COCO's (x, y, w, h); a label is the category id itself, as DETR trains with them, unless
the dataset's ids were sparse and got rows 0..n-1 (minidetr/categories.py): then the
table maps each label back to the dataset's id. Under DDP each
rank evaluates its shard, the detections are gathered, and rank 0 (every rank, in fact:
the call is cheap) computes the 12 statistics. Images a sampler repeated to even out the
shards are counted once.
"""
import contextlib
import io
import math
import time
from collections import defaultdict

import numpy as np
import torch
from tqdm import tqdm

from minidetr import distributed
from minidetr.data import move_targets
from minidetr.losses import total_loss

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def autocast(device, amp):
    """torch.autocast for amp in {'bf16', 'fp16'}; a no-op context for 'none'."""
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def to_coco_detections(image_id, result, id_of=None):
    """One image's post-processed result -> COCO result dicts (bbox as x, y, w, h).

    id_of: {label: category id} (Categories.id_of); None or a label it lacks: the label itself.
    """
    boxes, id_of = result["boxes"].tolist(), id_of or {}
    return [{"image_id": int(image_id), "category_id": id_of.get(label, label), "score": float(score),
             "bbox": [x1, y1, x2 - x1, y2 - y1]}
            for (x1, y1, x2, y2), label, score in zip(boxes, result["labels"].tolist(),
                                                       result["scores"].tolist())]


@torch.no_grad()
def evaluate(model, criterion, postprocess, loader, coco_gt, device, amp="none", progress=True,
             categories=None):
    """-> dict(stats=[12 floats], per_class={cat_id: AP}, losses={name: mean}, detections=n,
    images=n, loop_seconds=s): loop_seconds is the batch loop (loading, forward, losses,
    post-processing), as DETR's evaluate times it, without the COCOeval summary after it.
    categories: the dataset's Categories (labels -> its ids); None: labels are the ids."""
    id_of = categories.id_of if categories is not None else None
    model.eval()
    detections, loss_sums, batches, images_seen = {}, defaultdict(float), 0, 0
    start = time.perf_counter()
    bar = tqdm(loader, desc="eval", leave=False, disable=not (progress and distributed.is_main_process()))
    for images, mask, targets in bar:
        images, mask = images.to(device), mask.to(device)
        targets = move_targets(targets, device)
        with autocast(device, amp):
            outputs = model(images, mask)
        if criterion is not None:
            losses = criterion(outputs, targets)
            loss_sums["loss"] += float(total_loss(losses, criterion.weight_dict))
            for k, v in losses.items():
                loss_sums[k] += float(v)
        batches, images_seen = batches + 1, images_seen + len(targets)
        orig_sizes = torch.stack([t["orig_size"] for t in targets])
        for target, result in zip(targets, postprocess(outputs, orig_sizes)):
            detections[int(target["image_id"])] = to_coco_detections(target["image_id"], result, id_of)
    loop_seconds = time.perf_counter() - start
    merged = {}
    for part in distributed.all_gather_object(detections):   # dedupe sampler padding
        merged.update(part)
    stats, per_class = coco_stats(coco_gt, merged)
    losses = {k: distributed.all_reduce_mean(v / max(batches, 1)) for k, v in sorted(loss_sums.items())}
    return {"stats": stats, "per_class": per_class, "losses": losses,
            "detections": sum(len(v) for v in merged.values()), "images": images_seen,
            "loop_seconds": loop_seconds}


def coco_stats(coco_gt, detections_by_image, verbose=False):
    """COCOeval on {image_id: [detections]} -> (12 stats, {category_id: AP or nan})."""
    image_ids = sorted(detections_by_image)
    results = [d for i in image_ids for d in detections_by_image[i]]
    if not image_ids or not results:   # COCO.loadRes refuses an empty list: nothing found = 0
        return [0.0] * 12, {c: 0.0 for c in coco_gt.getCatIds()}
    from pycocotools.cocoeval import COCOeval
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.params.imgIds = image_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    if verbose:
        print(printed.getvalue(), end="")
    return [float(s) for s in evaluator.stats], per_class_ap(evaluator)


def per_class_ap(evaluator):
    """AP (IoU .50:.95, all areas, 100 detections) per category from COCOeval's precision array."""
    precision = evaluator.eval["precision"]            # [T iou, R recall, K cats, A areas, M maxdets]
    out = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]                                   # -1 marks "no ground truth" cells
        out[cat_id] = float(np.mean(p)) if p.size else math.nan
    return out


def format_stats(stats):
    return "  ".join(f"{n} {v:.3f}" for n, v in zip(STAT_NAMES, stats))
