"""detr: every variant builds and runs; post-processing on hand examples; paper defaults;
denoising queries never leak into the matching queries."""
import math

import pytest
import torch

import minidetr
from minidetr import Config
from minidetr.detr import PostProcess

SMALL = dict(hidden_dim=32, nheads=4, dim_feedforward=64, enc_layers=1, dec_layers=2,
             num_queries=6, num_select=6, backbone="resnet18", dropout=0.0)


def batch(sizes=((64, 64), (48, 56)), seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = max(s[0] for s in sizes), max(s[1] for s in sizes)
    images = torch.randn(len(sizes), 3, h, w, generator=g)
    mask = torch.ones(len(sizes), h, w, dtype=torch.bool)
    for i, (hi, wi) in enumerate(sizes):
        mask[i, :hi, :wi] = False
    targets = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[.5, .5, .3, .2], [.2, .3, .1, .1]])},
               {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    return images, mask, targets


@pytest.mark.parametrize("variant,dn", [("detr", False), ("conditional", False), ("conditional", True),
                                        ("smca", False), ("dn", True)])
def test_every_variant_trains_one_step(variant, dn):
    """Forward, loss and backward for each variant on a padded batch with an empty image."""
    torch.manual_seed(0)
    model, criterion, post = minidetr.build(variant, preset="tiny", dn=dn, **SMALL)
    images, mask, targets = batch()
    model.train()
    out = model(images, mask, targets)
    # tiny preset: num_classes 7 (ids 1..6 + the unused 0), + DETR's no-object logit
    assert out["pred_logits"].shape == (2, 6, 8 if variant == "detr" else 7)
    assert out["pred_boxes"].shape == (2, 6, 4)
    assert len(out["aux_outputs"]) == SMALL["dec_layers"] - 1
    assert ("dn" in out) == dn
    losses = criterion(out, targets)
    total = sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses)
    assert torch.isfinite(total)
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    with torch.no_grad():
        results = post(model(images, mask), torch.tensor([[64, 64], [48, 56]]))
    assert len(results) == 2 and results[0]["boxes"].shape[-1] == 4


def test_logit_width_follows_classification_type():
    """Softmax heads have classes + 1 logits (no-object), focal heads have classes."""
    for variant, width in (("detr", 8), ("conditional", 7)):
        model, _, _ = minidetr.build(variant, preset="tiny", **SMALL)
        assert model.class_embed.out_features == width


def test_paper_defaults_match_the_reference_recipes():
    """A few settings read from each paper's reference code."""
    detr = Config.for_variant("detr")
    assert (detr.num_queries, detr.eos_coef, detr.lr, detr.lr_backbone, detr.focal_alpha) == (100, 0.1, 1e-4, 1e-5, None)
    cond = Config.for_variant("conditional")
    assert (cond.num_queries, cond.focal_alpha, cond.set_cost_class, cond.cls_loss_coef, cond.epochs, cond.lr_drop) == \
        (300, 0.25, 2.0, 2.0, 50, 40)
    dn = Config.for_variant("dn")
    assert (dn.dropout, dn.activation, dn.pe_temperature, dn.scalar, dn.label_noise_scale, dn.box_noise_scale,
            dn.cls_loss_coef, dn.num_select) == (0.0, "prelu", 20, 5, 0.2, 0.4, 1.0, 300)
    tiny = Config.for_variant("dn", preset="tiny")
    assert not tiny.frozen_bn and not tiny.freeze_stem and tiny.lr_backbone == tiny.lr


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="unknown variant"):
        Config.for_variant("detrr")
    with pytest.raises(ValueError, match="divisible"):
        Config.for_variant("detr", hidden_dim=30, nheads=4)
    with pytest.raises(ValueError, match="reference box or point"):
        Config.for_variant("detr", dn=True)
    with pytest.raises(ValueError, match="unknown Config field"):
        Config.for_variant("detr", hiden_dim=3)


def test_softmax_postprocess_hand_example():
    """One image 100x200 (h, w); query 0 is class 1 at p=e^2/(e^2+2), box (0.5,0.5,0.2,0.4)."""
    logits = torch.tensor([[[0.0, 2.0, 0.0], [0.0, 0.0, 3.0]]])   # 2 classes + no-object
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.1, 0.1, 0.1, 0.1]]])
    res = PostProcess(focal=False)({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]]))[0]
    e = math.e
    assert res["labels"].tolist() == [1, 0]
    assert res["scores"][0].item() == pytest.approx(e ** 2 / (e ** 2 + 2))
    assert res["scores"][1].item() == pytest.approx(1 / (2 + e ** 3))
    assert res["boxes"][0].tolist() == pytest.approx([80.0, 30.0, 120.0, 70.0])


def test_focal_postprocess_topk_over_queries_and_classes():
    """Top-3 over 2 queries x 3 classes: a query may appear twice, label = flat index % K."""
    logits = torch.tensor([[[4.0, -9.0, 3.0], [-9.0, 2.0, -9.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.5, 0.5], [0.25, 0.25, 0.5, 0.5]]])
    res = PostProcess(focal=True, num_select=3)({"pred_logits": logits, "pred_boxes": boxes},
                                                torch.tensor([[10, 10]]))[0]
    sig = lambda v: 1 / (1 + math.exp(-v))
    assert res["scores"].tolist() == pytest.approx([sig(4), sig(3), sig(2)])
    assert res["labels"].tolist() == [0, 2, 1]
    assert res["query_ids"].tolist() == [0, 0, 1]
    assert res["boxes"][2].tolist() == pytest.approx([0.0, 0.0, 5.0, 5.0])


@pytest.mark.parametrize("variant", ["conditional", "dn"])
def test_denoising_queries_do_not_change_matching_outputs(variant):
    """With the mask, the matching queries' outputs in training (dn on) equal inference (dn off)."""
    torch.manual_seed(0)
    model, _, _ = minidetr.build(variant, preset="tiny", dn=True, frozen_bn=True, **SMALL)
    images, mask, targets = batch()
    model.train()
    with torch.no_grad():
        train_out = model(images, mask, targets)
        model.eval()
        eval_out = model(images, mask)
    assert train_out["dn"]["pred_boxes"].shape[1] == 5 * 2          # 5 groups x 2 objects (padded)
    assert torch.allclose(train_out["pred_logits"], eval_out["pred_logits"], atol=1e-5)
    assert torch.allclose(train_out["pred_boxes"], eval_out["pred_boxes"], atol=1e-6)
