"""Seeing what a model does: predictions, attention maps, and training curves.

- `draw_predictions`: boxes with class names and scores on the image (PIL only).
- `attention_maps` + `draw_attention`: the last decoder layer's cross-attention of the top
  predictions, one panel per head, over the image (PIL only). For Conditional DETR the
  maps show the bands at the box extremities the paper's Fig. 1 shows; for SMCA, the
  Gaussian prior log G itself can be drawn (kind="prior") beside the attention it shapes.
  `record_attention` collects them with forward hooks, so the model code records nothing.
- `plot_logs`: loss and AP against epoch from one or several `log.txt` files (matplotlib,
  an optional extra: `pip install matplotlib`).
"""
import contextlib
import io
import json
import os
from typing import NamedTuple

import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageDraw

from minidetr.checkpoint import write_bytes_atomic

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40)]


# ---- predictions ----

def draw_predictions(image, result, category_names=None, threshold=0.5):
    """Draw result (scores, labels, boxes xyxy in pixels of `image`) above `threshold`.

    category_names: {label: name} (categories.Categories.names_by_label()); a label without
    a name is written as its number."""
    image = image.convert("RGB").copy()
    draw = ImageDraw.Draw(image)
    keep = result["scores"] >= threshold
    for score, label, box in zip(result["scores"][keep].tolist(), result["labels"][keep].tolist(),
                                 result["boxes"][keep].tolist()):
        colour = PALETTE[label % len(PALETTE)]
        name = (category_names or {}).get(label, str(label))
        draw.rectangle(box, outline=colour, width=max(1, round(min(image.size) / 200)))
        text = f"{name} {score:.2f}"
        x, y = box[0], max(0, box[1] - 11)
        draw.rectangle([x, y, x + 6 * len(text) + 2, y + 10], fill=colour)
        draw.text((x + 1, y - 1), text, fill=(255, 255, 255))
    return image


# ---- attention ----

class Recorded(NamedTuple):
    """One call of an attention module, as `record_attention` collects it."""
    name: str               # the module's path in the model, e.g. 'decoder.layers.5.cross_attn'
    weights: torch.Tensor   # [B, h, Q, N] softmax weights, each row a distribution over keys
    bias: torch.Tensor      # [B, h, Q, N] the additive bias (SMCA's log G), or None


@contextlib.contextmanager
def record_attention(model, names=None):
    """Record the attention maps `model` computes inside the block, through forward hooks.

    Hooks the submodules that have an `attention_maps` method (transformer.MultiheadAttention,
    conditional_attn.PreprojectedAttention, smca.ScaleSelectionCrossAttention), all of them
    or those whose path is in `names`. Yields a list that fills with one Recorded per call,
    in call order. The hook recomputes the weights from the module's inputs (the fused
    kernel does not return them), before dropout: for inspection only. The hooks are removed
    on leaving the block; outside it the model runs no recording code at all.
    """
    modules = {name: m for name, m in model.named_modules() if hasattr(m, "attention_maps")}
    if names is not None:
        unknown = sorted(set(names) - set(modules))
        if unknown:
            raise ValueError(f"no attention module at {unknown}; the model has {list(modules)}")
        modules = {name: modules[name] for name in names}
    recorded = []

    def hook_for(name):
        def record(module, args, kwargs, output):     # a forward hook with kwargs: the call's inputs
            with torch.no_grad():
                weights, bias = module.attention_maps(*args, **kwargs)
            recorded.append(Recorded(name, weights, bias))
        return record

    handles = [m.register_forward_hook(hook_for(name), with_kwargs=True) for name, m in modules.items()]
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def attention_maps(model, images, mask, kind="attention"):
    """The last decoder layer's cross-attention: (outputs, maps [B, h, Q, y, x]) of level 0.

    kind="attention": softmax weights; kind="prior": SMCA's Gaussian weight map G = exp(log G)
    (only for models whose cross-attention has an additive bias).
    """
    model.eval()
    grids = []    # the levels' (y, x), read off the projection's output in the same forward pass
    hook = model.input_proj.register_forward_hook(
        lambda module, inputs, levels: grids.extend(tuple(src.shape[-2:]) for src, _ in levels))
    last = f"decoder.layers.{len(model.decoder.layers) - 1}.cross_attn"
    try:
        with record_attention(model, [last]) as recorded:
            outputs = model(images, mask)
    finally:
        hook.remove()
    weights = recorded[-1].weights.float()
    if kind == "prior":
        if recorded[-1].bias is None:
            raise ValueError(f"{last} adds no bias: only SMCA adds a Gaussian prior")
        weights = recorded[-1].bias.float().exp()
    if hasattr(model.encoder, "key_levels"):   # the decoder's keys have other levels (SMCA released)
        grids = model.encoder.key_levels(grids)
    y, x = grids[0]                       # level 0's grid; with several levels its tokens come first
    return outputs, rearrange(weights[..., :y * x], 'b h q (y x) -> b h q y x', y=y, x=x)


def _heatmap(values):
    """[y, x] -> RGB uint8 [y, x, 3], black -> red -> yellow -> white (no matplotlib)."""
    v = (values - values.min()) / max(float(values.max() - values.min()), 1e-12)
    r, g, b = np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)
    return (np.stack([r, g, b], -1) * 255).astype(np.uint8)


def draw_attention(image, maps, result, query_ids, category_names=None, valid_hw=None):
    """One row per query: the image with its box, then one heat map per head over the image.

    image: PIL (original size); maps: [h, Q, y, x] for this image; result: its post-processed
    dict; query_ids: the query index of each drawn detection; valid_hw: the unpadded part
    of the feature grid (y, x) to crop before resizing.
    """
    heads = maps.shape[0]
    w, h = image.size
    scale = 160 / max(w, h)
    tile = (max(1, round(w * scale)), max(1, round(h * scale)))
    canvas = Image.new("RGB", (tile[0] * (heads + 1), tile[1] * max(1, len(query_ids))), "white")
    for row, (det, q) in enumerate(query_ids):
        single = {k: v[det:det + 1] for k, v in result.items()}
        canvas.paste(draw_predictions(image, single, category_names, threshold=0).resize(tile), (0, row * tile[1]))
        for head in range(heads):
            m = maps[head, q]
            if valid_hw is not None:
                m = m[:valid_hw[0], :valid_hw[1]]
            heat = Image.fromarray(_heatmap(m.cpu().numpy())).resize(image.size, Image.BILINEAR)
            panel = Image.blend(image.convert("RGB"), heat, 0.6).resize(tile)
            canvas.paste(panel, ((head + 1) * tile[0], row * tile[1]))
    return canvas


# ---- training curves ----

def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("plotting needs matplotlib: pip install matplotlib "
                         "(or pip install 'minidetr[plot]')") from None
    return plt


def prepare_output(path, plot=False):
    """Check an --out path before any work is done for it, and create its folder.

    The writer (PIL for drawings, matplotlib for plots) picks the format from the extension,
    and would refuse an unknown one only at the end. Raises ValueError saying what to pass.
    """
    ext = os.path.splitext(str(path))[1].lower()
    if plot:
        _pyplot()
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        known = {"." + e for e in FigureCanvasAgg.get_supported_filetypes()}
    else:
        known = {e for e, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}
    if ext not in known:
        raise ValueError(f"--out {path}: {f'the extension {ext}' if ext else 'a name without an extension'}"
                         f" names no image format {'matplotlib' if plot else 'PIL'} writes; end it in .png")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    except OSError as err:
        raise ValueError(f"--out {path}: cannot create its folder: {err.strerror}") from None


def read_log(path):
    """A train.py (or official DETR) log.txt -> its rows, one dict per evaluated epoch.

    Raises ValueError naming the file and line when it is not such a log."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as err:
        raise ValueError(f"cannot read log {path}: {err.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file; --plot-logs reads the log.txt train.py "
                         f"writes in --output_dir") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            raise ValueError(f"{path}, line {number}: not a JSON object; --plot-logs reads the "
                             f"log.txt train.py writes in --output_dir (one JSON object per epoch)")
        rows.append(row)
    if rows and not any("train_loss" in r or "test_coco_eval_bbox" in r for r in rows):
        raise ValueError(f"{path}: no line has train_loss or test_coco_eval_bbox; "
                         f"--plot-logs reads the log.txt train.py writes in --output_dir")
    # the epochs' lines (a fine-tuned run's first line says where its weights came from)
    return [r for r in rows if "train_loss" in r or "test_coco_eval_bbox" in r]


def plot_logs(log_files, out_png, keys=("loss", "AP", "AP50")):
    """Plot train/test loss and COCO AP against epoch for one or several log.txt files.

    A file with no lines yet (a run in its first epoch) is left out; a line without a key
    (a log from other code) leaves a gap in that curve."""
    plt = _pyplot()
    logs = [(path, read_log(path)) for path in log_files]   # every file read before plotting
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4))
    for path, rows in logs:
        if not rows:
            continue
        epochs = [r.get("epoch", i) for i, r in enumerate(rows)]
        for ax, key in zip(np.atleast_1d(axes), keys):
            if key == "loss":
                ax.plot(epochs, [r.get("train_loss", np.nan) for r in rows], label=f"{path} train")
                ax.plot(epochs, [r.get("test_loss", np.nan) for r in rows], "--", label=f"{path} test")
            else:
                i = ("AP", "AP50", "AP75").index(key)
                ax.plot(epochs, [r["test_coco_eval_bbox"][i] if "test_coco_eval_bbox" in r else np.nan
                                 for r in rows], label=str(path))
            ax.set_title(key)
            ax.set_xlabel("epoch")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()   # encoded in memory, then written whole (a full disk: WriteError)
    fig.savefig(buffer, dpi=100, format="png")
    plt.close(fig)
    write_bytes_atomic(out_png, buffer.getvalue())
    return out_png
