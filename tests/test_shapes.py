"""Tests for minidetr/shapes.py, the synthetic shapes generator: valid COCO json,
boxes matching the drawn pixels, determinism, idempotent and interrupt-safe writing,
and items read back through CocoDetection agreeing with the json.
"""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from minidetr import shapes as shapes_module  # not `shapes`: that is the fixture below
from minidetr.check import load_dataset
from minidetr.data import collate_fn
from minidetr.shapes import make_shapes_dataset


SMALL = dict(num_train=12, num_val=4, seed=0, image_size=64, min_size=6)


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    return make_shapes_dataset(str(tmp_path_factory.mktemp('shapes') / 'ds'), **SMALL)


def test_shapes_json_loads_in_pycocotools(shapes):
    """COCO(path) indexes the json; every box lies inside its image, ids 1..K named."""
    from pycocotools.coco import COCO
    coco = COCO(shapes['train_json'])
    assert len(coco.getImgIds()) == 12 and len(coco.getAnnIds()) > 12
    assert [c['name'] for c in coco.loadCats(coco.getCatIds())] == list(shapes_module.SHAPE_NAMES)
    assert shapes['num_classes'] == 7
    for ann in coco.loadAnns(coco.getAnnIds()):
        img = coco.imgs[ann['image_id']]
        x, y, w, h = ann['bbox']
        assert x >= 0 and y >= 0 and w > 0 and h > 0
        assert x + w <= img['width'] and y + h <= img['height']
        assert ann['area'] == w * h and ann['iscrowd'] == 0
    assert all(os.path.isfile(os.path.join(shapes['train_images'], i['file_name']))
               for i in coco.imgs.values())


def test_shapes_boxes_are_tight_boxes_of_the_drawn_pixels(tmp_path):
    """One object, no clutter: a plane fitted to the pixels outside the box explains
    them exactly (no shape pixel outside), and each box edge touches the shape."""
    paths = make_shapes_dataset(str(tmp_path / 'one'), num_train=16, num_val=1, image_size=64,
                                min_objects=1, max_objects=1, empty_frac=0.0, clutter=0.0)
    coco = json.load(open(paths['train_json']))
    assert len(coco['annotations']) == 16
    yy, xx = np.mgrid[0:64, 0:64]
    design = np.stack([np.ones(64 * 64), xx.ravel(), yy.ravel()], 1)
    for ann in coco['annotations']:
        path = os.path.join(paths['train_images'], f"{ann['image_id']:06d}.png")
        pixels = np.asarray(Image.open(path), dtype=np.float64).reshape(-1, 3)
        x, y, w, h = ann['bbox']
        inside = ((xx >= x) & (xx < x + w) & (yy >= y) & (yy < y + h)).ravel()
        coef, *_ = np.linalg.lstsq(design[~inside], pixels[~inside], rcond=None)
        residual = np.abs(pixels - design @ coef).max(1).reshape(64, 64)
        assert residual[~inside.reshape(64, 64)].max() <= 1.0  # only gradient + rounding
        shape = residual > 12
        assert shape[y, x:x + w].any() and shape[y + h - 1, x:x + w].any()
        assert shape[y:y + h, x].any() and shape[y:y + h, x + w - 1].any()


def test_occlusion_rule_hand_example():
    """A newcomer may hide at most 70% of an earlier object (min_visible 0.3)."""
    owner = np.full((4, 5), -1)
    owner[1:3, :] = 0                          # object 0: 10 pixels, rows 1-2
    hides_8 = np.zeros((4, 5), dtype=bool)
    hides_8[1:3, :4] = True                    # covers 8 of them: 2/10 visible
    hides_6 = np.zeros((4, 5), dtype=bool)
    hides_6[1:3, :3] = True                    # covers 6: 4/10 visible
    assert not shapes_module._keeps_visible(owner, [10], hides_8, 0.3)
    assert shapes_module._keeps_visible(owner, [10], hides_6, 0.3)
    assert shapes_module._keeps_visible(np.full((4, 5), -1), [], hides_8, 0.3)


def _all_bytes(root):
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = open(path, 'rb').read()
    return out


def test_shapes_same_seed_is_byte_identical(shapes, tmp_path):
    """Regenerating elsewhere with the same seed gives the same bytes; seed 1 differs."""
    again = make_shapes_dataset(str(tmp_path / 'again'), **SMALL)
    other = make_shapes_dataset(str(tmp_path / 'other'), **{**SMALL, 'seed': 1})
    reference = _all_bytes(shapes['root'])
    assert len(reference) == 12 + 4 + 3
    assert _all_bytes(again['root']) == reference
    differing = _all_bytes(other['root'])
    assert differing.keys() == reference.keys()
    assert differing['train/000001.png'] != reference['train/000001.png']


def test_shapes_idempotent_regenerates_and_refuses_foreign_folder(tmp_path):
    """Same parameters: nothing rewritten; new parameters: regenerated; a folder
    that is not ours is never overwritten."""
    root = str(tmp_path / 'ds')
    paths = make_shapes_dataset(root, num_train=3, num_val=1, image_size=32, min_size=8)
    stamp = os.stat(paths['train_json']).st_mtime_ns
    make_shapes_dataset(root, num_train=3, num_val=1, image_size=32, min_size=8)
    assert os.stat(paths['train_json']).st_mtime_ns == stamp
    make_shapes_dataset(root, num_train=5, num_val=1, image_size=32, min_size=8)
    assert len(json.load(open(paths['train_json']))['images']) == 5
    foreign = tmp_path / 'home'
    foreign.mkdir()
    (foreign / 'notes.txt').write_text('mine')
    with pytest.raises(FileExistsError, match='home'):
        make_shapes_dataset(str(foreign), num_train=1, num_val=1, image_size=32, min_size=8)
    assert (foreign / 'notes.txt').read_text() == 'mine'


def test_shapes_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    """A failure mid-way leaves neither the dataset folder nor a partial folder."""
    calls = []

    def failing_render(rng, p):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_render(rng, p)
    real_render = shapes_module._render
    monkeypatch.setattr(shapes_module, '_render', failing_render)
    with pytest.raises(KeyboardInterrupt):
        make_shapes_dataset(str(tmp_path / 'ds'), num_train=5, num_val=1, image_size=32, min_size=8)
    assert os.listdir(tmp_path) == []


def test_shapes_rejects_objects_larger_than_the_image_allows(tmp_path):
    """The default min_size (24 px) cannot fit 0.6 * 32 px: a clear error, no folder."""
    with pytest.raises(ValueError, match='min_size 24 px .* 19.2 px'):
        make_shapes_dataset(str(tmp_path / 'ds'), num_train=1, num_val=1, image_size=32)
    assert os.listdir(tmp_path) == []


def test_dataset_items_agree_with_json(shapes):
    """Items (boxes back in pixels, labels, sizes) equal the json; batching works."""
    coco = json.load(open(shapes['train_json']))
    dataset = load_dataset(shapes['train_images'], shapes['train_json'])
    assert len(dataset) == 12 and dataset.num_classes_needed == 7
    assert dataset.category_names[1] == 'circle'
    for image, target in (dataset[i] for i in range(len(dataset))):
        anns = [a for a in coco['annotations'] if a['image_id'] == target['image_id']]
        expected = torch.tensor([[x + w / 2, y + h / 2, w, h] for x, y, w, h in
                                 (a['bbox'] for a in anns)]).reshape(-1, 4) / 64
        assert image.shape == (3, 64, 64)
        assert torch.allclose(target['boxes'], expected)
        assert target['labels'].tolist() == [a['category_id'] for a in anns]
        assert target['labels'].dtype == torch.int64
        assert target['orig_size'].tolist() == target['size'].tolist() == [64, 64]
    images, mask, targets = collate_fn([dataset[0], dataset[1]])
    assert images.shape == (2, 3, 64, 64) and not mask.any() and len(targets) == 2


def test_one_place_for_the_builtin_dataset(tmp_path, monkeypatch):
    """make_shapes_dataset() without a root (the benchmarks) and train.py's datasets use one
    folder: a second caller finds the first's files instead of refusing or regenerating them."""
    from minidetr.config import Config
    from minidetr.check import build_datasets
    monkeypatch.setenv('MINIDETR_DATA', str(tmp_path))
    paths = make_shapes_dataset(num_train=3, num_val=2)
    assert paths['root'] == str(tmp_path / 'n3_v2')
    before = os.stat(os.path.join(paths['root'], 'manifest.json')).st_mtime_ns
    train_set, _ = build_datasets(Config.for_variant('dn', 'tiny', shapes_train=3, shapes_val=2))
    assert train_set.ann_file == paths['train_json']
    assert os.stat(os.path.join(paths['root'], 'manifest.json')).st_mtime_ns == before   # not rewritten
