"""Config: every setting of every variant, defined once.

Field names are the official DETR command-line flags (`hidden_dim`, `nheads`, `dec_layers`,
`set_cost_class`, `lr_backbone`, ...) plus the few the variants add, so a reader who knows
any of the reference codebases knows these names. train.py builds its argparse from the
fields, so a flag's default and help text live here and nowhere else.

Two presets:
  paper  the numbers each paper trains COCO with (ResNet-50, 256-d, 6+6 layers, ...);
  tiny   a ResNet-18 model at ~128 px that learns the built-in shapes dataset on two CPU
         cores in minutes. It trains from random weights (no ImageNet weights can be
         downloaded at run time), so DETR's choices for a pretrained backbone do not apply:
         trainable BatchNorm, nothing frozen, backbone learning rate equal to the rest.
`Config.for_variant(variant, preset)` fills the paper's defaults for a variant, then the
preset's sizes; keyword overrides come last.
"""
import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Optional

VARIANTS = ("detr", "conditional", "smca", "dab", "dn")   # dn = dab + denoising
PRESETS = ("paper", "tiny")


def _f(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # ---- what to build ----
    variant: str = _f("detr", "detr | conditional | smca | dab (DAB-DETR's anchor boxes) | "
                              "dn (dab + query denoising: DN-DETR)")
    preset: str = _f("paper", "paper (the papers' COCO settings) | tiny (CPU, built-in dataset)")
    dn: bool = _f(False, "query denoising in training (DN-DETR): on for --variant dn, an add-on "
                         "for conditional or dab (queries with a reference point or box)")
    num_classes: int = _f(91, "largest category id + 1 (COCO: 91, ids used raw as DETR does)")
    # ---- backbone ----
    backbone: str = _f("resnet50", "resnet18 | resnet34 | resnet50 | resnet101")
    dilation: bool = _f(False, "DC5: replace the stride of the last stage by a dilation")
    backbone_stage: str = _f("layer4", "last ResNet stage used, the map the transformer sees: "
                                       "layer4 (DETR, stride 32), layer3 (16), layer2 (8), layer1 (4)")
    position_embedding: str = _f("sine", "image positional encoding (only 'sine' is implemented)")
    pe_temperature: int = _f(10000, "temperature of the sine encoding (DAB/DN-DETR: 20)")
    frozen_bn: bool = _f(True, "FrozenBatchNorm2d in the backbone (for pretrained weights)")
    freeze_stem: bool = _f(True, "freeze conv1 and layer1 as DETR does with ImageNet weights")
    backbone_weights: Optional[str] = _f(None, "torchvision ImageNet ResNet .pth to start from")
    # ---- transformer ----
    enc_layers: int = _f(6, "encoder layers")
    dec_layers: int = _f(6, "decoder layers")
    dim_feedforward: int = _f(2048, "FFN hidden width")
    hidden_dim: int = _f(256, "transformer width D")
    dropout: float = _f(0.1, "dropout in the transformer")
    nheads: int = _f(8, "attention heads")
    num_queries: int = _f(100, "object queries")
    activation: str = _f("relu", "FFN activation: relu (DETR) | prelu (DAB/DN-DETR)")
    aux_loss: bool = _f(True, "losses on every decoder layer (--no_aux_loss turns it off)")
    # ---- matcher and losses ----
    set_cost_class: float = _f(1.0, "class coefficient in the matching cost")
    set_cost_bbox: float = _f(5.0, "L1 box coefficient in the matching cost")
    set_cost_giou: float = _f(2.0, "GIoU coefficient in the matching cost")
    cls_loss_coef: float = _f(1.0, "classification loss weight")
    bbox_loss_coef: float = _f(5.0, "L1 box loss weight")
    giou_loss_coef: float = _f(2.0, "GIoU loss weight")
    eos_coef: float = _f(0.1, "weight of the no-object class (softmax classification)")
    giou_eps: float = _f(0.0, "added to GIoU's union and enclosing area, in loss and matching "
                              "(DAB/DN-DETR: 1e-6; DETR, Conditional, SMCA: 0, exact)")
    focal_alpha: Optional[float] = _f(None, "sigmoid focal classification with this alpha; "
                                            "None = softmax with a no-object class")
    num_select: int = _f(100, "detections kept per image by post-processing")
    # ---- SMCA ----
    smooth: float = _f(8.0, "SMCA beta: the Gaussian's width factor")
    smca_scale: str = _f("xy", "SMCA scale: fixed | shared (one per head) | xy (per head and axis)")
    smca_multiscale: bool = _f(False, "SMCA multi-scale encoder and scale selection")
    smca_ms_form: str = _f("paper", "SMCA multi-scale form: paper (Sec. 3.3: intra- and multi-scale "
                                    "self-attention over strides 16/32/64) | released (the released "
                                    "code: a depthwise-convolution encoder over strides 8/16/32/64)")
    # ---- denoising ----
    scalar: int = _f(5, "denoising groups (DN-DETR's --scalar)")
    dn_bucket: int = _f(0, "slots of a denoising group: a multiple of N (static query counts for "
                           "torch.compile or CUDA graphs; the extra slots are masked, the numbers "
                           "stay; 0 = the batch's largest object count, as DN-DETR)")
    label_noise_scale: float = _f(0.2, "probability of flipping a denoising label")
    box_noise_scale: float = _f(0.4, "lambda: centre shift <= lambda*wh/2, size scale in 1 +- lambda")
    # ---- optimisation ----
    lr: float = _f(1e-4, "learning rate of the transformer and heads")
    lr_backbone: float = _f(1e-5, "learning rate of the backbone (<= 0 freezes it)")
    batch_size: int = _f(2, "images per process")
    weight_decay: float = _f(1e-4, "AdamW weight decay")
    epochs: int = _f(300, "training epochs")
    lr_drop: int = _f(200, "epoch at which the learning rates drop 10x")
    clip_max_norm: float = _f(0.1, "gradient clipping max norm (0 = off)")
    amp: str = _f("none", "autocast: none | bf16 | fp16 (fp16 uses a GradScaler)")
    backbone_precision: str = _f("fp32", "the backbone's convolutions: fp32 | bf16 | auto (bf16 on a "
                                         "CPU with bf16 instructions, fp32 elsewhere)")
    # ---- data ----
    coco_path: Optional[str] = _f(None, "COCO 2017 root (train2017/, val2017/, annotations/)")
    train_json: Optional[str] = _f(None, "custom dataset: training annotations (COCO json)")
    train_images: Optional[str] = _f(None, "custom dataset: training image folder")
    val_json: Optional[str] = _f(None, "custom dataset: validation annotations (COCO json)")
    val_images: Optional[str] = _f(None, "custom dataset: validation image folder")
    image_size: int = _f(800, "shorter image side for evaluation (training jitters around it)")
    shapes_train: int = _f(2000, "built-in dataset: training images")
    shapes_val: int = _f(200, "built-in dataset: validation images")
    # ---- run ----
    output_dir: str = _f("", "where log.txt and checkpoints go ('' = nowhere)")
    device: str = _f("cpu", "cpu | cuda | cuda:N")
    seed: int = _f(42, "random seed")
    resume: str = _f("", "checkpoint to resume from (ours, or an official one with --variant)")
    finetune: str = _f("", "start a new run from these weights (minidetr's or an official "
                           "checkpoint): new optimiser, epoch 0; class rows follow the categories")
    finetune_by_name: bool = _f(True, "with --finetune: copy the class rows of categories whose "
                                      "names the checkpoint knows (--no_finetune_by_name: all fresh)")
    overfit_batches: int = _f(0, "train on the same N batches, unaugmented, until the loss "
                                 "flattens, then say whether the model fits them (AP50 on them)")
    start_epoch: int = _f(0, "first epoch (set from the checkpoint when resuming)")
    eval: bool = _f(False, "only evaluate")
    num_workers: int = _f(2, "data loading workers")
    keep_checkpoints: int = _f(1, "keep the checkpoints of the last K epochs")
    max_steps: int = _f(0, "stop after this many optimiser steps (0 = no limit)")
    time_limit: float = _f(0.0, "minutes: the run stops after the epoch past which another "
                                "(at this machine's mean epoch, evaluation included) would end "
                                "later than this since it started (0 = every epoch; the tiny "
                                "preset's 9.75 unless --epochs or --max_steps is given)")
    eval_every: int = _f(1, "evaluate every N epochs (and always after the last)")
    log_every: int = _f(50, "print the training loss every N steps (0 = only per epoch; "
                            "each print waits for the device once)")
    log_instability: bool = _f(False, "log train_instability: the fraction of N fixed training "
                                      "images' ground truths whose matched query changed since the "
                                      "last evaluation (DN-DETR's matching instability; costs a "
                                      "forward pass over them)")
    instability_images: int = _f(200, "with --log_instability: N, the first N training images by id, "
                                      "unaugmented")

    @classmethod
    def for_variant(cls, variant="detr", preset="paper", **overrides):
        """The paper's settings for `variant`, resized by `preset`, then `overrides`."""
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}: choose one of {', '.join(VARIANTS)}")
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
        settings = dict(variant=variant, preset=preset, **PAPER_DEFAULTS[variant])
        if preset == "tiny":
            settings.update(TINY)
            settings.update(TINY_PER_VARIANT.get(variant, {}))
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown Config field(s): {', '.join(sorted(unknown))}")
        settings.update(overrides)
        cfg = cls(**settings)
        cfg.validate()
        return cfg

    def validate(self):
        """Stop early, with what to do, on settings that cannot work together."""
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}: choose one of {', '.join(VARIANTS)}")
        if self.hidden_dim % self.nheads:
            raise ValueError(f"hidden_dim {self.hidden_dim} must be divisible by nheads {self.nheads}")
        if self.dn and self.variant in ("detr", "smca"):
            raise ValueError(f"--dn needs queries that carry a reference box or point "
                             f"(conditional, dab or dn); {self.variant!r} has none")
        if self.backbone_precision not in ("fp32", "bf16", "auto"):
            raise ValueError(f"--backbone_precision must be fp32, bf16 or auto, not {self.backbone_precision!r}")
        if self.amp not in ("none", "bf16", "fp16"):
            raise ValueError(f"--amp must be none, bf16 or fp16, not {self.amp!r}")
        if self.smca_scale not in ("fixed", "shared", "xy"):
            raise ValueError(f"--smca_scale must be fixed, shared or xy, not {self.smca_scale!r}")
        if self.smca_ms_form not in ("paper", "released"):
            raise ValueError(f"--smca_ms_form must be paper or released, not {self.smca_ms_form!r}")
        if self.smca_ms_form == "released" and not self.smca_multiscale:
            raise ValueError("--smca_ms_form released chooses a multi-scale form: add --smca_multiscale")
        if self.smca_ms_form == "released" and self.dilation:
            raise ValueError("--smca_ms_form released halves each level into the next (stride 8, 16, "
                             "32, 64): it cannot run with --dilation, which keeps layer4 at stride 16")
        if self.backbone_stage not in ("layer1", "layer2", "layer3", "layer4"):
            raise ValueError(f"--backbone_stage must be layer1..layer4, not {self.backbone_stage!r}")
        if self.position_embedding != "sine":
            raise ValueError("only --position_embedding sine is implemented")
        # a number out of range fails deep inside (a division by zero, an empty top-k, a
        # negative resize) or trains silently wrong (a negative learning rate): name the flag
        for name, low in RANGES.items():
            value = getattr(self, name)
            if not value >= low:   # also catches NaN
                raise ValueError(f"--{name} must be >= {low}, not {value}"
                                 + (f" ({RANGE_WHY[name]})" if name in RANGE_WHY else ""))
        for name in ("lr", "smooth", "pe_temperature", "eos_coef"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name} must be > 0, not {getattr(self, name)}")
        for name in ("eos_coef",) + (("focal_alpha",) if self.focal_alpha is not None else ()):
            if not getattr(self, name) <= 1:
                raise ValueError(f"--{name} must be <= 1, not {getattr(self, name)}")
        if not self.dropout < 1:
            raise ValueError(f"--dropout must be < 1, not {self.dropout} (1 drops every activation)")
        return self

    def to_dict(self):
        return dataclasses.asdict(self)


# the lowest value each number may take (Config.validate); lr_backbone may be anything
# (<= 0 freezes the backbone), seed too
RANGES = dict(
    batch_size=1, epochs=1, lr_drop=1, eval_every=1, keep_checkpoints=1, num_classes=1,
    hidden_dim=1, nheads=1, dim_feedforward=1, dec_layers=1, num_queries=1, num_select=1,
    scalar=1, image_size=32, shapes_train=1, shapes_val=1, instability_images=1,
    enc_layers=0, num_workers=0, max_steps=0, log_every=0, start_epoch=0, overfit_batches=0,
    time_limit=0.0, dn_bucket=0,
    weight_decay=0.0, clip_max_norm=0.0, dropout=0.0, giou_eps=0.0,
    set_cost_class=0.0, set_cost_bbox=0.0, set_cost_giou=0.0,
    cls_loss_coef=0.0, bbox_loss_coef=0.0, giou_loss_coef=0.0,
    label_noise_scale=0.0, box_noise_scale=0.0,
)
RANGE_WHY = dict(image_size="the ResNet's last stage has stride 32, and training jitters the size below it",
                 enc_layers="0 is DETR's ablation without an encoder",
                 max_steps="0: no limit", log_every="0: only per epoch", time_limit="0: no limit")


# ---- per-variant defaults: each paper's training recipe ----

_FOCAL = dict(focal_alpha=0.25, set_cost_class=2.0, num_queries=300, epochs=50, lr_drop=40)
PAPER_DEFAULTS = {
    # facebookresearch/detr main.py defaults
    "detr": dict(),
    # Atten4Vis/ConditionalDETR: focal loss, 300 queries, top-100, 50 epochs
    "conditional": dict(_FOCAL, cls_loss_coef=2.0, num_select=100),
    # gaopengcuhk/SMCA-DETR README command: --num_queries 300 --epochs 50 --lr_drop 40
    # --dynamic_scale type3 (our smca_scale 'xy'); ce weight 2 and top-k = num_queries
    "smca": dict(_FOCAL, cls_loss_coef=2.0, num_select=300, smca_scale="xy", smooth=8.0),
    # IDEA-Research/DAB-DETR dab_detr: dropout 0, PReLU, PE temperature 20, ce 1, and its
    # util/box_ops.py's GIoU with + 1e-6 in both denominators
    "dab": dict(_FOCAL, cls_loss_coef=1.0, num_select=300, dropout=0.0, activation="prelu",
                pe_temperature=20, giou_eps=1e-6),
}
# FengLi-ust/DN-DETR dn_dab_detr: DAB-DETR's recipe with denoising on
PAPER_DEFAULTS["dn"] = dict(PAPER_DEFAULTS["dab"], dn=True)

# ---- the tiny preset: CPU-sized, trained from scratch on the shapes dataset ----
# Every choice below was measured on 2 CPU cores (benchmarks/RESULTS.md, "tuning the tiny
# preset"): the default run must show learning from random weights within ~10 minutes.
#  - ResNet-18 cut after layer2: stride 8, a 16x16 map at 128 px, and the cheapest backbone.
#    dn reached AP50 0.25 here against 0.08 at stride 16 (layer3).
#  - 1 encoder layer, not 3: in post-norm layers that start out attending almost uniformly,
#    every extra layer mixes the image further before the decoder has learned where to
#    look (dn AP50 0.038 with 1 layer vs 0.004 with 3, on the first dataset).
#  - batch 8 at lr 3e-4: batch 4 (twice the steps) and lr 1e-3 were both worse.
#  - the backbone in bf16 on CPUs that have bf16 instructions (backbone.py, runs_in_bf16):
#    the step takes ~0.6x the time, the AP after 1,250 steps stays in the seed spread.
#  - 10 epochs (2,500 steps, lr drop after 8): the time the bf16 backbone saved, spent on
#    steps. dn: AP50 0.69 in 8.6 min on 2 cores, against 0.34 after 5 epochs in 4.3 min.
#    The benchmarks that compare variants or codes (benchmarks/convergence.py's race,
#    official.py) keep 5 epochs / 1,250 steps, the budget their tables were built on.
#  - time_limit 9.75 minutes: those 10 epochs take 7-8 minutes where the CPU has bf16
#    instructions and two to three times that on one without; the run stops after the
#    epochs that fit (engine.TimeLimit). Giving --epochs or --max_steps turns it off.
TINY = dict(
    backbone="resnet18", backbone_stage="layer2", dilation=False, frozen_bn=False, freeze_stem=False,
    hidden_dim=128, nheads=8, dim_feedforward=512, enc_layers=1, dec_layers=3, dropout=0.0,
    image_size=128, batch_size=8, lr=3e-4, lr_backbone=3e-4, weight_decay=1e-4,
    epochs=10, lr_drop=8, clip_max_norm=0.1, num_workers=2, seed=42, time_limit=9.75,
    num_classes=7, shapes_train=2000, shapes_val=200, backbone_precision="auto",
)
# Queries: the papers' ratio (100 for DETR, 300 for the others, against ~7 COCO objects per
# image) scaled to 1-3 objects. Vanilla DETR keeps layer3 (stride 16, an 8x8 map): its
# cross-attention starts global and must find each object among all the tokens, and with
# the 4x more tokens of stride 8 it learned less in the same steps (AP50 0.010 vs 0.042 with
# seed 42, 0.027 vs 0.039 with seed 0): the very problem Conditional DETR, SMCA and DN-DETR
# set out to fix. DETR is also the slow starter: 0.04 after 1,250 steps, 0.22 after
# 2,500 (fp32 backbone, benchmarks/RESULTS.md).
TINY_PER_VARIANT = {
    "detr": dict(num_queries=10, num_select=10, backbone_stage="layer3"),
    "conditional": dict(num_queries=40, num_select=40),
    "smca": dict(num_queries=40, num_select=40),
    "dab": dict(num_queries=40, num_select=40),
    "dn": dict(num_queries=40, num_select=40),
}


def add_arguments(parser: argparse.ArgumentParser):
    """One flag per Config field, named as the field (booleans as --flag / --no_flag)."""
    for f in dataclasses.fields(Config):
        help_text = f.metadata.get("help", "")
        if f.type in (bool, "bool"):
            if f.name == "aux_loss":
                parser.add_argument("--no_aux_loss", dest="aux_loss", action="store_false",
                                    default=None, help=help_text)
                continue
            parser.add_argument(f"--{f.name}", dest=f.name, action="store_true", default=None,
                                help=help_text)
            parser.add_argument(f"--no_{f.name}", dest=f.name, action="store_false",
                                default=None, help=argparse.SUPPRESS)
        else:
            kind = {int: int, float: float, "int": int, "float": float}.get(f.type, str)
            if f.type in (Optional[float], "Optional[float]"):
                kind = _optional_float
            parser.add_argument(f"--{f.name}", dest=f.name, type=kind, default=None,
                                help=f"{help_text} (default {f.default})")
    return parser


def _optional_float(text):
    return None if text.lower() in ("none", "") else float(text)


def config_from_args(args):
    """Config.for_variant(args.variant, args.preset) with every flag the user gave on top."""
    given = {k: v for k, v in vars(args).items()
             if v is not None and k in {f.name for f in dataclasses.fields(Config)}}
    variant = given.pop("variant", "detr")
    preset = given.pop("preset", None)
    if preset is None:  # no dataset given -> the built-in shapes dataset and the tiny preset
        has_data = given.get("coco_path") or given.get("train_json") or given.get("val_json")
        preset = "paper" if has_data else "tiny"
    if ("epochs" in given or "max_steps" in given) and "time_limit" not in given:
        given["time_limit"] = 0.0   # a length the user chose is not shortened (the benchmarks')
    return Config.for_variant(variant, preset, **given)
