"""Official checkpoints' layouts, written out by hand for a tiny model (tests' shared helper).

The state_dict names of facebookresearch/detr, Atten4Vis/ConditionalDETR,
gaopengcuhk/SMCA-DETR, IDEA-Research/DN-DETR and DAB-DETR, name by name, from the
references' layouts (minidetr/convert.py lists the mapping), for a ResNet-18 model of
width 32 with 1 encoder + 2 decoder layers; only the ResNet keys are taken from our
backbone (torchvision's names, checked in test_backbone.py) with the official prefix.
Used by test_convert.py (every key lands) and test_finetune.py (such files fine-tune).
"""
import functools

import torch

from minidetr.backbone import Backbone

C, F, ENC, DEC, Q, K, HEADS = 32, 64, 1, 2, 5, 7, 4
ARGS = dict(backbone="resnet18", dilation=False, hidden_dim=C, nheads=HEADS, dim_feedforward=F,
            enc_layers=ENC, dec_layers=DEC, num_queries=Q, dropout=0.0, position_embedding="sine",
            pre_norm=False, masks=False, aux_loss=True, dataset_file="coco", lr=1e-4,
            set_cost_class=1, set_cost_bbox=5, set_cost_giou=2, bbox_loss_coef=5, giou_loss_coef=2)
VARIANT_ARGS = {
    "detr": dict(eos_coef=0.1),
    "conditional": dict(cls_loss_coef=2, focal_alpha=0.25, set_cost_class=2),
    "smca": dict(dynamic_scale="type3", smooth=8, set_cost_class=2),
    "dn": dict(modelname="dn_dab_detr", use_dn=True, transformer_activation="prelu", pe_temperatureH=20,
               pe_temperatureW=20, num_select=Q, num_patterns=0, cls_loss_coef=1, focal_alpha=0.25,
               scalar=5, label_noise_scale=0.2, box_noise_scale=0.4),
}
# DAB-DETR's dab_detr: DN-DETR's model without its label embedding
VARIANT_ARGS["dab"] = {**VARIANT_ARGS["dn"], "modelname": "dab_detr", "use_dn": False}


@functools.lru_cache
def resnet18_shapes():
    body = Backbone("resnet18", frozen_bn=True, freeze_stem=True, train_backbone=True, dilation=False).body
    return {f"backbone.0.body.{k}": tuple(v.shape) for k, v in body.state_dict().items()}


def official_shapes(variant):
    """{official key: shape} of a tiny reference model, written from the reference layouts."""
    shapes = dict(resnet18_shapes())
    shapes.update({"input_proj.weight": (C, 512, 1, 1), "input_proj.bias": (C,),
                   "class_embed.weight": (K + 1 if variant in ("detr", "smca") else K, C),
                   "class_embed.bias": (K + 1 if variant in ("detr", "smca") else K,),
                   "transformer.decoder.norm.weight": (C,), "transformer.decoder.norm.bias": (C,)})

    def linear(prefix, out_dim, in_dim):
        shapes.update({f"{prefix}.weight": (out_dim, in_dim), f"{prefix}.bias": (out_dim,)})

    def torch_mha(prefix):   # nn.MultiheadAttention: packed q, k, v
        shapes.update({f"{prefix}.in_proj_weight": (3 * C, C), f"{prefix}.in_proj_bias": (3 * C,)})
        linear(f"{prefix}.out_proj", C, C)

    for j, (o, i) in enumerate(((C, C), (C, C), (4, C))):
        linear(f"bbox_embed.layers.{j}", o, i)
    prelu = variant in ("dn", "dab")
    for i in range(ENC):
        p = f"transformer.encoder.layers.{i}"
        torch_mha(f"{p}.self_attn")
        linear(f"{p}.linear1", F, C), linear(f"{p}.linear2", C, F)
        for n in ("norm1", "norm2"):
            shapes.update({f"{p}.{n}.weight": (C,), f"{p}.{n}.bias": (C,)})
        if prelu:
            shapes[f"{p}.activation.weight"] = (1,)
    for i in range(DEC):
        p = f"transformer.decoder.layers.{i}"
        if variant in ("detr", "smca"):
            torch_mha(f"{p}.self_attn"), torch_mha(f"{p}.multihead_attn")
        else:
            names = ["sa_qcontent_proj", "sa_qpos_proj", "sa_kcontent_proj", "sa_kpos_proj", "sa_v_proj",
                     "self_attn.out_proj", "ca_qcontent_proj", "ca_kcontent_proj", "ca_kpos_proj",
                     "ca_v_proj", "ca_qpos_sine_proj", "cross_attn.out_proj"]
            names += ["ca_qpos_proj"] if i == 0 else []     # layer 0 only
            for n in names:
                linear(f"{p}.{n}", C, C)
        linear(f"{p}.linear1", F, C), linear(f"{p}.linear2", C, F)
        for n in ("norm1", "norm2", "norm3") + (("norm4",) if variant == "smca" else ()):
            shapes.update({f"{p}.{n}.weight": (C,), f"{p}.{n}.bias": (C,)})
        if prelu:
            shapes[f"{p}.activation.weight"] = (1,)
        if variant == "smca":
            linear(f"{p}.point2", 2 * HEADS, C), linear(f"{p}.point3", 2 * HEADS, C)
            if i == 0:
                for j, (o, n) in enumerate(((C, C), (C, C), (2, C))):
                    linear(f"{p}.point1.layers.{j}", o, n)
    if variant in ("detr", "conditional", "smca"):
        shapes["query_embed.weight"] = (Q, C)
    if variant in ("conditional", "dn", "dab"):
        linear("transformer.decoder.query_scale.layers.0", C, C)
        linear("transformer.decoder.query_scale.layers.1", C, C)
    if variant == "conditional":
        linear("transformer.decoder.ref_point_head.layers.0", C, C)
        linear("transformer.decoder.ref_point_head.layers.1", 2, C)
    if variant in ("dn", "dab"):
        linear("transformer.encoder.query_scale.layers.0", C, C)
        linear("transformer.encoder.query_scale.layers.1", C, C)
        linear("transformer.decoder.ref_point_head.layers.0", C, 2 * C)
        linear("transformer.decoder.ref_point_head.layers.1", C, C)
        linear("transformer.decoder.ref_anchor_head.layers.0", C, C)
        linear("transformer.decoder.ref_anchor_head.layers.1", 2, C)
        for j, (o, i) in enumerate(((C, C), (C, C), (4, C))):
            linear(f"transformer.decoder.bbox_embed.layers.{j}", o, i)
        shapes["refpoint_embed.weight"] = (Q, 4)
    if variant == "dn":
        shapes["label_enc.weight"] = (K + 1, C - 1)
    return shapes


def official_state_dict(variant, seed=0):
    """Random tensors under the official names; DN's two box-head copies share values."""
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(s, generator=g) for k, s in official_shapes(variant).items()}
    for k in [k for k in sd if k.startswith("transformer.decoder.bbox_embed.")]:
        sd[k] = sd[k.replace("transformer.decoder.", "")]
    return sd


def args_for(variant):
    return {**ARGS, **VARIANT_ARGS[variant]}
