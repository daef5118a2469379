"""Fine-tuning: a new run that starts from another run's weights, on other data and classes.

`--resume` continues a run exactly (optimiser, epoch, RNG); `--finetune PATH` takes only
the weights and trains them as a new run: a new optimiser, epoch 0, this run's schedule and
data. PATH may be a minidetr checkpoint or an official one of any of the five repositories
convert.py reads (converted here, on the fly). What is taken, tensor by tensor:

    architecture   the checkpoint's (variant, width, layers, queries, backbone, the
                   variant's own settings) unless a flag says otherwise; a flag that cannot
                   load (another width) stops with both values
    weights        every tensor whose name and shape match the new model
    queries        a smaller --num_queries takes the first N (query_embed / refpoint_embed)
    class rows     class_embed (and DN's label_enc) have one row per class, so they follow
                   the categories, not the row numbers: a new category whose name the
                   checkpoint knows ("Dog " = "dog") gets that category's trained row; the
                   others keep the fresh rows build() drew with the variant's own init
                   (nn.Linear's uniform, the focal prior bias -log(99)). The rows that are
                   no class move to their new place: softmax's no-object row (DETR, last
                   row) and label_enc's "unknown" row (DN-DETR, last row).

A checkpoint knows its categories when it stores a table (every minidetr checkpoint from
this version on: categories.py) or is an official COCO one (COCO's 80 names by id).
"""
import argparse
import dataclasses
from dataclasses import dataclass, field

from minidetr.categories import name_key
from minidetr.config import config_from_args

# [Q, *] tensors: one row per query
QUERY_KEYS = ("queries.query_embed.weight", "queries.refpoint_embed.weight")
# [rows, *] tensors whose rows are classes (+ softmax's no-object / label_enc's unknown row)
CLASS_KEYS = ("class_embed.weight", "class_embed.bias", "denoiser.label_enc.weight")
# settings that decide what the weights are and mean: the checkpoint's unless given
ARCH_KEYS = ("variant", "dn", "backbone", "backbone_stage", "dilation", "hidden_dim", "nheads",
             "enc_layers", "dec_layers", "dim_feedforward", "num_queries", "activation",
             "smca_scale", "smca_multiscale", "smca_ms_form", "smooth", "pe_temperature", "focal_alpha")
# of those, the ones a given flag may change (the rest would leave weights that do not
# fit or mean nothing): fewer queries, denoising on or off, another SMCA beta
MAY_CHANGE = ("dn", "num_queries", "smooth")
# models with the same parameters apart from denoising's label_enc
FAMILY = {"detr": "detr", "conditional": "conditional", "smca": "smca", "dab": "anchor", "dn": "anchor"}


@dataclass
class Source:
    """A checkpoint read for fine-tuning: its settings, minidetr-named weights, categories
    (convert.read_any_checkpoint reads minidetr's files and converts official ones)."""
    path: str
    settings: dict
    state_dict: dict
    categories: object = None          # categories.Categories, or None when it does not say


def config_for(args, source):
    """This run's Config: the flags given, the checkpoint's architecture for the rest.

    ValueError (naming the flag and both values) for a flag that cannot load the weights.
    """
    given = {k: v for k, v in vars(args).items() if v is not None}
    saved = source.settings
    variant = given.get("variant", saved["variant"])
    if FAMILY.get(variant, variant) != FAMILY[saved["variant"]]:   # (an unknown name: Config says so)
        raise ValueError(f"--variant {variant} cannot load {source.path}: it holds a "
                         f"{saved['variant']} model; leave --variant out to fine-tune it as one")
    for key in ARCH_KEYS:
        if key in given and key not in MAY_CHANGE + ("variant",) and given[key] != saved[key]:
            raise ValueError(f"--{key} {given[key]} cannot load {source.path}: it was trained with "
                             f"--{key} {saved[key]}; leave --{key} out to use the checkpoint's")
    if given.get("num_queries", 0) > saved["num_queries"]:
        raise ValueError(f"--num_queries {given['num_queries']} is more than the "
                         f"{saved['num_queries']} queries of {source.path}: fine-tuning takes "
                         f"the first N of them, so N <= {saved['num_queries']}")
    # the checkpoint's architecture, except where a flag was given (or --variant chose dn)
    inherited = {k: saved[k] for k in ARCH_KEYS if k not in given and not (k == "dn" and "variant" in given)}
    return config_from_args(argparse.Namespace(**{**vars(args), **inherited}))


# ---- loading the weights ----

@dataclass
class Report:
    """What fine-tuning took from the checkpoint, for the terminal and log.txt's first line."""
    source: str
    loaded: int = 0                        # tensors copied whole (name and shape match)
    carried: list = field(default_factory=list)       # category names whose rows were copied
    fresh: list = field(default_factory=list)         # category names with freshly drawn rows
    special_rows: list = field(default_factory=list)  # no-object / unknown rows moved over
    queries: str = ""                      # "first 40 of 300", when cut
    by_row: bool = False                   # carried by row number: the checkpoint names no category
    ignored: list = field(default_factory=list)       # checkpoint tensors with no place

    def lines(self):
        names = lambda xs: ", ".join(xs[:8]) + (f", ... ({len(xs)})" if len(xs) > 8 else "")
        rows = [("loaded", f"{self.loaded} tensors (name and shape match)"),
                ("carried by row", f"{len(self.carried)} classes (the checkpoint names none; the class "
                                   f"counts agree)") if self.by_row else
                ("carried by name", f"{len(self.carried)} classes" + (f": {names(self.carried)}" if self.carried else "")),
                ("re-initialised", f"{len(self.fresh)} classes" + (f": {names(self.fresh)}" if self.fresh else "")
                 + (f"; {', '.join(self.special_rows)} carried" if self.special_rows else ""))]
        if self.queries:
            rows.append(("queries", self.queries))
        rows.append(("ignored", f"{len(self.ignored)} tensors" + (f": {names(self.ignored)}" if self.ignored else "")))
        return [f"  {title:16s} {text}" for title, text in rows]

    def to_dict(self):
        return dataclasses.asdict(self)


def row_map(source, categories, num_new, num_old, focal_new, focal_old, by_name=True):
    """{new row: old row} for the class tensors, and the report's names.

    A category whose name (case and whitespace ignored) the checkpoint's table holds takes
    that category's row. Without a table on the checkpoint's side, rows are taken by
    position only when the class counts agree (the same labels assumed). The no-object row
    (softmax: row num_classes) is handled by the caller, as it exists only for softmax.
    """
    new_names = categories.names_by_label() if categories is not None else {}
    if not by_name or focal_new != focal_old:
        return {}, [], sorted(new_names.values())
    if source.categories is None:
        if num_new == num_old:
            return {r: r for r in range(num_new)}, sorted(new_names.values()), []
        return {}, [], sorted(new_names.values())
    old_rows = {name_key(name): label for label, name in source.categories.names_by_label().items()}
    mapping, carried, fresh = {}, [], []
    for label, name in sorted(new_names.items()):
        old = old_rows.get(name_key(name))
        if old is not None and old < num_old:
            mapping[label] = old
            carried.append(name)
        else:
            fresh.append(name)
    return mapping, carried, fresh


def load_for_finetune(model, source, cfg, categories, by_name=True):
    """Fill `model` (built for this run's classes and queries) from source; -> Report.

    categories: this run's Categories (the dataset's), for carrying class rows by name.
    by_name False draws every class row fresh (the benchmark's control).
    """
    target = model.state_dict()
    report = Report(source.path)
    num_old, num_new = source.settings["num_classes"], cfg.num_classes
    focal_old, focal_new = source.settings["focal_alpha"] is not None, cfg.focal_alpha is not None
    mapping, report.carried, report.fresh = row_map(source, categories, num_new, num_old,
                                                    focal_new, focal_old, by_name)
    report.by_row = source.categories is None and bool(mapping)
    state = {}
    for name, value in source.state_dict.items():
        if name not in target:
            report.ignored.append(name)
        elif value.shape[1:] != target[name].shape[1:]:          # another width: nothing fits
            report.ignored.append(f"{name} {tuple(value.shape)} -> {tuple(target[name].shape)}")
        elif name in CLASS_KEYS:
            state[name] = carry_rows(target[name], value, mapping, name, num_new, num_old,
                                     focal_new and focal_old, report)
        elif name in QUERY_KEYS and value.shape[0] > target[name].shape[0]:
            state[name] = value[:target[name].shape[0]]          # the first N queries
            report.queries = f"first {target[name].shape[0]} of {value.shape[0]}"
            report.loaded += 1
        elif value.shape != target[name].shape:
            report.ignored.append(f"{name} {tuple(value.shape)} -> {tuple(target[name].shape)}")
        else:   # (a 0-d tensor has shape[1:] == () too and lands here)
            state[name] = value
            report.loaded += 1
    # a part the checkpoint has no weights for (denoising switched on) keeps build()'s init
    report.ignored += [f"(kept fresh) {k}" for k in target if k not in state and not counter(k)]
    report.ignored = [k for k in report.ignored if not counter(k)]
    model.load_state_dict({**target, **state})
    return report


def counter(name):
    """BatchNorm's step counter: no weight (trainable BN has it, DETR's FrozenBatchNorm2d not)."""
    return name.endswith("num_batches_tracked")


def carry_rows(fresh, old, mapping, name, num_new, num_old, both_focal, report):
    """The new class tensor: build()'s fresh rows, with mapped rows copied from the old one.

    fresh [num_new (+1), *], old [num_old (+1), *]. The extra last row is softmax's no-object
    class (class_embed without focal loss) or DN's "unknown" label (label_enc, both heads):
    it keeps its meaning, so it moves from row num_old to row num_new.
    """
    out = fresh.clone()
    for new_row, old_row in mapping.items():
        out[new_row] = old[old_row]
    has_extra = name.startswith("denoiser.") or not both_focal and fresh.shape[0] == num_new + 1
    if has_extra and old.shape[0] == num_old + 1:
        out[num_new] = old[num_old]
        what = "unknown-label row" if name.startswith("denoiser.") else "no-object row"
        if what not in report.special_rows:
            report.special_rows.append(what)
    return out
