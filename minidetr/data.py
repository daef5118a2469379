"""Data: COCO-format detection datasets, DETR's augmentation, batching with padding
masks, and the built-in synthetic shapes dataset.

Everything here follows the data pipeline of DETR (Carion et al., "End-to-End Object
Detection with Transformers", ECCV 2020, arXiv:2005.12872), written with PIL + torch
only (no torchvision). A sample travels as (image, target); boxes stay consistent with
the image through every transform:

  json bbox (x, y, w, h) pixels -> xyxy pixels, clipped to the image    (CocoDetection)
  flip:    x1' = W - x2, x2' = W - x1
  resize:  x' = x * W'/W, y' = y * H'/H, shorter side -> s, longer side <= max_size
  crop:    x' = clamp(x - left, 0, w_crop), boxes left empty are dropped
  Normalize: (cx, cy, w, h) = ((x1+x2)/2 / W, (y1+y2)/2 / H, (x2-x1) / W, (y2-y1) / H),
           W, H the unpadded image size, so the model's sigmoid boxes live in [0, 1].

collate_fn pads a batch bottom/right to its largest image and returns a mask, True on
padding, which the backbone downsamples and attention uses to ignore padded tokens.

The shapes dataset (make_shapes_dataset) is written to disk as real COCO json + PNG
files, so the same loader and pycocotools evaluation run on it as on COCO itself.
"""
import contextlib
import io
import json
import math
import os
import shutil
import tempfile
import warnings

import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageDraw

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DETR's Normalize statistics (ImageNet RGB)
IMAGENET_STD = (0.229, 0.224, 0.225)
PER_OBJECT = ('boxes', 'labels', 'area', 'iscrowd')  # target fields indexed by object


# ---- transforms: (PIL image, target) -> (image, target), boxes xyxy pixels ----
# Randomness comes from torch's global generator, so torch.manual_seed makes a run
# repeatable and DataLoader workers (seeded per worker by torch) draw different crops.

def _rand():
    return torch.rand(()).item()


def _choice(seq):
    return seq[torch.randint(len(seq), ()).item()]


def _select(target, keep):
    """Keep the objects where `keep` [T] bool is True, in every per-object field."""
    return {k: (v[keep] if k in PER_OBJECT else v) for k, v in target.items()}


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image, target):
        for transform in self.transforms:
            image, target = transform(image, target)
        return image, target


class RandomSelect:
    """Apply `first` with probability p, else `second` (DETR: resize vs resize+crop)."""

    def __init__(self, first, second, p=0.5):
        self.first, self.second, self.p = first, second, p

    def __call__(self, image, target):
        return self.first(image, target) if _rand() < self.p else self.second(image, target)


class RandomHorizontalFlip:
    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, image, target):
        if _rand() >= self.p:
            return image, target
        target = dict(target)
        x1, y1, x2, y2 = target['boxes'].unbind(-1)
        # mirror x about the image width; x1/x2 swap roles so x1 <= x2 still holds
        target['boxes'] = torch.stack([image.width - x2, y1, image.width - x1, y2], -1)
        return image.transpose(Image.FLIP_LEFT_RIGHT), target


def resized_hw(w, h, size, max_size=None):
    """DETR's output (h, w) for shorter side -> size, longer side capped at max_size.

    Truncation (int) on the longer side and round on the capped size, exactly as DETR,
    so image sizes (and hence feature maps) match the reference for the same input.
    """
    if max_size is not None and max(w, h) / min(w, h) * size > max_size:
        size = int(round(max_size * min(w, h) / max(w, h)))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


class RandomResize:
    """Resize the shorter side to a random choice of `sizes` (longer <= max_size)."""

    def __init__(self, sizes, max_size=None):
        self.sizes, self.max_size = list(sizes), max_size

    def __call__(self, image, target):
        h, w = resized_hw(image.width, image.height, _choice(self.sizes), self.max_size)
        if (h, w) == (image.height, image.width):
            return image, target
        ratio_x, ratio_y = w / image.width, h / image.height
        target = dict(target)
        target['boxes'] = target['boxes'] * torch.tensor([ratio_x, ratio_y, ratio_x, ratio_y])
        if 'area' in target:
            target['area'] = target['area'] * (ratio_x * ratio_y)
        target['size'] = torch.tensor([h, w])
        return image.resize((w, h), Image.BILINEAR), target


def crop(image, target, top, left, height, width):
    """Cut a region; boxes shift and clip to it, those left with no area are dropped."""
    target = dict(target)
    boxes = target['boxes'] - torch.tensor([left, top, left, top], dtype=torch.float32)
    boxes = torch.min(boxes, torch.tensor([width, height, width, height], dtype=torch.float32))
    boxes = boxes.clamp(min=0)
    target['boxes'] = boxes
    target['area'] = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])  # as DETR
    target['size'] = torch.tensor([height, width])
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return image.crop((left, top, left + width, top + height)), _select(target, keep)


class RandomSizeCrop:
    """Crop a random region with sides in [min_size, min(image side, max_size)]."""

    def __init__(self, min_size, max_size):
        self.min_size, self.max_size = min_size, max_size

    def _side(self, image_side):
        high = min(image_side, self.max_size)
        low = min(self.min_size, high)  # an image smaller than min_size is kept whole
        return torch.randint(low, high + 1, ()).item()

    def __call__(self, image, target):
        width, height = self._side(image.width), self._side(image.height)
        top = torch.randint(image.height - height + 1, ()).item()
        left = torch.randint(image.width - width + 1, ()).item()
        return crop(image, target, top, left, height, width)


class ToTensor:
    """PIL RGB -> float [3, H, W] in [0, 1]."""

    def __call__(self, image, target):
        pixels = torch.from_numpy(np.asarray(image.convert('RGB'), dtype=np.float32) / 255.0)
        return rearrange(pixels, 'y x c -> c y x').contiguous(), target


class Normalize:
    """Standardise pixels; boxes xyxy pixels -> cxcywh in [0, 1] of the unpadded image."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.mean = torch.tensor(mean).reshape(3, 1, 1)
        self.std = torch.tensor(std).reshape(3, 1, 1)

    def __call__(self, image, target):
        image = (image - self.mean) / self.std
        height, width = image.shape[-2:]
        x1, y1, x2, y2 = target['boxes'].unbind(-1)
        # written out (not box_ops) so the data pipeline depends on nothing else here
        boxes_cxcywh = torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], -1)
        target = dict(target)
        target['boxes'] = boxes_cxcywh / torch.tensor([width, height, width, height])
        return image, target


def make_transforms(split, preset='tiny', image_size=128):
    """DETR's COCO augmentation ('paper') or its small-image version ('tiny')."""
    if split not in ('train', 'val') or preset not in ('paper', 'tiny'):
        raise ValueError(f"make_transforms: split must be train|val and preset "
                         f"paper|tiny, got split={split!r}, preset={preset!r}")
    normalize = Compose([ToTensor(), Normalize()])
    if preset == 'paper':
        scales = list(range(480, 801, 32))  # 480, 512, ..., 800: DETR's multi-scale
        if split == 'val':
            return Compose([RandomResize([800], max_size=1333), normalize])
        crop_then_resize = Compose([RandomResize([400, 500, 600]),
                                    RandomSizeCrop(384, 600),
                                    RandomResize(scales, max_size=1333)])
        return Compose([RandomHorizontalFlip(),
                        RandomSelect(RandomResize(scales, max_size=1333), crop_then_resize),
                        normalize])
    max_size = image_size * 4 // 3  # keeps the longer side of non-square images small
    if split == 'val':
        return Compose([RandomResize([image_size], max_size), normalize])
    jitter = list(range(image_size - 16, image_size + 1, 8))  # mild multi-scale
    return Compose([RandomHorizontalFlip(), RandomResize(jitter, max_size), normalize])


# ---- COCO-format dataset (pycocotools) ----

def _load_json(ann_file):
    """Read and shape-check a COCO json; ValueError names the file and the problem."""
    try:
        with open(ann_file, encoding='utf-8') as f:
            data = json.load(f)
    except ValueError as e:  # JSONDecodeError, or bytes that are not text at all
        raise ValueError(f"{ann_file}: malformed or incomplete json ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{ann_file}: top level must be an object, got {type(data).__name__}")
    for key in ('images', 'annotations', 'categories'):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{ann_file}: missing or non-list '{key}'")
    for kind, fields in (('images', ('id', 'file_name', 'width', 'height')),
                         ('annotations', ('id', 'image_id', 'category_id', 'bbox')),
                         ('categories', ('id', 'name'))):
        for entry in data[kind]:
            missing = [k for k in fields if k not in entry] if isinstance(entry, dict) else fields
            if missing:
                raise ValueError(f"{ann_file}: an entry of '{kind}' lacks {missing}: "
                                 f"{str(entry)[:200]}")
    return data


def _check_references(data, ann_file):
    """Every annotation must name a known image and category and a 4-number bbox."""
    image_ids = {img['id'] for img in data['images']}
    category_ids = {cat['id'] for cat in data['categories']}
    if not all(isinstance(i, int) and i >= 0 for i in category_ids):
        raise ValueError(f"{ann_file}: category ids must be integers >= 0 (they are the "
                         f"labels), got {sorted(map(str, category_ids))[:10]}")
    for ann in data['annotations']:
        if ann['category_id'] not in category_ids:
            raise ValueError(f"{ann_file}: annotation id {ann['id']} has category_id "
                             f"{ann['category_id']}, not in 'categories'")
        if ann['image_id'] not in image_ids:
            raise ValueError(f"{ann_file}: annotation id {ann['id']} refers to "
                             f"image_id {ann['image_id']}, not in 'images'")
        bbox = ann['bbox']
        if not (isinstance(bbox, list) and len(bbox) == 4
                and all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)):
            raise ValueError(f"{ann_file}: annotation id {ann['id']} has bbox {bbox}, "
                             f"expected [x, y, w, h] numbers")


def _clean_annotations(data):
    """Per image: xyxy boxes clipped to the image, labels, areas; plus drop/clip counts.

    DETR drops crowd regions and zero-area boxes and clips the rest; we do the same
    once here, counting each case so one warning can report them.
    """
    sizes = {img['id']: (img['width'], img['height']) for img in data['images']}
    per_image = {img_id: [] for img_id in sizes}
    counts = {k: [] for k in ('iscrowd', 'w or h <= 0', 'wholly outside', 'clipped')}
    for ann in data['annotations']:
        x, y, w, h = ann['bbox']
        if ann.get('iscrowd', 0):
            counts['iscrowd'].append(ann['id'])
            continue
        if w <= 0 or h <= 0:
            counts['w or h <= 0'].append(ann['id'])
            continue
        width, height = sizes[ann['image_id']]
        box = [min(max(x, 0), width), min(max(y, 0), height),
               min(max(x + w, 0), width), min(max(y + h, 0), height)]
        if box[2] <= box[0] or box[3] <= box[1]:
            counts['wholly outside'].append(ann['id'])
            continue
        if box != [x, y, x + w, y + h]:
            counts['clipped'].append(ann['id'])
        area = ann.get('area', (box[2] - box[0]) * (box[3] - box[1]))
        per_image[ann['image_id']].append((box, ann['category_id'], area))
    return per_image, counts


def _warn_counts(counts, ann_file):
    if any(counts.values()):
        parts = [f"{len(ids)} {why} (e.g. annotation ids {ids[:3]})"
                 for why, ids in counts.items() if ids]
        warnings.warn(f"{ann_file}: dropped or clipped annotations: " + '; '.join(parts)
                      + " (dropped: iscrowd, w or h <= 0, wholly outside)", stacklevel=3)


def _open_rgb(path, image_id):
    """Decode an image fully now (so truncation shows here) and convert it to RGB."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image id {image_id}: file not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode == 'P' and 'transparency' in image.info:
                image = image.convert('RGBA')  # PIL's advice for palette + transparency
            return image.convert('RGB')
    except (OSError, SyntaxError, ValueError) as e:
        raise OSError(f"image id {image_id}: cannot read {path}: {e}") from e


class CocoDetection(torch.utils.data.Dataset):
    """Any COCO-format detection dataset: item = (image [3, H, W], target dict).

    target: boxes float [T, 4] (cxcywh in [0, 1] once Normalize ran), labels int64 [T]
    (raw category ids, DETR's convention, so num_classes = max id + 1), image_id int,
    area float [T], iscrowd int64 [T], orig_size int64 [2] (h, w) on disk, size int64
    [2] (h, w) after the transforms. transforms=None means ToTensor + Normalize only.
    The json is checked once here; problems raise errors naming the file and the id.
    """

    def __init__(self, img_folder, ann_file, transforms=None):
        from pycocotools.coco import COCO
        self.img_folder, self.ann_file = str(img_folder), str(ann_file)
        if transforms is None:
            transforms = Compose([ToTensor(), Normalize()])
        self.transforms = transforms
        data = _load_json(self.ann_file)
        _check_references(data, self.ann_file)
        self._objects, counts = _clean_annotations(data)
        _warn_counts(counts, self.ann_file)
        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco.createIndex()
        self.ids = sorted(self.coco.imgs)  # every image, with or without objects
        self.category_names = {cat['id']: cat['name'] for cat in data['categories']}
        self.num_classes_needed = max(self.category_names, default=0) + 1

    def __len__(self):
        return len(self.ids)

    def _raw_target(self, image_id, image):
        info = self.coco.imgs[image_id]
        if image.size != (info['width'], info['height']):
            raise ValueError(f"image id {image_id}: {info['file_name']} is {image.size} "
                             f"(w, h) but {self.ann_file} says "
                             f"({info['width']}, {info['height']})")
        objects = self._objects[image_id]
        hw = torch.tensor([image.height, image.width])
        return {'boxes': torch.tensor([o[0] for o in objects], dtype=torch.float32).reshape(-1, 4),
                'labels': torch.tensor([o[1] for o in objects], dtype=torch.int64),
                'area': torch.tensor([o[2] for o in objects], dtype=torch.float32),
                'iscrowd': torch.zeros(len(objects), dtype=torch.int64),
                'image_id': image_id, 'orig_size': hw, 'size': hw.clone()}

    def __getitem__(self, index):
        image_id = self.ids[index]
        path = os.path.join(self.img_folder, self.coco.imgs[image_id]['file_name'])
        image = _open_rgb(path, image_id)
        return self.transforms(image, self._raw_target(image_id, image))


def build_dataset(split, *, coco_path=None, json_file=None, image_folder=None,
                  preset='tiny', image_size=128):
    """COCO (coco_path, official layout) or a custom json + image folder, for `split`."""
    if split not in ('train', 'val'):
        raise ValueError(f"build_dataset: split must be 'train' or 'val', got {split!r}")
    if coco_path is not None:
        image_folder = os.path.join(coco_path, f'{split}2017')
        json_file = os.path.join(coco_path, 'annotations', f'instances_{split}2017.json')
        for needed in (coco_path, image_folder, json_file):
            if not os.path.exists(needed):
                raise FileNotFoundError(f"COCO layout: {needed} is missing (expected "
                                        f"train2017/, val2017/, annotations/instances_*.json)")
    elif json_file is None or image_folder is None:
        # no silent fallback to the shapes: a missing val path must not train on shapes
        raise ValueError(f"build_dataset({split!r}): give coco_path, or json_file and "
                         f"image_folder together (got json_file={json_file!r}, "
                         f"image_folder={image_folder!r})")
    return CocoDetection(image_folder, json_file, make_transforms(split, preset, image_size))


# ---- batching ----

def nested_pad(tensors):
    """Zero-pad [C, H_i, W_i] tensors bottom/right to [B, C, Hmax, Wmax].

    Returns (padded, mask): mask [B, Hmax, Wmax] bool, True on padding (DETR's mask).
    """
    if not tensors:
        raise ValueError("nested_pad: empty list")
    channels = tensors[0].shape[0]
    height = max(t.shape[1] for t in tensors)
    width = max(t.shape[2] for t in tensors)
    padded = tensors[0].new_zeros(len(tensors), channels, height, width)
    mask = torch.ones(len(tensors), height, width, dtype=torch.bool)
    for i, t in enumerate(tensors):
        padded[i, :, :t.shape[1], :t.shape[2]] = t
        mask[i, :t.shape[1], :t.shape[2]] = False
    return padded, mask


def collate_fn(batch):
    """[(image, target)] -> (images [B, 3, Hmax, Wmax], mask [B, Hmax, Wmax], targets)."""
    images, targets = zip(*batch)
    padded, mask = nested_pad(list(images))
    return padded, mask, list(targets)


# ---- the built-in shapes dataset ----
# Each shape is drawn as a binary mask with PIL; the box is the tight box of the mask,
# so boxes are exact. A new shape is rejected if it would hide more than 1 - min_visible
# of an earlier one, so every drawn object is labelled and none is mostly hidden.

SHAPE_NAMES = ('circle', 'square', 'triangle', 'diamond', 'cross', 'ring')
SHAPES_VERSION = 2  # bump when the drawing code or the defaults change, so caches regenerate


def default_shapes_root():
    return os.path.expanduser(os.environ.get('MINIDETR_DATA', '~/.cache/minidetr/shapes'))


def _draw_shape(draw, kind, x0, y0, x1, y1):
    """Fill `kind` inside the inclusive pixel box (x0, y0)-(x1, y1)."""
    xm, ym = (x0 + x1) / 2, (y0 + y1) / 2
    thick = max(2, round(min(x1 - x0, y1 - y0) / 3))  # bar width of the cross
    if kind == 'circle':
        draw.ellipse([x0, y0, x1, y1], fill=255)
    elif kind == 'ring':
        draw.ellipse([x0, y0, x1, y1], outline=255, width=max(2, round(thick * 0.6)))
    elif kind == 'square':
        draw.rectangle([x0, y0, x1, y1], fill=255)
    elif kind == 'triangle':
        draw.polygon([(x0, y1), (x1, y1), (xm, y0)], fill=255)
    elif kind == 'diamond':
        draw.polygon([(xm, y0), (x1, ym), (xm, y1), (x0, ym)], fill=255)
    else:  # cross: a horizontal and a vertical bar
        draw.rectangle([x0, round(ym - thick / 2), x1, round(ym + thick / 2)], fill=255)
        draw.rectangle([round(xm - thick / 2), y0, round(xm + thick / 2), y1], fill=255)


def _random_shape(rng, p):
    """(class index, mask [S, S] bool): log-uniform size, jittered aspect, inside image."""
    size = p['image_size']
    side = math.exp(rng.uniform(math.log(p['min_size']), math.log(p['max_size_frac'] * size)))
    aspect = math.exp(rng.uniform(-1, 1) * math.log(1 + p['aspect_jitter']))
    w = int(min(size, max(4, round(side * math.sqrt(aspect)))))
    h = int(min(size, max(4, round(side / math.sqrt(aspect)))))
    x0, y0 = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
    kind = int(rng.integers(p['num_classes']))
    canvas = Image.new('L', (size, size), 0)
    _draw_shape(ImageDraw.Draw(canvas), SHAPE_NAMES[kind], x0, y0, x0 + w - 1, y0 + h - 1)
    return kind, np.asarray(canvas) > 0


def _background(rng, size, clutter):
    """Float [S, S, 3]: colour gradient + soft blobs + thin lines (none are objects)."""
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)  # [S, S] each, in [0, 1]
    ramp = rng.uniform(-60, 60, (2, 3))  # centred below, so base +- 60 stays in 0..255
    pixels = (rng.uniform(60, 195, 3) + (xx[..., None] - 0.5) * ramp[0]
              + (yy[..., None] - 0.5) * ramp[1])
    for _ in range(int(rng.integers(0, round(3 * clutter) + 1))):
        cx, cy, sigma = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.06, 0.25)
        bump = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma ** 2))
        pixels += bump[..., None] * rng.uniform(-70, 70, 3)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(0, round(4 * clutter) + 1))):
        ends = [float(v) for v in rng.uniform(0, size, 4)]
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.line(ends, fill=colour, width=int(rng.integers(1, 3)))
    return np.asarray(image, dtype=np.float32)


def _pick_colour(rng, under, min_contrast):
    """A random colour that stands out from most pixels it covers (`under` [M, 3])."""
    best, best_contrast = None, -1.0
    for _ in range(8):
        colour = rng.uniform(0, 255, 3)
        contrast = np.quantile(np.linalg.norm(under - colour, axis=1), 0.1)
        if contrast >= min_contrast:
            return colour
        if contrast > best_contrast:
            best, best_contrast = colour, contrast
    return best


def _keeps_visible(owner, areas, mask, min_visible):
    """True if every earlier object keeps >= min_visible of its pixels under `mask`."""
    still = owner[(owner >= 0) & ~mask]  # object index of each pixel not covered
    visible = np.bincount(still, minlength=len(areas))
    return bool(np.all(visible >= min_visible * np.asarray(areas)))


def _render(rng, p):
    """One image: (uint8 [S, S, 3], [(category_id, [x, y, w, h])])."""
    size = p['image_size']
    pixels = _background(rng, size, p['clutter'])
    owner = np.full((size, size), -1)  # index of the object on top of each pixel
    objects, areas = [], []
    count = rng.integers(p['min_objects'], p['max_objects'] + 1)
    if rng.random() < p['empty_frac']:
        count = 0  # a few images with nothing to find
    for _ in range(count):
        for _attempt in range(10):
            kind, mask = _random_shape(rng, p)
            if _keeps_visible(owner, areas, mask, p['min_visible']):
                break
        else:
            continue  # no placement found: this image gets one object fewer
        pixels[mask] = _pick_colour(rng, pixels[mask], p['min_contrast'])
        owner[mask] = len(objects)
        ys, xs = np.nonzero(mask)
        x0, y0 = int(xs.min()), int(ys.min())
        box = [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0]  # COCO xywh, tight
        objects.append((kind + 1, box))  # category ids 1..K
        areas.append(int(mask.sum()))
    noise = rng.normal(0, 8 * p['clutter'], pixels.shape) if p['clutter'] > 0 else 0
    return np.clip(np.rint(pixels + noise), 0, 255).astype(np.uint8), objects


def _write_split(folder, split, count, p):
    """Render `count` images into folder/split/*.png; return the COCO json dict."""
    os.makedirs(os.path.join(folder, split))
    images, annotations = [], []
    for image_id in range(1, count + 1):
        # one stream per image: image i is the same whatever num_train / num_val are
        rng = np.random.default_rng([p['seed'], ('train', 'val').index(split), image_id])
        pixels, objects = _render(rng, p)
        file_name = f'{image_id:06d}.png'
        Image.fromarray(pixels).save(os.path.join(folder, split, file_name), compress_level=1)
        images.append({'id': image_id, 'file_name': file_name,
                       'width': p['image_size'], 'height': p['image_size']})
        for category_id, box in objects:
            annotations.append({'id': len(annotations) + 1, 'image_id': image_id,
                                'category_id': category_id, 'bbox': box,
                                'area': box[2] * box[3], 'iscrowd': 0})
    categories = [{'id': i + 1, 'name': SHAPE_NAMES[i], 'supercategory': 'shape'}
                  for i in range(p['num_classes'])]
    info = {'description': 'minidetr synthetic shapes', 'version': str(SHAPES_VERSION)}
    return {'info': info, 'licenses': [], 'images': images, 'annotations': annotations,
            'categories': categories}  # no dates anywhere: same seed, same bytes


def _shapes_paths(root, num_classes):
    return {'root': root, 'num_classes': num_classes + 1,  # ids 1..K -> K + 1 logits
            'train_json': os.path.join(root, 'annotations', 'train.json'),
            'train_images': os.path.join(root, 'train'),
            'val_json': os.path.join(root, 'annotations', 'val.json'),
            'val_images': os.path.join(root, 'val')}


def _read_manifest(root):
    try:
        with open(os.path.join(root, 'manifest.json')) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _generate_into(folder, params):
    os.makedirs(os.path.join(folder, 'annotations'))
    for split, count in (('train', params['num_train']), ('val', params['num_val'])):
        coco = _write_split(folder, split, count, params)
        with open(os.path.join(folder, 'annotations', f'{split}.json'), 'w') as f:
            json.dump(coco, f)
    with open(os.path.join(folder, 'manifest.json'), 'w') as f:  # last: marks complete
        json.dump(params, f, indent=1)


def make_shapes_dataset(root=None, *, num_train=2000, num_val=200, seed=0, image_size=128,
                        num_classes=6, min_objects=1, max_objects=4, empty_frac=0.02,
                        min_size=16, max_size_frac=0.6, aspect_jitter=0.3, clutter=0.5,
                        min_visible=0.3, min_contrast=60.0):
    """Write the synthetic shapes dataset (COCO json + PNG) under root, once.

    Idempotent: if root/manifest.json holds the same parameters nothing is done; if
    they differ the folder is regenerated. Files are built in a temporary sibling
    folder and renamed into place, with the manifest written last, so an interrupted
    run never leaves a folder that looks complete. The same seed gives byte-identical
    files; image i depends only on (seed, split, i). clutter scales distractor
    blobs/lines and pixel noise (0 = plain gradient). Under DDP call it on rank 0 first,
    then barrier, so ranks do not generate side by side.
    Returns dict of root, train_json, train_images, val_json, val_images, num_classes.
    """
    root = os.path.abspath(root or default_shapes_root())
    if not 1 <= num_classes <= len(SHAPE_NAMES) or not 0 <= min_objects <= max_objects:
        raise ValueError(f"make_shapes_dataset: need 1 <= num_classes <= {len(SHAPE_NAMES)} "
                         f"and 0 <= min_objects <= max_objects")
    params = dict(version=SHAPES_VERSION, num_train=num_train, num_val=num_val, seed=seed,
                  image_size=image_size, num_classes=num_classes, min_objects=min_objects,
                  max_objects=max_objects, empty_frac=empty_frac, min_size=min_size,
                  max_size_frac=max_size_frac, aspect_jitter=aspect_jitter, clutter=clutter,
                  min_visible=min_visible, min_contrast=min_contrast)
    if _read_manifest(root) == params:
        return _shapes_paths(root, num_classes)
    if os.path.exists(root) and os.listdir(root) and _read_manifest(root) is None:
        raise FileExistsError(f"{root} exists and is not a minidetr shapes dataset "
                              f"(no manifest.json); refusing to overwrite it")
    os.makedirs(os.path.dirname(root), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(root),
                           prefix=f'.{os.path.basename(root)}.partial-')
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the dataset need not be
    try:
        _generate_into(tmp, params)
    except BaseException:  # interrupted or failed: leave nothing half-written behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if _read_manifest(root) == params:  # another process (DDP rank) finished first
        shutil.rmtree(tmp, ignore_errors=True)
        return _shapes_paths(root, num_classes)
    shutil.rmtree(root, ignore_errors=True)  # an older dataset, or an empty folder
    try:
        os.rename(tmp, root)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if _read_manifest(root) != params:  # else another process renamed first
            raise
    return _shapes_paths(root, num_classes)
