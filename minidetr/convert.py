"""Official DETR-family checkpoints -> minidetr: renamed weights and the settings that rebuild them.

The reference codebases save `{'model': state_dict, 'args': argparse.Namespace, ...}`
(files cut down for a model zoo may hold 'model' alone). minidetr computes the same
functions with differently named modules, so converting is renaming plus two reshapes:

  (1) nn.MultiheadAttention packs the three input projections into one matrix,
      in_proj_weight [3C, C] = [W_q; W_k; W_v] (rows 0..C-1 are q, C..2C-1 k, 2C..3C-1 v)
      and in_proj_bias [3C]; ours are three nn.Linear (q_proj, k_proj, v_proj).
  (2) SMCA-DETR keeps DETR's class head with num_classes + 1 outputs but trains it with
      sigmoid focal loss, where the extra "no object" column is a negative for every query,
      so it only ever learns to say "no". minidetr's focal head has num_classes outputs:
      that last row is dropped. The other logits are unchanged; only the reference's
      (in principle possible) detections of the id num_classes disappear.

Official name (prefix)                       minidetr name
  backbone.0.body.*                          backbone.body.*          (torchvision ResNet names)
  input_proj.{weight,bias}                   input_proj.proj.0.*      (one level, stride 32 or 16)
  query_embed / refpoint_embed               queries.query_embed / queries.refpoint_embed
  label_enc (DN-DETR)                        denoiser.label_enc
  transformer.encoder.layers.i.*             encoder.layers.i.*
  transformer.decoder.layers.i.*             decoder.layers.i.*
      multihead_attn (DETR, SMCA)            cross_attn               (+ the split (1))
      linear1, linear2, activation (PReLU)   ffn.linear1, ffn.linear2, ffn.activation
      norm2 (encoder) / norm3 (decoder)      ffn.norm                 (the FFN's post-norm)
      norm4, point1..point4 (SMCA)           query_norm, centre_head, offset_head, scale_head,
                                             scale_select_head (SMCA_HEADS)
  SMCA's released multi-scale code (Multi_scale_SMCA.zip; our --smca_ms_form released):
      input_proj_512/1024/2048, input_proj_2048_3   input_proj.proj.0/1/2, input_proj.extra
      encoder: self_attn_8..64, high_to_low_1..3,   within.0..3, down.0..2, up.0..2,
               low_to_high_1..3, conv_1, conv_2     in_proj, out_proj (RELEASED_MS_ENCODER)
      transformer.conv, transformer.level_embed     encoder.memory_down, encoder.level_embed
  transformer.encoder.query_scale (DAB, DN)  encoder.pos_scale
  transformer.decoder.ref_point_head         queries.ref_point_head (Conditional: it makes the
                                             queries' reference points) | decoder.ref_point_head
  transformer.decoder.*                      decoder.*   (norm, query_scale, ref_anchor_head, bbox_embed)
  class_embed, bbox_embed                    unchanged (SMCA: (2))
Every tensor must land in the model `build(cfg)` makes, with its shape, and every model
tensor must be filled; otherwise ValueError names the keys. BatchNorm step counters
(num_batches_tracked) are dropped: a frozen BatchNorm has none.

Variants: detr, conditional (alias cond), smca (single scale, any --dynamic_scale but type4; the
released multi-scale code's files, read as --smca_ms_form released, with type3),
dn (DN-DETR's dn_dab_detr) and dab (DAB-DETR's dab_detr = our 'dab': 'dn' without denoising).

    python -m minidetr.convert --variant detr --src detr-r50-e632da11.pth --dst detr-r50.pth
"""
import argparse
import dataclasses
import re
import sys

import torch

from minidetr.backbone import RESNETS
from minidetr.categories import Categories
from minidetr.checkpoint import Contents, is_official_checkpoint, load_safely, minidetr_contents, save_atomic
from minidetr.config import Config
from minidetr.detr import build

VARIANTS = {"detr": "detr", "conditional": "conditional", "cond": "conditional", "smca": "smca",
            "dn": "dn", "dab": "dab"}
SMCA_SCALES = {"type1": "fixed", "type2": "shared", "type3": "xy"}   # SMCA-DETR's --dynamic_scale
# (blocks per stage, bottleneck blocks) -> torchvision ResNet name
RESNET_LAYOUTS = {((2, 2, 2, 2), False): "resnet18", ((3, 4, 6, 3), False): "resnet34",
                  ((3, 4, 6, 3), True): "resnet50", ((3, 4, 23, 3), True): "resnet101"}
# Config fields that are also reference flags of the same name and meaning
SHARED_FLAGS = ("backbone", "dilation", "enc_layers", "dec_layers", "dim_feedforward", "hidden_dim",
                "dropout", "nheads", "num_queries", "aux_loss", "set_cost_class", "set_cost_bbox",
                "set_cost_giou", "bbox_loss_coef", "giou_loss_coef", "lr", "lr_backbone",
                "batch_size", "weight_decay", "epochs", "lr_drop", "clip_max_norm", "seed")


def canonical_variant(variant):
    """'cond' -> 'conditional'; ValueError for names no reference uses."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown official variant {variant!r}: choose one of "
                         f"{', '.join(sorted(set(VARIANTS.values())))}")
    return VARIANTS[variant]


# ---- settings: the reference's argparse flags -> Config ----

def _check_supported(args, variant):
    """ValueError for reference settings that build a model minidetr does not have."""
    problems = []
    if args.get("pre_norm"):
        problems.append("--pre_norm (minidetr's transformer is post-norm only)")
    if args.get("masks"):
        problems.append("--masks (segmentation heads; convert the box model instead)")
    if args.get("position_embedding", "sine") not in ("sine", "v2"):   # 'v2' = sine in DETR
        problems.append(f"--position_embedding {args['position_embedding']} (only sine)")
    if args.get("backbone", "resnet50") not in RESNETS:
        problems.append(f"--backbone {args['backbone']} (only {', '.join(RESNETS)})")
    if variant == "smca" and args.get("dynamic_scale", "type3") not in SMCA_SCALES:
        problems.append(f"--dynamic_scale {args['dynamic_scale']} (type1, type2, type3 only)")
    if variant in ("dn", "dab"):
        expected = {"dn": "dn_dab_detr", "dab": "dab_detr"}[variant]
        if args.get("modelname", expected) != expected:
            other = {"dn_dab_detr": " (that is --variant dn)", "dab_detr": " (that is --variant dab)"}
            problems.append(f"-m {args['modelname']}{other.get(args['modelname'], '')}: --variant "
                            f"{variant} converts {expected}; deformable models are not implemented")
        if args.get("num_patterns", 0):
            problems.append(f"--num_patterns {args['num_patterns']} (pattern embeddings)")
        if args.get("pe_temperatureH", 20) != args.get("pe_temperatureW", 20):
            problems.append("--pe_temperatureH != --pe_temperatureW (one temperature for both axes)")
    if problems:
        raise ValueError(f"this {variant} checkpoint uses settings minidetr cannot rebuild: "
                         + "; ".join(problems))


def _num_classes(args, variant, state_dict):
    """Our num_classes: the class head's rows (minus DETR's no-object row), else the args."""
    if state_dict is not None and "class_embed.weight" in state_dict:
        rows = state_dict["class_embed.weight"].shape[0]
        return rows - 1 if variant in ("detr", "smca") else rows
    if args.get("num_classes"):
        return int(args["num_classes"])
    # as every reference's build(): 91 = largest COCO id + 1, 250 for panoptic, else 20
    return {"coco": 91, "coco_panoptic": 250}.get(args.get("dataset_file", "coco"), 20)


def config_from_official_args(args, variant, state_dict=None):
    """The Config that rebuilds a reference model from its argparse settings.

    args: argparse.Namespace or dict of the reference's flags (checkpoint['args']);
    variant: detr | conditional | smca | dn | dab; state_dict (optional): the official
    weights, whose class head then fixes num_classes. Flags the reference hard-codes are
    set as it does: Conditional DETR keeps the top 100 detections, SMCA the top num_queries
    with focal alpha 0.25 and class weight 2. The backbone is frozen-BN with a frozen stem
    (DETR's fine-tuning setup); paths, device and output flags are not copied.
    """
    variant = canonical_variant(variant)
    args = dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args)
    _check_supported(args, variant)
    settings = {k: args[k] for k in SHARED_FLAGS if args.get(k) is not None}
    settings.update(num_classes=_num_classes(args, variant, state_dict),
                    frozen_bn=True, freeze_stem=True)
    if variant == "detr":
        settings.update(focal_alpha=None, eos_coef=args.get("eos_coef", 0.1))
    elif variant == "conditional":
        settings.update(num_select=100, focal_alpha=args.get("focal_alpha", 0.25),
                        cls_loss_coef=args.get("cls_loss_coef", 2.0))
    elif variant == "smca":
        released_ms = state_dict is not None and RELEASED_MS_MARKER in state_dict
        settings.update(num_select=settings.get("num_queries", 300), focal_alpha=0.25,
                        cls_loss_coef=2.0, smooth=args.get("smooth", 8.0), smca_multiscale=released_ms,
                        smca_ms_form="released" if released_ms else "paper",
                        smca_scale=SMCA_SCALES[args.get("dynamic_scale", "type3")])
    else:   # dn, dab: DAB-DETR's sine temperature, FFN activation and top-k
        settings.update({k: args[k] for k in ("focal_alpha", "cls_loss_coef", "num_select", "scalar",
                                              "label_noise_scale", "box_noise_scale") if k in args})
        if "pe_temperatureH" in args:
            settings["pe_temperature"] = args["pe_temperatureH"]
        if "transformer_activation" in args:
            settings["activation"] = args["transformer_activation"]
        settings["dn"] = variant == "dn"   # DN-DETR's content query is label_enc's "unknown" row
    types = {f.name: f.type for f in dataclasses.fields(Config)}
    for k, v in settings.items():   # argparse defaults such as set_cost_class=1 are ints
        if types[k] in (float, "float") and v is not None:
            settings[k] = float(v)
    return Config.for_variant(variant, "paper", **settings)


def infer_official_args(state_dict, variant):
    """Architecture flags read off the tensor shapes, for files saved without 'args'.

    Returns a dict of reference flag names. Not in the weights, hence left at the paper
    defaults: --dilation (DC5 has the same tensors; pass it explicitly), --nheads (except
    SMCA, whose point2 has 2 outputs per head), DAB/DN's PE temperature (20).
    """
    variant = canonical_variant(variant)
    sd = state_dict

    def count(prefix):   # number of numbered blocks under prefix
        found = {int(m.group(1)) for m in (re.match(re.escape(prefix) + r"(\d+)\.", k) for k in sd) if m}
        return max(found) + 1 if found else 0

    blocks = tuple(count(f"backbone.0.body.layer{i}.") for i in range(1, 5))
    bottleneck = "backbone.0.body.layer1.0.conv3.weight" in sd
    if (blocks, bottleneck) not in RESNET_LAYOUTS:
        raise ValueError(f"backbone with {blocks} blocks per stage (bottleneck {bottleneck}) is not "
                         f"one of {', '.join(RESNETS)}; is this an official {variant} checkpoint?")
    args = dict(backbone=RESNET_LAYOUTS[blocks, bottleneck],
                enc_layers=count("transformer.encoder.layers."),
                dec_layers=count("transformer.decoder.layers."))
    for name in ("input_proj.weight", RELEASED_MS_MARKER):
        if name in sd:
            args["hidden_dim"] = sd[name].shape[0]
    for name in ("transformer.encoder.layers.0.linear1.weight", "transformer.decoder.layers.0.linear1.weight"):
        if name in sd:
            args["dim_feedforward"] = sd[name].shape[0]
            break
    for name in ("query_embed.weight", "refpoint_embed.weight"):
        if name in sd:
            args["num_queries"] = sd[name].shape[0]
    if variant in ("dn", "dab"):
        prelu = any(k.endswith(".activation.weight") for k in sd)
        args["transformer_activation"] = "prelu" if prelu else "relu"
    if variant == "smca" and "transformer.decoder.layers.0.point2.weight" in sd:
        levels = 4 if RELEASED_MS_MARKER in sd else 1   # (dx, dy) per head and level
        heads = sd["transformer.decoder.layers.0.point2.weight"].shape[0] // (2 * levels)
        per_head = sd.get("transformer.decoder.layers.0.point3.weight", torch.empty(0)).shape[0] // (heads * levels)
        args.update(nheads=heads, dynamic_scale=f"type{per_head + 1}")
    return args


# ---- weights: official names -> ours ----

# SMCA-DETR's decoder-layer names -> ours (what each predicts, smca.SMCADecoderLayer)
SMCA_HEADS = {"norm4": "query_norm", "point1": "centre_head", "point2": "offset_head",
              "point3": "scale_head", "point4": "scale_select_head"}
# SMCA's released multi-scale code (Multi_scale_SMCA.zip): its encoder layer's convolutions
# and its input projections -> ours (smca.ConvMixLayer, smca.SMCAConvEncoder, MultiScaleProjection)
RELEASED_MS_MARKER = "input_proj_512.weight"
RELEASED_MS_ENCODER = {**{f"self_attn_{s}": f"within.{i}" for i, s in enumerate((8, 16, 32, 64))},
                       **{f"high_to_low_{i + 1}": f"down.{i}" for i in range(3)},
                       **{f"low_to_high_{i + 1}": f"up.{i}" for i in range(3)},
                       "conv_1": "in_proj", "conv_2": "out_proj"}
RELEASED_MS_INPUT = {"input_proj_512": "proj.0", "input_proj_1024": "proj.1", "input_proj_2048": "proj.2",
                     "input_proj_2048_3": "extra"}


def _rules(variant):
    """(pattern, replacement) pairs, tried in order with re.fullmatch; the first match wins."""
    layer = r"transformer\.(encoder|decoder)\.layers\.(\d+)\."
    ref_point_head = "queries.ref_point_head" if variant == "conditional" else "decoder.ref_point_head"
    return [
        (r"backbone\.0\.body\.(.+)", r"backbone.body.\1"),
        (r"input_proj\.(weight|bias)", r"input_proj.proj.0.\1"),
        *[(rf"{official}\.(weight|bias)", rf"input_proj.{ours}.\1") for official, ours in RELEASED_MS_INPUT.items()],
        (r"transformer\.conv\.(weight|bias)", r"encoder.memory_down.\1"),
        (r"transformer\.level_embed", r"encoder.level_embed"),
        *[(rf"transformer\.encoder\.layers\.(\d+)\.{official}\.(.+)", rf"encoder.layers.\1.{ours}.\2")
          for official, ours in RELEASED_MS_ENCODER.items()],
        (r"(query_embed|refpoint_embed)\.weight", r"queries.\1.weight"),
        (r"label_enc\.weight", r"denoiser.label_enc.weight"),
        (r"(class_embed|bbox_embed)\.(.+)", r"\1.\2"),
        (r"transformer\.decoder\.layers\.(\d+)\.multihead_attn\.(.+)", r"decoder.layers.\1.cross_attn.\2"),
        (r"transformer\.encoder\.layers\.(\d+)\.norm2\.(.+)", r"encoder.layers.\1.ffn.norm.\2"),
        (r"transformer\.decoder\.layers\.(\d+)\.norm3\.(.+)", r"decoder.layers.\1.ffn.norm.\2"),
        (layer + r"(linear1|linear2|activation)\.(.+)", r"\1.layers.\2.ffn.\3.\4"),
        *[(layer + rf"{official}\.(.+)", rf"\1.layers.\2.{ours}.\3") for official, ours in SMCA_HEADS.items()],
        (layer + r"(.+)", r"\1.layers.\2.\3"),
        (r"transformer\.encoder\.query_scale\.(.+)", r"encoder.pos_scale.\1"),
        (r"transformer\.decoder\.ref_point_head\.(.+)", ref_point_head + r".\1"),
        (r"transformer\.decoder\.(.+)", r"decoder.\1"),
    ]


def rename(state_dict, variant):
    """Official state_dict -> (ours, origin, unmapped).

    ours: our names -> tensors; origin: our name -> the official name it came from;
    unmapped: official names no rule knows. Applies the split (1) and the row drop (2).
    """
    variant = canonical_variant(variant)
    rules = [(re.compile(p), r) for p, r in _rules(variant)]
    ours, origin, unmapped = {}, {}, []
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        match = next(((p, r) for p, r in rules if p.fullmatch(key)), None)
        if match is None:
            unmapped.append(key)
            continue
        name = match[0].sub(match[1], key)
        if name.endswith((".in_proj_weight", ".in_proj_bias")):   # (1) [3C, ...] -> 3 x [C, ...]
            module, kind = name.rsplit(".in_proj_", 1)
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                ours[f"{module}.{part}.{kind}"] = chunk.clone()   # clone: save C rows, not 3C
                origin[f"{module}.{part}.{kind}"] = key
            continue
        if variant == "smca" and name.startswith("class_embed."):   # (2) drop the no-object row
            value = value[:-1].clone()
        ours[name], origin[name] = value, key
    return ours, origin, unmapped


def convert_official_checkpoint(state_dict, variant, cfg=None):
    """Official state_dict -> minidetr state_dict for `build(cfg)`, checked key by key.

    cfg: the Config of the model to fill; default: from the tensor shapes
    (infer_official_args). Raises ValueError naming the official keys with no place in
    the model, the model keys left empty, and any shape mismatch.
    """
    variant = canonical_variant(variant)
    if cfg is None:
        cfg = config_from_official_args(infer_official_args(state_dict, variant), variant, state_dict)
    expected = build(cfg)[0].state_dict()
    ours, origin, unmapped = rename(state_dict, variant)
    unmapped += [origin[k] for k in ours if k not in expected]
    missing = [k for k in expected if k not in ours]
    wrong = [f"{origin[k]} {tuple(v.shape)} -> {k} {tuple(expected[k].shape)}"
             for k, v in ours.items() if k in expected and v.shape != expected[k].shape]
    if unmapped or missing or wrong:
        found = [f"{title} ({len(keys)}): " + ", ".join(keys[:12]) + (", ..." if len(keys) > 12 else "")
                 for title, keys in (("unmapped source keys", sorted(set(unmapped))),
                                     ("missing target keys", missing), ("shape mismatches", wrong)) if keys]
        guess = guess_variant(state_dict)
        hint = f" The weights look like --variant {guess}." if guess not in (None, variant) else ""
        raise ValueError(f"the official {variant} weights do not fit minidetr's {cfg.variant} model "
                         f"({cfg.backbone}, {cfg.enc_layers}+{cfg.dec_layers} layers, {cfg.num_queries} "
                         f"queries, {cfg.num_classes} classes): " + "; ".join(found) + "." + hint)
    if variant in ("dn", "dab"):   # one shared box head in both codebases, stored twice
        for k in [k for k in ours if k.startswith("bbox_embed.")]:
            if not torch.equal(ours[k], ours["decoder." + k]):
                raise ValueError(f"{origin[k]} and {origin['decoder.' + k]} differ, but both models "
                                 f"use one box head for prediction and anchor refinement")
    return {k: ours[k] for k in expected}


# ---- whole files ----

def guess_variant(state_dict):
    """The variant whose signature key the weights hold, or None (for error messages)."""
    keys = list(state_dict)
    for variant, marker in (("dn", "label_enc.weight"), ("dab", "refpoint_embed.weight"),
                            ("conditional", ".ca_qpos_sine_proj."), ("smca", ".point2."),
                            ("detr", ".multihead_attn.")):
        if any(marker in k for k in keys):
            return variant
    return None


def convert_file(ckpt, variant, **overrides):
    """A loaded official checkpoint -> (Config, minidetr state_dict).

    The settings come from ckpt['args'] when present, else from the tensor shapes;
    `overrides` are reference flags set on top (e.g. dilation=True for a DC5 file
    saved without its args).
    """
    if "model" not in ckpt:
        raise ValueError(f"no 'model' entry (top-level keys: {sorted(ckpt)[:8]})")
    state_dict = ckpt["model"]
    args = ckpt.get("args")
    args = infer_official_args(state_dict, variant) if args is None else (
        dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args))
    args.update(overrides)
    cfg = config_from_official_args(args, variant, state_dict)
    return cfg, convert_official_checkpoint(state_dict, variant, cfg)


def read_any_checkpoint(path, variant=None):
    """A minidetr or official checkpoint file -> checkpoint.Contents (settings, weights, categories).

    Official files (no minidetr 'config') are converted here; `variant` (--variant) says which
    reference saved one: the message names the variant its weights look like when it is
    missing. ValueError / FileNotFoundError say what is wrong with the file.
    """
    ckpt = load_safely(path)
    if not (isinstance(ckpt, dict) and "config" not in ckpt and is_official_checkpoint(ckpt)):
        return minidetr_contents(path, ckpt)
    if not variant:
        guess = guess_variant(ckpt.get("model", {}))
        raise ValueError(f"{path} is an official checkpoint (no minidetr config): say which model "
                         f"it holds with --variant {{detr,conditional,smca,dn,dab}}"
                         + (f" (its weights look like {guess})" if guess else ""))
    try:
        cfg, state_dict = convert_file(ckpt, variant)
    except ValueError as err:
        raise ValueError(f"cannot convert {path} as --variant {variant}: {err}") from None
    # the references train COCO with its ids as rows (91 = largest id + 1): COCO's names
    return Contents(cfg.to_dict(), state_dict, Categories.coco() if cfg.num_classes == 91 else None, [])


def main(argv=None):
    p = argparse.ArgumentParser("python -m minidetr.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", required=True, choices=sorted(VARIANTS), help="which reference saved --src")
    p.add_argument("--src", required=True, help="official checkpoint (.pth)")
    p.add_argument("--dst", required=True, help="minidetr checkpoint to write: {'model', 'config'}")
    p.add_argument("--dilation", action="store_true", default=None,
                   help="DC5 model (only needed for files saved without 'args': the weights cannot tell)")
    p.add_argument("--nheads", type=int, help="attention heads (likewise: not in the weights)")
    opt = p.parse_args(argv)
    overrides = {k: v for k, v in (("dilation", opt.dilation), ("nheads", opt.nheads)) if v is not None}
    try:
        ckpt = load_safely(opt.src)
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    if isinstance(ckpt, dict) and "config" in ckpt:
        sys.exit(f"error: {opt.src} is already a minidetr checkpoint (variant "
                 f"{ckpt['config'].get('variant')!r}): train.py and eval.py load it as it is")
    try:
        cfg, state_dict = convert_file(ckpt, opt.variant, **overrides)
    except ValueError as err:
        sys.exit(f"error: cannot convert {opt.src}: {err}")
    save_atomic({"model": state_dict, "config": cfg.to_dict()}, opt.dst)
    source = "its args" if "args" in ckpt else "the tensor shapes (no args in the file)"
    print(f"wrote {opt.dst}: {len(state_dict)} tensors, {cfg.variant} "
          f"{cfg.backbone}{'-DC5' if cfg.dilation else ''}, {cfg.enc_layers}+{cfg.dec_layers} layers, "
          f"{cfg.num_queries} queries, {cfg.num_classes} classes (settings from {source})")


if __name__ == "__main__":
    main()
