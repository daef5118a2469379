"""What the benchmark scripts share: their sections of RESULTS.md, the line that says which
machine made the numbers, train.py's log.txt read as an AP curve, numbers read off such
curves, and train.py run so that a run stopped halfway continues.

Each script in benchmarks/ is a program (`python benchmarks/NAME.py`), and these helpers
used to live in convergence.py, which the others imported: to update a section of
RESULTS.md they loaded the quick race's run table and paper claims. Here they depend on no
benchmark, so a script imports what it uses and nothing else; what is about one benchmark
stays in its script. Python puts a script's own folder on sys.path, so `from common import`
finds this file; this file puts the repository there too (train.py, minidetr).
"""
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent      # the repository: train.py lives here
sys.path.insert(0, str(ROOT))

from minidetr.draw import read_log   # noqa: E402  (the project's reader of log.txt)


# ---- RESULTS.md sections and the machine ----

def update_section(path, name, body):
    """Replace the text between <!-- name:start --> and <!-- name:end --> in `path` (or append).

    One RESULTS.md holds every benchmark's numbers, with text written by hand between them:
    a script rewrites its own block and leaves everything else as it was."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = Path(path).read_text() if Path(path).exists() else "# minidetr benchmark results\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)


def cpu_model():
    """The CPU's marketing name: timings mean little without it (bf16 instructions or not)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def usable_cores():
    """The cores this process may run on (a container or taskset may allow fewer than the
    machine has), where the OS says; else all of them."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def machine_description():
    """One line: CPU model, usable cores, torch version and threads, Python, git commit.

    The commit is marked when minidetr/ or train.py has uncommitted changes: then the numbers
    belong to no commit anyone can check out."""
    import torch
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                capture_output=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "minidetr", "train.py"], cwd=ROOT,
                               text=True, capture_output=True).stdout.strip()
        commit = f"{commit}{' + uncommitted changes' if dirty else ''}" if commit else "unknown"
    except OSError:
        commit = "unknown"
    return (f"{cpu_model()}, {usable_cores()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}, minidetr commit {commit}")


# ---- the runs' logs ----

def evaluations(log_path):
    """A log.txt's evaluated epochs, one dict each; [] while the run has written no log.

    draw.read_log reads the file (train.py's log.txt, or the official DETR code's, whose
    format train.py keeps); a benchmark reads logs of runs not started yet, and of runs
    evaluated every few epochs (--eval_every), whose other lines hold no AP."""
    if not Path(log_path).exists():
        return []
    return [row for row in read_log(log_path) if "test_coco_eval_bbox" in row]


def read_curve(log_path, steps_per_epoch=None):
    """log.txt -> [(step, AP, AP50, AP75)], sorted by step, one row per step (a step logged
    twice, by a run resumed before it, keeps its last evaluation).

    steps_per_epoch: for the official code's logs, which count epochs and not steps: epoch e
    (from 0) ends at step (e + 1) * steps_per_epoch."""
    rows = {}
    for row in evaluations(log_path):
        step = row["step"] if steps_per_epoch is None else (int(row["epoch"]) + 1) * steps_per_epoch
        rows[step] = row["test_coco_eval_bbox"][:3]    # COCO's stats begin AP, AP50, AP75
    return [(step, *rows[step]) for step in sorted(rows)]


def archive(log, kept):
    """Copy a run's log.txt to `kept`, a file committed with the results.

    Run folders (checkpoints) are not committed; the logs, a few lines each, are, so that the
    curves outlive the folders and another machine continues a benchmark instead of
    repeating it. A kept log is never replaced by a shorter one (a run started again)."""
    lines = lambda path: len(path.read_text().splitlines()) if path.exists() else 0   # noqa: E731
    if log.exists() and lines(log) >= lines(kept):
        kept.parent.mkdir(exist_ok=True)
        shutil.copyfile(log, kept)


# ---- curves: interpolation and the steps to reach a target ----

def value_at(steps, values, at):
    """Linear interpolation of the curve (0, 0), (steps[i], values[i]) at step `at` (flat past the end).

    Runs are evaluated at different steps (other budgets, chunks, epochs); interpolating puts
    them on one axis. The curve starts at AP 0 at step 0: an untrained model finds nothing."""
    import numpy as np
    return float(np.interp(at, [0, *steps], [0.0, *values]))


def curve_at(curve, at, column=1):
    """value_at for a run's curve [(step, AP, AP50, AP75)]: column 1 is AP, 2 AP50, 3 AP75."""
    return value_at([r[0] for r in curve], [r[column] for r in curve], at)


def steps_to_reach(steps, values, target):
    """First step at which the interpolated curve (0, 0), (steps, values) reaches `target`; None if never.

    The papers' convergence claims are of this kind: the epochs one model needs to reach
    another's accuracy."""
    xs, ys = [0, *steps], [0.0, *values]
    if target <= 0:
        return 0.0
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if y1 >= target:
            return x0 + (x1 - x0) * (target - y0) / (y1 - y0) if y1 != y0 else x0
    return None


def fmt_spread(values, digits=3):
    """'mean (min-max)' of a list of floats; just the value for one. The seeds' spread is the
    yardstick a difference between variants or codes is read against."""
    mean, lo, hi = sum(values) / len(values), min(values), max(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


# ---- plots ----

def pyplot():
    """matplotlib.pyplot drawing to files only (Agg: no display needed), or None without
    matplotlib: it is an optional extra, and a report is still written without its plot."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_ap_plot(fig, ax, out_png, xlabel, title, legend_size):
    """Label an AP-against-step plot, write it to out_png and close it (the quick race's and
    the long race's plots read alike)."""
    import matplotlib.pyplot as plt
    ax.set_xlabel(xlabel)
    ax.set_ylabel("COCO AP (val)")
    ax.set_title(title)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


# ---- running train.py: a run folder, its settings, resumed after a stop ----

def settings(argv):
    """What a run folder is checked against: train.py's arguments and the Config they resolve to
    (so a retuned preset is noticed too)."""
    from minidetr.config import config_from_args
    from train import get_args_parser
    config = config_from_args(get_args_parser().parse_args(argv)).to_dict()
    return {"train_argv": argv, "config": json.loads(json.dumps(config))}


def settings_diff(run_dir, expected, ignore=()):
    """Where run_dir's benchmark.json differs from `expected`: ['train.py arguments', Config fields...].

    A resumed run must continue the run it resumes: a folder made with other settings would
    mix two experiments in one curve. ignore: Config fields that do not change what is learned
    (long_race.py: max_steps, a run extended chunk by chunk; output_dir), left out of both the
    arguments and the fields.
    """
    meta = Path(run_dir) / "benchmark.json"
    if not meta.exists():
        return []
    saved = json.loads(meta.read_text())
    diff = (["train.py arguments"] if _without(saved.get("train_argv", []), ignore)
            != _without(expected["train_argv"], ignore) else [])
    old, new = saved.get("config", {}), expected.get("config", {})
    return diff + sorted(k for k in set(old) | set(new) if k not in ignore and old.get(k) != new.get(k))


def _without(argv, fields):
    """argv without the flags --<field> of `fields` and their values."""
    flags, out, skip = {f"--{f}" for f in fields}, [], False
    for arg in argv:
        if not skip and arg not in flags:
            out.append(arg)
        skip = not skip and arg in flags
    return out


def run_one(argv, run_dir, budget, write):
    """Run (or resume) one train.py; its stdout goes to `write` and run_dir/train_stdout.txt.

    budget: {"steps": the run's --max_steps, "steps_per_epoch": ...} (to read a checkpoint's
    step). run_dir/benchmark.json keeps the settings, the machine, the date and the wall time
    summed over the invocations that trained this run: a benchmark that takes hours is
    stopped and continued, and its report still says what the whole run cost.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    meta_path, started = run_dir / "benchmark.json", time.time()
    meta = {"wall_s": 0.0, **(json.loads(meta_path.read_text()) if meta_path.exists() else {}),
            **settings(argv), "machine": machine_description(), "date": datetime.date.today().isoformat()}
    meta_path.write_text(json.dumps(meta, indent=1))
    try:
        return _train(argv, run_dir, budget, write)
    finally:
        meta["wall_s"] += time.time() - started
        meta_path.write_text(json.dumps(meta, indent=1))


def _train(argv, run_dir, budget, write):
    ckpt = run_dir / "checkpoint.pth"
    if ckpt.exists() and checkpoint_step(ckpt, budget)[0] >= budget["steps"]:
        return evaluate_final(argv, ckpt, budget, run_dir, write)
    if ckpt.exists():
        argv = argv + ["--resume", str(ckpt)]
    elif (run_dir / "log.txt").exists():   # a log without a checkpoint cannot be continued
        (run_dir / "log.txt").unlink()
    cmd = [sys.executable, "-u", "train.py", *argv]
    write(f"$ {shlex.join(cmd[1:])}")
    with open(run_dir / "train_stdout.txt", "a") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)  # stderr: tqdm bars
        try:
            for line in proc.stdout:
                out.write(line)
                write(line.rstrip())
        except KeyboardInterrupt:   # the child got the same SIGINT and is saving a checkpoint
            proc.wait()
            raise
        return proc.wait()


def checkpoint_step(ckpt, budget):
    """(global optimiser step, epoch being trained) of a train.py checkpoint."""
    from minidetr.checkpoint import load_safely
    saved = load_safely(str(ckpt))
    epoch, step = saved.get("epoch", 0), saved.get("step", 0)
    return epoch * budget["steps_per_epoch"] + step, epoch - 1 if step == 0 else epoch


def evaluate_final(argv, ckpt, budget, run_dir, write):
    """A run killed between its last checkpoint and its last log line: evaluate that checkpoint.

    (train.py --resume from a checkpoint already at --max_steps trains nothing and does not
    evaluate either.) Same evaluation code: train.main with --eval. Appends the log line
    train.py would have written.
    """
    write(f"{run_dir.name}: checkpoint at the budget but no final log line; evaluating it")
    code = "import json, sys, train; r = train.main(sys.argv[1:]); print('STATS', json.dumps(r['stats']))"
    out = subprocess.run([sys.executable, "-c", code, *argv, "--eval", "--resume", str(ckpt)],
                         cwd=ROOT, stdout=subprocess.PIPE, text=True)
    stats = [line for line in out.stdout.splitlines() if line.startswith("STATS ")]
    if out.returncode or not stats:
        return out.returncode or 1
    step, epoch = checkpoint_step(ckpt, budget)
    row = {"test_coco_eval_bbox": json.loads(stats[-1][6:]), "step": step, "epoch": epoch,
           "note": "final checkpoint evaluated by benchmarks/convergence.py"}
    with open(run_dir / "log.txt", "a") as f:
        f.write(json.dumps(row) + "\n")
    return 0
