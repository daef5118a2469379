"""draw: predictions and attention maps render to valid PNGs of the expected size on a tiny
model; the hook recorder's maps equal a naive softmax and leave the model untouched; SMCA's
prior maps are exp(log G); plotting reads DETR-style log.txt files."""
import json

import pytest
import torch
from PIL import Image
from naive import naive_attention_weights, rand

import minidetr
from minidetr import draw
from minidetr.transformer import MultiheadAttention

SMALL = dict(hidden_dim=32, nheads=4, dim_feedforward=64, enc_layers=1, dec_layers=2,
             num_queries=6, num_select=6)


def test_draw_predictions_keeps_the_image_size_and_paints_the_box(tmp_path):
    image = Image.new("RGB", (80, 60), "black")
    result = {"scores": torch.tensor([0.9, 0.1]), "labels": torch.tensor([1, 2]),
              "boxes": torch.tensor([[10.0, 10.0, 50.0, 40.0], [0.0, 0.0, 5.0, 5.0]])}
    out = draw.draw_predictions(image, result, {1: "circle"}, threshold=0.5)
    out.save(tmp_path / "p.png")
    png = Image.open(tmp_path / "p.png")
    assert png.size == (80, 60)
    assert png.getpixel((10, 30)) != (0, 0, 0)        # left edge of the kept box is drawn
    assert png.getpixel((2, 55)) == (0, 0, 0)          # far from any kept box: untouched


def test_record_attention_rows_sum_to_one_and_respect_padding():
    """Recorded maps are distributions over keys with zero weight on padding, equal to a naive
    float64 softmax of the module's projected queries and keys."""
    B, Q, N, D, H = 2, 5, 12, 16, 4
    torch.manual_seed(0)
    model = torch.nn.ModuleDict(dict(cross_attn=MultiheadAttention(D, H).double()))
    query, key, value = rand(B, Q, D, seed=18), rand(B, N, D, seed=19), rand(B, N, D, seed=20)
    pad = torch.zeros(B, N, dtype=torch.bool)
    pad[0, -3:] = True
    with draw.record_attention(model) as recorded:
        model["cross_attn"](query, key, value, pad_mask=pad)
    (name, w, bias), = recorded
    assert name == "cross_attn" and w.shape == (B, H, Q, N) and bias is None
    assert torch.allclose(w.sum(-1), torch.ones(B, H, Q, dtype=torch.float64))
    assert (w[0, :, :, -3:] == 0).all()
    with torch.no_grad():
        q, k = model["cross_attn"].q_proj(query), model["cross_attn"].k_proj(key)
    torch.testing.assert_close(w, naive_attention_weights(q, k, H, pad_mask=pad), rtol=0, atol=1e-12)


def test_record_attention_hooks_every_attention_module_then_leaves():
    """Every attention module is recorded once per call, by path; outputs are bit-identical
    with and without the recorder, and after the block no hook is left."""
    torch.manual_seed(0)
    model, _, _ = minidetr.build("conditional", preset="tiny", **SMALL)
    model.eval()
    images, mask = torch.randn(1, 3, 64, 96), torch.zeros(1, 64, 96, dtype=torch.bool)
    with torch.no_grad():
        plain = model(images, mask)
        with draw.record_attention(model) as recorded:
            hooked = model(images, mask)
    assert [r.name for r in recorded] == ["encoder.layers.0.self_attn",
                                          "decoder.layers.0.self_attn", "decoder.layers.0.cross_attn",
                                          "decoder.layers.1.self_attn", "decoder.layers.1.cross_attn"]
    assert torch.equal(plain["pred_logits"], hooked["pred_logits"])
    assert torch.equal(plain["pred_boxes"], hooked["pred_boxes"])
    assert not any(m._forward_hooks for m in model.modules())
    with pytest.raises(ValueError, match="no attention module"):
        with draw.record_attention(model, ["decoder.layers.1.ffn"]):
            pass


def test_attention_maps_are_distributions_over_the_grid():
    torch.manual_seed(0)
    model, _, _ = minidetr.build("conditional", preset="tiny", **SMALL)
    images, mask = torch.randn(1, 3, 64, 96), torch.zeros(1, 64, 96, dtype=torch.bool)
    outputs, maps = draw.attention_maps(model, images, mask)
    assert maps.shape == (1, 4, 6, 8, 12)              # [B, heads, Q, y, x], stride 8 (layer2)
    assert torch.allclose(maps.sum((-1, -2)), torch.ones(1, 4, 6), atol=1e-5)


def test_smca_prior_is_a_gaussian_peaking_at_one():
    """kind='prior' gives G = exp(log G) in (0, 1], the paper's weight map."""
    torch.manual_seed(0)
    model, _, _ = minidetr.build("smca", preset="tiny", **SMALL)
    images, mask = torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool)
    _, prior = draw.attention_maps(model, images, mask, kind="prior")
    assert prior.shape == (1, 4, 6, 8, 8)               # 64 px at stride 8 (layer2)
    assert (prior > 0).all() and (prior <= 1 + 1e-6).all()


def test_smca_multiscale_maps_are_level0_distributions():
    """Multi-scale SMCA: level 0's part of the map is its own per-scale softmax (sums to one
    over its grid) and its prior is exp(log G) in (0, 1]."""
    torch.manual_seed(0)
    model, _, _ = minidetr.build("smca", preset="tiny", smca_multiscale=True, **SMALL)
    images, mask = torch.randn(1, 3, 64, 96), torch.zeros(1, 64, 96, dtype=torch.bool)
    _, maps = draw.attention_maps(model, images, mask)
    assert maps.shape == (1, 4, 6, 4, 6)                 # stride 16 (layer3)
    assert torch.allclose(maps.sum((-1, -2)), torch.ones(1, 4, 6), atol=1e-5)
    _, prior = draw.attention_maps(model, images, mask, kind="prior")
    assert prior.shape == (1, 4, 6, 4, 6) and (prior > 0).all() and (prior <= 1 + 1e-6).all()


def test_prior_of_a_model_without_bias_says_so():
    """kind='prior' on a model whose cross-attention has no bias names the reason."""
    torch.manual_seed(0)
    model, _, _ = minidetr.build("detr", preset="tiny", **SMALL)
    images, mask = torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool)
    with pytest.raises(ValueError, match="only SMCA adds a Gaussian prior"):
        draw.attention_maps(model, images, mask, kind="prior")


def test_draw_attention_png_size(tmp_path):
    image = Image.new("RGB", (64, 32), "gray")
    maps = torch.rand(3, 5, 2, 4)                        # heads, queries, y, x
    result = {"scores": torch.tensor([0.8, 0.6]), "labels": torch.tensor([1, 1]),
              "boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 20.0, 20.0]]),
              "query_ids": torch.tensor([4, 2])}
    draw.draw_attention(image, maps, result, [(0, 4), (1, 2)]).save(tmp_path / "a.png")
    png = Image.open(tmp_path / "a.png")
    png.verify()
    assert png.size == (160 * 4, 80 * 2)                 # (image + 3 heads) x 2 rows, 160x80 tiles


def test_plot_logs_writes_a_png(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("\n".join(json.dumps({"epoch": e, "train_loss": 10 - e, "test_loss": 11 - e,
                                         "test_coco_eval_bbox": [0.1 * e] * 12}) for e in range(3)))
    draw.plot_logs([log], tmp_path / "c.png")
    Image.open(tmp_path / "c.png").verify()


def test_a_fine_tuned_runs_first_line_is_not_an_epoch(tmp_path):
    """log.txt of a --finetune run starts with where its weights came from: read and plotted
    as the epochs after it."""
    log = tmp_path / "log.txt"
    log.write_text("\n".join([json.dumps({"finetune": {"source": "coco.pth", "loaded": 300}})] +
                             [json.dumps({"epoch": e, "train_loss": 5.0 - e, "test_coco_eval_bbox": [0.1] * 12})
                              for e in range(2)]))
    assert [r["epoch"] for r in draw.read_log(log)] == [0, 1]
    draw.plot_logs([log], tmp_path / "c.png")
    Image.open(tmp_path / "c.png").verify()


def test_read_log_names_what_is_wrong_and_plot_leaves_gaps(tmp_path):
    """A json that is not a training log is refused with its name; a log whose lines lack a
    key (another codebase's, or one that started without evaluation) still plots."""
    coco = tmp_path / "instances.json"
    coco.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(ValueError, match=f"{coco}: no line has train_loss or test_coco_eval_bbox"):
        draw.read_log(coco)
    log = tmp_path / "log.txt"
    log.write_text("\n".join([json.dumps({"epoch": 0, "train_loss": 3.0}),
                              json.dumps({"epoch": 1, "train_loss": 2.0, "test_coco_eval_bbox": [0.2] * 12}),
                              ""]))
    assert [r["epoch"] for r in draw.read_log(log)] == [0, 1]
    (tmp_path / "empty.txt").write_text("")
    draw.plot_logs([log, tmp_path / "empty.txt"], tmp_path / "c.png")
    Image.open(tmp_path / "c.png").verify()


def test_plot_logs_without_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    """matplotlib is optional: without it plotting stops with the pip command, not an ImportError."""
    import builtins
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(SystemExit, match="pip install matplotlib"):
        draw.plot_logs([tmp_path / "log.txt"], tmp_path / "c.png")
