"""predict: eval.py --image on a folder writes COCO results that pycocotools loads unchanged,
with each file's boxes equal to eval.py --image on that file alone and to the model run by
hand; category ids come from the checkpoint's table; an undecodable file is listed, not
fatal; a video gives one prediction set per frame and a drawn video at its frame rate
(skipped without PyAV: pip install -e '.[video]')."""
import json
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import minidetr
from minidetr import predict
from minidetr.categories import Categories
from minidetr.checkpoint import save_atomic

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import eval as eval_script  # noqa: E402

# sparse ids, so labels 0..2 are remapped to them (categories.py): a label must never be written
CATEGORIES = Categories({101: "cat", 205: "dog", 999: "fish"})


def small_checkpoint(path):
    """A random small conditional model (3 classes, 64-px images) with its category table."""
    cfg = minidetr.Config.for_variant("conditional", "tiny", hidden_dim=32, nheads=4, dim_feedforward=64,
                                      enc_layers=1, dec_layers=2, num_queries=6, num_select=6,
                                      num_classes=3, image_size=64, batch_size=2)
    torch.manual_seed(0)
    model, _, _ = minidetr.build(cfg)
    save_atomic({"model": model.state_dict(), "config": cfg.to_dict(),
                 "categories": CATEGORIES.to_list()}, path)
    return str(path)


def noise_image(path, w, h, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def by_file(results_json):
    """{file name: [(category_id, bbox, score)] best first} from the two files eval.py writes."""
    from pycocotools.coco import COCO
    coco = COCO(predict.images_path(results_json))
    results = coco.loadRes(str(results_json))
    out = {}
    for image in coco.dataset["images"]:
        anns = sorted(results.imgToAnns[image["id"]], key=lambda a: -a["score"])
        out[image["file_name"]] = [(a["category_id"], a["bbox"], a["score"]) for a in anns]
    return out


def assert_same_detections(got, want, atol=1e-3):
    assert [c for c, _, _ in got] == [c for c, _, _ in want]
    torch.testing.assert_close(torch.tensor([b for _, b, _ in got]), torch.tensor([b for _, b, _ in want]),
                               rtol=0, atol=atol)
    torch.testing.assert_close(torch.tensor([s for _, _, s in got]), torch.tensor([s for _, _, s in want]),
                               rtol=0, atol=1e-5)


def test_folder_results_load_in_pycocotools_and_equal_each_file_alone(tmp_path, capsys):
    """A folder (two 80x60 images batched together, a portrait one, one in a subfolder, a broken
    JPEG, a text file): pycocotools loads the results with the images file beside them; each
    file's detections equal eval.py --image on that file alone (to 1e-3 px) and the model run by
    hand; category ids are the table's; the broken file is listed at the end, the text file
    ignored."""
    ckpt = small_checkpoint(tmp_path / "ckpt.pth")
    folder = tmp_path / "photos"
    for name, (w, h) in {"a.png": (80, 60), "b.jpg": (80, 60), "c.png": (50, 90), "sub/d.png": (70, 70)}.items():
        noise_image(folder / name, w, h, seed=len(name) + w)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (folder / "notes.txt").write_text("not an image")
    common = ["--resume", ckpt, "--threshold", "0", "--max_detections", "4", "--no-progress"]
    eval_script.main(common + ["--image", str(folder), "--out", str(tmp_path / "drawn"), "--batch_size", "2"])
    err = capsys.readouterr().err
    assert "1 file(s) could not be read" in err and "broken.jpg: cannot identify image file" in err
    assert "notes.txt" not in err
    folder_run = by_file(tmp_path / "drawn" / "predictions.json")
    assert list(folder_run) == ["a.png", "b.jpg", "c.png", "sub/d.png"]      # sorted, recursive
    images = json.loads(Path(predict.images_path(tmp_path / "drawn" / "predictions.json")).read_text())
    assert images["unreadable"][0]["file_name"] == "broken.jpg"
    assert {c["id"]: c["name"] for c in images["categories"]} == CATEGORIES.names
    assert Image.open(tmp_path / "drawn" / "sub" / "d.png").size == (70, 70)
    for name, detections in folder_run.items():
        assert len(detections) == 4 and {c for c, _, _ in detections} <= {101, 205, 999}
        alone = tmp_path / "alone" / (name.replace("/", "_") + ".json")
        eval_script.main(common + ["--image", str(folder / name), "--json", str(alone)])
        (single,) = by_file(alone).values()
        assert_same_detections(detections, single)

    # the model run by hand on c.png, through the evaluation's transform
    loaded = predict.load_model(ckpt)
    image = Image.open(folder / "c.png").convert("RGB")
    tensor = predict.image_tensor(image, minidetr.data.make_transforms("val", "tiny", 64))[None]
    with torch.no_grad():
        result = loaded.postprocess(loaded.model(tensor, torch.zeros(1, *tensor.shape[-2:], dtype=torch.bool)),
                                    torch.tensor([[90, 50]]))[0]
    top = result["scores"].argsort(descending=True)[:4]
    x1, y1, x2, y2 = result["boxes"][top].unbind(-1)
    by_hand = [(CATEGORIES.id_of[int(label)], box, float(score)) for label, box, score in
               zip(result["labels"][top], torch.stack([x1, y1, x2 - x1, y2 - y1], -1).tolist(), result["scores"][top])]
    assert_same_detections(folder_run["c.png"], by_hand, atol=1e-4)


def test_coco_results_map_labels_to_ids_and_boxes_to_xywh():
    """Labels become the table's ids (a label without a category is left out, never written as
    an id); xyxy pixel boxes become COCO's [x, y, w, h]; with no table the label is the id."""
    result = {"scores": torch.tensor([0.9, 0.8, 0.7]), "labels": torch.tensor([2, 0, 7]),
              "boxes": torch.tensor([[10.0, 20.0, 50.0, 80.0], [0.0, 0.0, 5.0, 5.0], [1.0, 1.0, 2.0, 2.0]])}
    assert predict.coco_results(3, result, CATEGORIES) == [
        {"image_id": 3, "category_id": 999, "bbox": [10.0, 20.0, 40.0, 60.0], "score": pytest.approx(0.9)},
        {"image_id": 3, "category_id": 101, "bbox": [0.0, 0.0, 5.0, 5.0], "score": pytest.approx(0.8)}]
    assert [r["category_id"] for r in predict.coco_results(1, result, None)] == [2, 0, 7]
    kept = predict.select(result, threshold=0.75, max_detections=5)
    assert kept["scores"].tolist() == pytest.approx([0.9, 0.8])


def test_output_kinds_refuse_what_means_nothing(tmp_path):
    """--out must fit --image: a folder draws into a folder, a video into a video or a folder,
    a drawn video needs a video; each mistake is one line before the model is loaded."""
    (tmp_path / "imgs").mkdir()
    (tmp_path / "a.png").write_bytes(b"")
    assert predict.output_kind(str(tmp_path / "imgs"), str(tmp_path / "out")) == "folder"
    assert predict.output_kind(str(tmp_path / "clip.mp4"), str(tmp_path / "o.mp4")) == "video"
    assert predict.output_kind(str(tmp_path / "clip.mp4"), str(tmp_path / "frames")) == "folder"
    with pytest.raises(SystemExit, match="a folder of images draws into a folder"):
        eval_script.main(["--resume", "none.pth", "--image", str(tmp_path / "imgs"), "--out", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit, match="a drawn video needs a video --image"):
        eval_script.main(["--resume", "none.pth", "--image", str(tmp_path / "a.png"), "--out", str(tmp_path / "x.mp4")])


def test_video_without_pyav_says_how_to_install(monkeypatch):
    """PyAV is optional: without it a video stops with the pip command, not an ImportError."""
    import builtins
    real_import = builtins.__import__

    def no_av(name, *args, **kwargs):
        if name == "av":
            raise ImportError("No module named 'av'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_av)
    with pytest.raises(SystemExit, match=r"pip install -e '\.\[video\]'"):
        predict.video_info("clip.mp4")


def test_video_gives_one_prediction_set_per_frame(tmp_path):
    """A 5-frame 12 fps video: one image entry (file, frame number) and max_detections results per
    frame, equal to the frames predicted as images; the drawn video has 5 frames at 12 fps."""
    av = pytest.importorskip("av", reason="videos need the [video] extra: pip install -e '.[video]'")
    ckpt = small_checkpoint(tmp_path / "ckpt.pth")
    video = tmp_path / "clip.mp4"
    container = av.open(str(video), "w")
    stream = container.add_stream("libx264", rate=Fraction(12))
    stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
    for i in range(5):
        pixels = np.full((64, 96, 3), 40, np.uint8)
        pixels[10:40, 8 + 12 * i:38 + 12 * i] = 230                        # a square moving right
        container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
    container.mux(stream.encode())
    container.close()
    eval_script.main(["--resume", ckpt, "--image", str(video), "--out", str(tmp_path / "drawn.mp4"),
                      "--threshold", "0", "--max_detections", "3", "--no-progress"])
    images = json.loads(Path(predict.images_path(tmp_path / "drawn.json")).read_text())["images"]
    assert [(i["file_name"], i["frame"], i["id"]) for i in images] == [("clip.mp4", f, f + 1) for f in range(5)]
    results = json.loads((tmp_path / "drawn.json").read_text())
    assert sorted(r["image_id"] for r in results) == sorted([1, 2, 3, 4, 5] * 3)
    # the same frames, decoded and saved as PNG (lossless), predicted as a folder of images
    (tmp_path / "frames").mkdir()
    for frame in predict.video_frames(video):
        frame.image.save(tmp_path / "frames" / f"{frame.index}.png")
    eval_script.main(["--resume", ckpt, "--image", str(tmp_path / "frames"), "--json", str(tmp_path / "f.json"),
                      "--threshold", "0", "--max_detections", "3", "--no-progress"])
    as_images = by_file(tmp_path / "f.json")
    for i in range(5):
        from_video = sorted(((r["category_id"], r["bbox"], r["score"]) for r in results if r["image_id"] == i + 1),
                            key=lambda d: -d[2])
        assert_same_detections(from_video, as_images[f"{i}.png"])
    assert predict.video_info(tmp_path / "drawn.mp4") == (Fraction(12), 5, (96, 64))


@pytest.mark.parametrize("victim", ["pred.png", "pred.json"])
def test_full_disk_on_a_drawing_or_the_results_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch, victim):
    """A full disk while the drawing or the results json is written: one line naming that file
    and the bytes it needed; the file from the run before is byte for byte as it was."""
    import errno
    import os
    ckpt = small_checkpoint(tmp_path / "ckpt.pth")
    noise_image(tmp_path / "photo.png", 80, 60, seed=1)
    argv = ["--resume", ckpt, "--image", str(tmp_path / "photo.png"), "--out", str(tmp_path / "pred.png"),
            "--threshold", "0", "--no-progress"]
    eval_script.main(argv)                                        # a first run: both files whole
    before = (tmp_path / victim).read_bytes()
    real_replace = os.replace

    def full_disk(src, dst):                                      # the rename of the new file fails
        if os.path.basename(str(dst)) == victim:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", full_disk)
    noise_image(tmp_path / "photo.png", 80, 60, seed=2)           # new pixels: a new drawing
    with pytest.raises(SystemExit) as exc:
        eval_script.main(argv)
    message = exc.value.code
    assert message.startswith(f"error: cannot write {tmp_path / victim}: No space left on device (needed ")
    assert "\n" not in message and "is unchanged" in message
    assert (tmp_path / victim).read_bytes() == before
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]   # no temporary file left
