"""The convergence race run to convergence: each paper's speed-up measured where it is defined.

The papers' claims are about reaching a *converged* model sooner (DETR's 500-epoch AP in 50
epochs for Conditional DETR; ~108 for single-scale SMCA; half its baseline's epochs for
DN-DETR). The quick race (convergence.py, 1,250 steps) stops while every curve still climbs
steeply. This one trains vanilla DETR until it has converged, and every other variant until
its AP passes DETR's converged AP, or for as many steps as DETR took:

    python benchmarks/long_race.py --jobs 2        # the race (hours on 2 CPU cores; resumable)
    python benchmarks/long_race.py --report_only   # rewrite RESULTS.md from the runs so far

One configuration for every variant, so that the race isolates each paper's idea
(COMMON_FLAGS): the tiny preset, ResNet-18 cut at layer2 for all (stride 8, a 16 x 16 map
at 128 px), queries in the papers' 100 : 300 ratio scaled to 1-3 objects per image
(DETR 10, the others 30), and a constant learning rate (see below). Each variant's own
recipe (loss, matching costs, PE temperature, activation) stays, as the papers compare them.

Converged, for vanilla DETR: its validation AP, mean over the seeds, gains less than
CONVERGED_GAIN (5%) relative over the last quarter of its steps, i.e. the first check
point N (a multiple of --chunk steps, at least --min_steps) with
    AP(N) < (1 + 0.05) * AP(3N / 4),  AP(3N / 4) > 0.
A learning-rate drop would add a jump to the last quarter of any schedule, so the race
keeps the learning rate constant (lr_drop past the end); then the first N steps of a long
run *are* an N-step run, and every variant can be cut at DETR's N afterwards. A variant
stops once its mean AP (over the seeds, at a step all of them have reached) passes DETR's
converged AP: the steps to that point are what the race measures. If DETR reaches the cap
unconverged, its AP at the cap stands in for the converged AP (the report says so).

How it runs: every run advances in chunks of --chunk steps (train.py --max_steps, resumed
from the run's checkpoint). The other variants move towards the first check point past the
step all DETR seeds have reached: DETR has not converged before it, so none of their steps
is wasted. DETR's seeds go first, until DETR converges (or --lead chunks ahead of the
slowest other run), so that its converged step is known early; its steps past that point,
up to the end of the chunk, are the race's only waste. Once it has converged at N, the
other runs advance chunk by chunk towards N, each variant until it passes DETR's AP: all in
step (--order step), or the variant nearest DETR's AP first (--order nearest: variants finish
one at a time, so a race cut short has whole rows; the official runs keep one of the jobs).
The order changes only which numbers come first, not any run's steps.
--jobs runs at a time, each with cores / jobs threads. Ctrl-C stops every run with a
checkpoint; the same command continues. RESULTS.md ("Convergence, to convergence") and
long_race.png are rewritten after every chunk, so partial results are always there.
Finished runs' logs are copied to benchmarks/long_race_logs/ (committed with the results).
"""
import argparse
import concurrent.futures as cf
import datetime
import fcntl
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

# shared with the other benchmark scripts (run_one runs convergence.py's train.py runs too)
from common import (ROOT, archive, curve_at, fmt_spread, machine_description, pyplot, read_curve, run_one,
                    save_ap_plot, settings, settings_diff, steps_to_reach, update_section, value_at)

# name -> the variant's flags; queries are set by QUERIES
RUNS = {
    "detr": ["--variant", "detr"],
    "conditional": ["--variant", "conditional"],
    "smca": ["--variant", "smca"],
    "dn": ["--variant", "dn"],
    "dab": ["--variant", "dab"],                       # DN-DETR without denoising
    "conditional_dn": ["--variant", "conditional", "--dn"],
    # SMCA's multi-scale encoder reads C4, C5 and C5 downsampled (strides 16, 32, 64 of the
    # same ResNet-18): the paper's levels, not the stride-8 map of the others. Last: costliest.
    "smca_ms": ["--variant", "smca", "--smca_multiscale"],
    # the released code's multi-scale form (issue 27): strides 8, 16, 32, 64 and an encoder of
    # depthwise convolutions instead of self-attention (smca.ConvMixLayer)
    "smca_ms_released": ["--variant", "smca", "--smca_multiscale", "--smca_ms_form", "released"],
    # the same at the sizes the released code hard-codes (256 channels, 6 decoder layers), so
    # that its official run (OFFICIAL below) is compared with minidetr at equal settings
    "smca_ms_released_d256": ["--variant", "smca", "--smca_multiscale", "--smca_ms_form", "released",
                              "--hidden_dim", "256", "--dec_layers", "6"],
}
BASELINE = "detr"
# DETR 100 : the others 300 in the papers, for ~7 COCO objects per image; 10 : 30 here
QUERIES = {name: 10 if name == BASELINE else 30 for name in RUNS}
EPOCHS = 400          # a ceiling only: runs stop at --max_steps; lr_drop = EPOCHS never drops
COMMON_FLAGS = ["--backbone_stage", "layer2", "--epochs", str(EPOCHS), "--lr_drop", str(EPOCHS),
                "--eval_every", "1"]
STEPS_PER_EPOCH = 250  # the tiny preset: 2,000 images / batch 8
CONVERGED_GAIN = 0.05
# the papers' factors: steps to reach the baseline's converged AP, as a fraction of its steps
PAPER = {
    "detr": "1 (500 epochs)",
    "conditional": "0.15 (R50: 6.7x faster)",
    "smca": "~0.22 (single-scale, 108 of 500 epochs)",
    "smca_ms": "<= 0.10 (multi-scale: 43.7 AP at 50 epochs, DETR 42.0 at 500)",
    "smca_ms_released": "<= 0.10 (the same figure: the paper does not say which form gave it)",
    "smca_ms_released_d256": "<= 0.10 (the same)",
    "dn": "0.5 of DAB-DETR's (its baseline), not DETR's",
    "dab": "no DAB-vs-DETR figure here",
    "conditional_dn": "0.5 of Conditional DETR's (DN-DETR's claim for the model it is added to)",
}
ARCHIVE = ROOT / "benchmarks" / "long_race_logs"   # every finished chunk's log, committed (common.archive)
# The official code's runs (--official, seeds --official_seeds), through the reference-training
# harness (benchmarks/official.py says what it is), at the race's configuration: the tiny
# preset's sizes (official.COMMON) with the race's stage, queries and constant lr.
OFFICIAL = {"detr": ("detr", []), "conditional": ("cond", ["--num_select", str(QUERIES["conditional"])]),
            "dn": ("dn", ["--num_select", str(QUERIES["dn"]), "--modelname", "dn_dab_detr", "--use_dn"]),
            # the released multi-scale code (--refs_smca_released): it picks its own stages
            # (layer2-4, so no --stage) and hard-codes 256 channels and 6 decoder layers
            "smca_ms_released_d256": ("smca", ["--dynamic_scale", "type3", "--hidden_dim", "256",
                                               "--dec_layers", "6"])}
OWN_STAGES = {"smca_ms_released_d256"}   # run through smca_released_launch.py (it says why)


# ---- the convergence rule and the schedule (pure functions; tests/test_benchmarks.py) ----

def mean_at_shared_steps(curves, upto):
    """Mean AP over seeds at every step <= upto that every seed has evaluated: (steps, APs).

    (convergence.mean_at_any_step takes every step any seed has, extending the shorter curves
    flat: right for finished runs of one budget, wrong for runs still under way.)"""
    shared = sorted(set.intersection(*[{r[0] for r in c if r[0] <= upto} for c in curves]))
    return shared, [sum(curve_at(c, s) for c in curves) / len(curves)
                    for s in shared]


def converged_step(steps, aps, chunk, min_steps, gain=CONVERGED_GAIN):
    """The first check point N (multiple of chunk, >= min_steps, evaluated) where the curve
    gains less than `gain` relative over its last quarter, AP(N) < (1 + gain) AP(3N/4); None if none."""
    for n in steps:
        if n % chunk or n < min_steps:
            continue
        before, now = value_at(steps, aps, 0.75 * n), value_at(steps, aps, n)
        if before > 0 and now < (1 + gain) * before:
            return n
    return None


def next_target(done, detr_seeds, chunk, cap, converged_at):
    """The step every run trains towards now.

    done: {(name, seed): last evaluated step}. Converged: that step. Otherwise the first
    check point past the step all DETR seeds have reached (DETR has not converged before
    it, so no run trained up to it wastes a step), at most the cap.
    """
    if converged_at is not None:
        return converged_at
    frontier = min(done.get((BASELINE, s), 0) for s in detr_seeds)
    return min(cap, (frontier // chunk + 1) * chunk)


# ---- runs ----

def train_argv(name, seed, run_dir, target):
    return ["--preset", "tiny", *RUNS[name], "--num_queries", str(QUERIES[name]),
            "--num_select", str(QUERIES[name]), *COMMON_FLAGS, "--output_dir", str(run_dir),
            "--seed", str(seed), "--max_steps", str(target)]


def other_settings(run_dir, argv):
    """Config fields / arguments where run_dir's benchmark.json differs from argv ([] = same);
    a run's budget (it is extended chunk by chunk) and its folder are not settings."""
    return settings_diff(run_dir, settings(argv), ignore=("max_steps", "output_dir"))


def official_argv(name, seed, folder, steps, args, done=0):
    """The harness's command for `steps` more steps of an official run (resumed if it has a checkpoint).

    The official main.py seeds torch's generator when it starts, and its RandomSampler and
    augmentations draw from it: a chunk resumed with the same seed would replay the first
    chunk's data orders. So a resumed chunk gets seed + its first step (`done`): new orders,
    as an uninterrupted run would have; the weights come from the checkpoint either way."""
    from official import COMMON, coco_layout
    harness_name, extra = OFFICIAL[name]
    common, i = list(COMMON), COMMON.index("--epochs")
    common[i + 1], common[common.index("--lr_drop") + 1] = str(EPOCHS), str(EPOCHS)
    refs, launcher, stage = args.refs, [], ["--stage", "layer2"]
    if name in OWN_STAGES:
        refs, launcher, stage = args.refs_smca_released, [str(ROOT / "benchmarks" / "smca_released_launch.py")], []
    argv = [args.ref_python, *launcher, args.harness, "--refs", refs, harness_name, "--coco_path",
            str(coco_layout(args.out)), "--output_dir", str(folder), *common, *stage,
            "--num_queries", str(QUERIES[name]), *extra, "--max_steps", str(steps)]
    if (Path(folder) / "checkpoint.pth").exists():   # the official main.py's own resume
        return argv + ["--seed", str(seed + done), "--resume", str(Path(folder) / "checkpoint.pth")]
    return argv + ["--seed", str(seed)]


def official_seeds(out, name):
    """The seeds of the official runs of `name` that have a log, in the run folders or the
    archive: the report shows every one of them, whichever command started it."""
    found = {p.parent.name for p in Path(out).glob(f"official_{name}_seed*/log.txt")}
    found |= {p.stem for p in ARCHIVE.glob(f"official_{name}_seed*.txt")}
    return sorted(int(f.rsplit("_seed", 1)[1]) for f in found)


def curve_of(out, name, seed):
    """A run's curve: from its folder, or from the archived log of a finished run (the longer).

    The official code's log counts epochs, not steps: epoch e ends at step (e + 1) * STEPS_PER_EPOCH."""
    per_epoch = STEPS_PER_EPOCH if name.startswith("official_") else None
    here = read_curve(out / f"{name}_seed{seed}" / "log.txt", per_epoch)
    archived = read_curve(ARCHIVE / f"{name}_seed{seed}.txt", per_epoch)
    return here if len(here) >= len(archived) else archived


# ---- the report ----

def detr_state(curves, seeds, chunk, min_steps):
    """(converged step or None, DETR's mean AP there (or at its frontier), frontier) from
    DETR's per-seed curves {seed: curve}."""
    base = [curves[s] for s in seeds if curves.get(s)]
    if len(base) < len(seeds):
        return None, None, 0
    frontier = min(c[-1][0] for c in base)
    steps, aps = mean_at_shared_steps(base, frontier)
    n_star = converged_step(steps, aps, chunk, min_steps)
    if not steps:
        return None, None, frontier
    return n_star, (aps[steps.index(n_star)] if n_star else aps[-1]), frontier


def mean_so_far(curves):
    """mean_at_shared_steps up to the step every one of these curves has reached; ([], [])
    while a curve is missing or empty."""
    if not curves or not all(curves):
        return [], []
    return mean_at_shared_steps(curves, min(c[-1][0] for c in curves))


def passed_at(curves, target):
    """The step at which the mean over these curves first reaches `target` (interpolated,
    up to the step every curve has reached), or None: the rule that ends a variant's run."""
    steps, aps = mean_so_far(curves)
    return steps_to_reach(steps, aps, target) if steps and target is not None else None


def ap_now(curves):
    """A variant's mean AP over its seeds at the last step all of them have evaluated (0 before
    that): the --order nearest schedule runs the variant with the highest first."""
    aps = mean_so_far(curves)[1]
    return aps[-1] if aps else 0.0


def nearest_first(pending, done, ap, runs, official_slot):
    """--order nearest: minidetr's runs by their variant's mean AP now, highest first (then
    least advanced, then RUNS' order), so that variants finish one at a time. The official
    runs (least advanced first) go last, except that one goes first when official_slot is
    set (the race gives them one of its jobs, so that their curves keep moving too)."""
    ours = sorted([r for r in pending if not r[0].startswith("official_")],
                  key=lambda r: (-ap.get(r[0], 0.0), done[r], runs.index(r)))
    official = sorted([r for r in pending if r[0].startswith("official_")], key=lambda r: (done[r], runs.index(r)))
    return official[:1] + ours + official[1:] if official_slot else ours + official


def official_alone(official, ours, chunk, min_steps):
    """The race read with the official code alone: its DETR's convergence by the race's rule
    (mean over its seeds), then the step at which each other official variant's mean curve
    reaches that AP, as a fraction of the official DETR's steps; minidetr's runs against the
    same line beside them. While the official DETR has not converged, its AP at the last
    step all its seeds reached stands in (the text says so). Markdown lines; [] without an
    official DETR. official, ours: {name: {seed: curve}}. The official variants' seeds are
    those that ran furthest (seeds stopped earlier would cut their mean curve short)."""
    detr = official.get(BASELINE) or {}
    n_star, target, frontier = detr_state(detr, sorted(detr), chunk, min_steps) if detr else (None, None, 0)
    if target is None:
        return []
    horizon = n_star or frontier
    steps, aps = mean_at_shared_steps(list(detr.values()), horizon)
    quarter = curve_at(list(zip(steps, aps)), 0.75 * horizon)
    gain = f"{target / quarter - 1:+.1%} over its last quarter" if quarter > 0 else "no AP at its last quarter"
    seeds = " ".join(map(str, sorted(detr)))
    state = (f"converges by the race's rule at step {n_star}: mean AP {target:.3f} ({gain})" if n_star else
             f"has not converged by step {frontier}: mean AP {target:.3f} ({gain}); the fractions that "
             f"follow are against that AP and step")
    lines = [f"**The official code alone.** Its DETR (seed{'s' * (len(detr) > 1)} {seeds}) {state}."]
    for name, runs in official.items():
        if name == BASELINE or not runs:
            continue
        longest = max(c[-1][0] for c in runs.values())
        runs = {s: c for s, c in runs.items() if c[-1][0] == longest}
        hit, mine = passed_at(list(runs.values()), target), passed_at(list(ours.get(name, {}).values()), target)
        theirs = f"at step {hit:.0f}, **{hit / horizon:.2f}** of its DETR's steps" if hit else f"not within its {longest} steps"
        lines.append(f"Official {name} (seed{'s' * (len(runs) > 1)} {' '.join(map(str, sorted(runs)))}) reaches "
                     f"that AP {theirs}; minidetr's {name} " + (f"at step {mine:.0f} ({mine / horizon:.2f})." if mine
                                                                 else "not within the steps it ran."))
    return [" ".join(lines)]


def detr_equivalent(detr_curve, ap, at):
    """'DETR's steps to that AP (fraction)': the step at which DETR's mean curve first had this
    AP, and `at` as a fraction of it. For a variant still under way it is the running form of
    the race's measure: the same fraction, at an AP below DETR's converged one."""
    hit = steps_to_reach(*detr_curve, ap) if detr_curve[0] and ap > 0 else None
    if hit is None:
        return f"beyond DETR's {detr_curve[0][-1]}" if detr_curve[0] and ap > 0 else "-"
    return f"{hit:.0f} ({at / hit:.2f})"


def fractions_by_horizon(curves, detr_curve, horizon, parts=(1, 2, 3, 4, 6, 8)):
    """How a variant's fraction depends on where DETR is cut: for each cut N = horizon * k / 8,
    DETR's mean AP at N, then the step at which each variant's mean curve first reaches it, as
    a fraction of N. {name: [(N, DETR's AP, fraction or None)]}; None: not within the steps
    every seed has run (a variant stops once it passes DETR's AP at the horizon, so the
    later cuts have no answer for it)."""
    rows = {}
    for name, runs in curves.items():
        if name == BASELINE or not runs:
            continue
        rows[name] = []
        for k in parts:
            n = horizon * k / 8
            target = value_at(*detr_curve, n)
            hit = passed_at(list(runs.values()), target)
            rows[name].append((n, target, hit / n if hit is not None else None))
    return rows


def report(out, names, seeds, chunk, cap, min_steps, results, official=()):
    """Rewrite the RESULTS.md section from the runs' logs; returns (converged step, DETR's AP)."""
    official = {n: {s: c for s in official_seeds(out, n) if (c := curve_of(out, f"official_{n}", s))}
                for n in official}
    curves = {n: {s: curve_of(out, n, s) for s in seeds} for n in names}
    curves = {n: {s: c for s, c in runs.items() if c} for n, runs in curves.items()}
    n_star, target, frontier = detr_state(curves.get(BASELINE, {}), seeds, chunk, min_steps)
    lines = ["## Convergence, to convergence", "",
             f"One configuration for every variant: tiny preset, ResNet-18 to layer2 (stride 8) for all "
             f"(smca_ms: its multi-scale levels, strides 16/32/64; smca_ms_released: 8/16/32/64), {QUERIES[BASELINE]} queries for DETR and "
             f"{QUERIES['conditional']} for the others (the papers' 100 : 300), constant learning rate, "
             f"evaluation every {STEPS_PER_EPOCH} steps; seeds {' '.join(map(str, seeds))}. Values: mean over "
             f"seeds (min-max). DETR trains until its mean AP gains < {CONVERGED_GAIN:.0%} over the last "
             f"quarter of its steps (checked every {chunk} steps from {min_steps}, cap {cap}); every other "
             "variant until its mean AP passes DETR's converged AP, or for as many steps as DETR.", ""]
    if n_star:
        lines.append(f"**DETR converged at step {n_star}**: mean AP {target:.3f} (it gained < "
                     f"{CONVERGED_GAIN:.0%} over steps {int(0.75 * n_star)}-{n_star}).")
    elif target is not None:
        lines.append(f"**Partial: DETR has not converged** by step {frontier} (cap {cap}); until it has, the "
                     f"table reads each variant against DETR's mean AP at that step, {target:.3f}.")
    else:
        lines.append("**Partial: no DETR curve yet.**")
    horizon = n_star or frontier
    # DETR's mean curve, to read any AP as "the step at which DETR had it" (the last column but one)
    detr_curve = mean_at_shared_steps(list(curves[BASELINE].values()), horizon) if horizon else ([], [])
    lines += ["", f"| variant | seeds (steps run) | steps to reach DETR's AP | fraction of DETR's {horizon} | "
              "AP where it stopped | AP50 where it stopped | DETR's steps to that AP (fraction) | "
              "the paper's fraction |", "|---|---|---|---|---|---|---|---|"]
    for name in names:
        runs = curves.get(name, {})
        if not runs:
            lines.append(f"| {name} | not started | | | | | {PAPER[name]} |")
            continue
        upto = min(c[-1][0] for c in runs.values())
        if name == BASELINE:
            upto = horizon
        hit = passed_at(list(runs.values()), target) if len(runs) == len(seeds) else None
        if hit is not None and hit > horizon:
            hit = None
        if name == BASELINE:   # by definition (its mean curve may touch that AP earlier and dip)
            hit = horizon or None
        reach = (f"{hit:.0f}" if hit is not None else
                 f"not by {upto}" if len(runs) == len(seeds) and target is not None else "-")
        frac = f"{hit / horizon:.2f} ({horizon / hit:.1f}x fewer)" if hit else "-"
        at = min(upto, horizon) if horizon else upto
        aps = [curve_at(c, at) for c in runs.values()]
        ap, ap50 = fmt_spread(aps), fmt_spread([curve_at(c, at, 2) for c in runs.values()])
        done = ", ".join(str(c[-1][0]) for c in runs.values())
        lines.append(f"| {name} | {len(runs)} ({done}) | {reach} | {frac} | {ap} at {at} | {ap50} | "
                     f"{detr_equivalent(detr_curve, sum(aps) / len(aps), at) if name != BASELINE else '-'} | {PAPER[name]} |")
    for name, runs in official.items():   # compared with ours at the step every official seed has reached
        if not runs:
            continue
        upto = min(c[-1][0] for c in runs.values())
        at = min(horizon or upto, upto)
        ours = [curve_at(c, at) for c in curves.get(name, {}).values()
                if c[-1][0] >= at]
        hit = passed_at(list(runs.values()), target)
        theirs = [curve_at(c, at) for c in runs.values()]
        lines.append(f"| {name}, official code (seed{'s' * (len(runs) > 1)} {' '.join(map(str, runs))}) | "
                     f"{len(runs)} ({', '.join(str(c[-1][0]) for c in runs.values())}) | "
                     f"{f'{hit:.0f}' if hit is not None and hit <= horizon else '-'} | | "
                     f"{fmt_spread(theirs)} at {at} (minidetr: {fmt_spread(ours) if ours else '-'}) | | "
                     f"{detr_equivalent(detr_curve, sum(theirs) / len(theirs), at) if name != BASELINE else '-'} | |")
    alone = official_alone(official, curves, chunk, min_steps)
    if alone:
        lines += [""] + alone
    by_cut = fractions_by_horizon({n: r for n, r in curves.items() if len(r) == len(seeds)}, detr_curve,
                                  horizon) if horizon else {}
    if by_cut:
        cuts = next(iter(by_cut.values()))
        lines += ["", "The fraction against DETR cut earlier: the steps each variant needs to reach DETR's mean AP "
                  "at step N, as a fraction of N (from the same runs; '-': not within the steps run).", "",
                  "| variant | " + " | ".join(f"N = {n:.0f} (DETR's AP {ap:.3f})" for n, ap, _ in cuts) + " |",
                  "|---|" + "---|" * len(cuts)]
        lines += [f"| {name} | " + " | ".join(f"{f:.2f}" if f is not None else "-" for _, _, f in row) + " |"
                  for name, row in by_cut.items()]
    png = plot(curves, results.parent / "long_race.png", official, target) if any(curves.values()) else None
    if png:
        lines += ["", f"![AP against step, log x]({png.name})"]
    metas = [json.loads(p.read_text()) for p in out.glob("*_seed*/benchmark.json")]
    core_h = sum(m.get("wall_s", 0) for m in metas) / 3600
    race = json.loads((out / "race.json").read_text()) if (out / "race.json").exists() else {}
    machines = sorted({m["machine"] for m in metas if "machine" in m}) or [machine_description()]
    command = "python benchmarks/long_race.py " + " ".join(race.get("argv", ["--jobs", "2"]))
    lines += ["", f"Reproduce: `{command}` (resumable; `--report_only` rewrites this section; "
              "--refs/--ref_python/--harness as benchmarks/official.py).", "",
              f"Machine: {'; '.join(machines)}. {race.get('jobs', '?')} runs at a time, "
              f"{race.get('threads_per_run', '?')} thread(s) each (the parent's torch thread count above "
              f"is not theirs). Race wall time so far: {race.get('wall_s', 0) / 3600:.1f} h "
              f"({core_h:.1f} run-hours). Updated {datetime.datetime.now():%Y-%m-%d %H:%M}."]
    update_section(results, "long-race", "\n".join(lines))
    return n_star, target


def mean_band(runs):
    """{seed: curve} -> (steps, mean AP, min AP, max AP) up to the step every seed has reached."""
    steps, mean = mean_so_far(list(runs.values()))
    per = [[curve_at(c, s) for s in steps] for c in runs.values()]
    return steps, mean, [min(v) for v in zip(*per)], [max(v) for v in zip(*per)]


def plot(curves, out_png, official=None, detr_ap=None):
    """AP against step on a log x axis: mean per variant with min-max bands; official dashed
    (mean over its seeds, with a lighter band);
    DETR's converged AP (the finishing line) as a grey line."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for name, runs in curves.items():
        if not runs:
            continue
        steps, mean, low, high = mean_band(runs)
        line, = ax.plot(steps, mean, label=f"{name} ({len(runs)} seed{'s' * (len(runs) > 1)})")
        ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2)
        theirs = (official or {}).get(name)
        if theirs:
            steps, mean, low, high = mean_band(theirs)
            ax.plot(steps, mean, ls="--", color=line.get_color(),
                    label=f"{name}, official code ({len(theirs)} seed{'s' * (len(theirs) > 1)})")
            if len(theirs) > 1:
                ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.08, hatch="//")
    if detr_ap is not None:
        ax.axhline(detr_ap, color="grey", ls=":", lw=0.8, label="DETR's AP to reach")
    ax.set_xscale("log")
    return save_ap_plot(fig, ax, out_png, "training step (log)",
                        "minidetr, one configuration for all, shapes dataset", 7)


# ---- main ----

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--chunk", type=int, default=1000, help="steps per advance; convergence is checked "
                   "at its multiples (a multiple of the 250 steps per epoch)")
    p.add_argument("--min_steps", type=int, default=2000, help="no convergence before this step")
    p.add_argument("--cap", type=int, default=20000, help="DETR's step cap")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (one per core)")
    p.add_argument("--lead", type=int, default=0, help="chunks DETR may run ahead of the slowest "
                   "other run (0: no limit, DETR first until it converges or reaches the cap); DETR's "
                   "steps past its converged step are the only ones the race can waste")
    p.add_argument("--order", choices=["step", "nearest"], default="step",
                   help="after DETR, which run advances next: 'step', the least advanced (all variants "
                        "in step); 'nearest', the variant with the highest mean AP now, so that variants "
                        "finish one at a time and a race cut short has whole rows. Either way each "
                        "variant's steps to DETR's AP are the same")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "runs_long"), help="runs folder")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    p.add_argument("--report_only", action="store_true")
    p.add_argument("--official", nargs="*", default=[], choices=list(OFFICIAL),
                   help="also train the official code of these variants (one job for them under --order "
                        "nearest); needs --refs, --ref_python and --harness as benchmarks/official.py")
    p.add_argument("--official_seeds", nargs="+", type=int, default=[0], help="the official runs' seeds")
    p.add_argument("--refs", help="folder with the official repositories (see official.py)")
    p.add_argument("--ref_python", help="the Python of the official code's environment")
    p.add_argument("--harness", help="the reference-training harness's ref_train.py")
    p.add_argument("--refs_smca_released", help="a folder whose SMCA-DETR/ is SMCA's released multi-scale "
                   "code (folder DMS-MH-GMCA-main_very_important of Multi_scale_SMCA.zip in "
                   "gaopengcuhk/SMCA-DETR), for --official smca_ms_released_d256")
    args = p.parse_args(argv)
    if args.official and not (args.refs and args.ref_python and args.harness) and not args.report_only:
        p.error("--official needs --refs, --ref_python and --harness")
    if set(args.official) & OWN_STAGES and not args.refs_smca_released and not args.report_only:
        p.error("--official smca_ms_released_d256 needs --refs_smca_released")
    if args.chunk % STEPS_PER_EPOCH:
        p.error(f"--chunk must be a multiple of {STEPS_PER_EPOCH} (one epoch)")
    if args.cap < args.chunk or args.cap % STEPS_PER_EPOCH:
        p.error(f"--cap must be at least --chunk and a multiple of {STEPS_PER_EPOCH}")
    if BASELINE not in args.variants:
        p.error("the race needs detr, its baseline")
    args.out, args.results = Path(args.out).resolve(), Path(args.results)
    return args


def main(argv=None):
    args = get_args(argv)
    names, seeds = args.variants, args.seeds
    runs = [(BASELINE, s) for s in seeds] + [(n, s) for n in names if n != BASELINE for s in seeds]
    runs += [(f"official_{n}", s) for n in args.official for s in args.official_seeds]   # last

    def write_report():   # -> (DETR's converged step or None, its mean AP there)
        return report(args.out, names, seeds, args.chunk, args.cap, args.min_steps, args.results,
                      args.official)

    if args.report_only:
        write_report()
        print(f"wrote the long-race section of {args.results}")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    lock_file = open(args.out / "race.lock", "w")   # two races in one folder would train a run twice
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        sys.exit(f"error: another long_race.py is running on {args.out} (it holds {lock_file.name})")
    for name, seed in [r for r in runs if not r[0].startswith("official_")]:   # before any work:
        folder = args.out / f"{name}_seed{seed}"
        diff = other_settings(folder, train_argv(name, seed, folder, 0))
        if diff:
            sys.exit(f"error: {folder} holds a run made with other settings ({', '.join(diff)}); "
                     f"delete it or choose another --out")
    # Ctrl-C, kill -INT and kill -TERM stop the race wherever it was started: a background job
    # of a non-interactive shell (nohup ... & in a script) starts with SIGINT ignored, so
    # Python installs no KeyboardInterrupt, and such a race went on starting chunks while its
    # runs were being stopped
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if "OMP_NUM_THREADS" not in os.environ:   # the children's threads: the cores shared out
        os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // args.jobs))
    race_json = args.out / "race.json"
    race = json.loads(race_json.read_text()) if race_json.exists() else {"wall_s": 0.0}
    race.update(jobs=args.jobs, threads_per_run=int(os.environ["OMP_NUM_THREADS"]),
                argv=[f"--jobs {args.jobs}", f"--cap {args.cap}", f"--chunk {args.chunk}", f"--order {args.order}"]
                + ([f"--official {' '.join(args.official)} --official_seeds {' '.join(map(str, args.official_seeds))}"
                    " --refs DIR --ref_python PY --harness H"]
                   if args.official else []))
    lock, started = threading.Lock(), time.time()

    def say(text):
        with lock:
            print(text, flush=True)

    def done_steps():
        return {(n, s): (curve_of(args.out, n, s) or [(0,)])[-1][0] for n, s in runs}

    def train(name, seed, target):
        folder = args.out / f"{name}_seed{seed}"
        if name.startswith("official_"):
            return train_official(name[len("official_"):], seed, folder, target)
        budget = {"steps": target, "steps_per_epoch": STEPS_PER_EPOCH}
        return run_one(train_argv(name, seed, folder, target), folder, budget, lambda line: None)

    def train_official(name, seed, folder, target):
        folder.mkdir(parents=True, exist_ok=True)
        # without a checkpoint (a new machine, an archived log only) it starts again from 0
        done = ((read_curve(folder / "log.txt", STEPS_PER_EPOCH) or [(0,)])[-1][0]
                if (folder / "checkpoint.pth").exists() else 0)
        argv_run = official_argv(name, seed, folder, target - done, args, done)
        (folder / "command.txt").write_text(shlex.join(argv_run) + "\n")
        meta_path, start = folder / "benchmark.json", time.time()
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {"wall_s": 0.0}
        # the official main.py resumes with torch.load's old default (its checkpoint holds an
        # argparse.Namespace), which torch >= 2.6 refuses unless told to
        env = dict(os.environ, NTHREADS=os.environ["OMP_NUM_THREADS"], MKL_NUM_THREADS=os.environ["OMP_NUM_THREADS"],
                   TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")
        with open(folder / "stdout.txt", "a") as log:
            rc = subprocess.call(argv_run, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        meta["wall_s"] += time.time() - start
        meta["machine"] = machine_description()
        meta_path.write_text(json.dumps(meta, indent=1))
        return rc

    running = {}
    pool = cf.ThreadPoolExecutor(max_workers=args.jobs)
    try:
        while True:
            done = done_steps()
            n_star, detr_ap = write_report()
            target = next_target(done, seeds, args.chunk, args.cap, n_star)
            # a variant is finished once its mean AP has passed DETR's converged AP (or DETR's AP
            # at the cap); the official DETR is not: it is compared with ours up to DETR's steps
            detr_frontier = min(done[(BASELINE, s)] for s in seeds)
            finished_names = set() if n_star is None and detr_frontier < args.cap else {
                n for n in {r[0] for r in runs} - {BASELINE, "official_detr"}
                if passed_at([curve_of(args.out, n, s) for s in
                              (args.official_seeds if n.startswith("official_") else seeds)],
                             detr_ap) is not None}
            # DETR's seeds first (least advanced first), so that its converged step is known
            # early: up to the cap, or --lead chunks past the slowest other run; then the others
            slowest = min([done[r] for r in runs if r[0] != BASELINE], default=0)
            detr_goal = (target if n_star is not None else
                         min(args.cap, slowest + args.lead * args.chunk) if args.lead else args.cap)
            todo = sorted([(BASELINE, s) for s in seeds if (BASELINE, s) not in running
                           and done[(BASELINE, s)] < detr_goal], key=lambda k: done[k])
            others = [(n, s) for n, s in runs if n != BASELINE and (n, s) not in running
                      and n not in finished_names and done[(n, s)] < target]
            if args.order == "step":   # least advanced first, then in RUNS' order (official after ours)
                todo += sorted(others, key=lambda r: (done[r], runs.index(r)))
            else:
                ap = {n: ap_now([curve_of(args.out, n, s) for s in seeds]) for n in names}
                official_slot = args.jobs > 1 and not any(k[0].startswith("official_") for k in running)
                todo += nearest_first(others, done, ap, runs, official_slot)
            if not todo and not running:
                break
            while todo and len(running) < args.jobs:
                name, seed = todo.pop(0)
                goal = min(detr_goal if name == BASELINE else target,
                           (done[(name, seed)] // args.chunk + 1) * args.chunk)
                say(f"{datetime.datetime.now():%H:%M:%S} {name}_seed{seed}: {done[(name, seed)]} -> {goal} steps")
                running[(name, seed)] = pool.submit(train, name, seed, goal)
            if not running:
                break
            finished, _ = cf.wait(running.values(), return_when=cf.FIRST_COMPLETED)
            for key in [k for k, f in running.items() if f in finished]:
                rc = running.pop(key).result()
                run = f"{key[0]}_seed{key[1]}"   # its log kept with the results (official ones too)
                archive(args.out / run / "log.txt", ARCHIVE / f"{run}.txt")
                if rc != 0:
                    raise SystemExit(f"{run} failed (exit status {rc}); see "
                                     f"the output in {args.out / run}. "
                                     "Rerun the same command to resume.")
            race["wall_s"] += time.time() - started
            started = time.time()
            race_json.write_text(json.dumps(race))
    except KeyboardInterrupt:
        say("interrupted: no new chunk starts; the running ones save a checkpoint when they get the "
            "signal too (Ctrl-C sends it to them), else they finish their chunk. Rerun the same command to continue")
        pool.shutdown(wait=True)
        raise SystemExit(1)
    finally:
        race["wall_s"] += time.time() - started
        race_json.write_text(json.dumps(race))
    pool.shutdown()
    n_star, _ = write_report()
    print(f"done: DETR {'converged at step ' + str(n_star) if n_star else 'did not converge by the cap'}; "
          f"see {args.results}")


if __name__ == "__main__":
    main()
