"""convert: official checkpoints of every variant land key by key in minidetr's model.

The official state_dicts are written out by hand, name by name, from the references'
layouts in tests/official_layouts.py (shared with test_finetune.py), for a tiny model
(ResNet-18, width 32, 1 encoder + 2 decoder layers). Numerical equality with the reference code itself is checked outside the test
suite (README, "Official checkpoints").
"""
import argparse
import functools

import pytest
import torch
from torch import nn

from minidetr import Config, build
from minidetr.checkpoint import load_safely, save_atomic
from minidetr.convert import (config_from_official_args, convert_official_checkpoint,
                              infer_official_args, main as convert_main, rename)
from minidetr.transformer import MultiheadAttention
from official_layouts import ARGS, C, DEC, ENC, F, HEADS, K, Q, args_for, official_state_dict

def convert(variant, sd=None):
    sd = official_state_dict(variant) if sd is None else sd
    cfg = config_from_official_args(args_for(variant), variant, state_dict=sd)
    return sd, cfg, convert_official_checkpoint(sd, variant, cfg)


converted = functools.lru_cache(convert)   # (variant) -> the same read-only result for several tests


@pytest.mark.parametrize("variant", ["detr", "conditional", "smca", "dn", "dab"])
def test_every_official_key_lands_and_loads_strictly(variant):
    """Converted weights fill build(cfg) exactly (strict load), and every official number is
    used exactly once (total element count kept; SMCA drops its C+1-element no-object row)."""
    sd, cfg, ours = converted(variant)
    model = build(cfg)[0]
    model.load_state_dict(ours, strict=True)
    dropped = C + 1 if variant == "smca" else 0
    assert sum(v.numel() for v in ours.values()) == sum(v.numel() for v in sd.values()) - dropped
    assert cfg.num_classes == K and model.class_embed.out_features == (K + 1 if variant == "detr" else K)


# (official key, rows, our key); in_proj rows [0:C] are q, [C:2C] k, [2C:3C] v
ALL, QR, KR, VR = slice(None), slice(0, C), slice(C, 2 * C), slice(2 * C, 3 * C)
ENC0 = "transformer.encoder.layers.0."
DEC0, DEC1, TD = "transformer.decoder.layers.0.", "transformer.decoder.layers.1.", "transformer.decoder."
PLACES = {
    "detr": [(ENC0 + "self_attn.in_proj_weight", QR, "encoder.layers.0.self_attn.q_proj.weight"),
             (ENC0 + "self_attn.in_proj_weight", KR, "encoder.layers.0.self_attn.k_proj.weight"),
             (ENC0 + "self_attn.in_proj_bias", VR, "encoder.layers.0.self_attn.v_proj.bias"),
             (DEC1 + "multihead_attn.in_proj_weight", VR, "decoder.layers.1.cross_attn.v_proj.weight"),
             (DEC1 + "multihead_attn.out_proj.bias", ALL, "decoder.layers.1.cross_attn.out_proj.bias"),
             (ENC0 + "norm2.weight", ALL, "encoder.layers.0.ffn.norm.weight"),
             (DEC1 + "norm2.bias", ALL, "decoder.layers.1.norm2.bias"),
             (DEC1 + "norm3.bias", ALL, "decoder.layers.1.ffn.norm.bias"),
             (DEC0 + "linear1.weight", ALL, "decoder.layers.0.ffn.linear1.weight"),
             ("transformer.decoder.norm.weight", ALL, "decoder.norm.weight"),
             ("backbone.0.body.layer4.1.bn2.running_var", ALL, "backbone.body.layer4.1.bn2.running_var"),
             ("input_proj.weight", ALL, "input_proj.proj.0.weight"),
             ("query_embed.weight", ALL, "queries.query_embed.weight"),
             ("class_embed.weight", ALL, "class_embed.weight")],
    "conditional": [(TD + "ref_point_head.layers.1.weight", ALL, "queries.ref_point_head.layers.1.weight"),
                    (DEC0 + "ca_qpos_proj.weight", ALL, "decoder.layers.0.ca_qpos_proj.weight"),
                    (DEC1 + "cross_attn.out_proj.weight", ALL, "decoder.layers.1.cross_attn.out_proj.weight"),
                    (TD + "query_scale.layers.0.bias", ALL, "decoder.query_scale.layers.0.bias"),
                    (DEC1 + "norm3.weight", ALL, "decoder.layers.1.ffn.norm.weight")],
    "smca": [("class_embed.weight", slice(0, K), "class_embed.weight"),       # no-object row dropped
             ("class_embed.bias", slice(0, K), "class_embed.bias"),
             (DEC0 + "point1.layers.2.bias", ALL, "decoder.layers.0.centre_head.layers.2.bias"),
             (DEC1 + "point3.weight", ALL, "decoder.layers.1.scale_head.weight"),
             (DEC1 + "norm4.weight", ALL, "decoder.layers.1.query_norm.weight"),
             (DEC0 + "self_attn.in_proj_weight", KR, "decoder.layers.0.self_attn.k_proj.weight")],
    "dn": [("label_enc.weight", ALL, "denoiser.label_enc.weight"),
           ("refpoint_embed.weight", ALL, "queries.refpoint_embed.weight"),
           ("transformer.encoder.query_scale.layers.1.weight", ALL, "encoder.pos_scale.layers.1.weight"),
           (ENC0 + "activation.weight", ALL, "encoder.layers.0.ffn.activation.weight"),
           (DEC1 + "activation.weight", ALL, "decoder.layers.1.ffn.activation.weight"),
           (TD + "ref_point_head.layers.0.weight", ALL, "decoder.ref_point_head.layers.0.weight"),
           (TD + "ref_anchor_head.layers.1.bias", ALL, "decoder.ref_anchor_head.layers.1.bias"),
           (TD + "bbox_embed.layers.2.weight", ALL, "decoder.bbox_embed.layers.2.weight"),
           ("bbox_embed.layers.2.weight", ALL, "bbox_embed.layers.2.weight")],
}


@pytest.mark.parametrize("variant", list(PLACES))
def test_values_land_where_the_name_map_says(variant):
    """A value at official key X (rows r) is found at our key Y, unchanged."""
    sd, _, ours = converted(variant)
    for src, rows, dst in PLACES[variant]:
        assert torch.equal(ours[dst], sd[src][rows]), f"{src}[{rows}] -> {dst}"


def test_in_proj_split_reproduces_torch_multihead_attention():
    """nn.MultiheadAttention with a packed in_proj and ours loaded from the split agree."""
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(C, HEADS, batch_first=True).double().eval()
    nn.init.normal_(ref.in_proj_bias), nn.init.normal_(ref.out_proj.bias)
    packed = {f"transformer.encoder.layers.0.self_attn.{k}": v for k, v in ref.state_dict().items()}
    split, _, unmapped = rename(packed, "detr")
    assert not unmapped
    ours = MultiheadAttention(C, HEADS).double().eval()
    ours.load_state_dict({k.removeprefix("encoder.layers.0.self_attn."): v for k, v in split.items()})
    q, k, v = (torch.randn(2, n, C, dtype=torch.float64) for n in (3, 6, 6))
    expected, _ = ref(q, k, v, need_weights=False)
    assert torch.allclose(ours(q, k, v), expected, atol=1e-12)


def test_unmapped_missing_and_misshaped_keys_are_named():
    """Keys with no place, holes in the model and wrong shapes all appear in the ValueError."""
    sd = official_state_dict("detr")
    sd["mystery.weight"] = torch.zeros(3)                                  # no rule knows it
    sd["transformer.decoder.layers.0.point2.weight"] = torch.zeros(8, C)  # a rule, but no such module
    del sd["transformer.decoder.layers.1.norm2.weight"]
    sd["query_embed.weight"] = torch.zeros(Q + 1, C)
    cfg = config_from_official_args(args_for("detr"), "detr", state_dict=sd)
    with pytest.raises(ValueError) as err:
        convert_official_checkpoint(sd, "detr", cfg)
    msg = str(err.value)
    for name in ("mystery.weight", "transformer.decoder.layers.0.point2.weight",
                 "decoder.layers.1.norm2.weight", "query_embed.weight (6, 32)"):
        assert name in msg


def test_wrong_variant_is_refused_with_a_hint():
    """DETR weights converted as Conditional DETR fail, naming the variant they look like."""
    sd = official_state_dict("detr")
    cfg = config_from_official_args(args_for("conditional"), "conditional", state_dict=sd)
    with pytest.raises(ValueError, match="look like --variant detr"):
        convert_official_checkpoint(sd, "conditional", cfg)


def test_dn_box_head_copies_must_agree():
    """DN-DETR stores its one box head twice; two different tensors cannot be one module."""
    sd = official_state_dict("dn")
    sd["transformer.decoder.bbox_embed.layers.0.bias"] = sd["bbox_embed.layers.0.bias"] + 1
    with pytest.raises(ValueError, match="bbox_embed.layers.0.bias"):
        convert("dn", sd)


def test_batchnorm_counters_are_dropped():
    """num_batches_tracked (BatchNorm2d checkpoints) is not a weight and is skipped."""
    sd = official_state_dict("detr")
    sd["backbone.0.body.bn1.num_batches_tracked"] = torch.tensor(7)
    _, _, ours = convert("detr", sd)
    assert not [k for k in ours if k.endswith("num_batches_tracked")]
    _, _, without = convert("detr", official_state_dict("detr"))   # the same file without it
    assert ours.keys() == without.keys()


def test_official_args_set_the_architecture():
    """Backbone, DC5, sizes and the variants' hard-coded settings come from the args."""
    r101_dc5 = argparse.Namespace(**{**ARGS, "backbone": "resnet101", "dilation": True})
    cfg = config_from_official_args(r101_dc5, "detr")
    assert (cfg.backbone, cfg.dilation, cfg.hidden_dim, cfg.nheads, cfg.enc_layers, cfg.dec_layers) == \
        ("resnet101", True, C, HEADS, ENC, DEC)
    assert (cfg.num_classes, cfg.focal_alpha, cfg.set_cost_class, cfg.frozen_bn, cfg.preset) == \
        (91, None, 1.0, True, "paper")          # 91: --dataset_file coco, as the reference builds
    cond = config_from_official_args(args_for("conditional"), "cond")
    assert (cond.variant, cond.num_select, cond.cls_loss_coef, cond.focal_alpha) == \
        ("conditional", 100, 2.0, 0.25)                # Conditional DETR keeps a fixed top 100
    scales = [config_from_official_args({**args_for("smca"), "dynamic_scale": t}, "smca").smca_scale
              for t in ("type1", "type2", "type3")]
    assert scales == ["fixed", "shared", "xy"]
    smca = config_from_official_args(args_for("smca"), "smca")
    assert (smca.num_select, smca.cls_loss_coef, smca.focal_alpha, smca.smooth) == (Q, 2.0, 0.25, 8.0)
    dn = config_from_official_args({**args_for("dn"), "pe_temperatureH": 30, "pe_temperatureW": 30}, "dn")
    assert (dn.variant, dn.dn, dn.pe_temperature, dn.activation, dn.dropout, dn.num_select) == \
        ("dn", True, 30, "prelu", 0.0, Q)
    dab = config_from_official_args({**args_for("dn"), "modelname": "dab_detr"}, "dab")
    assert (dab.variant, dab.dn) == ("dab", False)


@pytest.mark.parametrize("variant,change,needle", [
    ("detr", dict(pre_norm=True), "pre_norm"), ("detr", dict(masks=True), "masks"),
    ("detr", dict(backbone="swin_L_384_22k"), "backbone"), ("smca", dict(dynamic_scale="type4"), "type4"),
    ("dn", dict(modelname="dn_dab_deformable_detr"), "dn_dab_deformable_detr"),
    ("dn", dict(num_patterns=3), "num_patterns")])
def test_settings_minidetr_cannot_build_are_refused(variant, change, needle):
    with pytest.raises(ValueError, match=needle):
        config_from_official_args({**args_for(variant), **change}, variant)


@pytest.mark.parametrize("variant", ["detr", "smca", "dn"])
def test_architecture_is_read_off_the_shapes_without_args(variant):
    """Files saved without 'args' (model zoo): backbone, sizes, heads (SMCA) from the tensors."""
    args = infer_official_args(official_state_dict(variant), variant)
    assert {k: args[k] for k in ("backbone", "hidden_dim", "dim_feedforward", "enc_layers",
                                 "dec_layers", "num_queries")} == \
        dict(backbone="resnet18", hidden_dim=C, dim_feedforward=F, enc_layers=ENC, dec_layers=DEC,
             num_queries=Q)
    if variant == "smca":
        assert (args["nheads"], args["dynamic_scale"]) == (HEADS, "type3")
    if variant == "dn":
        assert args["transformer_activation"] == "prelu"


def test_command_line_writes_a_loadable_minidetr_checkpoint(tmp_path):
    """--src official {'model', 'args': Namespace} -> --dst {'model', 'config'} that rebuilds."""
    sd = official_state_dict("smca")
    torch.save({"model": sd, "args": argparse.Namespace(**args_for("smca")), "epoch": 49}, tmp_path / "off.pth")
    convert_main(["--variant", "smca", "--src", str(tmp_path / "off.pth"), "--dst", str(tmp_path / "ours.pth")])
    ckpt = load_safely(tmp_path / "ours.pth")
    assert set(ckpt) == {"model", "config"}
    model = build(Config(**ckpt["config"]))[0]
    model.load_state_dict(ckpt["model"], strict=True)
    assert torch.equal(model.decoder.layers[1].offset_head.weight, sd["transformer.decoder.layers.1.point2.weight"])


def test_command_line_mistakes_are_one_line(tmp_path):
    """A missing --src, and a minidetr checkpoint given as an official one, stop with one
    'error:' line (the first was a traceback, the second blamed the backbone's shape)."""
    with pytest.raises(SystemExit, match="error: checkpoint .*none.pth' does not exist"):
        convert_main(["--variant", "detr", "--src", str(tmp_path / "none.pth"), "--dst", str(tmp_path / "o.pth")])
    save_atomic({"model": {}, "config": Config.for_variant("dn", "tiny").to_dict()}, tmp_path / "ours.pth")
    with pytest.raises(SystemExit, match="is already a minidetr checkpoint \\(variant 'dn'\\)"):
        convert_main(["--variant", "conditional", "--src", str(tmp_path / "ours.pth"), "--dst", str(tmp_path / "o.pth")])
    assert not (tmp_path / "o.pth").exists()


def test_eval_converts_an_official_file_on_load(tmp_path):
    """eval.py --resume official.pth --variant V converts on load; without --variant it stops
    and says which variant the weights look like."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import eval as eval_script
    sd = official_state_dict("dn")
    torch.save({"model": sd, "args": argparse.Namespace(**args_for("dn"))}, tmp_path / "dn.pth")
    cfg, model, _, _ = eval_script.load_model(str(tmp_path / "dn.pth"), {}, torch.device("cpu"), "dn")
    assert (cfg.variant, cfg.dn, cfg.pe_temperature) == ("dn", True, 20) and not model.training
    assert torch.equal(model.denoiser.label_enc.weight, sd["label_enc.weight"])
    with pytest.raises(SystemExit, match="--variant .*look like dn"):
        eval_script.load_model(str(tmp_path / "dn.pth"), {}, torch.device("cpu"), None)


class Opaque:
    """Pickled by reference to this module: weights_only loading must refuse it."""


def test_load_safely_refuses_foreign_classes_and_accepts_namespace(tmp_path):
    torch.save({"model": {}, "payload": Opaque()}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="refusing to load .*bad.pth"):
        load_safely(tmp_path / "bad.pth")
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=1e-4)}, tmp_path / "ok.pth")
    ckpt = load_safely(tmp_path / "ok.pth")
    assert ckpt["args"].lr == 1e-4 and torch.equal(ckpt["model"]["w"], torch.ones(2))
