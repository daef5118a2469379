"""config: presets and paper defaults compose in order, flags map one-to-one onto fields,
and the default preset follows whether a dataset was given."""
import argparse
import dataclasses

import pytest

from minidetr.config import PAPER_DEFAULTS, TINY, Config, add_arguments, config_from_args


def parse(*argv):
    return config_from_args(add_arguments(argparse.ArgumentParser()).parse_args(list(argv)))


def test_every_field_is_a_flag():
    """train.py's parser has one option per Config field (booleans as --x, aux_loss as --no_aux_loss)."""
    parser = add_arguments(argparse.ArgumentParser())
    dests = {a.dest for a in parser._actions}
    assert {f.name for f in dataclasses.fields(Config)} <= dests


def test_no_dataset_means_tiny_preset_and_a_dataset_means_paper():
    assert parse("--variant", "dn").preset == "tiny"
    assert parse("--variant", "dn", "--coco_path", "/data/coco").preset == "paper"
    assert parse("--variant", "dn", "--train_json", "a.json").preset == "paper"
    assert parse("--variant", "dn", "--preset", "tiny", "--coco_path", "/x").preset == "tiny"


def test_order_paper_then_preset_then_flags():
    """Paper defaults < tiny preset < explicit flags."""
    cfg = parse("--variant", "conditional", "--lr", "5e-4", "--no_aux_loss", "--dilation")
    assert cfg.focal_alpha == PAPER_DEFAULTS["conditional"]["focal_alpha"]     # paper
    assert cfg.hidden_dim == TINY["hidden_dim"]                                 # preset
    assert (cfg.lr, cfg.aux_loss, cfg.dilation) == (5e-4, False, True)          # flags
    assert parse("--variant", "detr", "--focal_alpha", "none").focal_alpha is None


def test_paper_preset_is_the_dataclass_default_for_detr():
    """DETR's paper settings are exactly Config()'s defaults (main.py of facebookresearch/detr)."""
    assert Config.for_variant("detr", "paper") == Config()


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown preset"):
        Config.for_variant("detr", "huge")
    with pytest.raises(ValueError, match="--amp"):
        Config.for_variant("detr", amp="fp8")
    with pytest.raises(ValueError, match="smca_scale"):
        Config.for_variant("smca", smca_scale="type3")
    with pytest.raises(ValueError, match="backbone_stage"):
        Config.for_variant("detr", backbone_stage="layer5")


@pytest.mark.parametrize("flag, bad", [
    ("batch_size", "0"), ("epochs", "0"), ("lr_drop", "0"), ("eval_every", "0"), ("num_queries", "0"),
    ("num_select", "0"), ("dec_layers", "0"), ("hidden_dim", "0"), ("image_size", "31"),
    ("enc_layers", "-1"), ("num_workers", "-1"), ("max_steps", "-5"), ("lr", "0"), ("lr", "-0.0001"),
    ("lr", "nan"), ("weight_decay", "-1"), ("dropout", "1"), ("dropout", "-0.1"), ("clip_max_norm", "-1"),
    ("bbox_loss_coef", "-5"), ("eos_coef", "0"), ("eos_coef", "1.5"), ("focal_alpha", "2"),
    ("keep_checkpoints", "0"), ("smooth", "0"), ("box_noise_scale", "-0.4"), ("scalar", "0")])
def test_numbers_out_of_range_name_their_flag(flag, bad):
    """Each out-of-range number stops at the door naming its flag and value (they used to fail
    deep inside: --batch_size 0 divided by zero, --num_workers -1 in the DataLoader), while
    --num_queries 0 and --lr -1 trained without a word."""
    with pytest.raises(ValueError, match=f"^--{flag} must be"):
        parse("--variant", "conditional", f"--{flag}", bad)


def test_numbers_at_their_limits_are_accepted():
    """The edges that mean something: no encoder (DETR's ablation), no step limit, a frozen
    backbone (lr_backbone <= 0), no clipping, no dropout, a 32-px image."""
    cfg = parse("--variant", "dn", "--enc_layers", "0", "--max_steps", "0", "--lr_backbone", "-1",
                "--clip_max_norm", "0", "--dropout", "0", "--image_size", "32", "--log_every", "0")
    assert (cfg.enc_layers, cfg.image_size, cfg.lr_backbone) == (0, 32, -1)
