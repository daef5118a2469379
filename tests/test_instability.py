"""Tests for minidetr/instability.py: DN-DETR's matching instability.

The score against changes counted by hand on made-up assignments; the measured assignment
against the minimum-cost assignment found by trying every permutation of a cost written out
pair by pair with Python floats, for a tiny dn model and for a stand-in whose layers and
modes predict differently (so that the last layer in eval mode is the one matched);
train.py's --log_instability end to end: None, then the fraction counted here from the
checkpointed assignments, the same after --resume as in one uninterrupted run, and the same
weights as a run without the flag.
"""
import itertools
import json
import math
import os
import sys

import pytest
import torch

import minidetr
from minidetr.config import Config
from minidetr.instability import count_changes, fraction_changed, measure_assignment, query_per_target
from minidetr.matcher import HungarianMatcher
from naive import naive_giou  # noqa: E402  (tests/naive.py)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402

L = torch.LongTensor


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these tiny tensors gain nothing from two, and on a machine whose
    cores are busy the threads' waiting for each other made a run 20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- the score on hand-made assignments ----

def test_count_changes_by_hand():
    """Changed ground truths counted by hand: a moved one, an image with none, a permutation
    moving all, a ground truth unmatched (-1) in both measurements (no change)."""
    before = [L([3, 1]), L([]), L([0, 1, 2, 4]), L([5, -1]), L([7])]
    after = [L([3, 2]), L([]), L([4, 2, 0, 1]), L([5, -1]), L([7])]
    # image 0: 1 of 2 moved; image 1: 0 of 0; image 2: 4 of 4; image 3: 0 of 2; image 4: 0 of 1
    assert count_changes(before, after) == (5, 9)
    assert fraction_changed(before, after) == 5 / 9
    assert fraction_changed(after, after) == 0.0


def test_every_query_changed_is_one_and_no_ground_truth_is_none():
    """A cyclic shift of every image's queries scores 1; images without ground truths, None."""
    before = [L([0, 1, 2]), L([6, 4])]
    after = [L([1, 2, 0]), L([4, 6])]
    assert count_changes(before, after) == (5, 5) and fraction_changed(before, after) == 1.0
    assert count_changes([L([]), L([])], [L([]), L([])]) == (0, 0)
    assert fraction_changed([L([]), L([])], [L([]), L([])]) is None


def test_different_images_are_refused():
    """Another number of images, or of ground truths in one image, is a ValueError."""
    with pytest.raises(ValueError, match="2 images before, 1 now"):
        count_changes([L([0]), L([1])], [L([0])])
    with pytest.raises(ValueError, match="image 1 had 1 ground truths, now 2"):
        count_changes([L([0]), L([1])], [L([0]), L([1, 2])])


def test_query_per_target_is_in_ground_truth_order():
    """The matcher's (pred_idx ascending, tgt_idx) pairs become each ground truth's query;
    a ground truth beyond the queries (T > Q) gets -1."""
    # queries 1, 4, 6 matched to ground truths 2, 0, 1 -> ground truth 0 on 4, 1 on 6, 2 on 1
    assert torch.equal(query_per_target(L([1, 4, 6]), L([2, 0, 1]), 3), L([4, 6, 1]))
    # Q = 2 queries, T = 3: ground truth 1 is left without one
    assert torch.equal(query_per_target(L([0, 1]), L([2, 0]), 3), L([1, -1, 0]))
    assert torch.equal(query_per_target(L([]), L([]), 0), L([]))


# ---- the measurement against brute force ----

def naive_match_cost(logit, box, tgt_box, cost_class, cost_bbox, cost_giou, alpha, eps):
    """The focal matching cost of one (query, ground truth) pair, from Python floats:
    cost_class * (FL(p, positive) - FL(p, negative)) + cost_bbox * L1 - cost_giou * GIoU."""
    p = 1 / (1 + math.exp(-logit))
    focal = alpha * (1 - p) ** 2 * -math.log(p + 1e-8) - (1 - alpha) * p ** 2 * -math.log(1 - p + 1e-8)
    l1 = sum(abs(u - v) for u, v in zip(box, tgt_box))
    return cost_class * focal + cost_bbox * l1 - cost_giou * naive_giou(box, tgt_box, eps)


def brute_force_assignment(logits, boxes, labels, tgt_boxes, cfg):
    """Each ground truth's query in the cheapest one-to-one assignment, over every ordered
    choice of T distinct queries (itertools.permutations)."""
    q, t = len(boxes), len(labels)
    cost = [[naive_match_cost(logits[i][labels[j]], boxes[i], tgt_boxes[j], cfg.set_cost_class,
                              cfg.set_cost_bbox, cfg.set_cost_giou, cfg.focal_alpha, cfg.giou_eps)
             for j in range(t)] for i in range(q)]
    best = min(itertools.permutations(range(q), t), key=lambda qs: sum(cost[qs[j]][j] for j in range(t)))
    return list(best)


def test_measured_assignment_equals_brute_force():
    """A tiny dn model (float64) on two batches holding 2, 0, 3 and 1 ground truths: each
    ground truth's query is the brute-force minimum's, from the last decoder layer in eval
    mode; the model is left in training mode as it was."""
    torch.manual_seed(0)
    cfg = Config.for_variant("dn", "tiny", hidden_dim=32, nheads=4, dim_feedforward=64, enc_layers=1,
                             dec_layers=2, num_queries=5, num_select=5, backbone_precision="fp32")
    model, criterion, _ = minidetr.build(cfg)
    model.double().train()
    gen = torch.Generator().manual_seed(1)
    batches = []
    for counts in ([2, 0], [3, 1]):
        targets = [{"labels": torch.randint(0, cfg.num_classes, (t,), generator=gen),
                    "boxes": torch.cat([0.2 + 0.6 * torch.rand(t, 2, generator=gen, dtype=torch.float64),
                                        0.1 + 0.3 * torch.rand(t, 2, generator=gen, dtype=torch.float64)], 1)}
                   for t in counts]
        images = torch.randn(2, 3, 32, 32, generator=gen, dtype=torch.float64)
        batches.append((images, torch.zeros(2, 32, 32, dtype=torch.bool), targets))

    measured = measure_assignment(model, criterion.matcher, batches, torch.device("cpu"))
    assert model.training

    expected = []
    model.eval()
    with torch.no_grad():
        for images, mask, targets in batches:
            out = model(images, mask)
            for b, target in enumerate(targets):
                expected.append(brute_force_assignment(
                    out["pred_logits"][b].tolist(), out["pred_boxes"][b].tolist(),
                    target["labels"].tolist(), target["boxes"].tolist(), cfg))
    assert [a.tolist() for a in measured] == expected
    assert [len(a) for a in expected] == [2, 0, 3, 1]


class TablePredictor(torch.nn.Module):
    """A stand-in model: image i (its pixel [0, 0, 0]) predicts row i of fixed tables; the
    earlier layer (aux_outputs) and training mode see the queries in other orders."""

    def __init__(self, logits, boxes):
        super().__init__()
        self.logits, self.boxes = logits, boxes          # [I, Q, K], [I, Q, 4] cxcywh

    def forward(self, images, mask):
        rows = images[:, 0, 0, 0].long()
        logits, boxes = self.logits[rows], self.boxes[rows]
        shift = 1 if self.training else 0                # train mode: queries rolled by one
        last = {"pred_logits": logits.roll(shift, 1), "pred_boxes": boxes.roll(shift, 1)}
        return dict(last, aux_outputs=[{"pred_logits": logits.roll(2, 1), "pred_boxes": boxes.roll(2, 1)}])


def test_measurement_matches_the_last_layer_in_eval_mode():
    """With predictions that differ between layers and between train and eval mode, the
    measured assignment is the brute-force one of the last layer's eval-mode predictions."""
    cfg = Config.for_variant("dn")                       # focal cost 2 / 5 / 2, GIoU eps 1e-6
    matcher = HungarianMatcher(cfg.set_cost_class, cfg.set_cost_bbox, cfg.set_cost_giou,
                               focal_alpha=cfg.focal_alpha, giou_eps=cfg.giou_eps)
    gen = torch.Generator().manual_seed(2)
    counts, q, k = [3, 1, 2, 3], 4, 3
    logits = torch.randn(len(counts), q, k, generator=gen, dtype=torch.float64) * 2
    boxes = torch.cat([0.2 + 0.6 * torch.rand(len(counts), q, 2, generator=gen, dtype=torch.float64),
                       0.1 + 0.3 * torch.rand(len(counts), q, 2, generator=gen, dtype=torch.float64)], -1)
    model = TablePredictor(logits, boxes).train()
    # ground truths near some of the predicted boxes, so that the box costs decide
    targets = [{"labels": torch.randint(0, k, (t,), generator=gen),
                "boxes": boxes[i, torch.randperm(q, generator=gen)[:t]] * 0.9 + 0.05}
               for i, t in enumerate(counts)]
    images = torch.arange(len(counts), dtype=torch.float64)[:, None, None, None].expand(-1, 3, 8, 8)
    mask = torch.zeros(len(counts), 8, 8, dtype=torch.bool)
    batches = [(images[:2], mask[:2], targets[:2]), (images[2:], mask[2:], targets[2:])]
    measured = measure_assignment(model, matcher, batches, torch.device("cpu"))
    expected = [brute_force_assignment(logits[i].tolist(), boxes[i].tolist(), t["labels"].tolist(),
                                       t["boxes"].tolist(), cfg) for i, t in enumerate(targets)]
    assert [a.tolist() for a in measured] == expected and model.training


# ---- train.py --log_instability end to end ----

TINY = ["--variant", "detr", "--hidden_dim", "32", "--nheads", "4", "--dim_feedforward", "64",
        "--enc_layers", "1", "--dec_layers", "2", "--num_queries", "8", "--num_select", "8",
        "--batch_size", "2", "--shapes_train", "4", "--shapes_val", "2", "--num_workers", "0",
        "--image_size", "32", "--lr", "1e-3", "--lr_backbone", "0"]   # lr: the matching moves in 2 steps
MEASURE = ["--log_instability", "--instability_images", "4"]


def logged(out):
    return [json.loads(line).get("train_instability", "absent") for line in open(out / "log.txt")]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_log_instability_run_resumes_exactly_and_leaves_training_alone(tmp_path, monkeypatch):
    """2 epochs: None, then the fraction of the checkpointed assignments that differ (counted
    here); split at the epoch and resumed, the same numbers and assignment; the weights equal
    a run without the flag's."""
    monkeypatch.setenv("MINIDETR_DATA", str(tmp_path / "data"))
    straight, split, plain = tmp_path / "straight", tmp_path / "split", tmp_path / "plain"
    train.main(TINY + MEASURE + ["--epochs", "1", "--output_dir", str(split)])
    first = load(split / "checkpoint.pth")["instability"]
    train.main(TINY + MEASURE + ["--epochs", "2", "--output_dir", str(split),
                                 "--resume", str(split / "checkpoint.pth")])
    train.main(TINY + MEASURE + ["--epochs", "2", "--output_dir", str(straight)])
    train.main(TINY + ["--epochs", "2", "--output_dir", str(plain)])

    train_json = tmp_path / "data" / "n4_v2" / "annotations" / "train.json"
    ids = sorted(img["id"] for img in json.load(open(train_json))["images"])
    assert first["image_ids"] == ids[:4]
    end, resumed = load(straight / "checkpoint.pth"), load(split / "checkpoint.pth")
    second = end["instability"]["assignment"]
    pairs = [(a, b) for before, now in zip(first["assignment"], second)
             for a, b in zip(before.tolist(), now.tolist())]
    assert logged(straight) == [None, round(sum(a != b for a, b in pairs) / len(pairs), 5)]
    assert 0 < logged(straight)[1] <= 1              # the tiny run's matching does move
    assert logged(split) == logged(straight)
    assert all(torch.equal(a, b) for a, b in zip(resumed["instability"]["assignment"], second))
    assert logged(plain) == ["absent", "absent"] and "instability" not in load(plain / "checkpoint.pth")
    assert all(torch.equal(end["model"][k], v) for k, v in load(plain / "checkpoint.pth")["model"].items())
