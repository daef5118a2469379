"""Checking a COCO-format dataset before training: every defect at once, named by its ids.

People bring their own COCO json (exports from labelling tools, converted VOC or YOLO
sets), and that is where runs go wrong: one dies an epoch in, another trains happily on
wrong targets. This module reads each json once and lists every defect it finds, so that
all of them can be fixed in one go. train.py and eval.py run the same checks (all but the
pixel decoding) on every split they use before a model is built: their datasets are built
through this module's door (build_datasets), which checks every split, then builds it.

    python -m minidetr.check --train_json train.json --train_images imgs/train \
        [--val_json val.json --val_images imgs/val] [--images]
    python -m minidetr.check --coco_path /data/coco

A defect is a Finding(kind, file, image_id, ann_id, message); its kind fixes its severity
(KINDS below):
  error    training would be wrong or impossible: exit status 1, train.py stops;
  warning  training skips, clips or fills it in: exit status 0, train.py names it once.

Cost: plain dicts and sets; each image file opened once and only its header read (PIL
decodes nothing), which finds a missing file, a file that is no image, and a size other
than the json's; --images decodes every image as training does (truncation, pixels
training refuses). A json of COCO's size (118k images, 860k annotations, 200 MB) took 23 s
on two busy CPU cores, half of it json.load; reading its 118k images' headers adds 5 s with
the files in the page cache, 8 s with them evicted (benchmarks/check_speed.py, the same
two busy cores).
"""
import argparse
import filecmp
import json
import math
import os
import sys
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

from tqdm import tqdm

from minidetr import distributed
from minidetr.categories import Categories
# what training does with an image file, a box and a split's files is the data's (check.py
# counts with the same functions, so that it reports exactly what training would do)
from minidetr.data import CocoDetection, box_fate, dataset_files, make_transforms, open_rgb, split_files

ERROR, WARNING = "error", "warning"
SECTIONS = ("images", "annotations", "categories")
KINDS = {   # kind: (severity, what it breaks, or what training does with it)
    "unreadable json": (ERROR, "the file cannot be read as a json object"),
    "missing section": (ERROR, "COCO json needs the lists 'images', 'annotations', 'categories'"),
    "malformed entry": (ERROR, "an entry lacks a field or holds the wrong type"),
    "empty split": (ERROR, "nothing to train or evaluate on"),
    "duplicate image id": (ERROR, "pycocotools keeps one image per id: targets and AP would be wrong"),
    "duplicate file name": (ERROR, "one image listed twice: each copy has only part of its boxes"),
    "duplicate annotation id": (ERROR, "pycocotools keeps one annotation per id: AP would miss boxes"),
    "duplicate category id": (ERROR, "one label, two names"),
    "bad category id": (ERROR, "category ids are the labels: integers >= 0"),
    "unknown image": (ERROR, "the annotation's image_id is not in 'images'"),
    "unknown category": (ERROR, "the annotation's category_id is not in 'categories'"),
    "malformed bbox": (ERROR, "bbox must be [x, y, w, h], four numbers"),
    "non-finite bbox": (ERROR, "a NaN or inf coordinate makes the loss NaN"),
    "missing image file": (ERROR, "the run would stop when it reaches the image"),
    "unreadable image": (ERROR, "the run would stop when it reaches the image"),
    "image size mismatch": (ERROR, "boxes are in the json's pixels: another size misplaces them"),
    "w or h <= 0": (WARNING, "dropped"),
    "wholly outside": (WARNING, "dropped"),
    "clipped": (WARNING, "clipped to the image"),
    "iscrowd": (WARNING, "dropped: DETR does not train on crowd regions"),
    "missing area or iscrowd": (WARNING, "filled in: iscrowd 0, area of the clipped box"),
    "unused category": (WARNING, "no box that training uses has it in this split"),
    "train/val overlap": (WARNING, "val AP would be optimistic"),
}


class Finding(NamedTuple):
    """One defect: its kind (a key of KINDS), the json file, the ids it concerns, what is wrong."""
    kind: str
    file: str
    image_id: object = None
    ann_id: object = None
    message: str = ""

    @property
    def severity(self):
        return KINDS[self.kind][0]

    def where(self):
        """'train.json, image id 3, annotation id 17': the ids a user searches the json for."""
        ids = [f"image id {self.image_id}" if self.image_id is not None else "",
               f"annotation id {self.ann_id}" if self.ann_id is not None else ""]
        return ", ".join([self.file] + [i for i in ids if i])


class DatasetError(ValueError):
    """The dataset has errors; str() lists every kind with its count and first examples."""

    def __init__(self, findings, examples=5):
        self.findings = list(findings)
        super().__init__(f"the dataset has {len(self.findings)} error(s); nothing was trained. "
                         f"Fix them (python -m minidetr.check prints the full report):\n"
                         + format_findings(self.findings, examples))


_NUMBER = (int, float)   # exact types: a bool is an int to isinstance, not a coordinate
_ID = (int, str)         # what an id may be (COCO's are ints; some tools write strings)
FILE_THREADS = 8         # image files read at once (check_files); see its docstring


def _progress(items, desc, show, total=None):
    """A progress bar on a terminal only (tqdm's disable=None), never in logs or pipes."""
    return tqdm(items, desc=desc, total=total, leave=False, mininterval=0.5,
                disable=None if show else True)


# ---- what training does with one image file (data.py and eval.py's drawing read with this) ----

def _box_message(kind, bbox, width, height):
    """What box_fate found, and how far a box reaches out of or lies beyond the image."""
    x, y, w, h = bbox
    if kind == "iscrowd":
        return "iscrowd is set"
    if kind == "w or h <= 0":
        return f"bbox {bbox} has no area"
    if kind == "clipped":   # the parts cut off, per side
        out = (("left", -x), ("top", -y), ("right", x + w - width), ("bottom", y + h - height))
        parts = [f"{d:g} px past the {side} edge" for side, d in out if d > 0]
        return f"bbox {bbox} reaches {', '.join(parts)} of the {width}x{height} image"
    # wholly outside: the gap between the image and the box, on a side the box lies beyond
    gaps = (("left", -(x + w)), ("top", -(y + h)), ("right", x - width), ("bottom", y - height))
    side, gap = max(gaps, key=lambda g: g[1])
    return f"bbox {bbox} lies {gap:g} px beyond the {side} edge of the {width}x{height} image"


# ---- one json: sections, entries, ids, references, boxes ----

def read_json(json_file):
    """(data, findings); data is None when the file cannot be used at all."""
    try:
        with open(json_file, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        return None, [Finding("unreadable json", json_file, message=f"cannot open it: {e.strerror}")]
    except ValueError as e:  # JSONDecodeError, or bytes that are not text at all
        return None, [Finding("unreadable json", json_file, message=f"malformed or incomplete json ({e})")]
    if not isinstance(data, dict):
        return None, [Finding("unreadable json", json_file,
                              message=f"top level must be an object, got {type(data).__name__}")]
    missing = [k for k in SECTIONS if not isinstance(data.get(k), list)]
    findings = [Finding("missing section", json_file, message=f"missing or non-list '{k}'") for k in missing]
    return (None if missing else data), findings


def _well_formed(entries, section, fields, json_file, findings):
    """The entries that are dicts holding `fields`; the others become 'malformed entry'."""
    good, needed = [], set(fields)
    for entry in entries:
        if isinstance(entry, dict) and entry.keys() >= needed:   # the fast path, one C call
            good.append(entry)
            continue
        missing = [k for k in fields if k not in entry] if isinstance(entry, dict) else list(fields)
        own_id = entry.get("id") if isinstance(entry, dict) else None
        findings.append(Finding("malformed entry", json_file, message=f"an entry of '{section}' "
                                f"(id {own_id}) lacks {missing}: {str(entry)[:120]}"))
    return good


def check_images(data, json_file, findings):
    """{image id: entry} of the usable images; duplicate ids and file names are errors."""
    by_id, by_file = {}, {}
    for img in _well_formed(data["images"], "images", ("id", "file_name", "width", "height"),
                            json_file, findings):
        image_id, name = img["id"], img["file_name"]
        if not (type(image_id) in _ID and isinstance(name, str)
                and type(img["width"]) in _NUMBER and type(img["height"]) in _NUMBER
                and img["width"] > 0 and img["height"] > 0):
            findings.append(Finding("malformed entry", json_file, message=f"image entry needs an int or "
                                    f"str id, a str file_name and positive width/height: {str(img)[:120]}"))
        elif image_id in by_id:   # its annotations cannot be told from the first image's
            findings.append(Finding("duplicate image id", json_file, image_id,
                                    message=f"used by both {by_id[image_id]['file_name']} and {name}"))
        else:
            if name in by_file:
                findings.append(Finding("duplicate file name", json_file, image_id,
                                        message=f"{name} is also image id {by_file[name]['id']}"))
            by_id[image_id], by_file[name] = img, img
    return by_id


def check_categories(data, json_file, findings):
    """{category id: name}; ids must be distinct integers >= 0 (they are the labels)."""
    names = {}
    for cat in _well_formed(data["categories"], "categories", ("id", "name"), json_file, findings):
        cat_id = cat["id"]
        if not (type(cat_id) is int and cat_id >= 0):
            findings.append(Finding("bad category id", json_file, message=f"category id {cat_id!r} "
                                    f"({cat['name']!r}) is not an integer >= 0"))
        elif cat_id in names:
            findings.append(Finding("duplicate category id", json_file, message=f"category id {cat_id} "
                                    f"is both {names[cat_id]!r} and {cat['name']!r}"))
        else:
            names[cat_id] = cat["name"]
    return names


def _bbox_problem(bbox):
    """None for four finite numbers, else the kind of defect (written out: 860k calls on COCO)."""
    if type(bbox) is not list or len(bbox) != 4:
        return "malformed bbox"
    x, y, w, h = bbox
    if not (type(x) in _NUMBER and type(y) in _NUMBER and type(w) in _NUMBER and type(h) in _NUMBER):
        return "malformed bbox"
    return None if math.isfinite(x + y + w + h) else "non-finite bbox"   # a NaN or inf spreads


def _reference_errors(ann, seen, images, listed, categories):
    """[(kind, message)] for one annotation's ids, references and bbox; None: skip it quietly
    (its image is listed but malformed, which is reported already)."""
    ann_id, image_id, cat_id = ann["id"], ann["image_id"], ann["category_id"]
    if not (type(ann_id) in _ID and type(image_id) in _ID and type(cat_id) in _ID):
        return [("malformed entry", f"id, image_id and category_id must be int or str: {str(ann)[:120]}")]
    if image_id not in images and image_id in listed:
        return None
    problems = []
    if ann_id in seen:
        problems.append(("duplicate annotation id", "another annotation has this id"))
    seen.add(ann_id)
    if image_id not in images:
        problems.append(("unknown image", f"image_id {image_id} is not in 'images'"))
    if cat_id not in categories:
        problems.append(("unknown category", f"category_id {cat_id} is not in 'categories'"))
    bbox_kind = _bbox_problem(ann["bbox"])
    if bbox_kind:
        problems.append((bbox_kind, f"bbox {ann['bbox']} is not four finite numbers [x, y, w, h]"))
    return problems


def check_annotations(data, images, categories, json_file, findings):
    """References, ids and boxes of every annotation -> (usable boxes, category ids used)."""
    seen, used, usable = set(), set(), 0
    listed = {img.get("id") for img in data["images"]   # malformed images included
              if isinstance(img, dict) and type(img.get("id")) in _ID}
    for ann in _well_formed(data["annotations"], "annotations",
                            ("id", "image_id", "category_id", "bbox"), json_file, findings):
        problems = _reference_errors(ann, seen, images, listed, categories)
        if problems is None:
            continue
        image_id = ann["image_id"] if type(ann["image_id"]) in _ID else None
        findings += [Finding(kind, json_file, image_id, ann["id"], message) for kind, message in problems]
        if problems:
            continue
        if "area" not in ann or "iscrowd" not in ann:
            findings.append(Finding("missing area or iscrowd", json_file, image_id, ann["id"],
                                    f"lacks {[k for k in ('area', 'iscrowd') if k not in ann]}"))
        width, height = images[image_id]["width"], images[image_id]["height"]
        kind, box = box_fate(ann["bbox"], width, height, ann.get("iscrowd", 0))
        if box is not None:
            usable += 1
            used.add(ann["category_id"])
        if kind:
            findings.append(Finding(kind, json_file, image_id, ann["id"],
                                    _box_message(kind, ann["bbox"], width, height)))
    return usable, used


# ---- the image files: each opened once, its header read (always) or decoded (--images) ----

def _header_size(path, what):
    """(width, height) from the file's header: PIL's Image.open parses it and decodes nothing.

    A PNG's size is in its first 24 bytes, a JPEG's in the SOF marker after the EXIF and
    other APP segments: one open and a read of a few KB, ~20 us a file on a warm cache.
    The size is the stored one, before any EXIF rotation: open_rgb does not rotate either.
    PIL raises UnidentifiedImageError (an OSError) for a file no plugin recognises,
    SyntaxError or ValueError for a header a plugin rejects; all become one OSError, as in
    open_rgb, except FileNotFoundError, which check_files reports as a missing file.
    An image of over 2 x Image.MAX_IMAGE_PIXELS (179M) pixels is refused here already, as
    DecompressionBombError: training's decode would refuse it, with a traceback.
    """
    from PIL import Image
    try:
        with Image.open(path) as image:
            return image.size
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise OSError(f"{what}: cannot read {path}: {e}") from e


def _decoded_size(path, what):
    """(width, height) after a full decode as training does it: truncation shows here too."""
    return open_rgb(path, what).size


def _file_finding(img, json_file, image_folder, read_size):
    """The one finding for one image's file ('missing image file', 'unreadable image',
    'image size mismatch'), or None: the file opens and has the size the json says."""
    name = img["file_name"]
    try:
        width, height = read_size(os.path.join(image_folder, name), f"image id {img['id']}")
    except FileNotFoundError:   # what open() says: one call, no listing or stat before it
        return Finding("missing image file", json_file, img["id"], message=f"{name} is not in {image_folder}")
    except OSError as e:
        return Finding("unreadable image", json_file, img["id"], message=f"{name}: {e.__cause__ or e}")
    if (width, height) != (img["width"], img["height"]):
        return Finding("image size mismatch", json_file, img["id"], message=(
            f"{name} is {width}x{height} px (w x h), the json says {img['width']}x{img['height']}"))
    return None


def check_files(images, json_file, image_folder, pixels=False, show_progress=True):
    """Every image file, opened once: missing, unreadable, or of another size than the json says.

    The size comes from the file's header (_header_size), or with pixels=True from a full
    decode (_decoded_size), which also finds truncated files and pixels training refuses.
    A thread pool overlaps the reads: a cold disk makes each open wait for the device, and
    PIL's parsing in Python is short; on a warm cache the threads take turns on the GIL.
    COCO's 118k files on two busy cores (benchmarks/check_speed.py): 8.1 s with the files
    evicted from the page cache (1 thread: 13.5 s), 5.0 s cached (1 thread: 4.6 s).
    """
    if images and not os.path.isdir(image_folder):
        return [Finding("missing image file", json_file, message=f"image folder {image_folder} "
                        f"does not exist ({len(images)} images should be in it)")]
    read_size = _decoded_size if pixels else _header_size
    entries = list(images.values())
    chunks = [entries[i:i + 256] for i in range(0, len(entries), 256)]   # a future per 256, not per file

    def check_chunk(chunk):
        return [_file_finding(img, json_file, image_folder, read_size) for img in chunk]

    findings, what = [], "pixels" if pixels else "files"
    with ThreadPoolExecutor(max_workers=FILE_THREADS) as pool, _progress(
            None, f"{os.path.basename(json_file)}: {what}", show_progress, total=len(entries)) as bar:
        for found in pool.map(check_chunk, chunks):   # in the json's order
            findings += [f for f in found if f is not None]
            bar.update(len(found))
    return findings


# ---- a split, both splits ----

def check_split(json_file, image_folder=None, pixels=False, show_progress=True):
    """Every check of one split -> (data, findings); data is None when the json is unusable.

    image_folder None checks the json alone; with a folder, every image's header is read
    (its size against the json's), or with pixels=True every image is decoded.
    """
    data, findings = read_json(json_file)
    if data is None:
        return None, findings
    images = check_images(data, json_file, findings)
    categories = check_categories(data, json_file, findings)
    errors_before = sum(f.severity == ERROR for f in findings)
    usable, used = check_annotations(data, images, categories, json_file, findings)
    if not data["images"]:
        findings.append(Finding("empty split", json_file, message="'images' is empty"))
    elif usable == 0 and sum(f.severity == ERROR for f in findings) == errors_before:
        n = len(data["annotations"])
        findings.append(Finding("empty split", json_file, message=(
            "'annotations' is empty" if n == 0 else f"none of its {n} annotations is usable: "
            "every one is dropped (see the warnings)")))
    for cat_id in sorted(set(categories) - used):
        findings.append(Finding("unused category", json_file, message=(
            f"category id {cat_id} ({categories[cat_id]!r}) has no usable annotation")))
    if image_folder is not None:
        findings += check_files(images, json_file, image_folder, pixels, show_progress)
    return data, findings


def check_overlap(train, val):
    """train, val: (json_file, image_folder, data). A val image is shared when it is the same
    file, or a file of the same name with the same bytes (a copy); ids are not evidence, as
    two datasets both numbered from 1 share them (the built-in shapes do)."""
    def path_of(folder, img):
        return os.path.normpath(os.path.abspath(os.path.join(folder, str(img.get("file_name")))))
    (train_json, train_folder, train_data), (val_json, val_folder, val_data) = train, val
    train_images = [img for img in train_data["images"] if isinstance(img, dict)]
    by_path = {path_of(train_folder, img): img for img in train_images}
    by_name = {img.get("file_name"): img for img in train_images}
    findings = []
    for img in (img for img in val_data["images"] if isinstance(img, dict)):
        path, other, how = path_of(val_folder, img), None, ""
        if path in by_path:
            other, how = by_path[path], "the same file"
        elif img.get("file_name") in by_name:   # few candidates: compare their bytes
            candidate = by_name[img.get("file_name")]
            try:
                if filecmp.cmp(path, path_of(train_folder, candidate), shallow=False):
                    other, how = candidate, "a copy: same name, same bytes"
            except OSError:   # a missing file: check_files reports it
                pass
        if other is not None:
            findings.append(Finding("train/val overlap", val_json, img.get("id"), message=(
                f"{img.get('file_name')} is also train image id {other.get('id')} in {train_json} ({how})")))
    return findings


def check_splits(files, pixels=False, show_progress=True):
    """files {split: (json_file, image_folder)} -> ({split: data}, findings), overlap included."""
    data, findings, checked = {}, [], {}
    for split, (json_file, image_folder) in files.items():
        if (json_file, image_folder) in checked:   # one file for two splits: its findings once
            data[split] = data[checked[json_file, image_folder]]
            continue
        data[split], found = check_split(json_file, image_folder, pixels, show_progress)
        findings += found
        checked[json_file, image_folder] = split
    if data.get("train") is not None and data.get("val") is not None:
        findings += check_overlap((*files["train"], data["train"]), (*files["val"], data["val"]))
    return data, findings


def check_before_training(files, verbose=True):
    """The door of train.py / eval.py: {split: (json, folder)} -> {split: data}, checked.

    Raises DatasetError listing every error of every split at once; prints one warning line
    per split for what training will skip (verbose: rank 0 only under torchrun).
    """
    data, findings = check_splits(files, show_progress=verbose)
    errors = [f for f in findings if f.severity == ERROR]
    if errors:
        raise DatasetError(errors)
    if verbose:
        for json_file in dict.fromkeys(json_file for json_file, _ in files.values()):   # once each
            line = warning_line(findings, json_file)
            if line:
                print(f"warning: {line}", file=sys.stderr, flush=True)
    return data


# ---- the door: datasets built only from checked json ----

def build_datasets(cfg, categories=None):
    """(train, val) datasets of a run: COCO, a custom COCO-format pair, or the built-in shapes.

    train is None with cfg.eval. Every split is checked before any is built: DatasetError
    lists every defect that would stop or corrupt the run, and what training skips is named
    once. The class count they need is checked by data.fit_num_classes. Both splits share
    one category table (minidetr/categories.py): `categories` (a checkpoint's, when
    evaluating it) or the union of their json lists.
    """
    files = dataset_files(cfg, ("val",) if cfg.eval else ("train", "val"))
    data = check_before_training(files, verbose=distributed.is_main_process())
    categories = categories or Categories.from_datasets(*(data[s]["categories"] for s in files))
    for s in files:
        unknown = [c["id"] for c in data[s]["categories"] if c["id"] not in categories.label_of]
        if unknown:
            raise ValueError(f"{files[s][0]} lists category id {unknown[0]!r}, which the model's "
                             f"class head has no row for (it knows {len(categories.names)} categories)")
    if categories.remapped and distributed.is_main_process():
        largest = max(categories.label_of, key=lambda i: (isinstance(i, str), i))
        print(f"categories: {len(categories.names)} ids up to {largest!r}: the class head gets rows "
              f"0..{categories.num_classes - 1} in id order, mapped back to the ids in every result")
    built = {s: CocoDetection(folder, json_file, data[s], make_transforms(s, cfg.preset, cfg.image_size),
                              categories=categories)
             for s, (json_file, folder) in files.items()}
    return built.get("train"), built["val"]


def load_dataset(img_folder, ann_file, transforms=None, categories=None):
    """One json and its images as a CocoDetection, the json checked first (not the images).

    Any error raises DatasetError (a ValueError) naming the file and the ids; what training
    skips is named in one warning.
    """
    data, findings = check_split(str(ann_file))
    errors = [f for f in findings if f.severity == ERROR]
    if errors:
        raise DatasetError(errors)
    line = warning_line(findings, str(ann_file))
    if line:
        warnings.warn(line, stacklevel=2)
    return CocoDetection(img_folder, ann_file, data, transforms, categories)


def build_dataset(split, *, coco_path=None, json_file=None, image_folder=None,
                  preset='tiny', image_size=128):
    """COCO (coco_path, official layout) or a custom json + image folder, for `split`."""
    json_file, image_folder = split_files(split, coco_path, json_file, image_folder)
    return load_dataset(image_folder, json_file, make_transforms(split, preset, image_size))


# ---- reporting ----

def format_findings(findings, examples=5):
    """Per kind, in KINDS order: the count, what it means, and the first `examples` findings."""
    counts = Counter(f.kind for f in findings)
    lines = []
    for kind in (k for k in KINDS if counts[k]):
        of_kind = [f for f in findings if f.kind == kind]
        lines.append(f"  {kind}: {counts[kind]} ({KINDS[kind][1]})")
        lines += [f"    {f.where()}: {f.message}" for f in of_kind[:examples]]
        if counts[kind] > examples:
            lines.append(f"    ... and {counts[kind] - examples} more")
    return "\n".join(lines)


def warning_line(findings, json_file):
    """One line naming each kind of warning in json_file, with its count and a few ids."""
    mine = [f for f in findings if f.file == json_file and f.severity == WARNING]
    parts = []
    for kind in (k for k in KINDS if any(f.kind == k for f in mine)):
        of_kind = [f for f in mine if f.kind == kind]
        ann_ids = [f.ann_id for f in of_kind if f.ann_id is not None]
        image_ids = [f.image_id for f in of_kind if f.image_id is not None]
        example = (f"annotation ids {ann_ids[:3]}" if ann_ids else f"image ids {image_ids[:3]}"
                   if image_ids else of_kind[0].message)
        parts.append(f"{len(of_kind)} {kind} ({KINDS[kind][1]}; e.g. {example})")
    return f"{json_file}: " + "; ".join(parts) if parts else None


def report(files, data, findings, examples=5):
    """The text `python -m minidetr.check` prints."""
    lines = []
    for split, (json_file, image_folder) in files.items():
        d = data.get(split)
        sizes = (", ".join(f"{len(d[k])} {k}" for k in SECTIONS) if d is not None else "unusable")
        lines.append(f"{split}: {json_file} (images in {image_folder}): {sizes}")
    for severity, title in ((ERROR, "training would be wrong or impossible"),
                            (WARNING, "training skips, clips or fills these in")):
        found = [f for f in findings if f.severity == severity]
        if found:
            lines += [f"{severity.upper()}S: {len(found)}, {title}", format_findings(found, examples)]
    n_err = sum(f.severity == ERROR for f in findings)
    lines.append(f"{n_err} error(s), {len(findings) - n_err} warning(s): " +
                 ("fix the errors before training" if n_err else "ready to train"))
    return "\n".join(lines)


# ---- command line ----

def main(argv=None):
    """Check the splits given; print the report; return the exit status (1 on errors)."""
    p = argparse.ArgumentParser("python -m minidetr.check", description=__doc__.split("\n\n")[0])
    p.add_argument("--coco_path", help="COCO 2017 root: train2017/, val2017/, annotations/")
    for split in ("train", "val"):
        p.add_argument(f"--{split}_json", help=f"{split} annotations (COCO json)")
        p.add_argument(f"--{split}_images", help=f"{split} image folder")
    p.add_argument("--images", action="store_true", help="also decode every image (slow)")
    p.add_argument("--examples", type=int, default=5, help="examples shown per kind of defect")
    args = p.parse_args(argv)
    splits = [s for s in ("train", "val") if args.coco_path or getattr(args, f"{s}_json")
              or getattr(args, f"{s}_images")]
    if not splits:
        p.error("give --coco_path, or --train_json/--train_images and/or --val_json/--val_images")
    try:
        files = {s: split_files(s, args.coco_path, getattr(args, f"{s}_json"),
                                getattr(args, f"{s}_images")) for s in splits}
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    data, findings = check_splits(files, pixels=args.images)
    print(report(files, data, findings, args.examples))
    return 1 if any(f.severity == ERROR for f in findings) else 0


if __name__ == "__main__":
    sys.exit(main())
