"""export: each variant's ONNX graph, run by ONNX Runtime, equals the PyTorch model to 1e-4 on
two image sizes and a padded batch of two, none of them the size it was traced at; the
postprocessed graph equals PostProcess; the graph's sizes are named and shared. The models
are the tiny preset made smaller (1 encoder, 2 decoder layers), random weights, eval mode,
float32 backbone. Skipped without the optional extra (pip install -e '.[export]')."""
import pytest
import torch

import minidetr

pytest.importorskip("onnx", reason="ONNX export needs the [export] extra: pip install -e '.[export]'")
pytest.importorskip("onnxscript", reason="ONNX export needs the [export] extra: pip install -e '.[export]'")
pytest.importorskip("onnxruntime", reason="the check needs the [export] extra: pip install -e '.[export]'")
from minidetr import export  # noqa: E402

SMALL = dict(hidden_dim=32, nheads=4, dim_feedforward=64, enc_layers=1, dec_layers=2,
             num_queries=6, num_select=6, backbone_precision="fp32")
TRACED_HW = (128, 160)
VARIANTS = {"detr": {}, "conditional": {}, "smca": {}, "smca_multiscale": dict(smca_multiscale=True),
            "smca_ms_released": dict(smca_multiscale=True, smca_ms_form="released"), "dab": {}, "dn": {}}


def small_model(name):
    torch.manual_seed(0)
    variant = "smca" if name.startswith("smca") else name
    model, _, postprocess = minidetr.build(variant, preset="tiny", **SMALL, **VARIANTS[name])
    return model.eval(), postprocess


def inputs_other_than_traced():
    """(images, mask): 96x128, 144x112 (portrait), and a batch of two at 120x176 whose second
    image is 80x120 zero-padded bottom and right (mask True there), as data.nested_pad pads."""
    generator = torch.Generator().manual_seed(7)
    cases = [(torch.randn(1, 3, h, w, generator=generator), torch.zeros(1, h, w, dtype=torch.bool))
             for h, w in ((96, 128), (144, 112))]
    images, mask = torch.randn(2, 3, 120, 176, generator=generator), torch.zeros(2, 120, 176, dtype=torch.bool)
    images[1, :, 80:], images[1, :, :, 120:] = 0, 0
    mask[1, 80:], mask[1, :, 120:] = True, True
    return cases + [(images, mask)]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_onnx_runtime_equals_pytorch(name, tmp_path):
    """ONNX Runtime's pred_logits and pred_boxes equal PyTorch's to 1e-4 at sizes and batch
    sizes other than the traced one (so B, H and W are symbolic, not baked in)."""
    model, _ = small_model(name)
    path = export.export_onnx(model, tmp_path / f"{name}.onnx", example_hw=TRACED_HW)
    session = export.onnx_session(path)
    for images, mask in inputs_other_than_traced():
        assert images.shape[-2:] != TRACED_HW
        with torch.no_grad():
            want = model(images, mask)
        got = session.run(["pred_logits", "pred_boxes"], {"images": images.numpy(), "mask": mask.numpy()})
        for key, value in zip(("pred_logits", "pred_boxes"), got):
            torch.testing.assert_close(torch.from_numpy(value), want[key], rtol=0, atol=1e-4)


def test_cli_postprocessed_graph_equals_postprocess_and_names_its_axes(tmp_path, capsys):
    """python -m minidetr.export --postprocess on a checkpoint: ONNX Runtime's scores, labels and
    pixel boxes (focal top-k inside the graph) equal detr.PostProcess on PyTorch's outputs, and
    images, mask, orig_sizes and the outputs share the named axes batch, height, width."""
    import onnx
    from minidetr.checkpoint import save_atomic
    cfg = minidetr.Config.for_variant("conditional", "tiny", **SMALL, image_size=TRACED_HW[0])
    torch.manual_seed(0)
    model, _, postprocess = minidetr.build(cfg)
    save_atomic({"model": model.state_dict(), "config": cfg.to_dict()}, tmp_path / "ckpt.pth")
    path = tmp_path / "post.onnx"
    worst = export.main(["--resume", str(tmp_path / "ckpt.pth"), "--onnx", str(path), "--postprocess"])
    assert f"wrote {path}: conditional (tiny, resnet18)" in capsys.readouterr().out and worst <= 1e-4
    graph = onnx.load(str(path)).graph
    axes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(graph.input) + list(graph.output)}
    assert axes["images"] == ["batch", 3, "height", "width"] and axes["mask"] == ["batch", "height", "width"]
    assert axes["orig_sizes"] == ["batch", 2] and axes["scores"][0] == axes["boxes"][0] == "batch"
    session = export.onnx_session(path)
    model.eval()
    for images, mask in inputs_other_than_traced():
        sizes = torch.tensor([[300, 400]] * len(images))          # any original size: boxes scale to it
        with torch.no_grad():
            want = postprocess(model(images, mask), sizes)
        scores, labels, boxes = session.run(["scores", "labels", "boxes"], {
            "images": images.numpy(), "mask": mask.numpy(), "orig_sizes": sizes.numpy()})
        for i, result in enumerate(want):
            torch.testing.assert_close(torch.from_numpy(scores[i]), result["scores"], rtol=0, atol=1e-5)
            assert torch.equal(torch.from_numpy(labels[i]), result["labels"])
            torch.testing.assert_close(torch.from_numpy(boxes[i]), result["boxes"], rtol=0, atol=1e-3)  # pixels
    with pytest.raises(SystemExit, match="does not exist"):
        export.main(["--resume", str(tmp_path / "none.pth"), "--onnx", str(tmp_path / "n.onnx")])
