"""Fine-tuning benchmark (issue 25): from scratch against --finetune, on data the model never saw.

    python benchmarks/finetune.py                 # everything missing, two runs at a time
    python benchmarks/finetune.py --report_only   # rewrite RESULTS.md and finetune.png from the logs

1. pretrain: the README's main job (`train.py --variant dn`, tiny preset on the built-in shapes).
2. a second built-in dataset: other backgrounds (clutter 0.5 instead of 0.3, another seed) and
   six classes, three sharing a name with the first dataset (circle, square, triangle, under
   other ids) and three new ones (star, hexagon, pentagon); 1,000 training images, so an
   epoch is 125 steps and each run is evaluated every 250 (--eval_every 2).
3. three arms, 3 seeds each, 1,000 steps at the tiny preset's learning rate:
     scratch   train.py on the second dataset from random weights
     fresh     --finetune the pretrained checkpoint, every class row drawn anew (--no_finetune_by_name)
     by name   --finetune, the rows of circle, square and triangle carried over
   AP (COCO, the 200 val images) overall, on the shared classes and on the new ones.
4. --overfit_batches 1 on the built-in dataset: its one line, with the preset's learning rate
   and with 1e-9 (a model that cannot move).

Each run has its folder under benchmarks/runs/finetune/; a run whose log reaches its last
step is skipped, an interrupted one continues from its checkpoint (--resume), so the same
command finishes what is missing. Runs use one torch thread and one loader worker each.
"""
import argparse
import concurrent.futures as cf
import json
import os
import subprocess
import sys
from pathlib import Path

from common import ROOT, evaluations, fmt_spread, machine_description, update_section

OUT = ROOT / "benchmarks" / "runs" / "finetune"
SHARED, NEW = ("circle", "square", "triangle"), ("star", "hexagon", "pentagon")
KINDS = ("star", "circle", "hexagon", "square", "pentagon", "triangle")   # ids 1..6 in this order
DATA = dict(num_train=1000, num_val=200, seed=1, clutter=0.5, shapes=KINDS)
ARMS = {"scratch": [], "fresh": ["--finetune", "PRETRAINED", "--no_finetune_by_name"],
        "by name": ["--finetune", "PRETRAINED"]}
SEEDS = (0, 1, 2)
PRETRAIN_STEPS = 2500


def second_dataset():
    """The second dataset's files (generated once, under the built-in dataset's root)."""
    from minidetr.data import default_shapes_root, make_shapes_dataset
    return make_shapes_dataset(os.path.join(default_shapes_root(), "finetune_n1000_v200"), **DATA)


def run(name, argv, steps, threads=1):
    """train.py argv into OUT/name, resumed if it stopped early; skipped if done."""
    folder = OUT / name
    done = evaluations(folder / "log.txt")
    if done and done[-1]["step"] >= steps:
        return name
    resume = ["--resume", str(folder / "checkpoint.pth")] if (folder / "checkpoint.pth").exists() else []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "stdout.txt", "a") as out:
        subprocess.run([sys.executable, str(ROOT / "train.py"), *argv, "--output_dir", str(folder),
                        "--num_workers", "1", "--log_every", "0", *resume],
                       env=env, stdout=out, stderr=subprocess.STDOUT, check=True, cwd=ROOT)
    return name


def pretrain():
    # the README's main job, all of it (10 epochs, lr drop after 8)
    run("pretrain", ["--variant", "dn", "--max_steps", str(PRETRAIN_STEPS)], PRETRAIN_STEPS, threads=2)
    return OUT / "pretrain" / "checkpoint.pth"


def arm_argv(arm, seed, paths, pretrained, steps):
    data = ["--train_json", paths["train_json"], "--train_images", paths["train_images"],
            "--val_json", paths["val_json"], "--val_images", paths["val_images"]]
    flags = [str(pretrained) if a == "PRETRAINED" else a for a in ARMS[arm]]
    return ["--variant", "dn", "--preset", "tiny", *data, *flags, "--seed", str(seed),
            "--max_steps", str(steps), "--eval_every", "2"]


def step0(paths, pretrained):
    """Each arm evaluated before its first step (train.py --eval): what the weights bring."""
    import train
    found = {}
    for arm in ARMS:
        for seed in SEEDS:
            result = train.main(arm_argv(arm, seed, paths, pretrained, 0)[:-4] + ["--eval", "--num_workers", "0"])
            found[f"{arm}|{seed}"] = {"stats": result["stats"], "per_class": {str(k): v for k, v in result["per_class"].items()}}
    (OUT / "step0.json").write_text(json.dumps(found, indent=1))


def overfit_lines():
    """The one line --overfit_batches 1 ends with, at the preset's lr and at 1e-9."""
    lines = {}
    for label, extra in (("lr 3e-4 (the preset's)", []), ("lr 1e-9", ["--lr", "1e-9", "--lr_backbone", "1e-9"])):
        done = subprocess.run([sys.executable, str(ROOT / "train.py"), "--variant", "dn", "--overfit_batches",
                               "1", "--num_workers", "0", *extra], capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        lines[label] = [line for line in done.stdout.splitlines() if line.startswith("overfit:")][-1:] or [
            done.stderr.strip().splitlines()[-1]]
    (OUT / "overfit.json").write_text(json.dumps(lines, indent=1))
    return lines


# ---- the report ----

def ap_of(row, ids):
    """Mean AP over the category ids (the log's test_ap_per_category), or the overall AP."""
    if ids is None:
        return row["test_coco_eval_bbox"][0]
    values = [row["test_ap_per_category"][str(i)] for i in ids]
    return sum(values) / len(values)


def curves(paths_categories):
    """{arm: {seed: [(step, AP, AP shared, AP new)]}} from the logs there are."""
    ids = {name: cat_id for cat_id, name in paths_categories.items()}
    shared, new = [ids[n] for n in SHARED], [ids[n] for n in NEW]
    zero = json.loads((OUT / "step0.json").read_text()) if (OUT / "step0.json").exists() else {}
    out = {}
    for arm in ARMS:
        for seed in SEEDS:
            found = evaluations(OUT / f"{arm.replace(' ', '_')}_seed{seed}" / "log.txt")
            start = zero.get(f"{arm}|{seed}")
            if start:   # the evaluation before the first step (step0)
                found = [{"step": 0, "test_coco_eval_bbox": start["stats"],
                          "test_ap_per_category": start["per_class"]}] + found
            if found:
                out.setdefault(arm, {})[seed] = [(r["step"], ap_of(r, None), ap_of(r, shared), ap_of(r, new))
                                                 for r in found]
    return out


def spread(values):
    """fmt_spread over the seeds evaluated at that step ('–' where none was)."""
    values = [v for v in values if v is not None]
    return fmt_spread(values) if values else "–"


def at(curve, step, column):
    return next((r[column] for r in curve if r[0] == step), None)


def first_reaching(curve, target):
    """The first evaluated step whose AP >= target, or None."""
    return next((r[0] for r in curve if r[1] >= target), None)


def report(found, steps, overfit, results):
    checkpoints = [s for s in (0, 250, 500, 750, 1000) if s <= steps]
    lines = ["## Fine-tuning", "",
             f"Machine: {machine_description()}; two runs at a time, one thread each, while other "
             "work (tests, other benchmarks) shared the cores: AP only, no timings.", "",
             "`python benchmarks/finetune.py`: the tiny dn model pretrained by the README's main job "
             f"({PRETRAIN_STEPS:,} steps on the built-in shapes), then 1,000 steps on a second built-in dataset it never "
             "saw: other backgrounds, six classes, of which circle, square and triangle share a name (under "
             "other ids) and star, hexagon and pentagon are new. Mean over 3 seeds (min-max); AP on the 200 "
             "val images, the shared and new columns the mean of the per-category APs.", "",
             "| arm | step | AP | AP shared classes | AP new classes |", "|---|---|---|---|---|"]
    for arm, by_seed in found.items():
        for step in checkpoints:
            cells = [spread([at(c, step, k) for c in by_seed.values()]) for k in (1, 2, 3)]
            lines.append(f"| {arm} | {step:,} | " + " | ".join(cells) + " |")
    scratch = found.get("scratch", {})
    target = [at(c, steps, 1) for c in scratch.values()]
    target = [t for t in target if t is not None]
    if target:
        goal = sum(target) / len(target)
        lines += ["", f"Steps to reach from-scratch's {steps:,}-step AP ({goal:.3f}, mean of its seeds), "
                  "first evaluation at or above it, per seed:"]
        for arm in ("fresh", "by name"):
            reached = [first_reaching(c, goal) for c in found.get(arm, {}).values()]
            lines.append(f"- {arm}: " + ", ".join("not reached" if r is None else f"{r:,}" for r in reached))
    if overfit:
        lines += ["", "`python train.py --variant dn --overfit_batches 1` on the built-in dataset:", ""]
        lines += [f"- {label}: `{text[0]}`" for label, text in overfit.items()]
    lines += ["", "![fine-tuning](finetune.png)"]
    body = "\n".join(lines)
    update_section(results, "finetune", body)
    print(body)


def plot(found, out_png):
    from minidetr.draw import _pyplot
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
    for ax, column, title in zip(axes, (1, 2, 3), ("AP", "AP, shared classes", "AP, new classes")):
        for arm, by_seed in found.items():
            steps = sorted({r[0] for c in by_seed.values() for r in c})
            values = [[at(c, s, column) for c in by_seed.values()] for s in steps]
            mean = [sum(v for v in vs if v is not None) / max(1, sum(v is not None for v in vs)) for vs in values]
            low = [min(v for v in vs if v is not None) for vs in values]
            high = [max(v for v in vs if v is not None) for vs in values]
            line, = ax.plot(steps, mean, marker="o", label=arm)
            ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2)
        ax.set_title(title)
        ax.set_xlabel("steps on the second dataset")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("COCO AP (200 val images)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--jobs", type=int, default=2, help="runs at a time after the pretraining, one thread each")
    p.add_argument("--report_only", action="store_true")
    p.add_argument("--step0", action="store_true", help="only evaluate each arm before its first step")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    args = p.parse_args()
    paths = second_dataset()
    categories = {c["id"]: c["name"] for c in json.loads(Path(paths["val_json"]).read_text())["categories"]}
    overfit = json.loads((OUT / "overfit.json").read_text()) if (OUT / "overfit.json").exists() else {}
    if args.step0:
        step0(paths, OUT / "pretrain" / "checkpoint.pth")
    elif not args.report_only:
        pretrained = OUT / "pretrain" / "checkpoint.pth"
        name_of = lambda arm, seed: f"{arm.replace(' ', '_')}_seed{seed}"
        # the pretraining alone first, on both cores: two torch threads beside other runs wait
        # on each other (oversubscribed cores) and crawl
        pretrain()
        with cf.ThreadPoolExecutor(args.jobs) as pool:
            pending = [pool.submit(run, name_of(arm, seed), arm_argv(arm, seed, paths, pretrained, args.steps),
                                   args.steps) for seed in SEEDS for arm in ARMS]
            for done in cf.as_completed(pending):
                print("done:", done.result(), flush=True)
                report(curves(categories), args.steps, overfit, args.results)
        step0(paths, pretrained)
        overfit = overfit_lines()
    found = curves(categories)
    report(found, args.steps, overfit, args.results)
    if found:
        plot(found, ROOT / "benchmarks" / "finetune.png")


if __name__ == "__main__":
    main()
