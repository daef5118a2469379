"""What train.py's loop stands on: datasets, and exact resume (the optimiser is in optim.py).

train.py holds the loop itself (data -> forward -> loss -> backward -> clip -> step -> log);
everything here is what that loop calls. Two properties matter beyond getting the numbers right:

- Determinism across interruption (`TrainingProgress`). The data order of epoch e is a
  permutation seeded by (seed, e); each sample's augmentation draws from a generator seeded
  by (seed, e, index); the loader's worker seeds come from its own generator. A checkpoint
  stores the model, optimiser, scheduler, scaler, every rank's global RNG (dropout,
  denoising noise) and how many batches of the epoch were done, so a resumed run continues
  with exactly the batches and random numbers an uninterrupted run would have used.
- Nothing silently wrong. A non-finite loss stops training with the epoch, the step and
  the loss terms that went non-finite (LossMeter). The loop looks every --log_every steps
  and before every checkpoint, in one host sync for all the steps since the last look, so
  a few updates may follow a NaN, but no checkpoint holds a non-finite model.
"""
import dataclasses
import os
import re
import signal
import time

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from minidetr import distributed
from minidetr.categories import Categories
from minidetr.check import check_before_training, split_files
from minidetr.checkpoint import (cannot_write, copy_atomic, is_official_checkpoint, load_safely, rng_state,
                                 save_atomic, set_rng_state)
from minidetr.data import CocoDetection, collate_fn, make_shapes_dataset, make_transforms


class DataError(RuntimeError):
    """A sample could not be loaded (missing or unreadable image, bad annotation).

    Raised with the dataset's own message (it names the file and the image id). Inside a
    DataLoader worker, torch re-raises it in the main process with the worker's traceback
    folded into the message; `message_of` recovers the one line a user needs.
    """

    @staticmethod
    def message_of(err):
        lines = [line for line in str(err).splitlines() if line.strip()]
        last = lines[-1] if lines else repr(err)
        return last.split("DataError: ", 1)[-1]


# ---- datasets ----

def build_datasets(cfg, categories=None):
    """(train, val) datasets: COCO, a custom COCO-format pair, or the built-in shapes.

    train is None with cfg.eval. Every split is checked before any is built
    (minidetr/check.py): DatasetError lists every defect that would stop or corrupt the run,
    and what training skips is named once. The class count they need is checked by
    `fit_num_classes`. Both splits share one category table (minidetr/categories.py):
    `categories` (a checkpoint's, when evaluating it) or the union of their json lists.
    """
    splits = ("val",) if cfg.eval else ("train", "val")
    if cfg.coco_path or cfg.train_json or cfg.val_json:
        files = {s: split_files(s, cfg.coco_path, getattr(cfg, f"{s}_json"), getattr(cfg, f"{s}_images"))
                 for s in splits}
    else:
        if distributed.is_main_process():      # one writer; the others wait for it
            make_shapes_dataset(num_train=cfg.shapes_train, num_val=cfg.shapes_val)
        distributed.barrier()
        paths = make_shapes_dataset(num_train=cfg.shapes_train, num_val=cfg.shapes_val)
        files = {s: (paths[f"{s}_json"], paths[f"{s}_images"]) for s in splits}
    data = check_before_training(files, verbose=distributed.is_main_process())
    categories = categories or Categories.from_datasets(*(data[s]["categories"] for s in splits))
    for s in splits:
        unknown = [c["id"] for c in data[s]["categories"] if c["id"] not in categories.label_of]
        if unknown:
            raise ValueError(f"{files[s][0]} lists category id {unknown[0]!r}, which the model's "
                             f"class head has no row for (it knows {len(categories.names)} categories)")
    if categories.remapped and distributed.is_main_process():
        largest = max(categories.label_of, key=lambda i: (isinstance(i, str), i))
        print(f"categories: {len(categories.names)} ids up to {largest!r}: the class head gets rows "
              f"0..{categories.num_classes - 1} in id order, mapped back to the ids in every result")
    built = {s: CocoDetection(folder, json_file, make_transforms(s, cfg.preset, cfg.image_size),
                              data=data[s], categories=categories)
             for s, (json_file, folder) in files.items()}
    return built.get("train"), built["val"]


def fit_num_classes(cfg, datasets, num_classes_given):
    """cfg, or a copy with num_classes = the class-head rows the datasets need.

    Rows: the largest category id + 1 (ids as labels), or the number of categories when the
    ids are sparse (minidetr/categories.py). A label >= num_classes would index past the
    classifier (or be read as "no object"): a --num_classes the user gave that is too small
    is an error naming the file that needs more; one the user did not give is set to the
    rows needed (the preset's 91 or 7 are COCO's and the shapes' own counts).
    """
    def rows(d):   # what this split's own categories need under the shared table
        return max((d.categories.label_of[i] for i in d.category_names), default=0) + 1
    largest = max((d for d in datasets if d is not None), key=rows)
    needed = rows(largest)
    if cfg.num_classes >= needed and (num_classes_given or cfg.num_classes == needed):
        return cfg
    if num_classes_given:
        what = (f"the {needed} rows its {len(largest.categories.names)} sparse category ids are given"
                if largest.categories.remapped else f"the largest category id + 1 = {needed}")
        raise ValueError(f"--num_classes {cfg.num_classes} is smaller than {what} "
                         f"in {largest.ann_file}; pass --num_classes {needed} or more")
    return dataclasses.replace(cfg, num_classes=needed)


# ---- deterministic, resumable data order ----

class SeededDataset(Dataset):
    """Wraps a dataset so item i of epoch e always gets the same augmentation.

    The transforms draw from torch's global generator; here that generator is forked and
    seeded per (seed, epoch, index) around each item, so the draw no longer depends on
    which worker loads the item or on what ran before (a resumed run loads a different
    first batch in each worker, yet every item comes out identical).
    """

    def __init__(self, dataset, seed):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch * 10_007 + index) % (2 ** 63))
            try:
                return self.dataset[index]
            except (OSError, ValueError) as err:   # the dataset's messages name file and id
                raise DataError(str(err)) from err


class SkipSampler(Sampler):
    """The epoch's order from `base`, without its first `skip` indices (resuming mid-epoch)."""

    def __init__(self, base, skip=0):
        self.base, self.skip = base, skip

    def __iter__(self):
        return iter(list(self.base)[self.skip:])

    def __len__(self):
        return max(len(self.base) - self.skip, 0)


def make_loader(dataset, cfg, epoch, train, skip_batches=0):
    """DataLoader for one epoch; DistributedSampler shards it over ranks (a world of one too)."""
    sampler = DistributedSampler(dataset, num_replicas=distributed.get_world_size(),
                                 rank=distributed.get_rank(), shuffle=train, seed=cfg.seed,
                                 drop_last=False)
    sampler.set_epoch(epoch)
    if not isinstance(dataset, SeededDataset):   # evaluation too: same error reporting
        dataset = SeededDataset(dataset, cfg.seed)
    dataset.epoch = epoch
    return DataLoader(dataset, batch_size=cfg.batch_size,
                      sampler=SkipSampler(sampler, skip_batches * cfg.batch_size),
                      collate_fn=collate_fn, num_workers=cfg.num_workers,
                      generator=torch.Generator().manual_seed(cfg.seed + epoch),
                      drop_last=False)


# ---- stopping cleanly on SIGINT / SIGTERM ----

class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks before each step (then it saves).

    Under torchrun the ranks must stop after the same step, or those still training wait
    forever in the next all-reduce: should_stop() agrees on the flag across ranks. A
    terminal's Ctrl-C reaches every worker and torchrun, which forwards it again, so a
    repeat within REPEAT_S is the same request; a later one means "stop now, no saving".
    """
    REPEAT_S = 2.0

    def __init__(self):
        self.requested = False
        self._since = 0.0
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:   # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if not self.requested:
            self.requested, self._since = True, time.monotonic()
        elif time.monotonic() - self._since > self.REPEAT_S:   # a second Ctrl-C means now
            raise KeyboardInterrupt

    def should_stop(self):
        """True on every rank once any rank was asked to stop (a collective under torchrun)."""
        return distributed.all_reduce_mean(float(self.requested)) > 0

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ---- checkpoints: what a run saves, and what it checks before resuming ----

# settings that decide the model's weights and what they mean: a checkpoint cannot continue
# under others (num_classes is checked once the dataset has set it)
MODEL_KEYS = ("variant", "preset", "dn", "backbone", "backbone_stage", "dilation", "hidden_dim",
              "nheads", "enc_layers", "dec_layers", "dim_feedforward", "num_queries", "activation",
              "smca_scale", "smca_multiscale")


def read_resume(path, cfg):
    """Load --resume and check it fits this run's model; ValueError says what to do if not.

    Runs before the dataset and the model are built, so a wrong file stops the run at once.
    """
    ckpt = load_safely(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{path} has no 'model' entry; is it a minidetr or DETR checkpoint?")
    if is_official_checkpoint(ckpt):   # its weights have the reference's names, not ours
        raise ValueError(f"{path} is an official DETR-family checkpoint; convert it first: python -m "
                         f"minidetr.convert --variant {cfg.variant} --src {path} --dst converted.pth, "
                         f"then --resume converted.pth")
    check_same_settings(path, ckpt, cfg, MODEL_KEYS)
    return ckpt


def check_same_settings(path, ckpt, cfg, keys):
    saved = ckpt.get("config", {})
    for key in keys:
        if key in saved and saved[key] != getattr(cfg, key, None):
            raise ValueError(f"{path} was trained with --{key} {saved[key]!r} but this run has "
                             f"{getattr(cfg, key, None)!r}; pass the same settings to resume")


def load_weights(path, ckpt, model, cfg):
    """model.load_state_dict(ckpt['model']), a mismatch told as what to do (ValueError)."""
    check_same_settings(path, ckpt, cfg, ("num_classes",))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:   # missing / unexpected / wrongly shaped weights
        detail = " ".join(str(err).split())   # torch lists every key: keep the start
        raise ValueError(f"the weights in {path} do not fit this model; resume with the settings "
                         f"it was trained with ({detail[:240]}{'...' * (len(detail) > 240)})") from None


def load_training_state(path, ckpt, cfg, optimizer, scheduler, scaler):
    """Optimiser, scheduler, scaler and this rank's RNG from a checkpoint read by read_resume."""
    if ckpt.get("step", 0):
        # mid-epoch, `step` counts batches of this size on this many ranks
        check_same_settings(path, ckpt, cfg, ("batch_size",))
        if ckpt.get("world_size", 1) != distributed.get_world_size():
            raise ValueError(f"{path} stopped mid-epoch with {ckpt.get('world_size', 1)} process(es) "
                             f"but this run has {distributed.get_world_size()}; resume with as many, "
                             f"or from an end-of-epoch checkpoint_eNNNN.pth")
    if "optimizer" in ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["lr_scheduler"])
        if ckpt.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(ckpt["scaler"])
        if "rng" in ckpt:   # one state per rank (a world of another size: from an epoch's end)
            rngs = ckpt["rng"] if isinstance(ckpt["rng"], list) else [ckpt["rng"]]
            set_rng_state(rngs[distributed.get_rank() % len(rngs)])


def rotate_checkpoints(out_dir, epoch, keep):
    """Copy checkpoint.pth to checkpoint_eEEEE.pth, then drop the copies of epochs <= epoch - keep.

    The copy goes through a temporary name too: a crash leaves no half-written epoch file,
    and a full disk raises WriteError (see checkpoint_write_failed) with no temporary file left.
    """
    if keep <= 1:
        return
    target = os.path.join(out_dir, f"checkpoint_e{epoch:04d}.pth")
    copy_atomic(os.path.join(out_dir, "checkpoint.pth"), target)
    for name in os.listdir(out_dir):
        old = re.fullmatch(r"checkpoint_e(\d+)\.pth", name)
        if old and int(old.group(1)) <= epoch - keep:
            os.remove(os.path.join(out_dir, name))


# ---- where training stands, and how it continues exactly ----

class TrainingProgress:
    """Epoch, step and global step of a run, and the exact-resume machinery around them.

    batches() yields the epoch's remaining batches in their seeded order (a resumed run
    skips the ones done) and ends early, at a step boundary, when a stop is requested
    (SIGINT/SIGTERM, agreed over ranks) or max_steps is reached. end_epoch() moves on,
    save() writes model, optimiser, scheduler, scaler and every rank's RNG state.
    Use as a context manager: it installs the signal handlers for the run.
    """

    def __init__(self, cfg, train_set, epoch=0, step=0):
        self.cfg, self.data = cfg, SeededDataset(train_set, cfg.seed)
        self.categories = train_set.categories   # saved with the weights: what their class rows mean
        self.steps_per_epoch = -(-len(train_set) // (cfg.batch_size * distributed.get_world_size()))
        self.epoch, self.step = epoch, step
        self.global_step = epoch * self.steps_per_epoch + step
        self.stop, self.ended_early = StopRequest(), False
        self.step_times = []   # this epoch's, see batches()
        if cfg.max_steps and self.global_step >= cfg.max_steps:   # resumed at the budget
            self.epoch = cfg.epochs
            if distributed.is_main_process():
                print(f"nothing to train: the checkpoint is at step {self.global_step}, "
                      f"--max_steps is {cfg.max_steps}")
        elif epoch >= cfg.epochs and distributed.is_main_process():   # resumed a finished run
            print(f"nothing to train: the checkpoint has done {epoch} epochs and --epochs is "
                  f"{cfg.epochs} (a larger --epochs trains on)")

    def __enter__(self):
        self.stop.__enter__()
        return self

    def __exit__(self, *exc):
        self.stop.__exit__(*exc)

    def batches(self):
        """This epoch's remaining batches; checked for a stop before each, counted after each."""
        loader = make_loader(self.data, self.cfg, self.epoch, train=True, skip_batches=self.step)
        self.step_times, start = [], time.perf_counter()   # per step: loading + training, seconds
        for batch in loader:
            # before each step, so a Ctrl-C during an evaluation also stops before the next one
            if self.stop.should_stop():
                self.ended_early = True
                return
            yield batch
            now = time.perf_counter()
            self.step_times.append(now - start)
            start = now
            self.step, self.global_step = self.step + 1, self.global_step + 1
            if self.cfg.max_steps and self.global_step >= self.cfg.max_steps:
                self.ended_early = True
                return

    def end_epoch(self):
        """After batches(): True (and on to the next epoch, step 0) if the epoch ran to its end."""
        finished = self.step >= self.steps_per_epoch
        if finished:
            self.epoch, self.step = self.epoch + 1, 0
        return finished

    def should_evaluate(self, finished):
        """Every eval_every epochs, and always after the last step the run will take."""
        last = self.epoch >= self.cfg.epochs or self.ended_early
        return finished and self.epoch % self.cfg.eval_every == 0 or last

    def save(self, out_dir, model, optimizer, scheduler, scaler, finished, extra=None):
        """checkpoint.pth (+ the epoch's copy). Call on every rank: the RNG states are gathered.

        extra: more entries for the checkpoint, tensors and plain containers only (so that
        weights_only=True loads them), e.g. --log_instability's last assignment.
        """
        rngs = distributed.all_gather_object(rng_state())
        if not out_dir:
            return
        save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "lr_scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict(),      # {} when disabled (no fp16)
                     "epoch": self.epoch, "step": self.step, "config": self.cfg.to_dict(),
                     "rng": rngs, "world_size": len(rngs), "categories": self.categories.to_list(),
                     **(extra or {})},
                    os.path.join(out_dir, "checkpoint.pth"))
        if finished:
            rotate_checkpoints(out_dir, self.epoch, self.cfg.keep_checkpoints)


class TimeLimit:
    """--time_limit: as many of --epochs as fit in the minutes given, on this machine.

    The tiny preset's 10 epochs take 7-8 minutes on a 2-core CPU with bf16 instructions and
    two to three times that on one without (AVX2 only: its ResNet runs in float32, and
    older cores are slower). Which one a run is on shows in the time its first epoch takes,
    so after that epoch's evaluation (the first one this process runs to its end), with
        t_epoch = that epoch's training + evaluation, t = the time since the run started,
    the run keeps
        epochs' = min(epochs, done + floor((limit - t) / t_epoch))
    and says so in one line. The lr drop stays at its epoch, and falls away if the run ends
    first: dropped early, while AP climbs fastest, it costs more than it gives (dn, the same
    seed: AP50 0.335 after 1,250 steps with the drop after 1,000, 0.436 without it;
    benchmarks/RESULTS.md, "The default runs"). The decision is saved in the checkpoint
    ("schedule") and a resumed run keeps it.
    """

    clock = staticmethod(time.time)   # read once in each method (tests give it a fake)

    def __init__(self, cfg, ckpt=None):
        """Made as the run starts, before the dataset is built: t counts its generation too."""
        self.minutes, self.start = cfg.time_limit, self.clock()
        self.schedule = (ckpt or {}).get("schedule")   # {"epochs", "lr_drop"} once decided
        self.epoch_start = None

    def resumed(self, cfg):
        """cfg with the epochs a resumed run's time limit kept, if it decided."""
        if not (self.minutes and self.schedule):
            return cfg
        return dataclasses.replace(cfg, **self.schedule)

    def epoch_begins(self):
        self.epoch_start = self.clock()

    def fit(self, cfg, done):
        """After an evaluation that followed a whole epoch: cfg cut to what fits (or cfg)."""
        if not self.minutes or self.schedule is not None or self.epoch_start is None:
            return cfg
        now = self.clock()   # under torchrun every rank takes the same decision: the ranks' mean
        per_epoch = distributed.all_reduce_mean(now - self.epoch_start)
        left = distributed.all_reduce_mean(self.minutes * 60 - (now - self.start))
        epochs = min(cfg.epochs, max(done, done + int(left // max(per_epoch, 1e-9))))
        self.schedule = {"epochs": epochs}
        if epochs == cfg.epochs:
            return cfg
        if distributed.is_main_process():
            drop = (f"the lr drop after epoch {cfg.lr_drop} falls away" if cfg.lr_drop >= epochs
                    else f"the lr drops after epoch {cfg.lr_drop}")
            print(f"time limit: an epoch takes {per_epoch:.0f} s here, so {epochs} of the {cfg.epochs} "
                  f"epochs fit in {self.minutes:g} minutes ({drop}); --time_limit 0 trains all "
                  f"{cfg.epochs}", flush=True)
        return dataclasses.replace(cfg, epochs=epochs)

    def checkpoint_entry(self):
        return {"schedule": self.schedule} if self.schedule else {}


def checkpoint_write_failed(err, out_dir):
    """The one line when writing a file of the run failed (a full disk, say): checkpoint.pth,
    an epoch's copy or log.txt, named by the WriteError its writer raised with the bytes it
    needed; the writer left that file as it was, and checkpoint.pth (if written yet) is where
    to go on from."""
    resume = os.path.join(out_dir, "checkpoint.pth")
    return cannot_write(err.filename or resume, err, getattr(err, "needed", None),
                        then=f"continue with --resume {resume}" if os.path.isfile(resume) else "run it again")


# ---- per-step bookkeeping ----

def non_finite_message(losses, epoch, step):
    """What to say when the weighted loss is NaN or inf: the terms that went non-finite, what to try."""
    bad = sorted(k for k, v in losses.items() if not torch.isfinite(v).all())
    return (f"non-finite loss at epoch {epoch}, step {step}: {', '.join(bad) or 'the weighted sum'} "
            f"= {[float(losses[k]) for k in bad]}. The last good checkpoint was kept. Try a lower "
            f"--lr, --clip_max_norm 0.1, or --amp bf16 instead of fp16.")


class LossMeter:
    """The epoch's average of every loss, summed on the device in float64 (no host sync per
    step; the same sums, bit for bit, as adding up each step's .item() in Python), and the
    non-finite check of the steps since the last look, made when the loop looks.

    Keys: loss (the weighted total), k (weighted) for k in weight_dict, k_unscaled for all.
    """

    def __init__(self):
        self.sums, self.count = {}, 0
        self.unchecked = []    # (epoch, step, total, losses) of the steps since non_finite() last ran

    def add(self, total, losses, weight_dict, epoch, step):
        terms = {"loss": total}
        for k, v in losses.items():
            terms[f"{k}_unscaled"] = v
            if k in weight_dict:
                terms[k] = v.detach().double() * weight_dict[k]
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.detach().double()
        self.count += 1
        self.unchecked.append((epoch, step, total.detach(), {k: v.detach() for k, v in losses.items()}))

    def non_finite(self):
        """The error message for the first step since the last call whose weighted loss was
        NaN or inf (see non_finite_message), or None. One host sync for all those steps."""
        steps, self.unchecked = self.unchecked, []
        if not steps:
            return None
        finite = torch.isfinite(torch.stack([total for _, _, total, _ in steps]))
        if bool(finite.all()):
            return None
        epoch, step, _, losses = steps[int(torch.argmin(finite.int()))]   # the first False
        return non_finite_message(losses, epoch, step)

    def averages(self, lr):
        """{name: mean over the epoch's steps and the ranks} plus lr; one host sync."""
        out = {k: distributed.all_reduce_mean(float(v) / max(self.count, 1))
               for k, v in sorted(self.sums.items())}
        out["lr"] = lr
        return out
