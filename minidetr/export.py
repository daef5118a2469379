"""ONNX export of every variant, checked against PyTorch with ONNX Runtime.

    python -m minidetr.export --resume out/dn/checkpoint.pth --onnx dn.onnx
    python -m minidetr.export --resume ckpt.pth --onnx dn.onnx --postprocess   # scores, labels, boxes
    (an official checkpoint: python -m minidetr.convert --variant dn --src F --dst dn.pth first)

The graph takes what the model takes (the data contract in DESIGN.md):
    images [B, 3, H, W] float32, normalised (ImageNet mean and std, as data.Normalize)
    mask   [B, H, W] bool, True on padding
and returns
    pred_logits [B, Q, K], pred_boxes [B, Q, 4] cxcywh in [0, 1] of the unpadded image,
or with --postprocess (one more input, orig_sizes [B, 2] int64 (h, w) in pixels) the
PostProcess of detr.py inside the graph:
    scores [B, k], labels [B, k] int64, boxes [B, k, 4] xyxy in pixels of orig_sizes
(k = Q for softmax heads, min(num_select, Q * K) for focal ones). B, H and W are dynamic.

How: torch's dynamo exporter (torch.export, then onnxscript), with the three sizes declared
symbolic, so every size the model computes from them (feature maps, the padding mask's
downsampling, the sine positions, SMCA's Gaussian grid, the number of memory tokens)
stays an expression in the graph instead of the number seen while tracing. Three choices
make it work for every variant in torch 2.13:
  - the example batch has two images: torch.export specialises a size of 1 to a constant;
  - attention is traced with the math kernel (sdpa_kernel MATH): the fused CPU kernel's
    traced output layout disagrees with its decomposition, and the exporter's re-run of the
    graph then fails on a reshape in SMCA's biased attention;
  - onnxscript's graph optimiser is off (optimize=False): it drops the bounds of a clamp on
    DAB's anchors (inverse_sigmoid) and leaves an invalid graph. ONNX Runtime optimises the
    graph itself when it loads it.
The backbone runs in float32 in the graph: the tiny preset's bf16 autocast (backbone.py,
runs_in_bf16) is a CPU-speed choice of PyTorch, and bf16 convolutions are not portable.
The legacy TorchScript exporter (dynamo=False) is not used: it records Python ints taken
from shapes as constants (SMCA's token count), so other image sizes fail in ONNX Runtime.

The export is checked: ONNX Runtime and PyTorch run the same random inputs at sizes other
than the traced one (two sizes and a padded batch of two), and the largest differences are
printed (tests/test_export.py holds every variant to <= 1e-4).
Needs the optional extra: pip install -e '.[export]' (onnx, onnxruntime, onnxscript).
"""
import argparse
import contextlib
import logging
import sys
import warnings

import torch
from torch import nn

from minidetr.predict import load_model

INPUTS = ("images", "mask")
OUTPUTS = ("pred_logits", "pred_boxes")
POSTPROCESSED = ("scores", "labels", "boxes")
TOLERANCE = 1e-3   # the CLI's pass mark (max abs difference); tests hold the tiny preset to 1e-4


def _require(module, what):
    """Import an optional package, or stop with the one line that installs it."""
    try:
        return __import__(module)
    except ImportError:
        raise SystemExit(f"{what} needs the optional extra: pip install -e '.[export]' "
                         f"(onnx, onnxruntime, onnxscript); {module} is missing") from None


# ---- the graph's module ----

class OnnxDetector(nn.Module):
    """The model as the ONNX graph runs it: plain tensors in and out, no aux outputs.

    forward(images [B, 3, H, W], mask [B, H, W]) -> (pred_logits [B, Q, K], pred_boxes [B, Q, 4]);
    with a postprocess: forward(images, mask, orig_sizes [B, 2] (h, w)) ->
        (scores [B, k], labels [B, k], boxes [B, k, 4] xyxy pixels), detr.PostProcess.batched.
    """

    def __init__(self, model, postprocess=None):
        super().__init__()
        self.model, self.postprocess = model, postprocess

    def forward(self, images, mask, orig_sizes=None):
        out = self.model(images, mask)
        if self.postprocess is None:
            return out["pred_logits"], out["pred_boxes"]
        detections = self.postprocess.batched(out, orig_sizes)   # each [B, k] (boxes [B, k, 4])
        return tuple(detections[key] for key in POSTPROCESSED)


@contextlib.contextmanager
def float32_backbone(model):
    """Run the backbone in float32 inside the block (the tiny preset may pick bf16 on CPU)."""
    saved = model.backbone.precision
    model.backbone.precision = "fp32"
    try:
        yield model
    finally:
        model.backbone.precision = saved


def example_inputs(example_hw, postprocess=False, seed=0):
    """Tracing inputs: a batch of TWO images of example_hw (a batch of 1 would become a constant)."""
    h, w = example_hw
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, h, w, generator=generator)
    mask = torch.zeros(2, h, w, dtype=torch.bool)
    sizes = torch.tensor([[h, w], [h, w]])
    return (images, mask, sizes) if postprocess else (images, mask)


# ---- export ----

def export_onnx(model, path, postprocess=None, example_hw=(128, 160), opset=None):
    """Write `model` (eval mode, float32) as ONNX to `path`; returns the path.

    postprocess: a detr.PostProcess to put inside the graph (outputs scores, labels, boxes),
    or None (outputs pred_logits, pred_boxes). example_hw: the traced (H, W); the graph
    accepts any B, H, W. opset: ONNX opset (None: the exporter's default).
    """
    _require("onnxscript", "ONNX export")
    model.eval()
    detector = OnnxDetector(model, postprocess).eval()
    args = example_inputs(example_hw, postprocess is not None)
    # Dim.DYNAMIC: torch.export finds each size's valid range itself (named Dims would need the
    # smallest image each variant accepts, e.g. 17 px at stride 8); the names are set after
    any_size = torch.export.Dim.DYNAMIC
    dynamic = {"images": {0: any_size, 2: any_size, 3: any_size}, "mask": {0: any_size, 1: any_size, 2: any_size}}
    if postprocess is not None:
        dynamic["orig_sizes"] = {0: any_size}
    names = INPUTS + (("orig_sizes",) if postprocess is not None else ())
    quiet = logging.getLogger("torch.onnx")          # its "torchvision is not installed" notes
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    try:
        with float32_backbone(model), torch.no_grad(), sdpa_kernel(SDPBackend.MATH), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)     # torch.export's notes on its own internals
            torch.onnx.export(detector, args, str(path), dynamo=True, optimize=False,
                              external_data=False, verbose=False, opset_version=opset,
                              input_names=list(names),
                              output_names=list(POSTPROCESSED if postprocess is not None else OUTPUTS),
                              dynamic_shapes={n: dynamic[n] for n in names})
    finally:
        quiet.setLevel(level)
    name_dynamic_axes(path)
    return path


def name_dynamic_axes(path):
    """Call the graph's symbolic sizes batch, height and width, everywhere they occur.

    The exporter names them s0, s1, ... and gives the mask's height a symbol of its own
    (nothing told it the two are equal; the data contract does). One name per size makes
    the file say what it accepts (images [batch, 3, height, width], mask [batch, height, width])."""
    import onnx
    model = onnx.load(str(path))
    graph = model.graph
    inputs = {v.name: v.type.tensor_type.shape.dim for v in graph.input}
    rename = {}
    axes_of = {"images": ("batch", None, "height", "width"), "mask": ("batch", "height", "width"),
               "orig_sizes": ("batch", None)}
    for name, dims in inputs.items():
        for dim, new in zip(dims, axes_of[name]):
            if new and dim.dim_param:
                rename[dim.dim_param] = new
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]
    onnx.save(model, str(path))


# ---- check ----

def onnx_session(path, threads=None):
    """An ONNX Runtime CPU session for the file at `path` (threads: its intra-op threads,
    None: one per physical core)."""
    ort = _require("onnxruntime", "Running the ONNX model")
    options = ort.SessionOptions()
    options.log_severity_level = 3     # errors only: not its notes on the CastLike nodes it cannot fold
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_inputs(sizes, seed=1):
    """Random (images, mask) per (B, H, W); in a batch of two the second image is padded to
    2/3 of H and 3/4 of W (zeros, mask True), as data.nested_pad pads a smaller image."""
    generator = torch.Generator().manual_seed(seed)
    cases = []
    for b, h, w in sizes:
        images = torch.randn(b, 3, h, w, generator=generator)
        mask = torch.zeros(b, h, w, dtype=torch.bool)
        if b > 1:
            mask[1:, 2 * h // 3:, :] = True
            mask[1:, :, 3 * w // 4:] = True
            images = images.masked_fill(mask[:, None], 0.0)
        cases.append((images, mask))
    return cases


def max_differences(session, model, images, mask, postprocess=None):
    """Largest |ONNX Runtime - PyTorch| of each output on one batch: (name, value) pairs.

    A postprocessed graph (`postprocess` given) is compared on scores and on boxes divided
    by the image size (so the number reads as the raw graph's, in units of the image)."""
    with float32_backbone(model), torch.no_grad():
        out = model.eval()(images, mask)
    feed = {"images": images.numpy(), "mask": mask.numpy()}
    if postprocess is None:
        got = session.run(list(OUTPUTS), feed)
        want = [out[name] for name in OUTPUTS]
        return [(name, float((torch.from_numpy(g) - w).abs().max())) for name, g, w in zip(OUTPUTS, got, want)]
    hw = (~mask).sum(1).amax(1), (~mask).sum(2).amax(1)                   # unpadded (h, w) per image
    sizes = torch.stack(hw, -1)                                           # [B, 2]
    scores, _, boxes = session.run(list(POSTPROCESSED), {**feed, "orig_sizes": sizes.numpy()})
    want = postprocess(out, sizes)
    scale = torch.stack([sizes[:, 1], sizes[:, 0]] * 2, -1)[:, None].float()   # [B, 1, 4] (w, h, w, h)
    want_boxes = torch.stack([r["boxes"] for r in want]) / scale
    return [("scores", float((torch.from_numpy(scores) - torch.stack([r["scores"] for r in want])).abs().max())),
            ("boxes / size", float((torch.from_numpy(boxes) / scale - want_boxes).abs().max()))]


def main(argv=None):
    p = argparse.ArgumentParser("python -m minidetr.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--resume", required=True, help="minidetr checkpoint (official ones: minidetr.convert first)")
    p.add_argument("--onnx", required=True, help="the .onnx file to write")
    p.add_argument("--postprocess", action="store_true",
                   help="put PostProcess in the graph: input orig_sizes [B, 2], outputs scores, labels, boxes")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the ONNX Runtime check")
    args = p.parse_args(argv)
    for module in ("onnx", "onnxscript") + (("onnxruntime",) if args.check else ()):
        _require(module, "python -m minidetr.export")
    try:
        loaded = load_model(args.resume)
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    cfg, model = loaded.cfg, loaded.model
    size = cfg.image_size if cfg.preset == "tiny" else 800           # the evaluation's shorter side
    example_hw = (size, size * 5 // 4)
    export_onnx(model, args.onnx, loaded.postprocess if args.postprocess else None, example_hw, args.opset)
    print(f"wrote {args.onnx}: {cfg.variant} ({cfg.preset}, {cfg.backbone}), inputs "
          f"{', '.join(INPUTS + (('orig_sizes',) if args.postprocess else ()))}, traced at "
          f"{example_hw[0]}x{example_hw[1]}; batch, height and width dynamic")
    if not args.check:
        return None
    session = onnx_session(args.onnx)
    h, w = example_hw
    sizes = [(1, h * 3 // 4, w * 3 // 4), (1, h * 5 // 4, w * 3 // 4), (2, h, w * 5 // 4)]   # not (h, w)
    print(f"ONNX Runtime vs PyTorch on random inputs (max abs difference, tolerance {TOLERANCE:g}):")
    worst = 0.0
    for (b, hh, ww), (images, mask) in zip(sizes, check_inputs(sizes)):
        diffs = max_differences(session, model, images, mask, loaded.postprocess if args.postprocess else None)
        worst = max([worst] + [d for _, d in diffs])
        print(f"  {b} x {hh}x{ww}{' (2nd padded)' if b > 1 else '':14s}"
              + "  ".join(f"{name} {d:.1e}" for name, d in diffs))
    if worst > TOLERANCE:
        sys.exit(f"error: ONNX Runtime differs from PyTorch by {worst:.1e} > {TOLERANCE:g}: "
                 f"do not use {args.onnx}; please report it with the checkpoint's variant and preset")
    return worst


if __name__ == "__main__":
    main()
