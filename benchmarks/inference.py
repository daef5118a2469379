"""Inference speed on a CPU: eval.py --image on a folder, and the exported ONNX model in ONNX
Runtime beside PyTorch on the same images.

    python benchmarks/inference.py                          # tiny (64 images) and paper (8), detr
    python benchmarks/inference.py --presets tiny --variants detr dn --images 32

Per preset and variant (random weights: the time of a forward pass does not depend on them):
  - eval.py: `eval.main(['--resume', ckpt, '--image', folder, '--out', drawn/])` over a folder
    of N 640x480 JPEGs (photos' usual 4:3): decoding, the evaluation's resize, batches of
    --batch_size, the model, PostProcess, the results json and the drawings. Its own clock
    (the loop over the images; loading the checkpoint is not in it).
  - PyTorch and ONNX Runtime, forward only: the same images, decoded and resized once, in the
    same batches; `model(images, mask)` under no_grad against `session.run`, taking turns
    batch by batch (so a change of load falls on both), after five warm-up batches each (oneDNN
    compiles its kernels over the first calls: the bf16 backbone ran 3.5 img/s on its first
    batches and 64 on its fifth). PyTorch twice: as eval.py runs it (the tiny preset's
    backbone in bf16 on a CPU with bf16 instructions, backbone.runs_in_bf16) and in float32,
    which is what the ONNX graph computes (export.py). The largest |ONNX - PyTorch float32|
    over these real batches is given beside the speed.
Threads: --threads (default 1) for torch and ONNX Runtime alike. On a machine other jobs
share, two OpenMP threads wait for each other at every parallel region whenever one of
them is descheduled: with a load average of 7-9 on 2 cores, the tiny model ran 3-18 img/s
on 2 torch threads and 48-63 img/s on one, in the same minutes. One thread each measures
the code, not the neighbours; pass --threads 2 on an idle machine.
One run each (not a median): the numbers are for orders of magnitude and ratios, measured
while other jobs may share the cores. The section "Inference" of RESULTS.md is rewritten.
"""
import argparse
import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

from common import ROOT, cpu_model, update_section   # first: it puts ROOT (eval.py, minidetr) on sys.path
import eval as eval_script
from minidetr import Config, build, export, predict
from minidetr.checkpoint import save_atomic

SETTINGS = {"tiny": dict(images=64, batch_size=8), "paper": dict(images=8, batch_size=2)}


def make_folder(folder, count, seed=0):
    """`count` 640x480 JPEGs of a few random rectangles and ellipses on a noisy background."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        image = Image.fromarray(rng.integers(60, 200, (480, 640, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(5):
            x, y = rng.integers(0, 560), rng.integers(0, 400)
            w, h = rng.integers(20, 200, 2)
            shape = draw.rectangle if rng.random() < 0.5 else draw.ellipse
            shape([x, y, x + w, y + h], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        image.save(os.path.join(folder, f"{i:04d}.jpg"), quality=90)


def batches_of(folder, cfg, batch_size):
    """The folder's images as eval.py feeds them: [(images [B, 3, H', W'], mask)], one size here."""
    transform = predict.eval_transform(cfg)
    tensors = [predict.image_tensor(Image.open(os.path.join(folder, n)).convert("RGB"), transform)
               for n in predict.list_images(folder)]
    out = []
    for start in range(0, len(tensors), batch_size):
        images = torch.stack(tensors[start:start + batch_size])
        out.append((images, torch.zeros(len(images), *images.shape[-2:], dtype=torch.bool)))
    return out


def interleaved(runners, batches, warmup=5):
    """Images per second of each runner {name: run(images, mask)} over all batches, after
    `warmup` batches each. The runners take turns batch by batch, so a change in what else
    the machine runs falls on all of them alike."""
    for i in range(warmup):
        images, mask = batches[i % len(batches)]
        for run in runners.values():
            run(images, mask)
    seconds = dict.fromkeys(runners, 0.0)
    for images, mask in batches:
        for name, run in runners.items():
            start = time.perf_counter()
            run(images, mask)
            seconds[name] += time.perf_counter() - start
    count = sum(len(images) for images, _ in batches)
    return {name: count / s for name, s in seconds.items()}


def measure(preset, variant, work):
    settings = SETTINGS[preset]
    cfg = Config.for_variant(variant, preset)
    torch.manual_seed(0)
    model, _, _ = build(cfg)
    ckpt = os.path.join(work, f"{preset}_{variant}.pth")
    save_atomic({"model": model.state_dict(), "config": cfg.to_dict()}, ckpt)
    folder = os.path.join(work, f"images_{settings['images']}")
    if not os.path.isdir(folder):
        make_folder(folder, settings["images"])
    summary = eval_script.main(["--resume", ckpt, "--image", folder, "--out", os.path.join(work, "drawn"),
                                "--batch_size", str(settings["batch_size"]), "--threshold", "0.5",
                                "--no-progress"])
    batches = batches_of(folder, cfg, settings["batch_size"])
    model.eval()

    @torch.no_grad()
    def pytorch(images, mask):
        return model(images, mask)

    start = time.perf_counter()
    path = export.export_onnx(model, os.path.join(work, f"{preset}_{variant}.onnx"),
                              example_hw=tuple(batches[0][0].shape[-2:]))
    export_s = time.perf_counter() - start
    session = export.onnx_session(path, threads=torch.get_num_threads())

    def pytorch_fp32(images, mask):
        with export.float32_backbone(model):
            return pytorch(images, mask)

    speed = interleaved({"pytorch": pytorch, "pytorch_fp32": pytorch_fp32,
                         "onnx": lambda images, mask: session.run(None, {"images": images.numpy(),
                                                                          "mask": mask.numpy()})}, batches)
    worst = max(d for images, mask in batches for _, d in export.max_differences(session, model, images, mask))
    h, w = batches[0][0].shape[-2:]
    return dict(preset=preset, variant=variant, backbone=cfg.backbone, images=settings["images"],
                batch=settings["batch_size"], size=f"{h}x{w}", eval_py=summary["images"] / summary["seconds"],
                **speed, export_s=export_s, worst=worst,
                bf16=model.backbone.runs_in_bf16(torch.device("cpu")))


def render(rows):
    cpu = cpu_model()
    lines = [
        "## Inference",
        "",
        f"`python benchmarks/inference.py` on {cpu}, {os.cpu_count()} cores shared with other jobs during "
        f"the run, {torch.get_num_threads()} thread(s) for torch and for ONNX Runtime alike (why: the "
        f"script's docstring), torch {torch.__version__}, onnxruntime "
        f"{__import__('onnxruntime').__version__}. Random weights (speed does not depend on them), "
        f"640x480 JPEGs resized as the evaluation resizes them; one run each, images per second.",
        "",
        "| preset | variant | images | batch | input | eval.py --image folder | PyTorch (as eval.py) "
        "| PyTorch fp32 | ONNX Runtime fp32 | ORT / PyTorch fp32 | max abs diff ORT vs PyTorch | export |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {r['variant']} ({r['backbone']}) | {r['images']} | {r['batch']} | {r['size']} "
            f"| {r['eval_py']:.3g} | {r['pytorch']:.3g}{' (bf16 backbone)' if r['bf16'] else ''} "
            f"| {r['pytorch_fp32']:.3g} | {r['onnx']:.3g} | {r['onnx'] / r['pytorch_fp32']:.2f}x "
            f"| {r['worst']:.1e} | {r['export_s']:.0f} s |")
    lines += [
        "",
        "eval.py's column is the whole road (decode, resize, model, PostProcess, json, drawing); the "
        "three others the forward pass alone on the same, already resized batches. The difference "
        "is the ONNX Runtime graph (float32) against PyTorch float32 on these images, pred_logits "
        "and pred_boxes.",
    ]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "paper"], choices=list(SETTINGS))
    p.add_argument("--variants", nargs="+", default=["detr"])
    p.add_argument("--images", type=int, help="images per folder (default: 64 tiny, 8 paper)")
    p.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime threads (see above)")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.images:
        for settings in SETTINGS.values():
            settings["images"] = args.images
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for preset in args.presets:
            for variant in args.variants:
                rows.append(measure(preset, variant, work))
                print(render(rows).split("\n")[5 + len(rows)], flush=True)   # the row just measured
    table = render(rows)
    print(table)
    update_section(args.results, "inference", table)


if __name__ == "__main__":
    main()
