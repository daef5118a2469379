"""Tests for minidetr/matcher.py: the Hungarian matcher against brute force.

Every check compares with an independent computation: the matching cost written out pair by
pair with Python floats (softmax, focal cost, L1, GIoU by hand) and the minimum found by
trying every injective assignment with itertools.permutations.
"""
import itertools
import math

import pytest
import torch
from scipy.optimize import linear_sum_assignment

from minidetr.matcher import HungarianMatcher, focal_class_cost
from naive import naive_giou  # noqa: E402  (tests/naive.py)

K = 3   # object classes


def make_outputs(gen, b, q, k_logits):
    """Random float64 predictions: logits [B, Q, K'], boxes [B, Q, 4] cxcywh, valid boxes."""
    logits = torch.randn(b, q, k_logits, generator=gen, dtype=torch.float64) * 2
    return {"pred_logits": logits, "pred_boxes": random_boxes(gen, (b, q))}


def random_boxes(gen, shape):
    centre = 0.2 + 0.6 * torch.rand(*shape, 2, generator=gen, dtype=torch.float64)
    size = 0.05 + 0.35 * torch.rand(*shape, 2, generator=gen, dtype=torch.float64)
    return torch.cat([centre, size], dim=-1)


def make_targets(gen, counts):
    return [{"labels": torch.randint(0, K, (t,), generator=gen),
             "boxes": random_boxes(gen, (t,))} for t in counts]


# ---- the cost written out by hand, one pair at a time ----



def naive_focal_cost(x, alpha, gamma=2.0):
    p = 1 / (1 + math.exp(-x))
    return (alpha * (1 - p) ** gamma * -math.log(p + 1e-8)
            - (1 - alpha) * p ** gamma * -math.log(1 - p + 1e-8))


def naive_cost(logits, box, label, tgt_box, focal_alpha, w=(1.0, 5.0, 2.0)):
    """Eq. (1)'s L_match for one (query, target) pair, from Python floats."""
    logits, box, tgt_box = logits.tolist(), box.tolist(), tgt_box.tolist()
    if focal_alpha is None:
        denom = sum(math.exp(v) for v in logits)
        c_class = -math.exp(logits[label]) / denom
    else:
        c_class = naive_focal_cost(logits[label], focal_alpha)
    c_l1 = sum(abs(u - v) for u, v in zip(box, tgt_box))
    return w[0] * c_class + w[1] * c_l1 - w[2] * naive_giou(box, tgt_box)


def brute_force_min(cost):
    """Minimum total over all one-to-one assignments of a [Q][T] cost table."""
    q, t = len(cost), len(cost[0])
    if t <= q:   # each target picks a distinct query
        return min(sum(cost[qs[j]][j] for j in range(t)) for qs in itertools.permutations(range(q), t))
    return min(sum(cost[i][ts[i]] for i in range(q)) for ts in itertools.permutations(range(t), q))


# ---- tests ----

@pytest.mark.parametrize("focal_alpha", [None, 0.25])
@pytest.mark.parametrize("seed", range(4))
def test_matches_brute_force(seed, focal_alpha):
    """Our assignment's total cost equals the brute-force minimum over all permutations."""
    gen = torch.Generator().manual_seed(seed)
    counts = [4, 1, 3, 2]
    q = [6, 5, 4, 3][seed]
    out = make_outputs(gen, len(counts), q, K + 1 if focal_alpha is None else K)
    targets = make_targets(gen, counts)
    matcher = HungarianMatcher(1.0, 5.0, 2.0, focal_alpha=focal_alpha)
    for i, (pred_idx, tgt_idx) in enumerate(matcher(out, targets)):
        t = counts[i]
        table = [[naive_cost(out["pred_logits"][i, a], out["pred_boxes"][i, a],
                             int(targets[i]["labels"][j]), targets[i]["boxes"][j], focal_alpha)
                  for j in range(t)] for a in range(q)]
        assert pred_idx.dtype == tgt_idx.dtype == torch.int64
        assert len(pred_idx) == len(tgt_idx) == min(q, t)
        assert len(set(pred_idx.tolist())) == len(pred_idx) and len(set(tgt_idx.tolist())) == len(tgt_idx)
        assert pred_idx.tolist() == sorted(pred_idx.tolist())
        ours = sum(table[a][j] for a, j in zip(pred_idx.tolist(), tgt_idx.tolist()))
        assert ours == pytest.approx(brute_force_min(table), abs=1e-9)


def test_more_targets_than_queries():
    """With T > Q every query is used once and the total is still the brute-force minimum."""
    gen = torch.Generator().manual_seed(7)
    out = make_outputs(gen, 1, 3, K + 1)
    targets = make_targets(gen, [4])
    pred_idx, tgt_idx = HungarianMatcher()(out, targets)[0]
    table = [[naive_cost(out["pred_logits"][0, a], out["pred_boxes"][0, a],
                         int(targets[0]["labels"][j]), targets[0]["boxes"][j], None)
              for j in range(4)] for a in range(3)]
    assert sorted(pred_idx.tolist()) == [0, 1, 2]
    ours = sum(table[a][j] for a, j in zip(pred_idx.tolist(), tgt_idx.tolist()))
    assert ours == pytest.approx(brute_force_min(table), abs=1e-9)


def test_focal_cost_matches_naive_loop():
    """focal_class_cost equals alpha(1-p)^g(-log(p+1e-8)) - (1-alpha)p^g(-log(1-p+1e-8)) per entry."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(7, K, generator=gen, dtype=torch.float64) * 3
    labels = torch.tensor([2, 0, 0, 1])
    for alpha, gamma in [(0.25, 2.0), (0.5, 1.0)]:
        cost = focal_class_cost(logits, labels, alpha, gamma)
        matcher_cost = HungarianMatcher(focal_alpha=alpha, focal_gamma=gamma).class_cost(logits, labels)
        for n in range(7):
            for j, c in enumerate(labels.tolist()):
                p = 1 / (1 + math.exp(-float(logits[n, c])))
                expected = (alpha * (1 - p) ** gamma * -math.log(p + 1e-8)
                            - (1 - alpha) * p ** gamma * -math.log(1 - p + 1e-8))
                assert float(cost[n, j]) == pytest.approx(expected, rel=1e-12, abs=1e-12)
                assert float(matcher_cost[n, j]) == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("focal_alpha", [None, 0.25])
def test_no_objects_anywhere(focal_alpha):
    """A batch without objects gives empty int64 index tensors for every image."""
    gen = torch.Generator().manual_seed(2)
    out = make_outputs(gen, 3, 5, K + 1 if focal_alpha is None else K)
    for pred_idx, tgt_idx in HungarianMatcher(focal_alpha=focal_alpha)(out, make_targets(gen, [0, 0, 0])):
        assert pred_idx.shape == tgt_idx.shape == (0,)
        assert pred_idx.dtype == tgt_idx.dtype == torch.int64


def test_batch_mixing_empty_and_full_images():
    """Images with 0 and 3 objects in one batch: empty pairs for the first, 3 for the others."""
    gen = torch.Generator().manual_seed(3)
    out = make_outputs(gen, 3, 5, K + 1)
    indices = HungarianMatcher()(out, make_targets(gen, [0, 3, 0]))
    assert [len(p) for p, _ in indices] == [0, 3, 0]
    assert sorted(indices[1][1].tolist()) == [0, 1, 2]


@pytest.mark.parametrize("focal_alpha", [None, 0.25])
def test_batched_equals_one_by_one(focal_alpha):
    """Matching a batch gives the same pairs as matching each image on its own."""
    gen = torch.Generator().manual_seed(4)
    counts = [2, 0, 4, 1]
    out = make_outputs(gen, 4, 6, K + 1 if focal_alpha is None else K)
    targets = make_targets(gen, counts)
    matcher = HungarianMatcher(2.0, 5.0, 2.0, focal_alpha=focal_alpha)
    batched = matcher(out, targets)
    for i in range(4):
        single = matcher({k: v[i:i + 1] for k, v in out.items()}, targets[i:i + 1])[0]
        assert torch.equal(batched[i][0], single[0]) and torch.equal(batched[i][1], single[1])


def test_one_host_copy_per_batch(monkeypatch):
    """The batch's cost matrix is moved to the CPU with a single .cpu() call."""
    calls = []
    original = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **kw: calls.append(1) or original(self, *a, **kw))
    gen = torch.Generator().manual_seed(5)
    HungarianMatcher()(make_outputs(gen, 4, 5, K + 1), make_targets(gen, [2, 3, 0, 1]))
    assert len(calls) == 1


@pytest.mark.parametrize("focal_alpha", [None, 0.25])
def test_match_layers_is_each_layer_alone_with_one_host_copy(monkeypatch, focal_alpha):
    """Three layers matched together: one .cpu() in all, and each layer's pairs are those of
    scipy on its own hand-written cost table, and those of matching it alone (float32, as in
    training, so the stacking cannot have rounded anything differently)."""
    gen = torch.Generator().manual_seed(11)
    counts, q, k = [3, 0, 2], 5, K + 1 if focal_alpha is None else K
    layers = [make_outputs(gen, len(counts), q, k) for _ in range(3)]
    targets = make_targets(gen, counts)
    matcher = HungarianMatcher(2.0, 5.0, 2.0, focal_alpha=focal_alpha)
    alone = [matcher({n: v.float() for n, v in out.items()}, targets) for out in layers]
    calls, original = [], torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **kw: calls.append(1) or original(self, *a, **kw))
    together = matcher.match_layers([{n: v.float() for n, v in out.items()} for out in layers], targets)
    assert len(calls) == 1 and len(together) == 3
    for out, got, single in zip(layers, together, alone):
        for i, ((pred_idx, tgt_idx), (pred_one, tgt_one)) in enumerate(zip(got, single)):
            assert torch.equal(pred_idx, pred_one) and torch.equal(tgt_idx, tgt_one)
            table = [[naive_cost(out["pred_logits"][i, a], out["pred_boxes"][i, a],
                                 int(targets[i]["labels"][j]), targets[i]["boxes"][j], focal_alpha,
                                 w=(2.0, 5.0, 2.0)) for j in range(counts[i])] for a in range(q)]
            rows, cols = linear_sum_assignment(table) if counts[i] else ([], [])
            assert pred_idx.tolist() == list(rows) and tgt_idx.tolist() == list(cols)


def test_non_finite_cost_names_the_term():
    """NaN logits raise a ValueError that names the class cost."""
    gen = torch.Generator().manual_seed(6)
    out = make_outputs(gen, 2, 4, K + 1)
    out["pred_logits"][1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="class"):
        HungarianMatcher()(out, make_targets(gen, [1, 2]))
