"""The training loop's parts: optimiser, deterministic resumable data order, one epoch.

train.py strings these together; they live here so tests and benchmarks can run the very
same loop. Two properties matter beyond getting the numbers right:

- Determinism across interruption. The data order of epoch e is a permutation seeded by
  (seed, e); each sample's augmentation draws from a generator seeded by (seed, e, index);
  the loader's worker seeds come from its own generator. A checkpoint stores the model,
  optimiser, scheduler, scaler, every rank's global RNG (dropout, denoising noise) and how
  many batches of the epoch were done, so a resumed run continues with exactly the batches
  and random numbers an uninterrupted run would have used.
- Nothing silently wrong. A non-finite loss stops training with the epoch, the step and
  the loss terms that went non-finite, before the optimiser touches the weights.
"""
import math
import os
import signal
import time
from collections import defaultdict

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from tqdm import tqdm

from minidetr import distributed
from minidetr.check import check_before_training, split_files
from minidetr.data import (CocoDetection, collate_fn, default_shapes_root, make_shapes_dataset,
                           make_transforms)
from minidetr.evaluation import autocast, move_targets


class NonFiniteLossError(RuntimeError):
    pass


class DataError(RuntimeError):
    """A sample could not be loaded (missing or unreadable image, bad annotation).

    Raised with the dataset's own message (it names the file and the image id). Inside a
    DataLoader worker, torch re-raises it in the main process with the worker's traceback
    folded into the message; `message_of` recovers the one line a user needs.
    """

    @staticmethod
    def message_of(err):
        lines = [line for line in str(err).splitlines() if line.strip()]
        last = lines[-1] if lines else repr(err)
        return last.split("DataError: ", 1)[-1]


# ---- optimiser (DETR: AdamW, two learning rates, step drop) ----

def build_optimizer(model, cfg):
    """AdamW with the backbone at lr_backbone and everything else at lr; StepLR at lr_drop."""
    backbone = [p for n, p in model.named_parameters() if n.startswith("backbone.") and p.requires_grad]
    rest = [p for n, p in model.named_parameters() if not n.startswith("backbone.") and p.requires_grad]
    groups = [{"params": rest, "lr": cfg.lr}]
    if backbone:
        groups.append({"params": backbone, "lr": cfg.lr_backbone})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, cfg.lr_drop)
    return optimizer, scheduler


# ---- datasets ----

def build_datasets(cfg, num_classes_given):
    """(train, val) datasets (train None under --eval); checks num_classes against the largest
    category id. Every split is checked before any is built (minidetr/check.py): DatasetError
    lists every defect that would stop or corrupt the run, and what training skips is named once.
    """
    splits = ("val",) if cfg.eval else ("train", "val")
    if cfg.coco_path or cfg.train_json or cfg.val_json:
        files = {s: split_files(s, cfg.coco_path, getattr(cfg, f"{s}_json"), getattr(cfg, f"{s}_images"))
                 for s in splits}
    else:
        root = os.path.join(default_shapes_root(), f"n{cfg.shapes_train}_v{cfg.shapes_val}")
        if distributed.is_main_process():      # one writer; the others wait for it
            paths = make_shapes_dataset(root, num_train=cfg.shapes_train, num_val=cfg.shapes_val)
        distributed.barrier()
        paths = make_shapes_dataset(root, num_train=cfg.shapes_train, num_val=cfg.shapes_val)
        files = {s: (paths[f"{s}_json"], paths[f"{s}_images"]) for s in splits}
    data = check_before_training(files, verbose=distributed.is_main_process())
    built = {s: CocoDetection(folder, json_file, make_transforms(s, cfg.preset, cfg.image_size), data=data[s])
             for s, (json_file, folder) in files.items()}
    train, val = built.get("train"), built["val"]
    # a label >= num_classes would index past the classifier (or be read as "no object")
    largest = max((d for d in (train, val) if d is not None), key=lambda d: d.num_classes_needed)
    needed = largest.num_classes_needed
    if cfg.num_classes < needed:
        if num_classes_given:
            raise ValueError(f"--num_classes {cfg.num_classes} is smaller than the largest category "
                             f"id + 1 = {needed} in {largest.ann_file}; pass --num_classes {needed} or more")
        cfg.num_classes = needed
    return train, val


# ---- deterministic, resumable data order ----

class SeededDataset(Dataset):
    """Wraps a dataset so item i of epoch e always gets the same augmentation.

    The transforms draw from torch's global generator; here that generator is forked and
    seeded per (seed, epoch, index) around each item, so the draw no longer depends on
    which worker loads the item or on what ran before (a resumed run loads a different
    first batch in each worker, yet every item comes out identical).
    """

    def __init__(self, dataset, seed):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch * 10_007 + index) % (2 ** 63))
            try:
                return self.dataset[index]
            except (OSError, ValueError) as err:   # the dataset's messages name file and id
                raise DataError(str(err)) from err


class SkipSampler(Sampler):
    """The epoch's order from `base`, without its first `skip` indices (resuming mid-epoch)."""

    def __init__(self, base, skip=0):
        self.base, self.skip = base, skip

    def __iter__(self):
        return iter(list(self.base)[self.skip:])

    def __len__(self):
        return max(len(self.base) - self.skip, 0)


def make_loader(dataset, cfg, epoch, train, skip_batches=0):
    """DataLoader for one epoch; DistributedSampler shards it over ranks (a world of one too)."""
    sampler = DistributedSampler(dataset, num_replicas=distributed.get_world_size(),
                                 rank=distributed.get_rank(), shuffle=train, seed=cfg.seed,
                                 drop_last=False)
    sampler.set_epoch(epoch)
    if not isinstance(dataset, SeededDataset):   # evaluation too: same error reporting
        dataset = SeededDataset(dataset, cfg.seed)
    dataset.epoch = epoch
    return DataLoader(dataset, batch_size=cfg.batch_size,
                      sampler=SkipSampler(sampler, skip_batches * cfg.batch_size),
                      collate_fn=collate_fn, num_workers=cfg.num_workers,
                      generator=torch.Generator().manual_seed(cfg.seed + epoch),
                      drop_last=False)


# ---- stopping cleanly on SIGINT / SIGTERM ----

class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks before each step (then it saves).

    Under torchrun the ranks must stop after the same step, or those still training wait
    forever in the next all-reduce: should_stop() agrees on the flag across ranks. A
    terminal's Ctrl-C reaches every worker and torchrun, which forwards it again, so a
    repeat within REPEAT_S is the same request; a later one means "stop now, no saving".
    """
    REPEAT_S = 2.0

    def __init__(self):
        self.requested = False
        self._since = 0.0
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:   # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if not self.requested:
            self.requested, self._since = True, time.monotonic()
        elif time.monotonic() - self._since > self.REPEAT_S:   # a second Ctrl-C means now
            raise KeyboardInterrupt

    def should_stop(self):
        """True on every rank once any rank was asked to stop (a collective under torchrun)."""
        return distributed.all_reduce_mean(float(self.requested)) > 0

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ---- one epoch ----

def check_finite(losses, total, epoch, step):
    if not torch.isfinite(total):
        bad = sorted(k for k, v in losses.items() if not torch.isfinite(v).all())
        raise NonFiniteLossError(
            f"non-finite loss at epoch {epoch}, step {step}: {', '.join(bad) or 'the weighted sum'} "
            f"= {[float(losses[k]) for k in bad]}. The last good checkpoint was kept. Try a lower "
            f"--lr, --clip_max_norm 0.1, or --amp bf16 instead of fp16.")


def train_one_epoch(model, criterion, loader, optimizer, device, epoch, cfg, scaler=None,
                    start_step=0, stop=None, on_step=None):
    """Runs the epoch's remaining batches. Returns (averages dict, steps done, stopped early).

    on_step(step) is called after every optimiser step (train.py uses it for max_steps).
    """
    model.train()
    sums, count = defaultdict(float), 0
    step = start_step
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=not distributed.is_main_process(),
               initial=start_step, total=start_step + len(loader))
    for images, mask, targets in bar:
        # checked before each step, so a Ctrl-C during the evaluation also stops before the
        # next step; train.py saves the state left here (and checks again at the epoch's end)
        if stop is not None and stop.should_stop():
            return _averages(sums, count, optimizer), step, True
        images, mask = images.to(device, non_blocking=True), mask.to(device, non_blocking=True)
        targets = move_targets(targets, device)
        with autocast(device, cfg.amp):
            outputs = model(images, mask, targets)
        losses = criterion(outputs, targets)       # float32: the criterion runs outside autocast
        weight_dict = criterion.weight_dict
        total = sum(losses[k] * w for k, w in weight_dict.items() if k in losses)
        check_finite(losses, total, epoch, step)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(total).backward()
            scaler.unscale_(optimizer)
        else:
            total.backward()
        if cfg.clip_max_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_max_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        step += 1
        count += 1
        sums["loss"] += total.item()
        for k, v in losses.items():
            sums[f"{k}_unscaled"] += v.item()
            if k in weight_dict:
                sums[k] += v.item() * weight_dict[k]
        bar.set_postfix(loss=f"{sums['loss'] / count:.3f}")
        if on_step is not None and on_step(step) is False:
            return _averages(sums, count, optimizer), step, True
    return _averages(sums, count, optimizer), step, False


def _averages(sums, count, optimizer):
    out = {k: distributed.all_reduce_mean(v / max(count, 1)) for k, v in sorted(sums.items())}
    out["lr"] = optimizer.param_groups[0]["lr"]
    return out


def finite_or_nan(x):
    return x if math.isfinite(x) else float("nan")
