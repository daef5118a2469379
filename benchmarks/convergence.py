"""Convergence benchmark: COCO AP against training steps for every variant, same budget.

The papers' headline claims are about convergence speed (see the table `PAPER_CLAIMS`):
Conditional DETR reaches DETR's accuracy 6.7x faster, SMCA cuts DETR's 500 epochs to 108,
DN-DETR reaches its baseline's accuracy in half the epochs. This script asks the same
question at the tiny preset on the built-in shapes dataset:

    python benchmarks/convergence.py                 # every variant x 3 seeds, 1,250 steps each
    python benchmarks/convergence.py --quick         # a few minutes on 2 CPU cores (plumbing check)
    python benchmarks/convergence.py --report_only   # rewrite RESULTS.md from the logs there are

Every run is `python train.py --variant V [--dn] --seed S --max_steps STEPS ...` in a
subprocess, so the numbers come from train.py's own loop and its COCO evaluation after
each epoch (log.txt, one JSON line per evaluation, `step` and `test_coco_eval_bbox`).
The same seed gives every variant the same data order and augmentation. A budget shorter
than the preset's schedule compresses the schedule (epochs = ceil(steps / steps per
epoch), lr_drop scaled in proportion) rather than cutting it before the learning-rate drop.

Reported (benchmarks/RESULTS.md, section "Convergence"; convergence.png):
  - AP, AP50, AP75 at 25 / 50 / 100 % of the budget, mean over seeds (min - max);
  - for each variant, the steps it needs to reach vanilla DETR's final AP, read off the
    mean-over-seeds curve by linear interpolation between evaluations, as a fraction of
    the budget (the curve starts at AP 0 at step 0: an untrained model finds nothing).
Resumable: a run whose log reaches the budget is skipped, one with a checkpoint continues
with --resume. Ctrl-C stops the current run cleanly (train.py saves); rerun to go on.
"""
import argparse
import datetime
import json
import math
import shlex
import sys
from pathlib import Path

# shared with the other benchmark scripts: RESULTS.md, the machine line, log curves, resumable runs
from common import (ROOT, curve_at, fmt_spread, machine_description, pyplot, read_curve, run_one,
                    save_ap_plot, settings, settings_diff, steps_to_reach, update_section)

# name -> train.py flags; the name is also the run folder's prefix
RUNS = {
    "detr": ["--variant", "detr"],
    "conditional": ["--variant", "conditional"],
    "smca": ["--variant", "smca"],
    "dn": ["--variant", "dn"],
    "dab": ["--variant", "dab"],                    # DN-DETR's base: DAB-DETR, no denoising
    "conditional_dn": ["--variant", "conditional", "--dn"],
    # the tiny preset gives vanilla DETR a stride-16 map (see config.py); this is DETR on
    # the stride-8 map the other variants use, for a same-setting comparison
    "detr_stride8": ["--variant", "detr", "--backbone_stage", "layer2"],
}
BASELINE = "detr"
RACE_STEPS = 1250   # the default budget: 5 epochs of 250 steps, lr drop after 4 (see get_args)
FRACTIONS = (0.25, 0.5, 1.0)
METRICS = {"AP": 0, "AP50": 1, "AP75": 2}          # index in test_coco_eval_bbox
# The papers' own convergence claims (their abstracts and tables), as a fraction of the baseline's epochs.
PAPER_CLAIMS = {
    "detr": "baseline (500 epochs, R50)",
    "conditional": "6.7x faster (R50: 50 vs 500 epochs) = 0.15",
    "smca": "~5x fewer epochs (108 vs 500) = 0.22",
    "dn": "its baseline's AP in 50% of the epochs (0.5), +1.9 AP at equal epochs; "
          "the baseline is DAB-DETR, not DETR",
    "dab": "DN-DETR's baseline (DAB-DETR); the paper does not claim DAB vs DETR here",
    "conditional_dn": "no paper figure (DN's claim, 0.5, is relative to the model it is added to)",
    "detr_stride8": "none: vanilla DETR on the other variants' stride-8 map",
}
# --quick: prove the plumbing in minutes; its AP says nothing about the variants.
QUICK = dict(shapes_train=24, shapes_val=16, steps=12, seeds=[0])   # 4 epochs of 3 steps


# ---- the budget ----

def schedule(steps=None, **overrides):
    """The tiny preset's schedule in optimiser steps, and the train.py flags for a budget.

    Returns dict(steps, steps_per_epoch, epochs, lr_drop, flags). steps None = the preset's
    full schedule, epochs * ceil(shapes_train / batch_size). overrides: Config fields.
    """
    from minidetr.config import Config
    cfg = Config.for_variant(BASELINE, "tiny", **overrides)
    per_epoch = math.ceil(cfg.shapes_train / cfg.batch_size)
    full = cfg.epochs * per_epoch
    steps = full if steps is None else steps
    epochs, lr_drop = cfg.epochs, cfg.lr_drop
    if steps != full:   # compress (or stretch) the schedule to the budget, lr drop included
        epochs = math.ceil(steps / per_epoch)
        lr_drop = max(1, round(cfg.lr_drop * epochs / cfg.epochs))
    flags = [] if steps == full else ["--epochs", str(epochs), "--lr_drop", str(lr_drop)]
    return dict(steps=steps, steps_per_epoch=per_epoch, epochs=epochs, lr_drop=lr_drop, flags=flags)


# ---- the runs ----

def run_state(run_dir, budget, expected=None):
    """'complete' (the log reaches the budget), 'resume' (a checkpoint exists), 'fresh', or
    'other settings' (the folder's benchmark.json differs from `expected`, see common.settings())."""
    if expected is not None and settings_diff(run_dir, expected):
        return "other settings"
    curve = read_curve(Path(run_dir) / "log.txt")
    if curve and curve[-1][0] >= budget:
        return "complete"
    return "resume" if (Path(run_dir) / "checkpoint.pth").exists() else "fresh"


def train_argv(name, seed, run_dir, budget, args):
    """train.py's arguments for one run (without --resume)."""
    out = run_dir.relative_to(ROOT) if run_dir.is_relative_to(ROOT) else run_dir   # train.py runs in ROOT
    argv = ["--preset", "tiny", *RUNS[name], "--output_dir", str(out), "--seed", str(seed),
            "--max_steps", str(budget["steps"]), "--eval_every", "1", *budget["flags"]]
    if args.shapes_train is not None:
        argv += ["--shapes_train", str(args.shapes_train)]
    if args.shapes_val is not None:
        argv += ["--shapes_val", str(args.shapes_val)]
    if args.device:
        argv += ["--device", args.device]
    return argv + shlex.split(args.train_args)


# ---- the report ----

def collect(args, budget):
    """({name: {seed: curve}}, [benchmark.json dicts]) of the complete runs made with these settings."""
    found, metas = {}, []
    for name in args.variants:
        for seed in args.seeds:
            run_dir = args.out / f"{name}_seed{seed}"
            expected = settings(train_argv(name, seed, run_dir, budget, args))
            if run_state(run_dir, budget["steps"], expected) == "complete":
                curve = [row for row in read_curve(run_dir / "log.txt") if row[0] <= budget["steps"]]
                found.setdefault(name, {})[seed] = curve
                metas.append({"name": name, **json.loads((run_dir / "benchmark.json").read_text())})
    return found, metas


def render(found, metas, args, budget, command):
    """The Markdown of the Convergence section."""
    n, seeds = budget["steps"], args.seeds
    lines = ["## Convergence", "",
             "The quick race: each variant at its own tiny preset (vanilla DETR on the stride-16 map "
             "with 10 queries, the others on stride 8 with 40), so the stage and the query count change "
             "with the idea; the long race below (\"Convergence, to convergence\", benchmarks/long_race.py) "
             "gives every variant one configuration and trains DETR until it has converged.", "",
             f"Tiny preset on the built-in shapes dataset, {n} optimiser steps per run "
             f"({budget['epochs']} epochs of {budget['steps_per_epoch']} steps, lr drop after epoch "
             f"{budget['lr_drop']}), COCO evaluation of the validation split after every epoch, seeds "
             f"{' '.join(map(str, seeds))}. Values: mean over seeds (min-max).", "",
             "| variant | metric | 25% | 50% | 100% |", "|---|---|---|---|---|"]
    for name, runs in found.items():
        for metric, i in METRICS.items():
            cells = [fmt_spread([curve_at(c, f * n, 1 + i)
                                 for c in runs.values()]) for f in FRACTIONS]
            label = name if len(runs) == len(seeds) else f"{name} ({len(runs)} of {len(seeds)} seeds)"
            lines.append(f"| {label} | {metric} | " + " | ".join(cells) + " |")
    lines += ["", f"Steps to reach {BASELINE}'s final AP (mean curve; per seed: against the same seed's "
              f"{BASELINE} run), as a fraction of {BASELINE}'s {n} steps:", "",
              "| variant | steps | fraction | per seed | the paper's figure |", "|---|---|---|---|---|"]
    for name, runs in found.items():
        lines.append(f"| {name} | " + " | ".join(reach_cells(found, name, n)) + f" | {PAPER_CLAIMS[name]} |")
    missing = [f"{name}_seed{s}" for name in args.variants for s in seeds if s not in found.get(name, {})]
    if missing:
        lines += ["", f"Left out (not run, not complete, or made with other settings): {', '.join(missing)}."]
    lines += ["", "![AP against training step](convergence.png)" if found else "", "",
              "Reproduce:", "", "```", command]
    for name in args.variants:   # what the script runs for each variant, first seed shown
        run_dir = args.out / f"{name}_seed{seeds[0]}"
        run_argv = train_argv(name, seeds[0], run_dir, budget, args)
        lines.append(f"# {name}: python train.py {shlex.join(run_argv)}")
    machines = sorted({m["machine"] for m in metas if "machine" in m}) or [machine_description()]
    dates = sorted({m["date"] for m in metas if "date" in m}) or [datetime.date.today().isoformat()]
    walls = {name: [m["wall_s"] for m in metas if m["name"] == name and "wall_s" in m] for name in found}
    wall = ", ".join(f"{name} {sum(w) / len(w) / 60:.1f} min" for name, w in walls.items() if w)
    lines += ["```", "", f"Machine: {'; '.join(machines)}. Date: {dates[0]}"
              + (f" to {dates[-1]}" if len(dates) > 1 else "") + "."
              + (f" Wall time per run (mean over seeds): {wall}." if wall else "")]
    return "\n".join(lines)


def mean_at_any_step(runs):
    """Mean AP over seeds at every step any seed was evaluated at: (steps, AP values).

    A seed without an evaluation at a step is read off its interpolated curve, flat past its
    end: right here, where every run is complete at one budget (long_race.py, whose runs are
    still under way, averages only the steps every seed has reached)."""
    steps = sorted({r[0] for c in runs.values() for r in c})
    return steps, [sum(curve_at(c, s) for c in runs.values()) / len(runs)
                   for s in steps]


def reach_cells(found, name, n):
    """[steps, fraction, per-seed fractions] for reaching the baseline's final AP."""
    if BASELINE not in found:
        return ["n/a", "n/a", f"no complete {BASELINE} run"]
    target = mean_at_any_step(found[BASELINE])[1][-1]
    if target <= 0:
        return ["n/a", "n/a", f"{BASELINE}'s final AP is 0"]
    hit = steps_to_reach(*mean_at_any_step(found[name]), target)
    per_seed = []
    for seed, curve in found[name].items():
        base = found[BASELINE].get(seed)
        s = base and steps_to_reach([r[0] for r in curve], [r[1] for r in curve], base[-1][1])
        per_seed.append("-" if base is None else "not reached" if s is None else f"{s / n:.2f}")
    if hit is None:
        return ["not reached", "not reached", ", ".join(per_seed)]
    return [f"{hit:.0f}", f"{hit / n:.2f} ({n / hit:.1f}x fewer)" if hit else "0", ", ".join(per_seed)]


def plot(found, out_png, budget):
    """AP against step, one line per variant (mean) with a shaded min-max band over seeds."""
    plt = pyplot()
    if plt is None:
        print("convergence.png skipped: plotting needs matplotlib (pip install matplotlib)")
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, runs in found.items():
        steps = sorted({r[0] for c in runs.values() for r in c})
        per_seed = [[curve_at(c, s) for s in steps] for c in runs.values()]
        mean = [sum(v) / len(v) for v in zip(*per_seed)]
        label = f"{name} ({len(runs)} seed{'s' * (len(runs) > 1)})"
        line, = ax.plot([0, *steps], [0.0, *mean], marker=".", label=label)
        if len(runs) > 1:
            ax.fill_between(steps, [min(v) for v in zip(*per_seed)], [max(v) for v in zip(*per_seed)],
                            color=line.get_color(), alpha=0.2)
    if BASELINE in found:
        ax.axhline(mean_at_any_step(found[BASELINE])[1][-1], color="grey", ls="--", lw=0.8,
                   label=f"{BASELINE} final AP")
    ax.set_xlim(0, budget["steps"])
    return save_ap_plot(fig, ax, out_png, "training step", "minidetr, tiny preset, shapes dataset", 8)


# ---- main ----

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default 0 1 2 (--quick: 0)")
    p.add_argument("--steps", type=int, default=None, help="budget in optimiser steps (default "
                   f"{RACE_STEPS}: 5 epochs of the tiny preset, the budget the race's tables were built on; "
                   "0 = the preset's full schedule, epochs * ceil(shapes_train / batch_size))")
    p.add_argument("--shapes_train", type=int, default=None, help="default: the tiny preset's")
    p.add_argument("--shapes_val", type=int, default=None, help="default: the tiny preset's")
    p.add_argument("--device", default="", help="passed to train.py (default: its own, cpu)")
    p.add_argument("--train_args", default="", help="more train.py flags for every run, one string")
    p.add_argument("--quick", action="store_true", help=f"plumbing check in minutes: {QUICK}, "
                   "written under benchmarks/runs_quick")
    p.add_argument("--out", default=None,
                   help="runs folder (default benchmarks/runs, --quick: benchmarks/runs_quick)")
    p.add_argument("--results", default=None, help="RESULTS.md to update (default benchmarks/RESULTS.md, "
                   "--quick: benchmarks/runs_quick/RESULTS.md)")
    p.add_argument("--report_only", action="store_true", help="only rewrite the report from the logs")
    args = p.parse_args(argv)
    if args.quick:
        for key in ("shapes_train", "shapes_val", "steps", "seeds"):
            if getattr(args, key) is None:
                setattr(args, key, QUICK[key])
    args.seeds = args.seeds if args.seeds is not None else [0, 1, 2]
    args.steps = RACE_STEPS if args.steps is None else (args.steps or None)   # 0: the full schedule
    folder = ROOT / "benchmarks" / ("runs_quick" if args.quick else "runs")
    args.out = Path(args.out).resolve() if args.out else folder
    default_results = (folder if args.quick else ROOT / "benchmarks") / "RESULTS.md"
    args.results = Path(args.results) if args.results else default_results
    return args


def main(argv=None):
    from tqdm import tqdm
    args = get_args(argv)
    sizes = {k: getattr(args, k) for k in ("shapes_train", "shapes_val") if getattr(args, k) is not None}
    budget = schedule(args.steps, **sizes)
    runs = [(name, seed) for name in args.variants for seed in args.seeds]
    if not args.report_only:
        print(f"convergence: {len(runs)} runs of {budget['steps']} steps into {args.out}")
        bar = tqdm(runs, desc="runs", unit="run")
        for name, seed in bar:
            run_dir = args.out / f"{name}_seed{seed}"
            bar.set_postfix_str(run_dir.name)
            run_argv = train_argv(name, seed, run_dir, budget, args)
            state = run_state(run_dir, budget["steps"], settings(run_argv))
            if state == "other settings":
                sys.exit(f"error: {run_dir} holds a run made with other settings ("
                         f"{', '.join(settings_diff(run_dir, settings(run_argv)))} differ, see its "
                         f"benchmark.json); delete the folder or choose another --out")
            if state == "complete":
                continue
            try:
                rc = run_one(run_argv, run_dir, budget, bar.write)
            except KeyboardInterrupt:
                bar.close()
                sys.exit(f"interrupted during {run_dir.name}; rerun the same command to resume")
            if rc != 0 or run_state(run_dir, budget["steps"]) != "complete":
                bar.close()
                sys.exit(f"{run_dir.name} stopped before its budget (exit status {rc}); see "
                         f"{run_dir / 'train_stdout.txt'}. Rerun the same command to resume.")
        bar.close()
    found, metas = collect(args, budget)
    command = "python benchmarks/convergence.py " + shlex.join(
        x for x in (sys.argv[1:] if argv is None else argv) if x != "--report_only")
    body = render(found, metas, args, budget, command.strip())
    png = plot(found, args.results.parent / "convergence.png", budget) if found else None
    update_section(args.results, "convergence", body)
    print(f"wrote the Convergence section of {args.results}" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    main()
