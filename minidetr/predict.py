"""Using a trained model: predictions on image files, folders and videos, as COCO results.

eval.py --image runs these steps (python eval.py --resume ckpt.pth --image photos/ --out drawn/):

    load_model        a minidetr checkpoint (or an official one, converted by the reader eval.py
                      passes: convert.read_any_checkpoint), with the category table its class
                      rows mean (categories.py)
    list_images       a folder's images, recursively, sorted by path (a stable order, so the
                      image ids of two runs agree); other files are left out
    video_frames      a video's frames in order, with its frame rate (PyAV, optional extra)
    predict           batches of images of the same size through the model (see below)
    coco_results      the detections as COCO's results format, one dict per box:
                      {image_id, category_id, bbox [x, y, w, h] in the image's own pixels, score}
    write_results     that list as the results file, and beside it a COCO dataset file without
                      annotations (the images with their file names and sizes, the categories
                      with their names), so that pycocotools reads both unchanged:
                      COCO('predictions_images.json').loadRes('predictions.json')

Why batches hold one image size only: a padded image does not give the boxes it gives alone.
The padding mask keeps attention off the padded cells, but the backbone's convolutions see
them (after BatchNorm they are no longer zero) within their receptive field of the image's
border, and the feature map of a padded image has more cells. Measured on a random tiny
conditional model, 128x96 padded to 128x170: boxes moved by up to 90 px. DETR's own
evaluation pads, and its COCO numbers carry that; predictions here equal the image alone.
A folder of one camera's photos or a video's frames resizes to one size, so those batch fully.
"""
import io
import json
import os
import sys
import time
from collections import defaultdict
from fractions import Fraction
from typing import NamedTuple, Optional

import torch
from PIL import Image

from minidetr.checkpoint import read_checkpoint, write_bytes_atomic
from minidetr.config import Config
from minidetr.data import make_transforms, open_rgb
from minidetr.detr import build
from minidetr.draw import draw_predictions

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv")
VIDEO_CODECS = {".webm": "libvpx-vp9", ".avi": "mpeg4"}   # others: H.264 (libx264, in PyAV's wheels)


# ---- the model ----

class Loaded(NamedTuple):
    cfg: Config
    model: torch.nn.Module          # on the device, eval mode
    criterion: torch.nn.Module
    postprocess: torch.nn.Module
    categories: Optional[object]    # categories.Categories, or None: labels are the category ids


def load_model(path, overrides=None, device="cpu", read=read_checkpoint):
    """Rebuild the model from a checkpoint's settings and load its weights -> Loaded.

    overrides: Config fields to replace (None values are ignored). read: path ->
    checkpoint.Contents; checkpoint.read_checkpoint reads minidetr's files, eval.py passes
    convert.read_any_checkpoint, which also converts official ones (convert.py stays a leaf
    that no module of the package imports). Raises ValueError / FileNotFoundError with a
    message for the user.
    """
    settings, state_dict, categories, missing = read(path)
    settings = {**settings, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    cfg = Config(**settings).validate()
    model, criterion, postprocess = build(cfg)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as err:   # missing / unexpected / wrongly shaped weights
        detail = " ".join(str(err).split())
        raise ValueError(f"the weights in {path} do not fit the model its config describes"
                         + (f"; its config lacks {missing} (saved by another version of minidetr?), "
                            f"which took the preset's values" if missing else "")
                         + f" ({detail[:200]}...)") from None
    return Loaded(cfg, model.to(device).eval(), criterion, postprocess, categories)


# ---- inputs: image files, folders, videos ----

def image_extensions():
    """File extensions PIL opens (lower case, with the dot): what list_images calls an image."""
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def is_video(path):
    return os.path.splitext(str(path))[1].lower() in VIDEO_EXTENSIONS


def list_images(folder):
    """Image files under `folder` (recursively, by extension), sorted by relative path."""
    extensions = image_extensions()
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()                                    # os.walk's order is the file system's
        found += [os.path.relpath(os.path.join(root, f), folder) for f in files
                  if os.path.splitext(f)[1].lower() in extensions]
    return sorted(found)


class Frame(NamedTuple):
    """One input image: an image file, or one frame of a video."""
    index: int                  # position in the input order; image id = index + 1
    name: str                   # path relative to the folder (or the file's), 'clip.mp4#12' for a frame
    image: object               # PIL RGB image; None when it could not be read
    error: Optional[str] = None  # why it could not be read


def image_frames(paths, folder=""):
    """Frames of image files, read lazily; an undecodable file gives a Frame with its error."""
    for index, name in enumerate(paths):
        try:
            yield Frame(index, name, open_rgb(os.path.join(folder, name), name))
        except OSError as err:             # open_rgb's message names the file; keep PIL's reason
            yield Frame(index, name, None, str(err.__cause__ or err))


def _pyav():
    """PyAV, or the line that installs it. PyAV rather than imageio-ffmpeg: it decodes in the
    process into frames (no ffmpeg subprocess and pipe), reads the frame rate and count from
    the container, encodes as well, and is one wheel (36 MB against 68 MB)."""
    try:
        import av
    except ImportError:
        raise SystemExit("videos need the optional extra PyAV: pip install -e '.[video]' "
                         "(or pip install av)") from None
    return av


def video_info(path):
    """(frame rate as a Fraction, number of frames or 0 if the file does not say, (w, h))."""
    av = _pyav()
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or Fraction(25)
            return Fraction(rate), stream.frames, (stream.width, stream.height)
    except (av.FFmpegError, IndexError) as err:
        raise OSError(f"cannot read video {path}: {err if str(err) else 'no video stream'}") from None


def video_frames(path):
    """The frames of a video file, in order, as Frames named 'file#i' (PyAV decodes them)."""
    av = _pyav()
    name = os.path.basename(str(path))
    index = 0
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"                # decode with frame threads
            for index, frame in enumerate(container.decode(stream)):
                yield Frame(index, f"{name}#{index}", frame.to_image())
    except av.FFmpegError as err:                      # a file cut short, a broken packet
        raise OSError(f"cannot decode {path} at frame {index}: {err}") from None


class VideoWriter:
    """Write PIL images as a video at `rate` frames per second (PyAV; the codec by extension)."""

    def __init__(self, path, rate):
        av = _pyav()
        self.container = av.open(str(path), mode="w")
        codec = VIDEO_CODECS.get(os.path.splitext(str(path))[1].lower(), "libx264")
        self.stream = self.container.add_stream(codec, rate=rate)
        self.stream.pix_fmt = "yuv420p"
        self.frame_type, self.size = av.VideoFrame, None

    def write(self, image):
        if self.size is None:                          # the first frame sets the size; yuv420p wants it even
            self.size = (image.width // 2 * 2, image.height // 2 * 2)
            self.stream.width, self.stream.height = self.size
        image = image.crop((0, 0) + self.size)
        self.container.mux(self.stream.encode(self.frame_type.from_image(image)))

    def close(self):
        self.container.mux(self.stream.encode())       # flush the encoder's delayed frames
        self.container.close()


# ---- running the model ----

def image_tensor(image, transform):
    """PIL image -> [3, H', W'] normalised tensor through a data.make_transforms('val', ...) transform."""
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
             "area": torch.zeros(0), "iscrowd": torch.zeros(0, dtype=torch.int64)}
    tensor, _ = transform(image, empty)
    return tensor


def eval_transform(cfg):
    """The evaluation's resize and normalisation for this model (shorter side -> image_size)."""
    return make_transforms("val", cfg.preset, cfg.image_size)


@torch.no_grad()
def _run(model, postprocess, frames, transform, batch_size, device):
    """Frames (some unreadable) -> {index: result}, batching only images of one size."""
    tensors = {f.index: image_tensor(f.image, transform) for f in frames if f.image is not None}
    by_size = defaultdict(list)                        # (H', W') -> frames resized to it
    for f in frames:
        if f.image is not None:
            by_size[tuple(tensors[f.index].shape[-2:])].append(f)
    results = {}
    for (h, w), group in by_size.items():
        for start in range(0, len(group), batch_size):
            batch = group[start:start + batch_size]
            images = torch.stack([tensors[f.index] for f in batch]).to(device)   # [B, 3, H', W']
            mask = torch.zeros(len(batch), h, w, dtype=torch.bool, device=device)  # no padding
            orig = torch.tensor([[f.image.height, f.image.width] for f in batch], device=device)
            for f, result in zip(batch, postprocess(model(images, mask), orig)):
                results[f.index] = {k: v.cpu() for k, v in result.items()}
    return results


def predict(model, postprocess, frames, transform, batch_size=8, device="cpu", window=4):
    """Run the model over an iterable of Frames; yields (Frame, result or None), in order.

    result: PostProcess's dict (scores [k], labels [k], boxes [k, 4] xyxy in the frame's
    pixels, query_ids [k]); None for a frame that could not be read. Frames are read
    `window` batches at a time and grouped by their resized size (module docstring).
    """
    pending = []
    for frame in frames:
        pending.append(frame)
        if len(pending) == window * batch_size:
            results = _run(model, postprocess, pending, transform, batch_size, device)
            yield from ((f, results.get(f.index)) for f in pending)
            pending = []
    if pending:
        results = _run(model, postprocess, pending, transform, batch_size, device)
        yield from ((f, results.get(f.index)) for f in pending)


# ---- results ----

def select(result, threshold=0.0, max_detections=None):
    """The detections scoring >= threshold, best first, at most max_detections of them."""
    order = result["scores"].argsort(descending=True)
    order = order[result["scores"][order] >= threshold][:max_detections]
    return {k: v[order] for k, v in result.items()}


def coco_results(image_id, result, categories=None):
    """One image's selected detections -> COCO results dicts.

    bbox: [x, y, w, h] in the image's pixels (COCO's format, from xyxy). category_id: the
    dataset's id of the label (categories.id_of); a label with no category in the table (a
    class row no category was trained on, such as COCO's unused ids) is left out. With no
    table (categories None) the labels are the ids themselves."""
    out = []
    for score, label, (x1, y1, x2, y2) in zip(result["scores"].tolist(), result["labels"].tolist(),
                                              result["boxes"].tolist()):
        category = label if categories is None else categories.id_of.get(label)
        if category is None:
            continue
        out.append({"image_id": image_id, "category_id": category,
                    "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
    return out


def images_path(results_path):
    """The dataset file beside a results file: predictions.json -> predictions_images.json."""
    stem, ext = os.path.splitext(str(results_path))
    return f"{stem}_images{ext or '.json'}"


def write_results(path, detections, images, categories, num_classes, unreadable=()):
    """Write the results list to `path` and the COCO dataset file beside it (images_path).

    detections: COCO results dicts; images: COCO image dicts {id, file_name, width, height};
    categories: Categories or None (then ids 0 .. num_classes - 1, named by their number);
    unreadable: (file name, reason) of the inputs left out, kept in the dataset file."""
    names = categories.names if categories is not None else {i: str(i) for i in range(num_classes)}
    dataset = {"info": {"description": "minidetr predictions; results in " + os.path.basename(str(path))},
               "images": images, "annotations": [],
               "categories": [{"id": i, "name": name} for i, name in sorted(names.items(), key=lambda kv: str(kv[0]))],
               "unreadable": [{"file_name": name, "error": reason} for name, reason in unreadable]}
    os.makedirs(os.path.dirname(os.path.abspath(str(path))), exist_ok=True)
    for target, content in ((path, detections), (images_path(path), dataset)):
        write_bytes_atomic(target, json.dumps(content).encode())   # whole, or WriteError
    return path, images_path(path)


def save_image(image, path):
    """A drawing to `path` (format from its extension), whole or not at all: encoded in
    memory, then written through checkpoint.write_bytes_atomic (a full disk: WriteError
    naming the file and its size, the drawing there before unchanged)."""
    buffer = io.BytesIO()
    image.save(buffer, format=Image.registered_extensions().get(os.path.splitext(str(path))[1].lower(), "PNG"))
    write_bytes_atomic(path, buffer.getvalue())


def image_entry(frame, video=None):
    """COCO image dict of a frame; a video's frames also carry the file and frame number."""
    entry = {"id": frame.index + 1, "file_name": frame.name,
             "width": frame.image.width if frame.image else 0, "height": frame.image.height if frame.image else 0}
    if video is not None:
        entry.update(file_name=video, frame=frame.index)
    return entry


# ---- the whole road: inputs -> model -> json (+ drawings) ----

def output_kind(source, out):
    """What --out means for --image `source`: None, 'image', 'folder' or 'video'.

    A single image draws into an image file (prepare_output checks its extension); a folder
    into a folder (mirroring its tree); a video into a video file (same frame rate) or a
    folder of frames. Raises ValueError for the combinations that mean nothing."""
    if out is None:
        return None
    has_ext = bool(os.path.splitext(str(out))[1]) and not os.path.isdir(out)
    if os.path.isdir(source):
        if has_ext:
            raise ValueError(f"--out {out}: a folder of images draws into a folder; give a folder name "
                             f"(no extension)")
        return "folder"
    if is_video(source):
        if is_video(out) or not has_ext:
            return "video" if is_video(out) else "folder"
        raise ValueError(f"--out {out}: a video draws into a video file ({', '.join(VIDEO_EXTENSIONS[:4])}, "
                         f"...) or a folder of frames (no extension)")
    if is_video(out):
        raise ValueError(f"--out {out}: a drawn video needs a video --image")
    return "image"


def default_json(out, kind):
    """Where the results go when --json is not given."""
    if kind == "folder":
        return os.path.join(out, "predictions.json")
    return os.path.splitext(str(out))[0] + ".json" if out else "predictions.json"


def _drawn_path(out, name):
    """A drawn image's file under --out: the input's relative path, .png if PIL cannot write its type."""
    writable = {e for e, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}
    path = os.path.join(out, name)
    return path if os.path.splitext(name)[1].lower() in writable else path + ".png"


def predict_files(loaded, source, out=None, json_path=None, threshold=0.5, max_detections=100,
                  batch_size=None, device="cpu", progress=True):
    """Predict on an image file, a folder of images or a video; write the results (and drawings).

    Returns a dict: images (read), detections (written), unreadable [(name, reason)], seconds,
    json and images_json (the two files written), best (the highest score seen)."""
    from tqdm import tqdm
    kind = output_kind(source, out)
    video, rate = None, None
    if os.path.isdir(source):
        names = list_images(source)
        frames, total = image_frames(names, source), len(names)
    elif is_video(source):
        rate, total, _ = video_info(source)
        frames, video = video_frames(source), os.path.basename(str(source))
    else:
        frames, total = image_frames([os.path.basename(str(source))], os.path.dirname(str(source))), 1
    json_path = json_path or default_json(out, kind)
    names_by_label = loaded.categories.names_by_label() if loaded.categories is not None else None
    writer = VideoWriter(out, rate) if kind == "video" else None
    detections, images, unreadable, best = [], [], [], 0.0
    start = time.perf_counter()
    stream = predict(loaded.model, loaded.postprocess, frames, eval_transform(loaded.cfg),
                     batch_size or loaded.cfg.batch_size, device)
    for frame, result in tqdm(stream, total=total or None, unit="img", disable=not progress or total == 1,
                              file=sys.stderr):
        if result is None:
            unreadable.append((frame.name, frame.error))
            continue
        best = max([best] + result["scores"].tolist())
        kept = select(result, threshold, max_detections)
        detections += coco_results(frame.index + 1, kept, loaded.categories)
        images.append(image_entry(frame, video))
        if kind is None:
            continue
        drawn = draw_predictions(frame.image, kept, names_by_label, threshold=threshold)
        if kind == "video":
            writer.write(drawn)
        elif kind == "image":
            save_image(drawn, out)
        else:
            name = f"{os.path.splitext(video)[0]}_{frame.index:06d}.png" if video else frame.name
            target = _drawn_path(out, name)
            os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
            save_image(drawn, target)
    if writer is not None:
        writer.close()
    seconds = time.perf_counter() - start
    if total == 1 and unreadable and not (os.path.isdir(source) or video):   # nothing else to predict on
        raise OSError(f"--image: cannot read {source}: {unreadable[0][1]}")
    num_classes = loaded.cfg.num_classes
    written = write_results(json_path, detections, images, loaded.categories, num_classes, unreadable)
    return {"images": len(images), "detections": len(detections), "unreadable": unreadable,
            "seconds": seconds, "json": written[0], "images_json": written[1], "best": best}
