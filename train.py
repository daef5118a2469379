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
"""
import argparse
import json
import os
import sys
import time

import torch

from minidetr import build, distributed
from minidetr.checkpoint import load_safely, rng_state, save_atomic, set_rng_state
from minidetr.config import add_arguments, config_from_args
from minidetr.engine import (NonFiniteLossError, SeededDataset, StopRequest, build_datasets,
                             build_optimizer, make_loader, train_one_epoch)
from minidetr.evaluation import evaluate, format_stats


def get_args_parser():
    parser = argparse.ArgumentParser("minidetr training", description=__doc__.split("\n\n")[0])
    return add_arguments(parser)


def save_checkpoint(path, model, optimizer, scheduler, scaler, cfg, epoch, step):
    save_atomic({"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                 "lr_scheduler": scheduler.state_dict(),
                 "scaler": scaler.state_dict() if scaler is not None else None,
                 "epoch": epoch, "step": step, "config": cfg.to_dict(), "rng": rng_state()}, path)


def unwrap(model):
    return model.module if hasattr(model, "module") else model


def load_resume(path, model, optimizer, scheduler, scaler, cfg):
    """Restore a checkpoint of ours; returns (epoch, step) to continue from."""
    ckpt = load_safely(path)
    if "model" not in ckpt:
        sys.exit(f"error: {path} has no 'model' entry; is it a minidetr or DETR checkpoint?")
    saved = ckpt.get("config", {})
    for key in ("variant", "preset", "dn", "hidden_dim", "backbone", "num_queries"):
        if key in saved and saved[key] != getattr(cfg, key):
            sys.exit(f"error: {path} was trained with --{key} {saved[key]!r} but this run has "
                     f"{getattr(cfg, key)!r}; pass the same settings to resume")
    unwrap(model).load_state_dict(ckpt["model"])
    if optimizer is not None and "optimizer" in ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["lr_scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if "rng" in ckpt:
            set_rng_state(ckpt["rng"])
    return ckpt.get("epoch", 0), ckpt.get("step", 0)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as err:
        sys.exit(f"error: {err}")
    device = distributed.init_distributed(cfg.device)
    main_process = distributed.is_main_process()
    torch.manual_seed(cfg.seed + distributed.get_rank())
    try:
        train_set, val_set = build_datasets(cfg, args.num_classes is not None)
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")

    model, criterion, postprocess = build(cfg)
    model.to(device)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if distributed.is_dist():
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer, scheduler = build_optimizer(unwrap(model), cfg)
    scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None
    epoch, step = cfg.start_epoch, 0
    if cfg.resume:
        epoch, step = load_resume(cfg.resume, model, None if cfg.eval else optimizer,
                                  scheduler, scaler, cfg)
    if main_process:
        print(f"minidetr: variant {cfg.variant}{' + dn' if cfg.dn and cfg.variant != 'dn' else ''}, "
              f"preset {cfg.preset}, {n_parameters:,} trainable parameters, "
              f"{len(val_set)} val images" + ("" if train_set is None else f", {len(train_set)} train images"))

    def run_eval():
        loader = make_loader(val_set, cfg, 0, train=False)
        return evaluate(model, criterion, postprocess, loader, val_set.coco, device, cfg.amp)

    if cfg.eval:
        result = run_eval()
        if main_process:
            print(f"COCO bbox: {format_stats(result['stats'])}")
        distributed.cleanup()
        return result

    out_dir = cfg.output_dir if main_process else ""
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    train_seeded = SeededDataset(train_set, cfg.seed)
    steps_per_epoch = -(-len(train_set) // (cfg.batch_size * distributed.get_world_size()))
    global_step = epoch * steps_per_epoch + step
    result = None
    start_time = time.time()
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
            if out_dir:
                save_checkpoint(os.path.join(out_dir, "checkpoint.pth"), model, optimizer, scheduler,
                                scaler, cfg, epoch, step)
                if finished_epoch:
                    rotate_checkpoints(out_dir, epoch, cfg.keep_checkpoints)
            if stop.requested:
                if main_process:
                    print(f"interrupted: saved epoch {epoch} step {step} to "
                          f"{os.path.join(out_dir, 'checkpoint.pth') if out_dir else '(no --output_dir)'}")
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
    """Copy checkpoint.pth to checkpoint_eEEEE.pth and drop copies older than `keep` epochs."""
    if keep <= 1:
        return
    import shutil
    shutil.copyfile(os.path.join(out_dir, "checkpoint.pth"), os.path.join(out_dir, f"checkpoint_e{epoch:04d}.pth"))
    old = os.path.join(out_dir, f"checkpoint_e{epoch - keep:04d}.pth")
    if os.path.exists(old):
        os.remove(old)


if __name__ == "__main__":
    main()
