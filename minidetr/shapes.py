"""The built-in synthetic shapes dataset: coloured circles, squares, triangles,
diamonds, crosses and rings on cluttered backgrounds, written to disk as COCO json + PNG.

It exists so that the tiny preset can train and be evaluated on a few CPU cores in
minutes with nothing to download. Because the files are real COCO json + PNG, the same
loader (data.CocoDetection) and pycocotools evaluation run on it as on COCO itself.

  image:    colour gradient + soft blobs + thin lines + pixel noise (all scaled by
            clutter; none of them are objects)
  objects:  min_objects..max_objects shapes (none in a fraction empty_frac of images),
            log-uniform size, jittered aspect, a colour picked to stand out from the
            pixels it covers
  boxes:    each shape is drawn as a binary mask with PIL and its box is the tight box
            of the mask, so boxes are exact; a shape that would hide more than
            1 - min_visible of an earlier one is replaced by a fresh random shape
            (up to 10 tries, then the image gets one object fewer)
  json:     category ids 1..K named by SHAPE_NAMES, bbox [x, y, w, h] pixels, iscrowd 0;
            the returned num_classes is K + 1 (DETR's max id + 1)

Defaults (128 px images, 1-3 objects of 24-77 px, light clutter 0.3) are what the tiny
preset can learn from random weights in its 10-minute CPU budget: with objects down to
16 px, up to 4 per image and clutter 0.5 the same runs reached a third of the AP
(benchmarks/RESULTS.md, "tuning the tiny preset", lists every setting tried).

Determinism: image i of a split draws from its own generator seeded by (seed, split, i),
so it is the same whatever num_train / num_val are, and the json holds no dates: the same
parameters give byte-identical files.
Idempotency: root/manifest.json records the parameters and SHAPES_VERSION; a call with
the same ones does nothing, different ones regenerate the folder, and a non-empty folder
with no manifest (not ours) is never overwritten.
Atomic writes: everything is generated in a temporary sibling folder, the manifest last,
and renamed into place, so an interrupted run leaves nothing behind and a folder with a
manifest is complete; if another process (a DDP rank) finished first, its copy is kept.
"""
import json
import math
import os
import shutil
import tempfile

import numpy as np
from PIL import Image, ImageDraw

SHAPE_NAMES = ('circle', 'square', 'triangle', 'diamond', 'cross', 'ring')
# more kinds the generator can draw, for a second dataset that shares some classes by name
# and adds new ones (make_shapes_dataset's `shapes`; the fine-tuning benchmark uses it)
MORE_SHAPES = ('star', 'hexagon', 'pentagon')
SHAPES_VERSION = 3  # bump when the drawing code or the defaults change, so caches regenerate


def default_shapes_root():
    return os.path.expanduser(os.environ.get('MINIDETR_DATA', '~/.cache/minidetr/shapes'))


def builtin_root(num_train, num_val):
    """Where the built-in dataset of this size lives: the one place every caller asks
    (train.py, eval.py, the benchmarks), so they share one copy instead of fighting over a
    folder (a bare default root once held another size's files and was refused)."""
    return os.path.join(default_shapes_root(), f'n{num_train}_v{num_val}')


# ---- drawing one image ----
# Each shape is drawn as a binary mask with PIL; the box is the tight box of the mask,
# so boxes are exact. A new shape is rejected if it would hide more than 1 - min_visible
# of an earlier one, so every drawn object is labelled and none is mostly hidden.

def _polygon(xm, ym, rx, ry, corners, inner=1.0):
    """Corners of a regular polygon (a star when inner < 1: every other corner pulled in),
    one corner at the top, inside the ellipse of radii (rx, ry) around (xm, ym)."""
    points = []
    for i in range(corners * (2 if inner < 1 else 1)):
        angle = -math.pi / 2 + i * math.pi * (1 if inner < 1 else 2) / corners
        r = inner if inner < 1 and i % 2 else 1.0
        points.append((xm + r * rx * math.cos(angle), ym + r * ry * math.sin(angle)))
    return points


def _draw_shape(draw, kind, x0, y0, x1, y1):
    """Fill `kind` inside the inclusive pixel box (x0, y0)-(x1, y1)."""
    xm, ym = (x0 + x1) / 2, (y0 + y1) / 2
    rx, ry = (x1 - x0) / 2, (y1 - y0) / 2
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
    elif kind in ('star', 'hexagon', 'pentagon'):
        corners, inner = {'star': (5, 0.45), 'hexagon': (6, 1.0), 'pentagon': (5, 1.0)}[kind]
        draw.polygon(_polygon(xm, ym, rx, ry, corners, inner), fill=255)
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
    _draw_shape(ImageDraw.Draw(canvas), p['shapes'][kind], x0, y0, x0 + w - 1, y0 + h - 1)
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


# ---- writing to disk: deterministic, idempotent, atomic ----

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
    categories = [{'id': i + 1, 'name': p['shapes'][i], 'supercategory': 'shape'}
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
    drawing = {'shapes': SHAPE_NAMES, **params}   # the default kinds when none were named
    os.makedirs(os.path.join(folder, 'annotations'))
    for split, count in (('train', params['num_train']), ('val', params['num_val'])):
        coco = _write_split(folder, split, count, drawing)
        with open(os.path.join(folder, 'annotations', f'{split}.json'), 'w') as f:
            json.dump(coco, f)
    with open(os.path.join(folder, 'manifest.json'), 'w') as f:  # last: marks complete
        json.dump(params, f, indent=1)


def make_shapes_dataset(root=None, *, num_train=2000, num_val=200, seed=0, image_size=128,
                        num_classes=6, min_objects=1, max_objects=3, empty_frac=0.02,
                        min_size=24, max_size_frac=0.6, aspect_jitter=0.3, clutter=0.3,
                        min_visible=0.3, min_contrast=60.0, shapes=None):
    """Write the synthetic shapes dataset (COCO json + PNG) under root, once.

    root None: builtin_root(num_train, num_val), where train.py trains on it.
    Idempotent: if root/manifest.json holds the same parameters nothing is done; if
    they differ the folder is regenerated. Files are built in a temporary sibling
    folder and renamed into place, with the manifest written last, so an interrupted
    run never leaves a folder that looks complete. The same seed gives byte-identical
    files; image i depends only on (seed, split, i). clutter scales distractor
    blobs/lines and pixel noise (0 = plain gradient). shapes: the kinds drawn, category
    ids 1..K in this order (default SHAPE_NAMES; MORE_SHAPES adds kinds). Under DDP call it on rank 0 first,
    then barrier, so ranks do not generate side by side.
    Returns dict of root, train_json, train_images, val_json, val_images, num_classes.
    """
    root = os.path.abspath(root or builtin_root(num_train, num_val))
    kinds = SHAPE_NAMES if shapes is None else tuple(shapes)
    unknown = [k for k in kinds if k not in SHAPE_NAMES + MORE_SHAPES]
    if unknown or len(set(kinds)) != len(kinds):
        raise ValueError(f"make_shapes_dataset: shapes must be distinct names from "
                         f"{SHAPE_NAMES + MORE_SHAPES}, got {kinds}")
    if not 1 <= num_classes <= len(kinds) or not 0 <= min_objects <= max_objects:
        raise ValueError(f"make_shapes_dataset: need 1 <= num_classes <= {len(kinds)} "
                         f"and 0 <= min_objects <= max_objects")
    if not 4 <= min_size <= max_size_frac * image_size:
        raise ValueError(f"make_shapes_dataset: min_size {min_size} px must be between 4 and "
                         f"max_size_frac * image_size = {max_size_frac * image_size:g} px "
                         f"(pass a smaller min_size for {image_size} px images)")
    params = dict(version=SHAPES_VERSION, num_train=num_train, num_val=num_val, seed=seed,
                  image_size=image_size, num_classes=num_classes, min_objects=min_objects,
                  max_objects=max_objects, empty_frac=empty_frac, min_size=min_size,
                  max_size_frac=max_size_frac, aspect_jitter=aspect_jitter, clutter=clutter,
                  min_visible=min_visible, min_contrast=min_contrast)
    if shapes is not None:   # only then: the default dataset's manifest (and cache) stay as they were
        params['shapes'] = list(kinds)
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
