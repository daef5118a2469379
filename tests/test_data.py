"""Tests for minidetr/data.py: transforms against hand-worked boxes, padding masks and
CocoDetection on broken inputs, whose errors must name the file and the id. The shapes
generator's tests are in test_shapes.py.
"""
import io
import json
import os
import pickle
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from minidetr.check import build_dataset, load_dataset
from minidetr.data import (Compose, Normalize, RandomHorizontalFlip, RandomResize, RandomSizeCrop,
                           ToTensor, collate_fn, crop, make_transforms, nested_pad, resized_hw)


def _target(boxes, labels=None):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    t = len(boxes)
    return {'boxes': boxes, 'area': (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
            'labels': torch.tensor(labels if labels is not None else list(range(1, t + 1))),
            'iscrowd': torch.zeros(t, dtype=torch.int64), 'image_id': 7,
            'size': torch.tensor([0, 0])}


def _noise_image(w, h, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


# ---- transforms ----

def test_flip_hand_example_and_twice_is_identity():
    """Box [10,20,30,40] in a 100-wide image flips to [70,20,90,40]; two flips undo."""
    image, target = _noise_image(100, 60), _target([[10, 20, 30, 40], [0, 0, 100, 60]])
    flip = RandomHorizontalFlip(p=1.0)
    once_image, once = flip(image, target)
    assert once['boxes'].tolist() == [[70, 20, 90, 40], [0, 0, 100, 60]]
    assert np.array_equal(np.asarray(once_image), np.asarray(image)[:, ::-1])
    twice_image, twice = flip(once_image, once)
    assert np.array_equal(np.asarray(twice_image), np.asarray(image))
    assert torch.equal(twice['boxes'], target['boxes'])
    assert RandomHorizontalFlip(p=0.0)(image, target)[1] is target


def test_crop_clips_boxes_and_drops_empty_ones():
    """Crop (top 20, left 30, 40x40): boxes shift, clip to the crop, empty ones go."""
    image = _noise_image(100, 80)
    target = _target([[10, 10, 50, 50], [0, 0, 20, 15], [60, 30, 90, 70]], labels=[4, 5, 6])
    out_image, out = crop(image, target, top=20, left=30, height=40, width=40)
    # [10,10,50,50] - [30,20,30,20] = [-20,-10,20,30] -> clip -> [0,0,20,30]
    # [0,0,20,15] lies left of x=30: zero width after clipping -> dropped
    # [60,30,90,70] -> [30,10,60,50] -> clip to 40 -> [30,10,40,40]
    assert out['boxes'].tolist() == [[0, 0, 20, 30], [30, 10, 40, 40]]
    assert out['labels'].tolist() == [4, 6]
    assert out['area'].tolist() == [600, 300]
    assert out['iscrowd'].tolist() == [0, 0] and out['size'].tolist() == [40, 40]
    assert np.array_equal(np.asarray(out_image), np.asarray(image)[20:60, 30:70])


def test_resize_rule_and_box_scaling():
    """DETR's size rule by hand, and boxes/areas scale by exactly the size ratio."""
    assert resized_hw(640, 480, 800, 1333) == (800, 1066)   # w/h * 800 = 1066.67, truncated
    assert resized_hw(300, 100, 60, 150) == (50, 150)       # capped: round(150*100/300) = 50
    assert resized_hw(480, 640, 800, 1333) == (1066, 800)   # portrait: the same, transposed
    assert resized_hw(100, 100, 100, None) == (100, 100)
    image, target = _noise_image(200, 100), _target([[20, 10, 60, 30]])
    out_image, out = RandomResize([50])(image, target)
    assert out_image.size == (100, 50) and out['size'].tolist() == [50, 100]
    assert out['boxes'].tolist() == [[10, 5, 30, 15]] and out['area'].tolist() == [200]


def test_normalize_gives_cxcywh_over_size():
    """Box [10,20,30,40] in a 100x50 image -> (0.2, 0.6, 0.2, 0.4); pixels standardised."""
    image = torch.zeros(3, 50, 100)
    image[0] = 0.485
    out_image, out = Normalize()(image, _target([[10, 20, 30, 40]]))
    assert torch.allclose(out['boxes'], torch.tensor([[0.2, 0.6, 0.2, 0.4]]))
    assert torch.allclose(out_image[0], torch.zeros(50, 100), atol=1e-6)
    assert torch.allclose(out_image[1], torch.full((50, 100), -0.456 / 0.224))
    empty = Normalize()(image, _target([]))[1]['boxes']
    assert empty.shape == (0, 4)


def test_to_tensor_layout():
    """Pixel (y=1, x=2) channel c lands at [c, 1, 2], scaled to [0, 1]."""
    pixels = np.zeros((3, 4, 3), dtype=np.uint8)
    pixels[1, 2] = (255, 51, 0)
    tensor, _ = ToTensor()(Image.fromarray(pixels), {})
    assert tensor.shape == (3, 3, 4)
    assert torch.allclose(tensor[:, 1, 2], torch.tensor([1.0, 0.2, 0.0]))
    assert tensor.sum().item() == pytest.approx(1.2)


def test_transforms_are_seeded_and_keep_boxes_valid():
    """Same torch seed -> same crop; training output boxes stay inside [0, 1]."""
    image, target = _noise_image(120, 90), _target([[5, 5, 60, 80], [70, 10, 118, 50]])
    paper = make_transforms('train', 'paper')
    cropper = Compose([RandomSizeCrop(30, 80)])
    torch.manual_seed(3)
    first = cropper(image, target)
    torch.manual_seed(3)
    second = cropper(image, target)
    assert np.array_equal(np.asarray(first[0]), np.asarray(second[0]))
    assert torch.equal(first[1]['boxes'], second[1]['boxes'])
    for seed in range(5):
        torch.manual_seed(seed)
        out_image, out = paper(image, target)
        assert out['size'].tolist() == list(out_image.shape[1:])
        assert min(out_image.shape[1:]) in range(384, 801) or max(out_image.shape[1:]) == 1333
        assert ((out['boxes'] >= 0) & (out['boxes'] <= 1)).all()


def test_make_transforms_sizes():
    """tiny train: shorter side in {112,120,128}; tiny val 128; paper val 800."""
    image, target = _noise_image(160, 120), _target([[0, 0, 10, 10]])
    sizes = set()
    for seed in range(20):
        torch.manual_seed(seed)
        sizes.add(make_transforms('train', 'tiny', 128)(image, target)[0].shape[1])
    assert sizes <= {112, 120, 128} and len(sizes) > 1
    assert make_transforms('val', 'tiny', 128)(image, target)[0].shape[1:] == (128, 170)
    assert make_transforms('val', 'paper')(image, target)[0].shape[1:] == (800, 1066)
    with pytest.raises(ValueError):
        make_transforms('test', 'tiny')


# ---- batching ----

def test_collate_pads_bottom_right_and_masks_padding():
    """Images 2x3 and 4x2 -> [2,3,4,3]; mask True exactly where nothing was copied."""
    a, b = torch.full((3, 2, 3), 1.0), torch.full((3, 4, 2), 2.0)
    images, mask, targets = collate_fn([(a, {'id': 0}), (b, {'id': 1})])
    assert images.shape == (2, 3, 4, 3) and mask.shape == (2, 4, 3) and mask.dtype == torch.bool
    expected_mask = torch.tensor([[[0, 0, 0], [0, 0, 0], [1, 1, 1], [1, 1, 1]],
                                  [[0, 0, 1], [0, 0, 1], [0, 0, 1], [0, 0, 1]]], dtype=torch.bool)
    assert torch.equal(mask, expected_mask)
    fill = torch.tensor([1.0, 2.0])[:, None, None]  # each image's constant value
    assert torch.equal(images[:, 0], torch.where(expected_mask, 0.0, fill))
    assert [t['id'] for t in targets] == [0, 1]
    assert torch.equal(nested_pad([a])[0][0], a)


class _NoTorchUnpickler(pickle.Unpickler):
    """Refuses every torch global: the one way a tensor could ride along (torch's reducers)."""
    def find_class(self, module, name):
        if module.split('.')[0] == 'torch':
            raise pickle.UnpicklingError(f'a torch object travels: {module}.{name}')
        return super().find_class(module, name)


def test_targets_cross_processes_as_arrays_and_arrive_as_equal_tensors():
    """A worker's batch is pickled with ForkingPickler, which would put every tensor in a
    shared-memory file of its own; the targets must travel as plain arrays and come back
    equal: same keys, dtypes and values, non-tensors untouched, a bf16 tensor kept."""
    from multiprocessing.reduction import ForkingPickler
    targets = [_target([[1, 2, 5, 6], [0, 0, 3, 3]]), _target([])]
    targets[0]['orig_size'] = torch.tensor([30, 40])
    _, _, batch = collate_fn([(torch.zeros(3, 4, 4), targets[0]), (torch.zeros(3, 2, 2), targets[1])])
    data = bytes(ForkingPickler.dumps(batch))
    _NoTorchUnpickler(io.BytesIO(data)).load()      # raises if any tensor was pickled as one
    arrived = pickle.loads(data)
    assert isinstance(arrived, list) and len(arrived) == 2
    for sent, got in zip(targets, arrived):
        assert got.keys() == sent.keys() and got['image_id'] == 7
        for key, value in sent.items():
            if torch.is_tensor(value):
                assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
    weights = torch.tensor([0.5, 2.0], dtype=torch.bfloat16)            # numpy has no bf16
    _, _, batch = collate_fn([(torch.zeros(3, 2, 2), {'w': weights})])
    assert torch.equal(pickle.loads(bytes(ForkingPickler.dumps(batch)))[0]['w'], weights)


def test_loader_workers_deliver_the_datasets_own_targets(tmp_path):
    """Through a DataLoader with 2 worker processes, each target equals dataset[i]'s."""
    images = [{'id': i, 'file_name': f'{i}.png', 'width': 40, 'height': 30} for i in (1, 2, 3)]
    folder, ann_file = _write_coco(tmp_path, [_ann(1, [1, 1, 5, 5], area=25, iscrowd=0),
                                    _ann(2, [2, 3, 9, 9], category_id=3, image_id=3, area=81, iscrowd=0)],
                                   images=images)
    dataset = load_dataset(folder, ann_file)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=collate_fn, num_workers=2)
    (_, _, targets), = list(loader)
    for i, got in enumerate(targets):
        expected = dataset[i][1]
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(got[key], value) if torch.is_tensor(value) else got[key] == value


# ---- CocoDetection on broken inputs ----

def _write_coco(folder, annotations, images=None, categories=None, modes=None):
    """A tiny COCO dataset: 40x30 images 1.png, 2.png, ... ; returns (images, json)."""
    os.makedirs(folder / 'img', exist_ok=True)
    images = images or [{'id': 1, 'file_name': '1.png', 'width': 40, 'height': 30}]
    for info in images:
        mode = (modes or {}).get(info['id'], 'RGB')
        image = Image.new(mode, (info['width'], info['height']), 128)
        image.save(folder / 'img' / info['file_name'])
    categories = categories or [{'id': 1, 'name': 'a'}, {'id': 3, 'name': 'b'}]
    ann_file = folder / 'ann.json'
    ann_file.write_text(json.dumps({'images': images, 'annotations': annotations,
                                    'categories': categories}))
    return str(folder / 'img'), str(ann_file)


def _ann(ann_id, bbox, category_id=1, image_id=1, **extra):
    return {'id': ann_id, 'image_id': image_id, 'category_id': category_id, 'bbox': bbox, **extra}


def test_missing_image_file_names_file_and_id(tmp_path):
    folder, ann_file = _write_coco(tmp_path, [_ann(1, [1, 1, 5, 5])])
    os.remove(os.path.join(folder, '1.png'))
    with pytest.raises(FileNotFoundError, match=r'image id 1.*1\.png'):
        load_dataset(folder, ann_file)[0]


def test_truncated_image_names_file_and_id(tmp_path):
    folder, ann_file = _write_coco(tmp_path, [_ann(1, [1, 1, 5, 5])])
    path = os.path.join(folder, '1.png')
    _noise_image(40, 30).save(path)
    blob = open(path, 'rb').read()
    open(path, 'wb').write(blob[:len(blob) // 2])
    with pytest.raises(OSError, match=r'image id 1.*1\.png'):
        load_dataset(folder, ann_file)[0]


def test_malformed_or_incomplete_json_names_file(tmp_path):
    folder, ann_file = _write_coco(tmp_path, [])
    text = open(ann_file).read()
    open(ann_file, 'w').write(text[:-10])
    with pytest.raises(ValueError, match='ann.json.*malformed'):
        load_dataset(folder, ann_file)
    open(ann_file, 'w').write(json.dumps({'images': [], 'annotations': []}))
    with pytest.raises(ValueError, match="ann.json.*'categories'"):
        load_dataset(folder, ann_file)
    open(ann_file, 'wb').write(b'\xff\xfe\x00binary')
    with pytest.raises(ValueError, match='ann.json'):
        load_dataset(folder, ann_file)


def test_image_size_disagreeing_with_json_names_file_and_id(tmp_path):
    folder, ann_file = _write_coco(tmp_path, [_ann(1, [1, 1, 5, 5])])
    Image.new('RGB', (41, 30)).save(os.path.join(folder, '1.png'))
    with pytest.raises(ValueError, match=r'image id 1.*1\.png'):
        load_dataset(folder, ann_file)[0]


def test_unknown_category_names_annotation_and_category(tmp_path):
    folder, ann_file = _write_coco(tmp_path, [_ann(1, [1, 1, 5, 5]), _ann(17, [1, 1, 5, 5], 2)])
    with pytest.raises(ValueError, match='annotation id 17.*category_id 2'):
        load_dataset(folder, ann_file)


def test_bad_boxes_dropped_or_clipped_with_one_warning(tmp_path):
    """w<=0, iscrowd and wholly-outside boxes dropped, a partly-outside one clipped,
    all reported by a single warning at construction, none at item time."""
    anns = [_ann(1, [2, 3, 10, 6]),                     # kept as is
            _ann(2, [5, 5, 0, 4]), _ann(3, [5, 5, 4, -1]),  # w or h <= 0
            _ann(4, [1, 1, 5, 5], iscrowd=1),
            _ann(5, [50, 5, 5, 5]),                     # right of the 40-wide image
            _ann(6, [30, 20, 20, 20], 3)]               # clipped to [30,20,40,30]
    folder, ann_file = _write_coco(tmp_path, anns)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        dataset = load_dataset(folder, ann_file)
        _, target = dataset[0]
    assert len(caught) == 1
    message = str(caught[0].message)
    assert 'ann.json' in message and '2 w or h <= 0' in message and '1 iscrowd' in message
    assert '1 wholly outside' in message and '1 clipped' in message
    boxes_px = target['boxes'] * torch.tensor([40, 30, 40, 30])
    assert torch.allclose(boxes_px, torch.tensor([[7.0, 6, 10, 6], [35, 25, 10, 10]]))  # cxcywh
    assert target['labels'].tolist() == [1, 3] and target['iscrowd'].tolist() == [0, 0]
    assert dataset.num_classes_needed == 4


def test_image_without_annotations_gives_empty_target(tmp_path):
    images = [{'id': 1, 'file_name': '1.png', 'width': 40, 'height': 30},
              {'id': 9, 'file_name': '9.png', 'width': 20, 'height': 10}]
    folder, ann_file = _write_coco(tmp_path, [_ann(1, [1, 1, 5, 5])], images=images)
    image, target = load_dataset(folder, ann_file)[1]
    assert target['image_id'] == 9 and image.shape == (3, 10, 20)
    assert target['boxes'].shape == (0, 4) and target['labels'].shape == (0,)
    assert target['labels'].dtype == torch.int64
    batch = collate_fn([load_dataset(folder, ann_file)[i] for i in range(2)])
    assert batch[0].shape == (2, 3, 30, 40) and batch[1][1, 10:, :].all()


@pytest.mark.parametrize('mode', ['L', 'RGBA', 'P', 'LA'])
def test_non_rgb_images_become_three_channels(tmp_path, mode):
    """Grey 128 in any mode -> 3 equal channels of 128/255 before normalisation."""
    folder, ann_file = _write_coco(tmp_path, [_ann(1, [1, 1, 5, 5])], modes={1: mode})
    dataset = load_dataset(folder, ann_file, transforms=lambda image, target: (image, target))
    image, _ = dataset[0]
    assert image.mode == 'RGB' and image.size == (40, 30)
    if mode in ('L', 'LA'):
        assert (np.asarray(image) == 128).all()


def test_build_dataset_coco_layout(tmp_path):
    """Missing official-layout pieces are named; a complete layout loads."""
    with pytest.raises(FileNotFoundError, match='val2017'):
        os.makedirs(tmp_path / 'coco' / 'annotations')
        build_dataset('val', coco_path=str(tmp_path / 'coco'))
    folder, ann_file = _write_coco(tmp_path, [_ann(1, [1, 1, 5, 5])])
    os.rename(folder, tmp_path / 'coco' / 'val2017')
    os.rename(ann_file, tmp_path / 'coco' / 'annotations' / 'instances_val2017.json')
    dataset = build_dataset('val', coco_path=str(tmp_path / 'coco'), image_size=60)
    assert dataset[0][0].shape == (3, 60, 80)
    with pytest.raises(ValueError, match='together'):
        build_dataset('val', json_file=ann_file)
    with pytest.raises(ValueError, match='together'):
        build_dataset('train')


def test_16_bit_grey_images_keep_their_contrast(tmp_path):
    """A 16-bit grey PNG maps 0..65535 onto 0..255 (PIL's own convert('RGB') clips at 255 and
    whitened 99.6% of this ramp); float pixels, which have no range, are an error naming the
    image; 8-bit grey is untouched."""
    from minidetr.data import open_rgb
    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    rgb = np.asarray(open_rgb(str(tmp_path / "g16.png"), "image id 1"))
    expected = np.floor(ramp / 257.0 + 0.5)         # nearest 8-bit level, by hand
    assert rgb.shape == (64, 64, 3) and all(np.array_equal(rgb[..., c], expected) for c in range(3))
    Image.fromarray(np.full((8, 8), 3.5, np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(OSError, match="image id 2: cannot read .*f.tif: F pixels .* no fixed range"):
        open_rgb(str(tmp_path / "f.tif"), "image id 2")
    grey = (np.arange(64).reshape(8, 8) * 4).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "g8.png")
    assert np.array_equal(np.asarray(open_rgb(str(tmp_path / "g8.png"), "x"))[..., 1], grey)
