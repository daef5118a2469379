"""Tests for minidetr/denoising.py: DN-DETR's noise, attention mask and query layout.

Each expected value is computed independently of the code under test: a mask written out
by hand, the paper's a_ij formula as a double loop, the noise bounds of Eqs. (1)-(3),
the label flip rate p * (1 - 1/K), hand-listed slot/target indices, and the embedding
table read directly for the noise-free queries.
"""
import pytest
import torch

from minidetr.denoising import (Denoiser, dn_attention_mask, dn_indices, noise_boxes,
                                noise_labels, split_dn)
from minidetr.transformer import attention


def make_targets(counts, num_classes=7, seed=0):
    """One target dict per image with `counts[b]` objects, boxes well inside the image."""
    g = torch.Generator().manual_seed(seed)
    targets = []
    for n in counts:
        centres = 0.3 + 0.4 * torch.rand(n, 2, generator=g)
        sizes = 0.05 + 0.25 * torch.rand(n, 2, generator=g)
        targets.append({"labels": torch.randint(0, num_classes, (n,), generator=g),
                        "boxes": torch.cat([centres, sizes], dim=1)})
    return targets


# ---- attention mask ----

def test_mask_hand_example():
    """2 groups of 3 slots + 4 matching queries: the 10x10 mask written out by hand."""
    expected = torch.tensor([
        # group 0  group 1  matching
        [0, 0, 0,  1, 1, 1,  0, 0, 0, 0],
        [0, 0, 0,  1, 1, 1,  0, 0, 0, 0],
        [0, 0, 0,  1, 1, 1,  0, 0, 0, 0],
        [1, 1, 1,  0, 0, 0,  0, 0, 0, 0],
        [1, 1, 1,  0, 0, 0,  0, 0, 0, 0],
        [1, 1, 1,  0, 0, 0,  0, 0, 0, 0],
        [1, 1, 1,  1, 1, 1,  0, 0, 0, 0],
        [1, 1, 1,  1, 1, 1,  0, 0, 0, 0],
        [1, 1, 1,  1, 1, 1,  0, 0, 0, 0],
        [1, 1, 1,  1, 1, 1,  0, 0, 0, 0],
    ], dtype=torch.bool)
    mask = dn_attention_mask(num_groups=2, group_size=3, num_queries=4)
    assert mask.dtype == torch.bool
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("groups,size,queries", [(3, 2, 4), (5, 1, 3), (1, 4, 2), (4, 3, 6)])
def test_mask_matches_paper_formula(groups, size, queries):
    """Equals the paper's a_ij (P groups of M slots, N matching) evaluated by a double loop."""
    P, M = groups, size
    W = P * M + queries
    expected = torch.zeros(W, W, dtype=torch.bool)
    for i in range(W):
        for j in range(W):
            expected[i, j] = (j < P * M and i // M != j // M) or (j < P * M and i >= P * M)
    assert torch.equal(dn_attention_mask(groups, size, queries), expected)


def test_mask_without_dn_slots_is_all_visible():
    """P = 0 (no groups, or no objects): the [Q, Q] mask blocks nothing."""
    for groups, size in [(0, 3), (5, 0)]:
        mask = dn_attention_mask(groups, size, 4)
        assert mask.shape == (4, 4) and not mask.any()


def test_mask_stops_information_flow():
    """Through attention with the mask, changing group 1 changes neither group 0 nor the
    matching queries, while changing a matching query does reach the dn queries."""
    torch.manual_seed(0)
    groups, size, Q, D, h = 3, 2, 4, 8, 2
    mask = dn_attention_mask(groups, size, Q)
    x = torch.randn(1, groups * size + Q, D, dtype=torch.float64)
    out = attention(x, x, x, heads=h, attn_mask=mask)
    poked = x.clone()
    poked[:, size:2 * size] += 10.0                   # group 1 only
    out_poked = attention(poked, poked, poked, heads=h, attn_mask=mask)
    untouched = list(range(size)) + list(range(2 * size, groups * size + Q))
    group_0_and_rest = torch.tensor(untouched)
    assert torch.allclose(out[:, group_0_and_rest], out_poked[:, group_0_and_rest])
    assert not torch.allclose(out[:, size:2 * size], out_poked[:, size:2 * size])
    poked = x.clone()
    poked[:, -1] += 10.0                              # one matching query
    out_poked = attention(poked, poked, poked, heads=h, attn_mask=mask)
    assert not torch.allclose(out[:, :size], out_poked[:, :size])


# ---- noise ----

def test_box_noise_bounds():
    """|dcx| <= lambda w/2, |dcy| <= lambda h/2, w'/w and h'/h in [1-lambda, 1+lambda],
    and the bounds are nearly reached (the noise has its full range)."""
    g = torch.Generator().manual_seed(1)
    n, lam = 20000, 0.4
    boxes = torch.cat([0.3 + 0.4 * torch.rand(n, 2, generator=g, dtype=torch.float64),
                       0.05 + 0.25 * torch.rand(n, 2, generator=g, dtype=torch.float64)], 1)
    # with these boxes no coordinate can leave [0, 1]: 0.7 + 0.4 * 0.3 / 2 < 1, 1.4 * 0.3 < 1
    noised = noise_boxes(boxes, lam, generator=g)
    w, h = boxes[:, 2], boxes[:, 3]
    rel_dx = (noised[:, 0] - boxes[:, 0]).abs() / (lam * w / 2)
    rel_dy = (noised[:, 1] - boxes[:, 1]).abs() / (lam * h / 2)
    ratio_w, ratio_h = noised[:, 2] / w, noised[:, 3] / h
    eps = 1e-12
    assert rel_dx.max() <= 1 + eps and rel_dy.max() <= 1 + eps
    assert rel_dx.max() > 0.99 and rel_dy.max() > 0.99
    for ratio in (ratio_w, ratio_h):
        assert ratio.min() >= 1 - lam - eps and ratio.max() <= 1 + lam + eps
        assert ratio.min() < 1 - 0.99 * lam and ratio.max() > 1 + 0.99 * lam
        assert abs(ratio.mean().item() - 1) < 0.01          # uniform: symmetric around 1


def test_box_noise_clamped_to_image():
    """Boxes at the image border with a large scale: every coordinate stays in [0, 1]
    and the clamp is actually hit at both ends."""
    g = torch.Generator().manual_seed(2)
    boxes = torch.tensor([[0.02, 0.98, 0.9, 0.9], [0.99, 0.01, 0.95, 0.8]]).repeat(5000, 1)
    noised = noise_boxes(boxes, 1.0, generator=g)
    assert noised.min() >= 0 and noised.max() <= 1
    assert (noised == 0).any() and (noised == 1).any()


def test_box_noise_separate_scales():
    """center_scale=0 leaves centres alone, size_scale=0 leaves sizes alone."""
    g = torch.Generator().manual_seed(3)
    boxes = torch.tensor([[0.5, 0.4, 0.2, 0.3]]).repeat(100, 1)
    only_size = noise_boxes(boxes, 0.4, center_scale=0.0, generator=g)
    only_centre = noise_boxes(boxes, 0.4, size_scale=0.0, generator=g)
    assert torch.equal(only_size[:, :2], boxes[:, :2])
    assert not torch.equal(only_size[:, 2:], boxes[:, 2:])
    assert torch.equal(only_centre[:, 2:], boxes[:, 2:])
    assert not torch.equal(only_centre[:, :2], boxes[:, :2])


def test_label_flip_rate():
    """p = 0.2, K = 10 over 100k labels: changed fraction ~ p (1 - 1/K) = 0.18, new labels
    in [0, K) and uniform; p = 0 changes nothing."""
    g = torch.Generator().manual_seed(4)
    K, p, n = 10, 0.2, 100_000
    labels = torch.randint(0, K, (n,), generator=g)
    noised = noise_labels(labels, K, p, generator=g)
    assert noised.dtype == torch.int64
    assert noised.min() >= 0 and noised.max() < K
    changed = (noised != labels).float().mean().item()
    assert abs(changed - p * (1 - 1 / K)) < 0.006           # ~5 standard deviations
    # originals of class 0 only: whatever they flip to is spread over the other classes
    flipped_to = noised[(labels == 0) & (noised != 0)]
    counts = torch.bincount(flipped_to, minlength=K)[1:].float()
    assert counts.min() > 0.7 * counts.mean()
    assert torch.equal(noise_labels(labels, K, 0.0, generator=g), labels)


def test_noise_determinism():
    """Same generator seed -> same noise; the global RNG is used by default, so
    re-seeding it reproduces the Denoiser's queries (resumed runs are identical)."""
    labels = torch.arange(50) % 5
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2]]).repeat(50, 1)
    a = noise_labels(labels, 5, 0.5, generator=torch.Generator().manual_seed(7))
    b = noise_labels(labels, 5, 0.5, generator=torch.Generator().manual_seed(7))
    c = noise_labels(labels, 5, 0.5, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    d = noise_boxes(boxes, 0.4, generator=torch.Generator().manual_seed(7))
    e = noise_boxes(boxes, 0.4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(d, e)
    denoiser, targets = Denoiser(7, 16), make_targets([2, 3])
    torch.manual_seed(11)
    first = denoiser(targets)
    torch.manual_seed(11)
    second = denoiser(targets)
    third = denoiser(targets)
    assert torch.equal(first.content, second.content) and torch.equal(first.boxes, second.boxes)
    assert not torch.equal(second.boxes, third.boxes)


# ---- bookkeeping ----

def test_dn_indices_hand_example():
    """Objects (0, 1, 2) per image, 3 groups of 2 slots: hand-listed slots and targets."""
    got = dn_indices([0, 1, 2], num_groups=3, group_size=2)
    expected = [([], []), ([0, 2, 4], [0, 0, 0]), ([0, 1, 2, 3, 4, 5], [0, 1, 0, 1, 0, 1])]
    for (slot, tgt), (slot_hand, tgt_hand) in zip(got, expected):
        assert slot.dtype == torch.int64 and tgt.dtype == torch.int64
        assert slot.tolist() == slot_hand and tgt.tolist() == tgt_hand


def test_split_dn_round_trip():
    """split_dn gives the first P and last Q entries of the query axis; cat restores x."""
    x = torch.randn(2, 7, 3)
    dn_part, match_part = split_dn(x, 3)
    assert torch.equal(dn_part, x[:, :3]) and torch.equal(match_part, x[:, 3:])
    assert torch.equal(torch.cat([dn_part, match_part], dim=1), x)
    stacked = torch.randn(4, 2, 7, 3)                  # [L, B, P+Q, K]
    dn_part, match_part = split_dn(stacked, 5, dim=2)
    assert dn_part.shape == (4, 2, 5, 3) and torch.equal(match_part, stacked[:, :, 5:])
    dn_part, match_part = split_dn(x, 0)
    assert dn_part.shape == (2, 0, 3) and torch.equal(match_part, x)
    with pytest.raises(ValueError):
        split_dn(x, 8)


# ---- the Denoiser module ----

def test_denoiser_batch_with_0_1_5_objects():
    """Without noise, each dn slot holds exactly the target its index names (embedding
    row + indicator 1, box); all other slots are padding (zeros, boxes 0.5)."""
    K, C, G = 7, 16, 3
    denoiser = Denoiser(K, C, num_groups=G, label_noise_prob=0.0, box_noise_scale=0.0)
    targets = make_targets([0, 1, 5], num_classes=K)
    dn = denoiser(targets)
    assert dn.group_size == 5 and dn.pad_size == 15 and dn.num_dn == 18
    assert dn.content.shape == (3, 15, C) and dn.boxes.shape == (3, 15, 4)
    hand = [([], []), ([0, 5, 10], [0, 0, 0]), (list(range(15)), [0, 1, 2, 3, 4] * 3)]
    table = denoiser.label_enc.weight.detach()
    real = set()
    for b, ((slot, tgt), (slot_hand, tgt_hand)) in enumerate(zip(dn.indices, hand)):
        assert slot.tolist() == slot_hand and tgt.tolist() == tgt_hand
        for s, t in zip(slot_hand, tgt_hand):
            real.add((b, s))
            label = int(targets[b]["labels"][t])
            assert torch.equal(dn.content[b, s, :-1], table[label])
            assert dn.content[b, s, -1] == 1.0
            assert torch.equal(dn.boxes[b, s], targets[b]["boxes"][t])
    for b in range(3):
        for s in range(15):
            if (b, s) not in real:
                assert (dn.content[b, s] == 0).all()
                assert (dn.boxes[b, s] == 0.5).all()
    assert dn.attn_mask(4).shape == (19, 19)


def test_denoiser_noisy_groups_differ():
    """With DN-DETR's default noise the groups get different copies of the same object,
    all boxes in [0, 1], and gradients reach the label embedding through the content."""
    denoiser = Denoiser(7, 16)
    dn = denoiser(make_targets([4, 2]), generator=torch.Generator().manual_seed(5))
    assert dn.pad_size == 20
    assert not torch.equal(dn.boxes[0, 0], dn.boxes[0, 4])         # object 0, groups 0 and 1
    assert dn.boxes.min() >= 0 and dn.boxes.max() <= 1
    dn.content.sum().backward()
    assert denoiser.label_enc.weight.grad.abs().sum() > 0


def test_match_content_indicator():
    """Matching content = row K ("unknown") of the label table + indicator 0, for all B, Q."""
    denoiser = Denoiser(7, 16)
    content = denoiser.match_content(2, 5)
    assert content.shape == (2, 5, 16)
    unknown = denoiser.label_enc.weight.detach()[7]
    assert torch.equal(content[..., :-1].detach(), unknown.expand(2, 5, 15))
    assert (content[..., -1] == 0).all()


def test_denoiser_all_empty_batch():
    """No image has an object: P = 0, empty [B, 0, C] / [B, 0, 4], mask [Q, Q] all False."""
    denoiser = Denoiser(7, 16)
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
               for _ in range(2)]
    dn = denoiser(targets)
    assert dn.pad_size == 0 and dn.group_size == 0 and dn.num_dn == 0
    assert dn.content.shape == (2, 0, 16) and dn.boxes.shape == (2, 0, 4)
    assert all(slot.numel() == 0 and tgt.numel() == 0 for slot, tgt in dn.indices)
    mask = dn.attn_mask(4)
    assert mask.shape == (4, 4) and not mask.any()
    dn_part, match_part = split_dn(torch.randn(2, 4, 3), dn.pad_size)
    assert dn_part.shape == (2, 0, 3) and match_part.shape == (2, 4, 3)


def test_denoiser_without_groups():
    """num_groups = 0 switches denoising off: no slots, and the mask is all False."""
    dn = Denoiser(7, 16, num_groups=0)(make_targets([3, 1]))
    assert dn.pad_size == 0 and dn.num_dn == 0 and dn.content.shape == (2, 0, 16)
    assert not dn.attn_mask(5).any()


# ---- --dn_bucket: static query counts, the same numbers ----

def test_bucket_mask_hand_example():
    """2 groups of 3 slots of which the batch uses 2 (a bucket of 3) + 1 matching query: the
    third slot of each group (columns 2 and 5) is hidden from every query, the rest as without."""
    expected = torch.tensor([
        # group 0  group 1  matching
        [0, 0, 1,  1, 1, 1,  0],
        [0, 0, 1,  1, 1, 1,  0],
        [0, 0, 1,  1, 1, 1,  0],
        [1, 1, 1,  0, 0, 1,  0],
        [1, 1, 1,  0, 0, 1,  0],
        [1, 1, 1,  0, 0, 1,  0],
        [1, 1, 1,  1, 1, 1,  0],
    ], dtype=torch.bool)
    assert torch.equal(dn_attention_mask(2, 3, 1, used=2), expected)


def test_bucket_changes_no_output_of_a_real_slot_or_a_matching_query():
    """dn (small) with and without --dn_bucket 4 on batches of 1-3 objects, the same weights and
    noise: the matching queries' outputs and the real dn slots' (read through each run's own
    indices) agree to float rounding, and so do the losses; only the query count is static."""
    import minidetr
    SMALL = dict(hidden_dim=32, nheads=4, dim_feedforward=64, enc_layers=1, dec_layers=2,
                 num_queries=6, num_select=6, backbone_precision="fp32", num_classes=7)
    torch.manual_seed(0)
    plain, criterion, _ = minidetr.build("dn", preset="tiny", **SMALL)
    bucketed, _, _ = minidetr.build("dn", preset="tiny", dn_bucket=4, **SMALL)
    bucketed.load_state_dict(plain.state_dict())
    images, mask = torch.randn(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.bool)
    for counts in ([1, 3], [2, 2], [3, 0]):
        targets = make_targets(counts)
        out = {}
        for name, model in (("plain", plain), ("bucketed", bucketed)):
            torch.manual_seed(1)   # the same noise: the draws do not depend on the bucket
            out[name] = model.train()(images, mask, targets)
            out[name]["loss"] = criterion(out[name], targets)
        a, b = out["plain"], out["bucketed"]
        assert b["dn"]["pred_logits"].shape[1] == 4 * 5 and a["dn"]["pred_logits"].shape[1] == max(counts) * 5
        torch.testing.assert_close(b["pred_logits"], a["pred_logits"], rtol=0, atol=1e-5)
        torch.testing.assert_close(b["pred_boxes"], a["pred_boxes"], rtol=0, atol=1e-5)
        for key in ("pred_logits", "pred_boxes"):
            for image, ((slots_a, _), (slots_b, _)) in enumerate(zip(a["dn"]["indices"], b["dn"]["indices"])):
                torch.testing.assert_close(b["dn"][key][image, slots_b], a["dn"][key][image, slots_a],
                                           rtol=0, atol=1e-5)
        for name in a["loss"]:
            torch.testing.assert_close(b["loss"][name], a["loss"][name], rtol=0, atol=1e-5)
