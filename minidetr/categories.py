"""Categories: a dataset's category ids <-> the rows of the class head, and their names.

DETR trains with COCO's category ids as they are: id 18 ("dog") is row 18 of the class
head, so the head has 91 rows for 80 categories (COCO's ids run 1..90 with gaps, row 0 is
never a target). minidetr keeps that convention wherever it costs little, because every
official checkpoint's rows mean COCO ids and a model's labels then read as the dataset's
ids with no table in between.

Labelling tools and databases hand out ids such as 987654321, and "largest id + 1" rows
would be a classifier with a billion rows. So:

    ids used as labels   when every id is an int >= 0 and largest id + 1 <= 2 n + 10
                         (n categories listed; COCO: 91 <= 170)
    labels 0 .. n-1      otherwise, in increasing id order, and mapped back to the
                         dataset's ids wherever a label leaves the model (the COCO
                         evaluation, results json, drawings)

A checkpoint stores the table (`Categories.to_list`), so predictions keep the user's ids and
names, and fine-tuning can carry class rows over by name (minidetr/finetune.py).
"""
import re

from minidetr.shapes import SHAPE_NAMES

# COCO 2017's 80 categories by id (instances_*.json), what an official COCO checkpoint's rows mean
COCO_NAMES = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train",
    8: "truck", 9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign",
    14: "parking meter", 15: "bench", 16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep",
    21: "cow", 22: "elephant", 23: "bear", 24: "zebra", 25: "giraffe", 27: "backpack",
    28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase", 34: "frisbee", 35: "skis",
    36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat", 40: "baseball glove",
    41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle", 46: "wine glass",
    47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple",
    54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza",
    60: "donut", 61: "cake", 62: "chair", 63: "couch", 64: "potted plant", 65: "bed",
    67: "dining table", 70: "toilet", 72: "tv", 73: "laptop", 74: "mouse", 75: "remote",
    76: "keyboard", 77: "cell phone", 78: "microwave", 79: "oven", 80: "toaster", 81: "sink",
    82: "refrigerator", 84: "book", 85: "clock", 86: "vase", 87: "scissors", 88: "teddy bear",
    89: "hair drier", 90: "toothbrush",
}


def ids_are_labels(ids):
    """True when the ids can index the class head directly (see the module docstring)."""
    ids = list(ids)
    if not all(type(i) is int and i >= 0 for i in ids):   # a bool is no id; strings need a table
        return False
    return not ids or max(ids) + 1 <= 2 * len(ids) + 10


def name_key(name):
    """What two category names must share to be one class: case and whitespace ignored."""
    return re.sub(r"\s+", " ", str(name)).strip().lower()


class Categories:
    """The label (class-head row) of each category id, and back, with names.

    names: {category id: name}, the categories a dataset lists (or a checkpoint stored).
    labels: {category id: label}; default: the rule of the module docstring.
    num_classes: the rows the class head needs (largest label + 1, at least 1).
    """

    def __init__(self, names, labels=None):
        self.names = dict(names)
        if labels is None:
            ordered = sorted(self.names, key=lambda i: (isinstance(i, str), i))
            labels = ({i: i for i in ordered} if ids_are_labels(ordered)
                      else {i: label for label, i in enumerate(ordered)})
        self.label_of = dict(labels)                            # category id -> label
        self.id_of = {label: i for i, label in self.label_of.items()}   # label -> category id
        self.num_classes = max(self.label_of.values(), default=0) + 1

    @property
    def remapped(self):
        """True when labels are not the ids themselves (sparse or non-integer ids)."""
        return any(label != i for i, label in self.label_of.items())

    def name_of_label(self, label):
        """The category name of a predicted label, or the label as text if it has none."""
        i = self.id_of.get(int(label))
        return self.names.get(i, str(label)) if i is not None else str(label)

    def names_by_label(self):
        """{label: name} for drawing."""
        return {label: self.names.get(i, str(i)) for i, label in self.label_of.items()}

    def to_list(self):
        """Plain containers for a checkpoint (torch.load weights_only reads them):
        [{'label', 'id', 'name'}] in label order."""
        return [{"label": label, "id": i, "name": self.names.get(i, "")}
                for i, label in sorted(self.label_of.items(), key=lambda item: item[1])]

    @classmethod
    def from_list(cls, entries):
        return cls({e["id"]: e["name"] for e in entries}, {e["id"]: e["label"] for e in entries})

    @classmethod
    def from_datasets(cls, *categories_lists):
        """One table for every split: the union of their json 'categories' lists (same id, same row)."""
        names = {}
        for categories in categories_lists:
            for cat in categories:
                names.setdefault(cat["id"], cat.get("name", ""))
        return cls(names)

    @classmethod
    def coco(cls):
        """COCO's 80 categories, ids as labels: what an official COCO checkpoint was trained on."""
        return cls(COCO_NAMES)

    def __repr__(self):
        return (f"Categories({len(self.names)} categories, {self.num_classes} rows"
                f"{', remapped' if self.remapped else ''})")


def for_checkpoint(ckpt, cfg=None):
    """The categories a loaded checkpoint's class rows mean, or None if it does not say.

    A minidetr checkpoint stores its table ('categories'); an official one (no minidetr
    'config') was trained on COCO with ids as labels; an older minidetr checkpoint trained
    on the built-in shapes dataset (no dataset flags in its config) means the shapes' names.
    """
    if isinstance(ckpt, dict) and ckpt.get("categories"):
        return Categories.from_list(ckpt["categories"])
    if isinstance(ckpt, dict) and "config" not in ckpt:
        return Categories.coco()
    settings = (ckpt or {}).get("config", {}) if cfg is None else cfg.to_dict()
    if settings.get("coco_path"):          # COCO 2017 itself: its ids are the labels
        return Categories.coco()
    if not (settings.get("coco_path") or settings.get("train_json") or settings.get("val_json")):
        return Categories({i + 1: name for i, name in enumerate(SHAPE_NAMES)})
    return None
