"""evaluation: our COCO path (post-processed xyxy pixels -> COCO json -> COCOeval) agrees
with pycocotools run directly, and ground truth fed back as predictions scores AP 1."""
import contextlib
import io
import json

import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from minidetr.evaluation import coco_stats, evaluate, to_coco_detections


def make_coco(tmp_path):
    data = {"images": [{"id": 1, "width": 100, "height": 80, "file_name": "a.png"},
                       {"id": 2, "width": 60, "height": 60, "file_name": "b.png"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 20], "area": 600, "iscrowd": 0},
                            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [50, 30, 40, 40], "area": 1600, "iscrowd": 0},
                            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [5, 5, 20, 30], "area": 600, "iscrowd": 0}],
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(data))
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def test_ground_truth_as_predictions_scores_one(tmp_path):
    coco = make_coco(tmp_path)
    dets = {}
    for img_id in (1, 2):
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)])
        dets[img_id] = to_coco_detections(img_id, {"boxes": boxes, "scores": torch.ones(len(anns)),
                                                   "labels": torch.tensor([a["category_id"] for a in anns])})
    stats, per_class = coco_stats(coco, dets)
    assert stats[0] == pytest.approx(1.0) and stats[1] == pytest.approx(1.0)
    assert per_class == {1: pytest.approx(1.0), 2: pytest.approx(1.0)}


def test_agrees_with_pycocotools_directly(tmp_path):
    """A shifted box, a wrong class and a miss: identical 12 numbers to a direct COCOeval."""
    coco = make_coco(tmp_path)
    raw = [{"image_id": 1, "category_id": 1, "bbox": [12, 11, 30, 20], "score": 0.9},
           {"image_id": 1, "category_id": 1, "bbox": [50, 30, 40, 40], "score": 0.8},
           {"image_id": 2, "category_id": 2, "bbox": [5, 5, 20, 30], "score": 0.7}]
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco, coco.loadRes(raw), "bbox")
        ev.evaluate(); ev.accumulate(); ev.summarize()
    dets = {1: [], 2: []}
    for r in raw:
        dets[r["image_id"]].append(r)
    stats, _ = coco_stats(coco, dets)
    assert stats == pytest.approx(list(ev.stats))


def test_no_detections_is_zero_not_a_crash(tmp_path):
    stats, per_class = coco_stats(make_coco(tmp_path), {1: [], 2: []})
    assert stats == [0.0] * 12 and set(per_class) == {1, 2}


def test_evaluate_runs_the_model_and_postprocess(tmp_path):
    """A fake model that outputs the ground truth boxes gives AP 1 through evaluate()."""
    from minidetr.detr import PostProcess
    coco = make_coco(tmp_path)

    class Oracle(torch.nn.Module):
        def forward(self, images, mask):
            logits = torch.full((1, 2, 3), -10.0)
            logits[0, 0, 1] = logits[0, 1, 2] = 10.0         # focal: classes 1 and 2
            boxes = torch.tensor([[[25 / 100, 20 / 80, 30 / 100, 20 / 80], [70 / 100, 50 / 80, 40 / 100, 40 / 80]]])
            return {"pred_logits": logits, "pred_boxes": boxes}

    target = {"image_id": 1, "orig_size": torch.tensor([80, 100])}
    loader = [(torch.zeros(1, 3, 8, 10), torch.zeros(1, 8, 10, dtype=torch.bool), [target])]
    coco.dataset["images"] = coco.dataset["images"][:1]
    result = evaluate(Oracle(), None, PostProcess(focal=True, num_select=2), loader, coco, "cpu", progress=False)
    assert result["stats"][0] == pytest.approx(1.0)
    assert result["detections"] == 2
