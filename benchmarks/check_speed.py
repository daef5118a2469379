"""How long the dataset check takes on a dataset of COCO's size: every image's header read.

`python -m minidetr.check` and train.py's door check (minidetr/check.py) open every image
file once and read its header for the size (check_files). This script writes a dataset
of train2017's size, 118,287 small JPEGs of COCO's common sizes and a json with 7
annotations per image (COCO has 7.3), into a temporary folder, and times:

  files, cold-ish  check_files right after the files' pages were dropped from the page
                   cache (posix_fadvise DONTNEED per file, after a sync; no root needed,
                   but the folder's inodes and directory entries stay cached, so a really
                   cold disk is slower),
  files, warm      the same again, the files now in the page cache,
  split, warm      check_split: json.load and every json check, then the files,

each with check.FILE_THREADS threads and with 1, to show what the thread pool buys.
Nothing is written to RESULTS.md: copy the printed lines there.

    python benchmarks/check_speed.py                          # 118,287 images in a temp dir
    python benchmarks/check_speed.py --images 5000 --keep ds_folder
"""
import argparse
import io
import json
import os
import shutil
import tempfile
import time

from PIL import Image

from common import cpu_model
from minidetr import check

# train2017's most common sizes (w, h); what matters is that each file's header holds one
SIZES = [(640, 480), (640, 427), (480, 640), (640, 426), (427, 640), (500, 375), (640, 424), (612, 612)]


def write_dataset(folder, n_images, anns_per_image):
    """n_images JPEGs (flat grey: a few hundred bytes, the header as a camera's) + ann.json."""
    encoded = {}
    for size in SIZES:   # encode each size once; the files are copies of these bytes
        buffer = io.BytesIO()
        Image.new("RGB", size, 128).save(buffer, "JPEG", quality=75)
        encoded[size] = buffer.getvalue()
    os.makedirs(os.path.join(folder, "img"), exist_ok=True)
    images, annotations = [], []
    for i in range(n_images):
        size = SIZES[i % len(SIZES)]
        name = f"{i:012d}.jpg"   # COCO's naming
        with open(os.path.join(folder, "img", name), "wb") as f:
            f.write(encoded[size])
        images.append({"id": i, "file_name": name, "width": size[0], "height": size[1]})
        for k in range(anns_per_image):
            annotations.append({"id": i * anns_per_image + k, "image_id": i, "category_id": 1 + k % 80,
                                "bbox": [10.0 + k, 20.0, 50.5, 40.25], "area": 2030.0, "iscrowd": 0})
    categories = [{"id": c, "name": f"class {c}"} for c in range(1, 81)]
    json_file = os.path.join(folder, "ann.json")
    with open(json_file, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return json_file, os.path.join(folder, "img")


def drop_from_page_cache(image_folder):
    """Evict every image file's pages (not its inode): the next read goes to the disk."""
    os.sync()   # dirty pages cannot be dropped; the files were just written
    for name in os.listdir(image_folder):
        fd = os.open(os.path.join(image_folder, name), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=118_287, help="train2017 has 118,287")
    p.add_argument("--annotations_per_image", type=int, default=7)
    p.add_argument("--keep", help="write the dataset here and keep it (default: a temp dir, removed)")
    args = p.parse_args()
    folder = args.keep or tempfile.mkdtemp(prefix="check_speed_")
    try:
        seconds, (json_file, image_folder) = timed(lambda: write_dataset(folder, args.images,
                                                                          args.annotations_per_image))
        print(f"wrote {args.images:,} images, {args.images * args.annotations_per_image:,} annotations "
              f"to {folder} in {seconds:.1f} s")
        data, _ = check.read_json(json_file)
        images = check.check_images(data, json_file, [])
        threads = check.FILE_THREADS
        for n_threads in (threads, 1):
            check.FILE_THREADS = n_threads   # check_files reads it at each call
            drop_from_page_cache(image_folder)
            def files():
                return check.check_files(images, json_file, image_folder, show_progress=False)
            cold, found = timed(files)
            assert found == [], found[:3]   # every file is of its json size
            warm, _ = timed(files)
            split, _ = timed(lambda: check.check_split(json_file, image_folder, show_progress=False))
            print(f"{n_threads} thread(s): files cold-ish {cold:.1f} s ({cold / len(images) * 1e6:.0f} us "
                  f"a file), warm {warm:.1f} s ({warm / len(images) * 1e6:.0f} us), whole split warm {split:.1f} s")
        check.FILE_THREADS = threads
        load = os.getloadavg()
        print(f"CPU: {cpu_model()}, {os.cpu_count()} logical cores; load average over 1/5/15 min "
              f"{load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} (other work shares the cores)")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
