"""What makes a run stoppable and resumable: where training stands, and how it ends.

train.py holds the loop itself (data -> forward -> loss -> backward -> clip -> step -> log);
the data it reads is minidetr/data.py's, the checkpoints it writes and resumes from are
minidetr/checkpoint.py's, the optimiser is minidetr/optim.py's. What is here:

- Determinism across interruption (`TrainingProgress`). The data order of epoch e is a
  permutation seeded by (seed, e); each sample's augmentation draws from a generator seeded
  by (seed, e, index) (data.SeededDataset); the loader's worker seeds come from its own
  generator. A checkpoint stores the model, optimiser, scheduler, scaler, every rank's
  global RNG (dropout, denoising noise) and how many batches of the epoch were done, so a
  resumed run continues with exactly the batches and random numbers an uninterrupted run
  would have used.
- Stopping: Ctrl-C / SIGTERM at a step boundary with a checkpoint (`StopRequest`), and
  --time_limit's epochs that fit (`TimeLimit`).
- Nothing silently wrong. A non-finite loss stops training with the epoch, the step and
  the loss terms that went non-finite (LossMeter). The loop looks every --log_every steps
  and before every checkpoint, in one host sync for all the steps since the last look, so
  a few updates may follow a NaN, but no checkpoint holds a non-finite model.
"""
import dataclasses
import os
import signal
import time

import torch

from minidetr import distributed
from minidetr.checkpoint import rng_state, rotate_checkpoints, save_atomic
from minidetr.data import SeededDataset, make_loader


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
    older cores are slower). So the run times itself: after each evaluation that follows a
    whole epoch, with
        t_epoch = the mean time of this process's epochs, evaluation included,
        t = the time since the run started (the dataset's generation and check included),
    it stops there when another epoch would end past the limit, t + t_epoch > limit, and
    says so in one line. The mean, not the first epoch alone: later epochs may take longer
    (a shared machine's neighbours; on a 2-core EPYC they took up to 10% more). The lr drop
    stays at its epoch and falls away when the run ends first: dropped early, while AP
    climbs fastest, it costs more than it gives (dn, the same seed: AP50 0.335 after 1,250
    steps with the drop after 1,000, 0.436 without it; benchmarks/RESULTS.md, "The default
    runs"). The cut is saved in the checkpoint ("schedule": the epochs it kept) and a
    resumed run keeps it; a resumed run that was not cut counts its own time only.
    """

    clock = staticmethod(time.time)   # read once in each method (tests give it a fake)

    def __init__(self, cfg, ckpt=None):
        """Made as the run starts, before the dataset is built: t counts its generation too."""
        self.minutes, self.start = cfg.time_limit, self.clock()
        self.schedule = (ckpt or {}).get("schedule")   # {"epochs": kept} once cut
        self.epoch_start, self.epoch_times = None, []

    def resumed(self, cfg):
        """cfg with the epochs a resumed run's time limit kept, if it cut them."""
        if not (self.minutes and self.schedule):
            return cfg
        return dataclasses.replace(cfg, **self.schedule)

    def epoch_begins(self):
        self.epoch_start = self.clock()

    def fit(self, cfg, done):
        """After the evaluation of a whole epoch (`done` epochs done): cfg, or cfg cut to
        `done` epochs if another would end past the limit."""
        if not self.minutes or self.epoch_start is None or done >= cfg.epochs:
            return cfg
        now = self.clock()
        self.epoch_times.append(now - self.epoch_start)
        self.epoch_start = None
        # under torchrun every rank takes the same decision: the ranks' mean
        per_epoch = distributed.all_reduce_mean(sum(self.epoch_times) / len(self.epoch_times))
        elapsed = distributed.all_reduce_mean(now - self.start)
        if elapsed + per_epoch <= self.minutes * 60:
            return cfg
        self.schedule = {"epochs": done}
        if distributed.is_main_process():
            print(f"time limit: an epoch takes {per_epoch:.0f} s here and {elapsed / 60:.1f} of the "
                  f"{self.minutes:g} minutes have passed, so the run stops after {done} of its "
                  f"{cfg.epochs} epochs" + (f" (before the lr drop after epoch {cfg.lr_drop})"
                                            if cfg.lr_drop >= done and cfg.lr_drop < cfg.epochs else "")
                  + f"; --time_limit 0 trains all {cfg.epochs}", flush=True)
        return dataclasses.replace(cfg, epochs=done)

    def checkpoint_entry(self):
        return {"schedule": self.schedule} if self.schedule else {}


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
