"""Evaluate a checkpoint with the official COCO metric, draw predictions, plot logs.

    python eval.py --resume out/dn/checkpoint.pth                      # built-in shapes val split
    python eval.py --resume ckpt.pth --coco_path /data/coco            # COCO val2017
    python eval.py --resume ckpt.pth --val_json a.json --val_images imgs/
    python eval.py --resume ckpt.pth --image photo.png --out pred.png [--threshold 0.5]
        (says so when no box reaches the threshold: focal-loss scores start low)
    python eval.py --resume ckpt.pth --image photos/ --out drawn/        # a folder, recursively
    python eval.py --resume ckpt.pth --image clip.mp4 --out drawn.mp4    # a video (pip install av)
        each writes COCO results (pred.json, drawn/predictions.json, ...; --json to choose)
        and beside them *_images.json, the images and category names (minidetr/predict.py)
    python eval.py --resume ckpt.pth --image photo.png --attention --out attn.png [--prior]
    python eval.py --plot-logs out/*/log.txt --out curves.png

The checkpoint carries its Config, so the model is rebuilt as it was trained; data flags
given here replace the checkpoint's.
"""
import argparse
import dataclasses
import os
import sys

import torch

from minidetr import convert, predict
from minidetr.check import build_datasets
from minidetr.checkpoint import WriteError, cannot_write
from minidetr.data import fit_num_classes, make_loader
from minidetr.evaluation import STAT_NAMES, evaluate


def get_args_parser():
    p = argparse.ArgumentParser("minidetr evaluation", description=__doc__.split("\n\n")[0])
    p.add_argument("--resume", help="checkpoint to evaluate (minidetr's, or an official one with --variant)")
    p.add_argument("--variant", help="variant of the checkpoint (only needed for official files)")
    for name in ("coco_path", "val_json", "val_images", "device", "amp"):
        p.add_argument(f"--{name}")
    p.add_argument("--batch_size", type=int)
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument("--image", help="predict on this image file, folder of images (recursively) or video")
    p.add_argument("--json", help="with --image: the COCO results file (default: beside --out, "
                                  "or predictions.json)")
    p.add_argument("--attention", action="store_true", help="with --image: draw decoder cross-attention")
    p.add_argument("--prior", action="store_true", help="with --attention: draw SMCA's Gaussian prior")
    p.add_argument("--top", type=int, default=3, help="with --attention: how many detections")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="score threshold for the results and drawings (0 for COCO evaluation)")
    p.add_argument("--max_detections", type=int, default=100, help="with --image: most detections per image")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--out", help="drawing: a PNG, a folder (for a folder) or a video file; plotting: a PNG")
    p.add_argument("--plot-logs", nargs="+", dest="plot_logs", help="log.txt files to plot")
    return p


def reader(variant):
    """path -> checkpoint.Contents for minidetr's files and official ones
    (converted on load, as --variant says which reference saved them)."""
    return lambda path: convert.read_any_checkpoint(path, variant)


def load_model(path, overrides, device, variant=None):
    """(cfg, model, criterion, postprocess) of a checkpoint, or one 'error:' line
    (minidetr/predict.py's load_model, which also returns the category table)."""
    try:
        return predict.load_model(path, overrides, device, reader(variant))[:4]
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")


def predict_images(args, loaded, device):
    """--image (a file, a folder or a video) -> results json (+ drawings); says what it wrote."""
    summary = predict.predict_files(loaded, args.image, args.out, args.json, args.threshold,
                                    args.max_detections, args.batch_size, device, args.progress)
    n, seconds = summary["images"], summary["seconds"]
    print(f"{n} image(s) in {seconds:.1f} s ({n / max(seconds, 1e-9):.1f} images/s"
          f"{', ' + str(len(summary['unreadable'])) + ' unreadable' if summary['unreadable'] else ''}): "
          f"{summary['detections']} detections >= --threshold {args.threshold}")
    print("wrote", summary["json"], "and", summary["images_json"] + (f" and {args.out}" if args.out else ""))
    if summary["unreadable"]:
        print(f"{len(summary['unreadable'])} file(s) could not be read (left out):", file=sys.stderr)
        for name, reason in summary["unreadable"]:
            print(f"  {name}: {reason}", file=sys.stderr)
    if n and not summary["detections"]:   # an empty result should say why, not look like a bug
        print(f"note: no prediction scored >= --threshold {args.threshold} (best {summary['best']:.2f}); "
              f"{args.out or summary['json']} has no boxes. Pass a lower --threshold to see the boxes "
              + ("(sigmoid-focal scores of a briefly trained model are often below 0.5)."
                 if loaded.cfg.focal_alpha is not None else
                 "(a briefly trained model spreads its softmax over the classes and 'no object')."),
              file=sys.stderr)
    return summary


def draw_attention(args, loaded, device):
    """--image FILE --attention: the top detections' cross-attention maps, one panel per head."""
    from minidetr import draw as drawing
    from minidetr.data import open_rgb
    image = open_rgb(args.image, "--image")
    tensor = predict.image_tensor(image, predict.eval_transform(loaded.cfg))[None].to(device)
    mask = torch.zeros(1, *tensor.shape[-2:], dtype=torch.bool, device=device)
    orig = torch.tensor([[image.height, image.width]], device=device)
    names = loaded.categories.names_by_label() if loaded.categories is not None else None
    outputs, maps = drawing.attention_maps(loaded.model, tensor, mask, "prior" if args.prior else "attention")
    result = loaded.postprocess(outputs, orig)[0]
    top = min(args.top, len(result["scores"]))
    predict.save_image(drawing.draw_attention(image, maps[0], result,
                                              list(zip(range(top), result["query_ids"][:top].tolist())),
                                              names), args.out)
    print("wrote", args.out)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.plot_logs:
        from minidetr.draw import plot_logs, prepare_output
        out = args.out or "curves.png"
        try:
            prepare_output(out, plot=True)
            print("wrote", plot_logs(args.plot_logs, out))
        except WriteError as err:   # a full disk: the file named with what it needed
            sys.exit(f"error: {cannot_write(err.filename, err, err.needed)}")
        except ValueError as err:
            sys.exit(f"error: {err}")
        return None
    if not args.resume:
        sys.exit("error: --resume CHECKPOINT is required (or --plot-logs)")
    device = torch.device(args.device or "cpu")
    overrides = {k: getattr(args, k) for k in ("coco_path", "val_json", "val_images", "amp", "batch_size")}
    if args.image and args.attention and not args.out:
        sys.exit("error: --attention needs --out PNG")
    if args.image and not os.path.exists(args.image):
        sys.exit(f"error: --image {args.image} does not exist")
    if args.image:   # --out is checked before any work is done for it
        from minidetr.draw import prepare_output
        try:
            kind = predict.output_kind(args.image, args.out)
            if kind == "image":
                prepare_output(args.out)
            elif kind == "folder":
                os.makedirs(args.out, exist_ok=True)
        except (ValueError, OSError) as err:
            sys.exit(f"error: {err}")
    try:
        loaded = predict.load_model(args.resume, overrides, device, reader(args.variant))
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    cfg, model, criterion, postprocess = loaded[:4]
    if args.image:
        try:
            if args.attention:
                return draw_attention(args, loaded, device)
            return predict_images(args, loaded, device)
        except WriteError as err:   # a full disk: the drawing or json named with what it needed
            sys.exit(f"error: {cannot_write(err.filename, err, err.needed)}")
        except OSError as err:   # an image or video that cannot be decoded, named by open_rgb / PyAV
            sys.exit(f"error: {err}")
    try:
        cfg = dataclasses.replace(cfg, num_workers=args.num_workers, eval=True).validate()
        _, val_set = build_datasets(cfg)
        fit_num_classes(cfg, (val_set,), num_classes_given=True)   # the checkpoint's classes fit?
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        sys.exit(f"error: {err}")
    result = evaluate(model, criterion, postprocess, make_loader(val_set, cfg, 0, train=False),
                      val_set.coco, device, cfg.amp)
    print("COCO bbox evaluation")
    for name, value in zip(STAT_NAMES, result["stats"]):
        print(f"  {name:6s} {value:.3f}")
    print("per-class AP")
    for cat_id, ap in result["per_class"].items():
        print(f"  {cat_id:4d} {val_set.category_names.get(cat_id, ''):20s} {ap:.3f}")
    return result


if __name__ == "__main__":
    main()
