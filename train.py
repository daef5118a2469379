"""Train any minidetr variant; evaluate with the official COCO metric after each epoch.

    python train.py --variant dn                      # tiny preset on the built-in shapes dataset
    python train.py --variant conditional --coco_path /data/coco --output_dir out/cond
    torchrun --nproc_per_node 8 train.py --variant dn --coco_path /data/coco --output_dir out/dn

Flags are the official DETR ones (see minidetr/config.py, one field per flag) plus
--variant, --preset, --dn, --amp. With no dataset flags the tiny preset trains on the
built-in shapes dataset (written on first use under $MINIDETR_DATA or ~/.cache/minidetr).
Output (rank 0, when --output_dir is set): log.txt, one JSON line per epoch with the keys
official DETR writes; checkpoint.pth (atomic), which --resume continues exactly.
--log_every N prints the training loss every N steps.

The loop in train() reads top to bottom: data -> forward (under autocast with --amp) ->
loss -> backward (DDP all-reduces the gradients there) -> clip -> step -> log. What makes
a run resumable exactly (seeded data order, per-rank RNG, stop requests, checkpoints) is
minidetr.engine.TrainingProgress.
Ctrl-C (SIGINT) or SIGTERM saves a checkpoint of the current step and exits cleanly.
A mistake on the command line stops at once with "error: ..." and what to do; under
torchrun a rank that fails prints "[rank N] error: ..." and the whole job ends.
"""
import argparse
import copy
import json
import os
import statistics
import sys
import time
import traceback
from typing import NamedTuple

import torch

from minidetr import build, distributed, finetune
from minidetr.check import build_datasets
from minidetr.checkpoint import (append_line, checkpoint_write_failed, load_training_state, load_weights,
                                 read_resume)
from minidetr.config import add_arguments, config_from_args
from minidetr.convert import read_any_checkpoint
from minidetr.data import DataError, fit_num_classes, make_loader, move_targets
from minidetr.engine import LossMeter, TimeLimit, TrainingProgress
from minidetr.evaluation import autocast, evaluate, format_stats
from minidetr.instability import InstabilityLog
from minidetr.losses import total_loss
from minidetr.optim import build_optimizer


def get_args_parser():
    parser = argparse.ArgumentParser("minidetr training", description=__doc__.split("\n\n")[0])
    return add_arguments(parser)


class Run(NamedTuple):
    """Everything a run is built from, made by prepare() before any training."""
    cfg: object
    device: torch.device
    out_dir: str
    train_set: object
    val_set: object
    model: torch.nn.Module        # DDP-wrapped under torchrun
    raw_model: torch.nn.Module    # the model itself: what a checkpoint holds
    n_parameters: int             # trainable, counted once (printed, and in every log line)
    criterion: torch.nn.Module
    postprocess: torch.nn.Module
    optimizer: object
    scheduler: object
    scaler: torch.amp.GradScaler
    start: tuple                  # (epoch, step) to go on from: --resume's, or (start_epoch, 0)
    time_limit: TimeLimit
    instability: InstabilityLog   # --log_instability's (does nothing without it)


def main(argv=None):
    """Parse, build, then evaluate only, fit a handful of batches, or train."""
    run = prepare(get_args_parser().parse_args(argv))
    if run.cfg.eval:
        result = evaluate_run(run)
        if distributed.is_main_process():
            print(f"COCO bbox: {format_stats(result['stats'])}")
    elif run.cfg.overfit_batches:
        return overfit(run.cfg, run.model, run.criterion, run.postprocess, run.optimizer, run.scaler,
                       run.train_set, run.device)
    else:
        result = train(run)
    distributed.cleanup()
    return result


def prepare(args):
    """The run's settings, data, model, optimiser and --resume state, in that order; every
    mistake on the command line stops here, before any slow work, with what to do."""
    try:
        source = (finetune.Source(args.finetune, *read_any_checkpoint(args.finetune, args.variant)[:3])
                  if args.finetune else None)   # official files are converted on the fly
        cfg = config_from_args(args) if source is None else finetune.config_for(args, source)
        ckpt = read_resume(cfg.resume, cfg) if cfg.resume else None
        time_limit = TimeLimit(cfg, ckpt)   # counts from here: the dataset's generation included
        cfg = time_limit.resumed(cfg)   # a resumed run keeps the epochs its time limit chose
        device = setup(cfg)
        out_dir = make_output_dir(cfg)
        torch.manual_seed(cfg.seed + distributed.get_rank())
        train_set, val_set = build_datasets(cfg)
        cfg = fit_num_classes(cfg, (train_set, val_set), args.num_classes is not None)
        model, criterion, postprocess = build(cfg)   # may load --backbone_weights
        report = None
        if source is not None and ckpt is None:   # (with --resume, its weights win)
            report = finetune.load_for_finetune(model, source, cfg, val_set.categories,   # (one table
                                                by_name=cfg.finetune_by_name)                # for both splits)
        del source
        model.to(device)
        optimizer, scheduler = build_optimizer(model, cfg)
        # fp16 needs loss scaling (its range ends at 65504); bf16 has float32's range and needs
        # none: a disabled scaler passes the loss and the step through unchanged
        scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
        if ckpt is not None:
            load_weights(cfg.resume, ckpt, model, cfg)
            if not cfg.eval:
                load_training_state(cfg.resume, ckpt, cfg, optimizer, scheduler, scaler)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        sys.exit(f"error: {err}")
    raw_model, n_parameters = model, sum(p.numel() for p in model.parameters() if p.requires_grad)
    if distributed.is_dist():   # DDP: backward() all-reduces the gradients over the ranks
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if distributed.is_main_process():
        print(f"minidetr: variant {cfg.variant}{' + dn' if cfg.dn and cfg.variant != 'dn' else ''}, "
              f"preset {cfg.preset}, {n_parameters:,} trainable parameters, {len(val_set)} val images"
              + ("" if train_set is None else f", {len(train_set)} train images")
              + (f"; {cfg.epochs} epochs, or as many as fit in {cfg.time_limit:g} minutes on this "
                 f"machine (--time_limit)" if cfg.time_limit and not cfg.eval else ""))
        if report is not None:   # once: what came from the checkpoint, and what did not
            print(f"fine-tuning from {cfg.finetune}:", *report.lines(), sep="\n")
            if out_dir:
                write_log({"finetune": report.to_dict()}, out_dir)
    start = (ckpt.get("epoch", 0), ckpt.get("step", 0)) if ckpt else (cfg.start_epoch, 0)
    # --log_instability: DN-DETR's matching instability at each evaluation (off: does nothing)
    instability = InstabilityLog.for_run(cfg, train_set, criterion.matcher, device, ckpt)
    return Run(cfg, device, out_dir, train_set, val_set, model, raw_model, n_parameters, criterion,
               postprocess, optimizer, scheduler, scaler, start, time_limit, instability)


def evaluate_run(run):
    """COCO evaluation of the model on the val split (the val transforms draw from torch's
    generator: forked, so whether an evaluation ran, as a run resumed from an epoch's end
    skips that epoch's, cannot change the training)."""
    loader = make_loader(run.val_set, run.cfg, 0, train=False)
    with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
        return evaluate(run.model, run.criterion, run.postprocess, loader, run.val_set.coco, run.device,
                        run.cfg.amp, categories=run.val_set.categories)


def train(run):
    """The epochs: steps, then checkpoint, then evaluation and log.txt's line -> the last result."""
    cfg, model, criterion, optimizer, out_dir = run.cfg, run.model, run.criterion, run.optimizer, run.out_dir
    time_limit, instability = run.time_limit, run.instability
    result, loop_start = None, time.time()

    def save(progress, finished):
        try:
            progress.save(out_dir, run.raw_model, optimizer, run.scheduler, run.scaler, finished,
                          extra={**instability.checkpoint_entry(), **time_limit.checkpoint_entry()})
        except OSError as err:   # a full disk: checkpoint.pth or the epoch's copy left as it was
            sys.exit(f"error: {checkpoint_write_failed(err, out_dir)}")

    with TrainingProgress(cfg, run.train_set, *run.start) as progress:   # exact resume, Ctrl-C, max_steps
        while progress.epoch < cfg.epochs:
            model.train()
            meter = LossMeter()
            if progress.step == 0:          # a whole epoch: --time_limit may time it
                time_limit.epoch_begins()
            for batch in progress.batches():
                loss, losses = train_step(model, criterion, optimizer, run.scaler, batch, cfg, run.device, meter)
                meter.add(loss, losses, criterion.weight_dict, progress.epoch, progress.step)   # no sync
                if cfg.log_every and (progress.global_step + 1) % cfg.log_every == 0:
                    stop_if_non_finite(meter)       # the steps since the last look, in one sync
                    if distributed.is_main_process():
                        print(f"step {progress.global_step + 1}: loss {loss.item():.6f}", flush=True)
            stop_if_non_finite(meter)               # never a non-finite model in a checkpoint
            train_stats = meter.averages(optimizer.param_groups[0]["lr"])
            finished = progress.end_epoch()
            if finished:
                run.scheduler.step()
            # before the checkpoint: it keeps the assignment a resumed run compares with
            instability.measure_if_evaluating(run.raw_model, progress, finished)
            save(progress, finished)
            if progress.stop.should_stop():
                interrupted(progress, out_dir)
                break
            if progress.should_evaluate(finished):
                eval_start = time.time()
                result = evaluate_run(run)
                log = epoch_log(train_stats, result, progress, finished, run.n_parameters)
                log.update(epoch_time=round(time.time() - loop_start, 1),   # since the loop started
                           eval_time=round(time.time() - eval_start, 2), **instability.log_entry())
                if distributed.is_main_process():
                    print(f"epoch {log['epoch']} step {log['step']}: loss {train_stats['loss']:.3f}  "
                          f"{format_stats(result['stats'])}", flush=True)
                write_log(log, out_dir)
                if finished and time_limit.minutes:   # once, after the first whole epoch
                    cut = time_limit.fit(cfg, progress.epoch)
                    if cut is not cfg:   # saved again, so that a resumed run keeps the cut
                        cfg = progress.cfg = cut
                        save(progress, finished=False)
            if progress.ended_early:
                break
    return result


def epoch_log(train_stats, result, progress, finished, n_parameters):
    """log.txt's line for an evaluation: official DETR's keys, then minidetr's own."""
    return {**{f"train_{k}": v for k, v in train_stats.items()},
            **{f"test_{k}": v for k, v in result["losses"].items()},
            "test_coco_eval_bbox": result["stats"],
            # AP per category id (as in the json), NaN (null) where val has none
            "test_ap_per_category": {str(k): (None if v != v else round(v, 5))
                                     for k, v in result["per_class"].items()},
            "epoch": progress.epoch - 1 if finished else progress.epoch,
            "step": progress.global_step,
            "n_parameters": n_parameters,
            # speed: the epoch's median step (loading + training) and the evaluation's images/s
            "step_time_median": round(statistics.median(progress.step_times), 4)
            if progress.step_times else None,
            "eval_img_s": round(result["images"] / max(result["loop_seconds"], 1e-9), 2)}


def train_step(model, criterion, optimizer, scaler, batch, cfg, device, meter=None):
    """One optimiser step on one batch -> (weighted loss, {name: unweighted loss}).

    forward (under autocast with --amp; targets are read by denoising only) -> loss in
    float32 -> backward (DDP all-reduces the gradients there) -> clip -> step. `meter`
    (LossMeter) names the loss that went non-finite first when NaN predictions reach the matcher.
    """
    images, mask, targets = batch
    images, mask = images.to(device, non_blocking=True), mask.to(device, non_blocking=True)
    targets = move_targets(targets, device)
    with autocast(device, cfg.amp):                  # the evaluation's autocast too
        outputs = model(images, mask, targets)
    try:
        losses = criterion(outputs, targets)         # float32: outside autocast
    except ValueError:                               # NaN predictions: name the loss
        if meter is not None:                        # that went non-finite first
            stop_if_non_finite(meter)
        raise
    loss = total_loss(losses, criterion.weight_dict)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()                    # DDP all-reduces the gradients here
    scaler.unscale_(optimizer)                       # fp16: clip the true gradients
    if cfg.clip_max_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_max_norm)
    scaler.step(optimizer)                           # fp16: skipped if the gradients overflowed
    scaler.update()
    return loss, losses


# ---- --overfit_batches: can the model fit a handful of images at all? ----

OVERFIT_WINDOW = 50          # steps per loss average
OVERFIT_FLAT = 0.02          # "flat": a window's mean loss within 2% of the window before
OVERFIT_MAX_STEPS = 2000     # unless --max_steps says otherwise


def overfit(cfg, model, criterion, postprocess, optimizer, scaler, train_set, device):
    """Train on the first N batches (unaugmented, in memory) until the loss flattens, then
    evaluate on exactly those images and say in one line whether the model fits them.

    The classic first check when AP stays at 0: a model that cannot fit 8 images it sees
    hundreds of times points at the data (labels, boxes, classes), not at the schedule.
    """
    from minidetr.data import collate_fn, make_transforms
    images = copy.copy(train_set)          # the same files and labels, validation transforms
    images.transforms = make_transforms("val", cfg.preset, cfg.image_size)
    count = min(cfg.overfit_batches * cfg.batch_size, len(images))
    images.ids = images.ids[:count]
    batches = [collate_fn([images[i] for i in range(start, min(start + cfg.batch_size, count))])
               for start in range(0, count, cfg.batch_size)]
    max_steps = cfg.max_steps or OVERFIT_MAX_STEPS
    model.train()
    window, means, step = [], [], 0
    for step in range(1, max_steps + 1):
        loss, _ = train_step(model, criterion, optimizer, scaler, batches[(step - 1) % len(batches)],
                             cfg, device)
        window.append(loss.detach())
        if len(window) == OVERFIT_WINDOW:            # one host sync per window
            means.append(float(torch.stack(window).mean()))
            window = []
            print(f"overfit step {step}: loss {means[-1]:.4f}", flush=True)
            if means[-1] != means[-1]:
                sys.exit(f"error: the loss went non-finite by step {step}; try a lower --lr")
            if len(means) >= 4 and means[-1] > (1 - OVERFIT_FLAT) * means[-2]:
                break
    loader = torch.utils.data.DataLoader(images, batch_size=cfg.batch_size, collate_fn=collate_fn)
    result = evaluate(model, criterion, postprocess, loader, images.coco, device, cfg.amp,
                      categories=images.categories)
    ap50 = result["stats"][1]
    verdict = ("fits them: the data and labels are learnable" if ap50 >= 0.9 else
               "fits them only partly" if ap50 >= 0.5 else
               "cannot fit them: look at the labels, boxes and classes (python -m minidetr.check), "
               "or the learning rate")
    print(f"overfit: {count} images, {step} steps, loss {means[0] if means else float('nan'):.3f} -> "
          f"{means[-1] if means else float('nan'):.3f}, AP50 on them {ap50:.3f}: the model {verdict}",
          flush=True)
    return result


def stop_if_non_finite(meter):
    """Exit with the epoch, step and loss terms of the first non-finite loss since the last look.

    The loop looks every --log_every steps, before every checkpoint and when the matcher
    meets NaN predictions (what the update after a NaN loss leaves): never every step, which
    would make the host wait for the device each time.
    """
    message = meter.non_finite()
    if message:
        sys.exit(f"error: {message}")


def setup(cfg):
    """The device this process trains on (joining torchrun's process group, if any)."""
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {cfg.device}, but this torch sees no CUDA device; use --device cpu")
    return distributed.init_distributed(cfg.device)


def make_output_dir(cfg):
    """--output_dir, created; '' on ranks other than 0 and when only evaluating (nothing written)."""
    out_dir = cfg.output_dir if distributed.is_main_process() and not cfg.eval else ""
    if out_dir:
        try:
            os.makedirs(out_dir, exist_ok=True)
        except OSError as err:
            raise ValueError(f"cannot create --output_dir {out_dir}: {err.strerror}") from None
    return out_dir


def write_log(log, out_dir):
    """Rank 0: one JSON line in log.txt (official DETR's keys; a fine-tuned run's first line
    says where its weights came from)."""
    if not distributed.is_main_process():
        return
    if out_dir:
        try:   # all of the line or none of it: a full disk leaves the earlier lines whole
            append_line(os.path.join(out_dir, "log.txt"), json.dumps(log) + "\n")
        except OSError as err:
            sys.exit(f"error: {checkpoint_write_failed(err, out_dir)}")


def interrupted(progress, out_dir):
    if distributed.is_main_process():
        path = os.path.join(out_dir, "checkpoint.pth") if out_dir else ""
        print(f"interrupted: saved epoch {progress.epoch} step {progress.step} to {path}; continue "
              f"with --resume {path}" if path else "interrupted (no --output_dir: nothing saved)")


def run(argv=None):
    """The command line's entry point: main(), with its failures told in one line.

    A sample that cannot be loaded (DataError, raised inside a loader worker) becomes one
    "error:" line naming the file and the image id, not a worker's traceback. Under torchrun
    a failing rank prints its error with its rank and exits at once: left to itself, it would
    go through interpreter teardown, which can block on a process group whose peers sit in a
    collective (NCCL especially), and the peers would wait for it up to the process group's
    timeout. os._exit skips that teardown; torchrun sees the exit code and stops the other
    ranks, and the log shows which rank failed why. A bug keeps its traceback either way.
    """
    under_torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
    try:
        return main(argv)
    except DataError as err:
        message = f"error: {DataError.message_of(err)} (fix or remove it from the annotation file)"
    except SystemExit as err:
        if err.code in (0, None) or not under_torchrun:
            raise
        message = str(err.code)        # our "error: ..." messages: no traceback needed
    except BaseException:              # a bug, or a second Ctrl-C: keep the traceback
        if not under_torchrun:
            raise
        message = traceback.format_exc()
    if not under_torchrun:
        sys.exit(message)
    sys.stdout.flush()
    print(f"[rank {os.environ.get('RANK', '?')}] {message}", file=sys.stderr, flush=True)
    os._exit(1)


if __name__ == "__main__":
    run()
