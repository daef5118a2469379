"""finetune: a new run from another run's weights, class rows following the category names.

Checked against the source tensors themselves, indexed by hand: every tensor whose name and
shape match is copied unchanged; class rows (class_embed, DN's label_enc) of categories whose
names the checkpoint knows are the source's rows of those names, the no-object / unknown row
moves to its new place, the other rows are drawn as build() draws them (the std of
nn.Linear's uniform init, 1/sqrt(3 fan_in); the focal prior bias -log(99); label_enc's
N(0, 1)); a smaller --num_queries takes the first N; the command line's mistakes stop with one
line; a file in each official repository's layout fine-tunes for 2 steps.
"""
import argparse
import json
import math
import os
import sys

import pytest
import torch

from minidetr import Config, build
from minidetr.categories import Categories
from minidetr.checkpoint import save_atomic
from minidetr.finetune import Source, load_for_finetune
from official_layouts import args_for, official_state_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import train  # noqa: E402

SMALL = dict(hidden_dim=32, nheads=4, dim_feedforward=64, enc_layers=1, dec_layers=2,
             num_queries=8, num_select=8)
OLD = Categories({1: "cat", 2: "dog", 3: "bird", 4: "fish"})       # rows 1..4, 5 rows
NEW = Categories({1: "Fish ", 2: "horse", 3: "DOG"})               # fish, dog carried; horse fresh
CARRIED = {1: 4, 3: 2}                                             # new row -> old row, by hand


def source_for(variant, categories=OLD, **overrides):
    """A minidetr checkpoint's content: random weights (not build()'s init), config, categories."""
    torch.manual_seed(0)
    cfg = Config.for_variant(variant, "tiny", num_classes=categories.num_classes, **{**SMALL, **overrides})
    model = build(cfg)[0]
    with torch.no_grad():   # in place, so tensors two names share (dab's box head) stay one
        for t in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
            t.normal_()
    return Source("src.pth", cfg.to_dict(), model.state_dict(), categories)


def finetuned(variant, source, categories=NEW, by_name=True, **overrides):
    settings = {k: v for k, v in source.settings.items() if k not in ("num_classes",)}
    cfg = Config(**{**settings, "num_classes": categories.num_classes, **overrides})
    model = build(cfg)[0]
    report = load_for_finetune(model, source, cfg, categories, by_name=by_name)
    return model.state_dict(), report, cfg


@pytest.mark.parametrize("variant", ["detr", "conditional", "smca", "dab", "dn"])
def test_tensors_of_matching_name_and_shape_are_copied_unchanged(variant):
    """Every source tensor with a same-named, same-shaped place is copied bit for bit."""
    source = source_for(variant)
    state, report, _ = finetuned(variant, source)
    same = [k for k, v in source.state_dict.items() if k in state and state[k].shape == v.shape
            and not k.startswith(("class_embed", "denoiser"))]
    assert len(same) == report.loaded > 100
    for k in same:
        assert torch.equal(state[k], source.state_dict[k]), k


@pytest.mark.parametrize("variant", ["detr", "dn"])   # softmax + no-object row; focal + label_enc
def test_class_rows_follow_the_names(variant):
    """fish and dog keep their trained rows in their new places; the extra row moves last to last."""
    source = source_for(variant)
    state, report, _ = finetuned(variant, source)
    old, new = source.state_dict, state
    keys = ["class_embed.weight", "class_embed.bias"] + (["denoiser.label_enc.weight"] if variant == "dn" else [])
    for key in keys:
        for new_row, old_row in CARRIED.items():
            assert torch.equal(new[key][new_row], old[key][old_row]), (key, new_row)
        assert not torch.equal(new[key][2], old[key][2])                 # horse: not copied
    if variant == "detr":   # softmax: row num_classes is "no object" in both heads
        assert new["class_embed.weight"].shape[0] == NEW.num_classes + 1
        assert torch.equal(new["class_embed.weight"][NEW.num_classes], old["class_embed.weight"][OLD.num_classes])
        assert report.special_rows == ["no-object row"]
    else:                   # label_enc's last row is the "unknown" label of the noised queries
        assert torch.equal(new["denoiser.label_enc.weight"][NEW.num_classes],
                           old["denoiser.label_enc.weight"][OLD.num_classes])
    assert sorted(report.carried) == ["DOG", "Fish "] and report.fresh == ["horse"]


def test_without_names_every_class_row_is_fresh():
    """--no_finetune_by_name: no class row comes from the checkpoint, the rest still does."""
    source = source_for("dn", categories=Categories({1: "fish", 2: "horse", 3: "dog"}))
    state, report, _ = finetuned("dn", source, by_name=False)
    for key in ("class_embed.weight", "denoiser.label_enc.weight"):
        for row in range(NEW.num_classes):
            assert not torch.equal(state[key][row], source.state_dict[key][row])
    assert report.carried == [] and report.loaded > 100


@pytest.mark.parametrize("variant", ["detr", "dn"])
def test_fresh_rows_are_drawn_as_the_variants_init(variant):
    """60 new categories: weights uniform with std 1/sqrt(3 D), focal bias -log(99), label_enc N(0, 1)."""
    many = Categories({i: f"new{i}" for i in range(1, 61)})
    state, report, cfg = finetuned(variant, source_for(variant, hidden_dim=64), categories=many)
    assert len(report.fresh) == 60 and report.carried == []
    weight = state["class_embed.weight"][1:61]                       # [60, 64]: 3,840 draws
    bound = 1 / math.sqrt(cfg.hidden_dim)                            # nn.Linear: U(-1/sqrt(in), 1/sqrt(in))
    assert weight.abs().max() <= bound
    assert abs(weight.std().item() / (bound / math.sqrt(3)) - 1) < 0.06
    if variant == "dn":
        assert torch.allclose(state["class_embed.bias"][1:61], torch.full((60,), -math.log(99)))
        label_rows = state["denoiser.label_enc.weight"][1:61]          # nn.Embedding: N(0, 1)
        assert abs(label_rows.std().item() - 1) < 0.06 and abs(label_rows.mean().item()) < 0.06


@pytest.mark.parametrize("variant,key", [("detr", "queries.query_embed.weight"),
                                         ("dn", "queries.refpoint_embed.weight")])
def test_fewer_queries_take_the_first_n(variant, key):
    """--num_queries 5 of 8: the first five rows of the source's query embedding."""
    source = source_for(variant)
    state, report, _ = finetuned(variant, source, num_queries=5, num_select=5)
    assert torch.equal(state[key], source.state_dict[key][:5])
    assert report.queries == "first 5 of 8"


# ---- the command line ----

TINY_DATA = ["--shapes_train", "4", "--shapes_val", "2", "--num_workers", "0", "--image_size", "32",
             "--batch_size", "2"]


def write_source(path, variant="dn", categories=OLD, **overrides):
    source = source_for(variant, categories, **overrides)
    save_atomic({"model": source.state_dict, "config": source.settings,
                 "categories": categories.to_list()}, path)
    return source


def error_of(argv):
    with pytest.raises(SystemExit) as exc:
        train.main(argv)
    assert isinstance(exc.value.code, str) and "\n" not in exc.value.code
    return exc.value.code


@pytest.mark.parametrize("flags,needle", [
    (["--hidden_dim", "64"], "--hidden_dim 64 cannot load {path}: it was trained with --hidden_dim 32"),
    (["--variant", "detr"], "--variant detr cannot load {path}: it holds a dn model"),
    (["--num_queries", "9"], "--num_queries 9 is more than the 8 queries of {path}"),
])
def test_overrides_that_cannot_load_stop_with_both_values(tmp_path, monkeypatch, flags, needle):
    """Another width, another model, more queries: one line naming the flag and both values."""
    monkeypatch.setenv("MINIDETR_DATA", str(tmp_path / "data"))
    path = str(tmp_path / "src.pth")
    write_source(path)
    assert error_of(["--finetune", path] + flags + TINY_DATA) == "error: " + needle.format(path=path) + (
        "; leave --{0} out to use the checkpoint's".format(flags[0][2:]) if "cannot load" in needle and
        "--variant" not in flags else "; leave --variant out to fine-tune it as one" if "--variant" in flags
        else ": fine-tuning takes the first N of them, so N <= 8")


def test_missing_finetune_file_is_one_line(tmp_path):
    """A path that does not exist is named."""
    assert error_of(["--finetune", str(tmp_path / "nope.pth")] + TINY_DATA) == (
        f"error: checkpoint {str(tmp_path / 'nope.pth')!r} does not exist")


def test_run_takes_the_architecture_and_logs_the_table(tmp_path, monkeypatch):
    """No architecture flags: the checkpoint's; log.txt's first line names the source and the table."""
    monkeypatch.setenv("MINIDETR_DATA", str(tmp_path / "data"))
    path, out = str(tmp_path / "src.pth"), tmp_path / "out"
    shapes = Categories({1: "circle", 2: "square", 3: "zebra"})   # shares two names with the data
    write_source(path, categories=shapes)
    train.main(["--finetune", path, "--max_steps", "2", "--output_dir", str(out)] + TINY_DATA)
    first, *rest = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert first["finetune"]["source"] == path
    assert sorted(first["finetune"]["carried"]) == ["circle", "square"]
    assert len(first["finetune"]["fresh"]) == 4 and rest and "test_coco_eval_bbox" in rest[-1]
    saved = torch.load(out / "checkpoint.pth", weights_only=True)
    assert saved["config"]["hidden_dim"] == 32 and saved["config"]["variant"] == "dn"
    assert [c["name"] for c in saved["categories"]][:2] == ["circle", "square"]


@pytest.mark.parametrize("variant", ["detr", "conditional", "smca", "dab", "dn"])
def test_official_checkpoint_fine_tunes_for_two_steps(tmp_path, monkeypatch, capsys, variant):
    """A file as each reference saves it ({'model', 'args'}, official names) trains 2 steps."""
    monkeypatch.setenv("MINIDETR_DATA", str(tmp_path / "data"))
    path = tmp_path / f"{variant}_official.pth"
    # official_state_dict draws N(0, 1) everywhere, which overflows a 30-layer network:
    # scaled down, BatchNorm variances 1, as a trained file's would be of that order
    weights = {k: torch.ones_like(v) if k.endswith("running_var") else v * 0.05
               for k, v in official_state_dict(variant).items()}
    torch.save({"model": weights, "args": argparse.Namespace(**args_for(variant)),
                "epoch": 49}, path)
    # the references' ResNet ends at stride 32: at 32 px its last map is one cell, and its
    # train-mode BatchNorm would normalise 2 numbers a channel. 64 px and a float32 backbone
    # keep this a test of loading, not of how a CPU rounds that in bf16 (CI's CPU gave NaN)
    result = train.main(["--finetune", str(path), "--variant", variant, "--max_steps", "2"] + TINY_DATA
                        + ["--image_size", "64", "--backbone_precision", "fp32"])
    assert len(result["stats"]) == 12
    printed = capsys.readouterr().out
    assert f"fine-tuning from {path}:" in printed and "ignored          0 tensors" in printed
    # the reference's 7 classes have no names: rows kept by position, as the counts agree
    assert "carried by row   6 classes (the checkpoint names none; the class counts agree)" in printed


def test_overfit_evaluates_exactly_the_batches_it_trained_on(tmp_path, monkeypatch, capsys):
    """--overfit_batches 1 at batch 2: the evaluation sees the first two training images; a
    learning rate that cannot move the weights ends in the 'cannot fit' line."""
    monkeypatch.setenv("MINIDETR_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(train, "OVERFIT_WINDOW", 2)
    seen = {}
    real_evaluate = train.evaluate

    def spy(model, criterion, postprocess, loader, coco_gt, *args, **kwargs):
        seen["ids"] = [t["image_id"] for _, _, targets in loader for t in targets]
        return real_evaluate(model, criterion, postprocess, loader, coco_gt, *args, **kwargs)

    monkeypatch.setattr(train, "evaluate", spy)
    train.main(["--variant", "dn", "--overfit_batches", "1", "--max_steps", "8", "--lr", "1e-12",
                "--lr_backbone", "1e-12"] + ["--" + k if v is True else f"--{k}={v}" for k, v in SMALL.items()]
               + TINY_DATA)
    train_ids = sorted(json.load(open(tmp_path / "data" / "n4_v2" / "annotations" / "train.json"))["images"],
                       key=lambda img: img["id"])
    assert seen["ids"] == [img["id"] for img in train_ids[:2]]
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("overfit: 2 images, 8 steps") and "cannot fit them" in last
