"""Evaluate a checkpoint with the official COCO metric, draw predictions, plot logs.

    python eval.py --resume out/dn/checkpoint.pth                      # built-in shapes val split
    python eval.py --resume ckpt.pth --coco_path /data/coco            # COCO val2017
    python eval.py --resume ckpt.pth --val_json a.json --val_images imgs/
    python eval.py --resume ckpt.pth --image photo.png --out pred.png [--threshold 0.5]
        (says so when no box reaches the threshold: focal-loss scores start low)
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

from minidetr import Config, build, convert
from minidetr.checkpoint import load_safely
from minidetr.evaluation import STAT_NAMES, evaluate
from minidetr.engine import build_datasets, fit_num_classes, make_loader


def get_args_parser():
    p = argparse.ArgumentParser("minidetr evaluation", description=__doc__.split("\n\n")[0])
    p.add_argument("--resume", help="checkpoint to evaluate (minidetr's, or an official one with --variant)")
    p.add_argument("--variant", help="variant of the checkpoint (only needed for official files)")
    for name in ("coco_path", "val_json", "val_images", "device", "amp"):
        p.add_argument(f"--{name}")
    p.add_argument("--batch_size", type=int)
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument("--image", help="draw the predictions on this image")
    p.add_argument("--attention", action="store_true", help="with --image: draw decoder cross-attention")
    p.add_argument("--prior", action="store_true", help="with --attention: draw SMCA's Gaussian prior")
    p.add_argument("--top", type=int, default=3, help="with --attention: how many detections")
    p.add_argument("--threshold", type=float, default=0.5, help="score threshold for drawing")
    p.add_argument("--out", help="output PNG (drawing and plotting)")
    p.add_argument("--plot-logs", nargs="+", dest="plot_logs", help="log.txt files to plot")
    return p


def load_model(path, overrides, device, variant=None):
    """Rebuild the model from a checkpoint's config and load its weights.

    An official DETR-family checkpoint (no minidetr 'config'; an 'args' entry or official
    weight names) is converted on load (minidetr/convert.py); `variant` (--variant) says
    which reference saved it.
    """
    ckpt = load_safely(path)
    if "config" in ckpt:
        settings, state_dict = dict(ckpt["config"]), ckpt["model"]
    else:
        if not convert.is_official_checkpoint(ckpt):
            sys.exit(f"error: {path} has neither a minidetr 'config' nor an official 'args' entry")
        if not variant:
            guess = convert.guess_variant(ckpt.get("model", {}))
            sys.exit(f"error: {path} is an official checkpoint (no minidetr config): say which model "
                     f"it holds with --variant {{detr,conditional,smca,dn,dab}}"
                     + (f" (its weights look like {guess})" if guess else ""))
        try:
            cfg, state_dict = convert.convert_file(ckpt, variant)
        except ValueError as err:
            sys.exit(f"error: cannot convert {path} as --variant {variant}: {err}")
        settings = cfg.to_dict()
    # a file from another version of minidetr: a setting it lacks takes its preset's value,
    # one this version does not know is ignored; weights that then do not fit are an error
    defaults = Config.for_variant(settings.get("variant", "detr"), settings.get("preset", "paper")).to_dict()
    missing = sorted(set(defaults) - set(settings))
    settings = {**defaults, **{k: v for k, v in settings.items() if k in defaults}}
    settings.update({k: v for k, v in overrides.items() if v is not None})
    cfg = Config(**settings).validate()
    model, criterion, postprocess = build(cfg)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as err:   # missing / unexpected / wrongly shaped weights
        detail = " ".join(str(err).split())
        raise ValueError(f"the weights in {path} do not fit the model its config describes"
                         + (f"; its config lacks {missing} (saved by another version of minidetr?), "
                            f"which took the preset's values" if missing else "")
                         + f" ({detail[:200]}...)") from None
    return cfg, model.to(device).eval(), criterion, postprocess


def category_names_of(cfg):
    if cfg.coco_path or cfg.val_json:
        return None
    from minidetr.data import SHAPE_NAMES
    return {i + 1: n for i, n in enumerate(SHAPE_NAMES)}


def draw(args, cfg, model, postprocess, device):
    from minidetr import draw as drawing
    image, tensor, mask = drawing.load_image(args.image, cfg.image_size)
    tensor, mask = tensor.to(device), mask.to(device)
    orig = torch.tensor([[image.height, image.width]], device=device)
    names = category_names_of(cfg)
    if not args.attention:
        with torch.no_grad():
            result = postprocess(model(tensor, mask), orig)[0]
        drawing.draw_predictions(image, result, names, args.threshold).save(args.out)
        best = float(result["scores"].max()) if len(result["scores"]) else 0.0
        if best < args.threshold:   # an empty picture should say why, not look like a bug
            print(f"note: no prediction scored >= --threshold {args.threshold} (best {best:.2f}); "
                  f"{args.out} shows the image alone. Pass a lower --threshold to see the boxes "
                  f"(sigmoid-focal scores of a briefly trained model are often below 0.5).",
                  file=sys.stderr)
        return
    outputs, maps = drawing.attention_maps(model, tensor, mask, "prior" if args.prior else "attention")
    result = postprocess(outputs, orig)[0]
    top = min(args.top, len(result["scores"]))
    drawing.draw_attention(image, maps[0], result, list(zip(range(top), result["query_ids"][:top].tolist())),
                           names).save(args.out)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.plot_logs:
        from minidetr.draw import plot_logs, prepare_output
        out = args.out or "curves.png"
        try:
            prepare_output(out, plot=True)
            print("wrote", plot_logs(args.plot_logs, out))
        except ValueError as err:
            sys.exit(f"error: {err}")
        return None
    if not args.resume:
        sys.exit("error: --resume CHECKPOINT is required (or --plot-logs)")
    device = torch.device(args.device or "cpu")
    overrides = {k: getattr(args, k) for k in ("coco_path", "val_json", "val_images", "amp", "batch_size")}
    if args.image and not args.out:
        sys.exit("error: --image needs --out PNG")
    if args.image and not os.path.isfile(args.image):
        sys.exit(f"error: --image {args.image} does not exist")
    if args.image:
        from minidetr.draw import prepare_output
        try:
            prepare_output(args.out)
        except ValueError as err:
            sys.exit(f"error: {err}")
    try:
        cfg, model, criterion, postprocess = load_model(args.resume, overrides, device, args.variant)
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    if args.image:
        try:
            draw(args, cfg, model, postprocess, device)
        except OSError as err:   # an image PIL cannot decode, named by open_rgb
            sys.exit(f"error: {err}")
        print("wrote", args.out)
        return None
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
