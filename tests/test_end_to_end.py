"""End to end: the tiny model overfits two shapes images (scored by pycocotools through the
same evaluation path train.py uses), a bf16 autocast step is finite, the two scripts
run, log, checkpoint, evaluate and draw, and eval.py reads a checkpoint of another version
(missing or unknown config fields) and stops on a broken val split."""
import json
import sys

import pytest
import torch
from PIL import Image

import minidetr
from minidetr.checkpoint import load_safely, save_atomic
from minidetr.check import load_dataset
from minidetr.data import collate_fn, make_shapes_dataset, make_transforms
from minidetr.optim import build_optimizer
from minidetr.evaluation import autocast, evaluate

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
import eval as eval_script  # noqa: E402
import train as train_script  # noqa: E402


@pytest.fixture(scope="module")
def two_images(tmp_path_factory):
    paths = make_shapes_dataset(tmp_path_factory.mktemp("shapes2"), num_train=2, num_val=2, seed=3)
    ds = load_dataset(paths["train_images"], paths["train_json"], make_transforms("val", "tiny", 128))
    return ds, collate_fn([ds[0], ds[1]])


def weighted(criterion, losses):
    return sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses)


@pytest.mark.parametrize("variant", ["detr", "conditional", "smca", "dn"])
def test_tiny_model_overfits_two_images(two_images, variant):
    """300 steps on 2 images (9 objects) -> COCO AP50 >= 0.9 on those images, every variant.

    dn with seed 0 reaches 1.0 by step 260 at 1 or 2 threads, but only 0.72 at step 220 with
    2 threads (other summation orders): 300 leaves a margin for other machines."""
    ds, (images, mask, targets) = two_images
    torch.manual_seed(0)
    cfg = minidetr.Config.for_variant(variant, preset="tiny", lr=1e-4, lr_backbone=1e-4, dropout=0.0)
    model, criterion, postprocess = minidetr.build(cfg)
    optimizer, _ = build_optimizer(model, cfg)
    model.train()
    for _ in range(300):
        total = weighted(criterion, criterion(model(images, mask, targets), targets))
        optimizer.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_max_norm)
        optimizer.step()
    result = evaluate(model, criterion, postprocess, [(images, mask, targets)], ds.coco, "cpu", progress=False)
    assert result["stats"][1] >= 0.9, result["stats"]


def test_bf16_autocast_training_step_is_finite(two_images):
    """One dn training step under CPU bf16 autocast: finite loss and finite gradients."""
    _, (images, mask, targets) = two_images
    torch.manual_seed(0)
    model, criterion, _ = minidetr.build("dn", preset="tiny", hidden_dim=64, enc_layers=1, dec_layers=2)
    model.train()
    with autocast("cpu", "bf16"):
        out = model(images, mask, targets)
    assert out["pred_logits"].dtype == torch.bfloat16
    total = weighted(criterion, criterion(out, targets))
    total.backward()
    assert torch.isfinite(total)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


TINY_RUN = ["--hidden_dim", "32", "--nheads", "4", "--dim_feedforward", "64", "--enc_layers", "1",
            "--dec_layers", "2", "--num_queries", "8", "--num_select", "8", "--batch_size", "4",
            "--shapes_train", "8", "--shapes_val", "4", "--epochs", "1", "--num_workers", "0"]


def test_train_eval_and_draw_scripts(tmp_path, monkeypatch, capsys):
    """train.py writes DETR-style log.txt + checkpoint; eval.py scores it and draws PNGs."""
    monkeypatch.setenv("MINIDETR_DATA", str(tmp_path / "data"))
    out = tmp_path / "run"
    train_script.main(["--variant", "conditional", *TINY_RUN, "--output_dir", str(out)])
    (log,) = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert len(log["test_coco_eval_bbox"]) == 12 and log["epoch"] == 0
    for key in ("train_loss", "train_loss_ce", "train_loss_bbox_unscaled", "train_lr", "test_loss", "n_parameters"):
        assert key in log, key
    # speed: 2 steps of 4 of 8 images, timed each; 4 val images over the evaluation loop's time
    assert 0 < log["step_time_median"] < log["epoch_time"]
    assert 0 < log["eval_time"] < log["epoch_time"]
    assert log["eval_img_s"] >= 4 / log["eval_time"]   # the loop is part of the whole evaluation
    result = eval_script.main(["--resume", str(out / "checkpoint.pth")])
    assert len(result["stats"]) == 12
    image = sorted((tmp_path / "data").rglob("val/*.png"))[0]
    eval_script.main(["--resume", str(out / "checkpoint.pth"), "--image", str(image),
                      "--out", str(tmp_path / "pred.png"), "--threshold", "0"])
    assert Image.open(tmp_path / "pred.png").size == Image.open(image).size
    capsys.readouterr()
    eval_script.main(["--resume", str(out / "checkpoint.pth"), "--image", str(image),
                      "--out", str(tmp_path / "none.png"), "--threshold", "1.01"])  # scores <= 1
    assert "no prediction scored >= --threshold 1.01" in capsys.readouterr().err
    eval_script.main(["--resume", str(out / "checkpoint.pth"), "--image", str(image), "--attention",
                      "--top", "2", "--out", str(tmp_path / "attn.png")])
    attn = Image.open(tmp_path / "attn.png")
    attn.verify()
    assert attn.size == (160 * (1 + 4), 160 * 2)     # (image + 4 heads) x 2 detections, 160-px tiles
    eval_script.main(["--plot-logs", str(out / "log.txt"), "--out", str(tmp_path / "curves.png")])
    Image.open(tmp_path / "curves.png").verify()


def test_eval_script_mistakes_are_one_line(tmp_path):
    """A missing checkpoint or image stops eval.py with one 'error:' line."""
    with pytest.raises(SystemExit, match="does not exist"):
        eval_script.main(["--resume", str(tmp_path / "none.pth")])
    with pytest.raises(SystemExit, match="--image .* does not exist"):
        eval_script.main(["--resume", str(tmp_path / "none.pth"), "--image", str(tmp_path / "x.png"),
                          "--out", str(tmp_path / "o.png")])


def test_eval_script_bad_outputs_and_images_are_one_line(tmp_path):
    """--out is checked before the model is loaded (an extension no writer knows; a missing
    folder is created); an image PIL cannot decode and a file that is not a log are named."""
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    none = str(tmp_path / "none.pth")          # never read: the --out check comes first
    with pytest.raises(SystemExit, match=r"--out .*o\.pngx: the extension \.pngx names no image format PIL"):
        eval_script.main(["--resume", none, "--image", str(tmp_path / "a.png"), "--out", str(tmp_path / "o.pngx")])
    with pytest.raises(SystemExit, match="a name without an extension"):
        eval_script.main(["--resume", none, "--image", str(tmp_path / "a.png"), "--out", str(tmp_path / "o")])
    untrained_checkpoint(tmp_path / "ckpt.pth")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(SystemExit, match=f"error: --image: cannot read {tmp_path / 'broken.jpg'}"):
        eval_script.main(["--resume", str(tmp_path / "ckpt.pth"), "--image", str(tmp_path / "broken.jpg"),
                          "--out", str(tmp_path / "o.png")])
    eval_script.main(["--resume", str(tmp_path / "ckpt.pth"), "--image", str(tmp_path / "a.png"),
                      "--out", str(tmp_path / "new" / "dir" / "o.png")])
    assert Image.open(tmp_path / "new" / "dir" / "o.png").size == (40, 30)
    (tmp_path / "notes.txt").write_text('{"epoch": 0, "train_loss": 1.0}\nnot json\n')
    with pytest.raises(SystemExit, match=f"error: {tmp_path / 'notes.txt'}, line 2: not a JSON object"):
        eval_script.main(["--plot-logs", str(tmp_path / "notes.txt"), "--out", str(tmp_path / "c.png")])
    with pytest.raises(SystemExit, match=f"error: {tmp_path / 'broken.jpg'}: not a text file"):
        eval_script.main(["--plot-logs", str(tmp_path / "broken.jpg"), "--out", str(tmp_path / "c.png")])
    with pytest.raises(SystemExit, match=f"error: cannot read log {tmp_path / 'gone.txt'}: No such file"):
        eval_script.main(["--plot-logs", str(tmp_path / "gone.txt"), "--out", str(tmp_path / "c.png")])


# ---- eval.py on files from elsewhere: another version's checkpoint, a broken val split ----

def untrained_checkpoint(path):
    """A minidetr checkpoint of a freshly built small dn model (eval.py needs no training)."""
    cfg = minidetr.Config.for_variant("dn", "tiny", hidden_dim=32, nheads=4, dim_feedforward=64,
                                      enc_layers=1, dec_layers=2, num_queries=8, num_select=8,
                                      shapes_train=4, shapes_val=2, image_size=32, batch_size=2)
    torch.manual_seed(0)
    model, _, _ = minidetr.build(cfg)
    save_atomic({"model": model.state_dict(), "config": cfg.to_dict()}, path)
    return load_safely(str(path))


def test_eval_checkpoint_of_another_version(tmp_path, monkeypatch):
    """A config lacking fields (backbone_stage, giou_eps) and holding an unknown one: the
    missing ones take the preset's values and the scores equal the intact file's; lacking
    hidden_dim (32 here, 128 in the preset) the weights cannot fit: one line naming it."""
    monkeypatch.setenv("MINIDETR_DATA", str(tmp_path / "data"))
    ckpt = untrained_checkpoint(tmp_path / "intact.pth")
    intact = eval_script.main(["--resume", str(tmp_path / "intact.pth")])
    for key in ("backbone_stage", "giou_eps"):
        del ckpt["config"][key]
    ckpt["config"]["a_field_from_the_future"] = 1
    save_atomic(ckpt, tmp_path / "older.pth")
    assert eval_script.main(["--resume", str(tmp_path / "older.pth")])["stats"] == intact["stats"]
    del ckpt["config"]["hidden_dim"]
    save_atomic(ckpt, tmp_path / "oldest.pth")
    with pytest.raises(SystemExit) as exc:
        eval_script.main(["--resume", str(tmp_path / "oldest.pth")])
    assert exc.value.code.startswith(
        f"error: the weights in {tmp_path / 'oldest.pth'} do not fit the model its config describes; "
        f"its config lacks ['backbone_stage', 'giou_eps', 'hidden_dim'] (saved by another version of "
        f"minidetr?), which took the preset's values (Error(s) in loading state_dict")


def test_eval_stops_on_a_broken_val_split(tmp_path):
    """eval.py checks its val split before evaluating: two images sharing id 1 are named."""
    untrained_checkpoint(tmp_path / "ckpt.pth")
    (tmp_path / "img").mkdir()
    images = [{"id": 1, "file_name": f"{name}.png", "width": 40, "height": 30} for name in ("a", "b")]
    for info in images:
        Image.new("RGB", (40, 30)).save(tmp_path / "img" / info["file_name"])
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0}]
    (tmp_path / "val.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                   "categories": [{"id": 1, "name": "x"}]}))
    with pytest.raises(SystemExit) as exc:
        eval_script.main(["--resume", str(tmp_path / "ckpt.pth"), "--val_json", str(tmp_path / "val.json"),
                          "--val_images", str(tmp_path / "img")])
    message = exc.value.code
    assert message.startswith("error: the dataset has 1 error(s)")
    assert f"{tmp_path / 'val.json'}, image id 1: used by both a.png and b.png" in message
