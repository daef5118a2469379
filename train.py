"""Train any minidetr variant; evaluate with the official COCO metric after each epoch.

    python train.py --variant dn                      # tiny preset on the built-in shapes dataset
    python train.py --variant conditional --coco_path /data/coco --output_dir out/cond
    torchrun --nproc_per_node 8 train.py --variant dn --coco_path /data/coco --output_dir out/dn

Flags are the official DETR ones (see minidetr/config.py, one field per flag) plus
--variant, --preset, --dn, --amp. With no dataset flags the tiny preset trains on the
built-in shapes dataset (written on first use under $MINIDETR_DATA or ~/.cache/minidetr).
Output (rank 0, when --output_dir is set): log.txt, one JSON line per epoch with the keys
official DETR writes; checkpoint.pth (atomic), which --resume continues exactly.
Ctrl-C (SIGINT) or SIGTERM saves a checkpoint of the current step and exits cleanly.
A mistake on the command line stops at once with "error: ..." and what to do; under
torchrun a rank that fails prints "[rank N] error: ..." and the whole job ends.
"""
import argparse
import json
import os
import re
import sys
import time
import traceback

import torch

from minidetr import build, distributed
from minidetr.checkpoint import load_safely, rng_state, save_atomic, set_rng_state
from minidetr.config import add_arguments, config_from_args
from minidetr.convert import is_official_checkpoint
from minidetr.engine import (DataError, NonFiniteLossError, SeededDataset, StopRequest,
                             build_datasets, build_optimizer, make_loader, train_one_epoch)
from minidetr.evaluation import evaluate, format_stats


def get_args_parser():
    parser = argparse.ArgumentParser("minidetr training", description=__doc__.split("\n\n")[0])
    return add_arguments(parser)


def save_checkpoint(path, model, optimizer, scheduler, scaler, cfg, epoch, step, rngs):
    """rngs: every rank's rng_state(), so each rank resumes with its own random numbers.

    A write that fails (a full disk) stops the run; save_atomic leaves the previous file whole.
    """
    try:
        save_atomic({"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                     "lr_scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict() if scaler is not None else None,
                     "epoch": epoch, "step": step, "config": cfg.to_dict(), "rng": rngs,
                     "world_size": len(rngs)}, path)
    except OSError as err:
        sys.exit(f"error: cannot write {path}: {err.strerror or err}; the checkpoint saved there "
                 f"before (if any) is unchanged: free some space, then continue with --resume {path}")


def unwrap(model):
    return model.module if hasattr(model, "module") else model


# settings that decide the model's weights and what they mean: a checkpoint cannot continue
# under others (num_classes is checked once the dataset has set it)
MODEL_KEYS = ("variant", "preset", "dn", "backbone", "backbone_stage", "dilation", "hidden_dim",
              "nheads", "enc_layers", "dec_layers", "dim_feedforward", "num_queries", "activation",
              "smca_scale", "smca_multiscale")


def read_resume(path, cfg):
    """Load --resume and check it fits this run's model; ValueError says what to do if not.

    Runs before the dataset and the model are built, so a wrong file stops the run at once.
    """
    ckpt = load_safely(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{path} has no 'model' entry; is it a minidetr or DETR checkpoint?")
    if is_official_checkpoint(ckpt):   # its weights have the reference's names, not ours
        raise ValueError(f"{path} is an official DETR-family checkpoint; convert it first: python -m "
                         f"minidetr.convert --variant {cfg.variant} --src {path} --dst converted.pth, "
                         f"then --resume converted.pth")
    check_same_settings(path, ckpt, cfg, MODEL_KEYS)
    return ckpt


def check_same_settings(path, ckpt, cfg, keys):
    saved = ckpt.get("config", {})
    for key in keys:
        if key in saved and saved[key] != getattr(cfg, key, None):
            raise ValueError(f"{path} was trained with --{key} {saved[key]!r} but this run has "
                             f"{getattr(cfg, key, None)!r}; pass the same settings to resume")


def load_resume(path, ckpt, model, optimizer, scheduler, scaler, cfg):
    """Restore a checkpoint read by read_resume; returns (epoch, step) to continue from."""
    check_same_settings(path, ckpt, cfg, ("num_classes",))
    if ckpt.get("step", 0) and optimizer is not None:
        # mid-epoch, `step` counts batches of this size on this many ranks
        check_same_settings(path, ckpt, cfg, ("batch_size",))
        if ckpt.get("world_size", 1) != distributed.get_world_size():
            raise ValueError(f"{path} stopped mid-epoch with {ckpt.get('world_size', 1)} process(es) "
                             f"but this run has {distributed.get_world_size()}; resume with as many, "
                             f"or from an end-of-epoch checkpoint_eNNNN.pth")
    try:
        unwrap(model).load_state_dict(ckpt["model"])
    except RuntimeError as err:   # missing / unexpected / wrongly shaped weights
        detail = " ".join(str(err).split())   # torch lists every key: keep the start
        raise ValueError(f"the weights in {path} do not fit this model; resume with the settings "
                         f"it was trained with ({detail[:240]}{'...' * (len(detail) > 240)})") from None
    if optimizer is not None and "optimizer" in ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["lr_scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if "rng" in ckpt:   # one state per rank (a world of another size: from an epoch's end)
            rngs = ckpt["rng"] if isinstance(ckpt["rng"], list) else [ckpt["rng"]]
            set_rng_state(rngs[distributed.get_rank() % len(rngs)])
    return ckpt.get("epoch", 0), ckpt.get("step", 0)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    # every mistake on the command line stops here, before any slow work, with what to do
    try:
        cfg = config_from_args(args)
        ckpt = read_resume(cfg.resume, cfg) if cfg.resume else None
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"error: --device {cfg.device}, but this torch sees no CUDA device; use --device cpu")
    device = distributed.init_distributed(cfg.device)
    main_process = distributed.is_main_process()
    out_dir = cfg.output_dir if main_process and not cfg.eval else ""   # only rank 0 writes
    if out_dir:
        try:
            os.makedirs(out_dir, exist_ok=True)
        except OSError as err:
            sys.exit(f"error: cannot create --output_dir {out_dir}: {err.strerror}")
    torch.manual_seed(cfg.seed + distributed.get_rank())
    try:
        train_set, val_set = build_datasets(cfg, args.num_classes is not None)
        model, criterion, postprocess = build(cfg)   # may load --backbone_weights
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        sys.exit(f"error: {err}")
    model.to(device)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if distributed.is_dist():
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer, scheduler = build_optimizer(unwrap(model), cfg)
    scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None
    epoch, step = cfg.start_epoch, 0
    if ckpt is not None:
        try:
            epoch, step = load_resume(cfg.resume, ckpt, model, None if cfg.eval else optimizer,
                                      scheduler, scaler, cfg)
        except ValueError as err:
            sys.exit(f"error: {err}")
        del ckpt
    if main_process:
        print(f"minidetr: variant {cfg.variant}{' + dn' if cfg.dn and cfg.variant != 'dn' else ''}, "
              f"preset {cfg.preset}, {n_parameters:,} trainable parameters, "
              f"{len(val_set)} val images" + ("" if train_set is None else f", {len(train_set)} train images"))

    def run_eval():
        # the val transforms draw from torch's generator: fork it, so whether an evaluation ran
        # (a run resumed from an epoch's end skips that epoch's) cannot change the training
        loader = make_loader(val_set, cfg, 0, train=False)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            return evaluate(model, criterion, postprocess, loader, val_set.coco, device, cfg.amp)

    if cfg.eval:
        result = run_eval()
        if main_process:
            print(f"COCO bbox: {format_stats(result['stats'])}")
        distributed.cleanup()
        return result

    train_seeded = SeededDataset(train_set, cfg.seed)
    steps_per_epoch = -(-len(train_set) // (cfg.batch_size * distributed.get_world_size()))
    global_step = epoch * steps_per_epoch + step
    result = None
    start_time = time.time()
    if cfg.max_steps and global_step >= cfg.max_steps:   # resumed at the budget: train no more
        if main_process:
            print(f"nothing to train: the checkpoint is at step {global_step}, --max_steps is {cfg.max_steps}")
        epoch = cfg.epochs
    with StopRequest() as stop:
        while epoch < cfg.epochs:
            loader = make_loader(train_seeded, cfg, epoch, train=True, skip_batches=step)

            def on_step(s):
                return not (cfg.max_steps and global_step + s - step >= cfg.max_steps)
            try:
                train_stats, new_step, stopped = train_one_epoch(
                    model, criterion, loader, optimizer, device, epoch, cfg, scaler,
                    start_step=step, stop=stop, on_step=on_step)
            except NonFiniteLossError as err:
                sys.exit(f"error: {err}")
            global_step += new_step - step
            step = new_step
            finished_epoch = step >= steps_per_epoch
            if finished_epoch:
                scheduler.step()
                epoch, step = epoch + 1, 0
            rngs = distributed.all_gather_object(rng_state())   # a collective: every rank
            if out_dir:
                save_checkpoint(os.path.join(out_dir, "checkpoint.pth"), model, optimizer, scheduler,
                                scaler, cfg, epoch, step, rngs)
                if finished_epoch:
                    rotate_checkpoints(out_dir, epoch, cfg.keep_checkpoints)
            if stop.should_stop():
                if main_process:
                    path = os.path.join(out_dir, "checkpoint.pth") if out_dir else ""
                    print(f"interrupted: saved epoch {epoch} step {step} to {path}; continue with "
                          f"--resume {path}" if path else "interrupted (no --output_dir: nothing saved)")
                break
            last = epoch >= cfg.epochs or stopped
            if finished_epoch and (epoch % cfg.eval_every == 0 or last) or last:
                result = run_eval()
                log = {**{f"train_{k}": v for k, v in train_stats.items()},
                       **{f"test_{k}": v for k, v in result["losses"].items()},
                       "test_coco_eval_bbox": result["stats"], "epoch": epoch - 1 if finished_epoch else epoch,
                       "step": global_step, "n_parameters": n_parameters,
                       "epoch_time": round(time.time() - start_time, 1)}
                if main_process:
                    print(f"epoch {log['epoch']} step {global_step}: loss {train_stats['loss']:.3f}  "
                          f"{format_stats(result['stats'])}", flush=True)
                    if out_dir:
                        with open(os.path.join(out_dir, "log.txt"), "a") as f:
                            f.write(json.dumps(log) + "\n")
            if stopped:
                break
    distributed.cleanup()
    return result


def rotate_checkpoints(out_dir, epoch, keep):
    """Copy checkpoint.pth to checkpoint_eEEEE.pth, then drop the copies of epochs <= epoch - keep.

    The copy goes through a temporary name too: a crash leaves no half-written epoch file.
    """
    if keep <= 1:
        return
    import shutil
    target = os.path.join(out_dir, f"checkpoint_e{epoch:04d}.pth")
    shutil.copyfile(os.path.join(out_dir, "checkpoint.pth"), target + ".tmp")
    os.replace(target + ".tmp", target)
    for name in os.listdir(out_dir):
        old = re.fullmatch(r"checkpoint_e(\d+)\.pth", name)
        if old and int(old.group(1)) <= epoch - keep:
            os.remove(os.path.join(out_dir, name))


def run_rank(argv=None):
    """main(); under torchrun a failing rank prints its error with its rank and exits at once.

    Left to itself, a rank that raised goes through interpreter teardown, which can block on
    a process group whose peers sit in a collective (NCCL especially), and the peers then
    wait for it up to the process group's timeout. os._exit skips that teardown; torchrun
    sees the exit code and stops the other ranks, and the log shows which rank failed why.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return main(argv)
    try:
        return main(argv)
    except SystemExit as err:
        if err.code in (0, None):
            raise
        message = str(err.code)        # our "error: ..." messages: no traceback needed
    except BaseException:              # a bug, or a second Ctrl-C: keep the traceback
        message = traceback.format_exc()
    sys.stdout.flush()
    print(f"[rank {os.environ.get('RANK', '?')}] {message}", file=sys.stderr, flush=True)
    os._exit(1)


def main_with_data_errors(argv=None):
    """run_rank(), with a sample that cannot be loaded reported as one line, not a traceback."""
    try:
        return run_rank(argv)
    except DataError as err:
        sys.exit(f"error: {DataError.message_of(err)} (fix or remove it from the annotation file)")


if __name__ == "__main__":
    main_with_data_errors()
