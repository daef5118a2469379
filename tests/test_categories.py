"""categories: which class-head row each category id gets, and back, end to end.

The rule is checked on hand-made id sets (COCO's 80 ids keep their 91 rows; 987654321 does
not get a billion), and a dataset with ids 987654321 and 3 trains 2 steps, evaluates, and its
detections carry the dataset's own ids, not the rows.
"""
import json
import os
import sys

import pytest
import torch
from PIL import Image

from minidetr import evaluation
from minidetr.categories import COCO_NAMES, Categories, for_checkpoint, name_key

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import train  # noqa: E402


def test_coco_ids_are_their_own_rows():
    """COCO: 80 ids up to 90 -> 91 rows, each id its own row (DETR's convention)."""
    cats = Categories.coco()
    assert len(COCO_NAMES) == 80 and cats.num_classes == 91 and not cats.remapped
    assert all(cats.label_of[i] == i and cats.id_of[i] == i for i in COCO_NAMES)
    assert cats.name_of_label(18) == "dog" and cats.name_of_label(12) == "12"   # 12: no category


@pytest.mark.parametrize("ids,rows", [([3, 987654321], {3: 0, 987654321: 1}),
                                      ([0, 5, 100], {0: 0, 5: 1, 100: 2}),        # 101 > 2*3 + 10
                                      ([1, 2, 15], {1: 1, 2: 2, 15: 15})])        # 16 <= 16: ids kept
def test_sparse_ids_get_rows_in_id_order(ids, rows):
    """Ids get rows 0..n-1 in increasing order once largest + 1 > 2n + 10, and map back."""
    cats = Categories.from_datasets([{"id": i, "name": f"c{i}"} for i in reversed(ids)])
    assert cats.label_of == rows and cats.num_classes == max(rows.values()) + 1
    assert {cats.id_of[r]: r for r in rows.values()} == rows


def test_table_survives_a_checkpoint_round_trip(tmp_path):
    """to_list holds only plain values; torch.load(weights_only=True) gives the same table back."""
    cats = Categories({987654321: "dog", 3: "cat"})
    torch.save({"categories": cats.to_list(), "config": {}}, tmp_path / "c.pth")
    back = for_checkpoint(torch.load(tmp_path / "c.pth", weights_only=True))
    assert back.label_of == cats.label_of and back.names == cats.names


def test_names_match_without_case_or_spacing():
    assert name_key("  Traffic   Light ") == name_key("traffic light") != name_key("trafficlight")


def write_sparse(folder):
    """Four 64x48 images, each with a box of id 987654321 and one of id 3."""
    (folder / "img").mkdir(parents=True)
    images = [{"id": i, "file_name": f"{i}.png", "width": 64, "height": 48} for i in (1, 2, 3, 4)]
    for info in images:
        Image.new("RGB", (64, 48), (30 * info["id"], 90, 160)).save(folder / "img" / info["file_name"])
    anns = [{"id": 2 * i + k, "image_id": i, "category_id": cat, "bbox": [4 + 20 * k, 6, 18, 20]}
            for i in (1, 2, 3, 4) for k, cat in enumerate((987654321, 3))]
    (folder / "ann.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": [
        {"id": 987654321, "name": "dog"}, {"id": 3, "name": "cat"}]}))
    return str(folder / "ann.json"), str(folder / "img")


def test_sparse_ids_train_evaluate_and_come_back(tmp_path, monkeypatch):
    """ids 987654321 and 3: a 2-row head, 2 steps, and every detection scored under a real id."""
    json_file, folder = write_sparse(tmp_path / "data")
    scored = []
    real = evaluation.coco_stats

    def spy(coco_gt, detections, verbose=False):
        scored.extend(d["category_id"] for dets in detections.values() for d in dets)
        return real(coco_gt, detections, verbose)

    monkeypatch.setattr(evaluation, "coco_stats", spy)
    out = tmp_path / "out"
    train.main(["--variant", "dn", "--preset", "tiny", "--train_json", json_file, "--train_images", folder,
                "--val_json", json_file, "--val_images", folder, "--max_steps", "2", "--batch_size", "2",
                "--num_workers", "0", "--image_size", "64", "--hidden_dim", "32", "--nheads", "4",
                "--num_queries", "8", "--num_select", "16", "--output_dir", str(out)])   # all 8 x 2 pairs
    saved = torch.load(out / "checkpoint.pth", weights_only=True)
    assert saved["config"]["num_classes"] == 2 and saved["model"]["class_embed.weight"].shape[0] == 2
    assert {c["id"]: c["label"] for c in saved["categories"]} == {3: 0, 987654321: 1}
    assert scored and set(scored) == {3, 987654321}
    last = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert set(last["test_ap_per_category"]) == {"3", "987654321"}
