"""Side by side with the official code: the same tiny configuration trained by minidetr and
by each paper's own repository, several seeds each, AP50 and training loss per epoch.

    python benchmarks/official.py --refs DIR --ref_python PY --harness H   # every run, then the report
    python benchmarks/official.py --report_only                    # rewrite RESULTS.md from the logs

DIR holds the official repositories and the reference-training harness's checkouts as the
harness expects them (detr/, ConditionalDETR/, SMCA-DETR/, DN-DETR/); PY is the Python of
their environment (torch + torchvision, kept apart from minidetr's); H is the
reference-training harness's ref_train.py, which trains an official repository through its own main.py,
loss, matcher and COCO evaluation: nothing of the official code is part of this project.

Both sides train the tiny preset of `train.py --variant V` on the built-in shapes dataset
(2,000 / 200 images; the official side reads the same files through a COCO-layout folder of
symbolic links): ResNet-18 from random weights with trainable BatchNorm, 128-d, 8 heads,
FFN 512, 1 encoder + 3 decoder layers, dropout 0, batch 8, lr 3e-4 everywhere, weight
decay 1e-4, 5 epochs (1,250 steps) with the lr drop after 4, clip 0.1; per variant the stage
and the queries of minidetr's tiny preset (OFFICIAL_FLAGS). One thread per run and `--jobs`
runs at a time (one per core).

SMCA needs one change to be like for like. The official SMCA code turns each query's
predicted centre (a fraction of the image) into feature-map cells by multiplying by the image
size in pixels and dividing by 32 (models/transformer.py, the `/ 32` in the first decoder
layer): right at stride 32, the stage its paper uses. The tiny preset cuts ResNet-18 at layer2
(stride 8), where that constant puts every Gaussian on a quarter-scale grid in the map's
top-left corner (unpatched, the official run learns almost nothing: AP50 0.039 where minidetr,
which divides by the true stride, reaches 0.46). So the smca row runs a copy of SMCA-DETR with
that one constant set to the stage's stride, given by `--refs_smca DIR2` (DIR2/SMCA-DETR):

    cp -r DIR/SMCA-DETR DIR2/ && sed -i 's|point_sigmoid_ref / 32|point_sigmoid_ref / 8|' \
        DIR2/SMCA-DETR/models/transformer.py

Resumable: a run whose log.txt holds its last epoch is
never repeated (finished logs are also copied to benchmarks/official_logs/, committed with
the results, so another machine continues where this one stopped); an unfinished one starts
again. Results: RESULTS.md, section "Against the
official code", and official.png.
"""
import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, archive, evaluations, fmt_spread, machine_description, pyplot, update_section

EPOCHS = 5
COMMON = ("--scratch --transforms tiny --size 128 --num_classes 7 --hidden_dim 128 --nheads 8 "
          "--dim_feedforward 512 --enc_layers 1 --dec_layers 3 --dropout 0 --batch_size 8 "
          "--lr 3e-4 --lr_backbone 3e-4 --weight_decay 1e-4 --epochs 5 --lr_drop 4 "
          "--clip_max_norm 0.1").split()
# the harness's variant name and the flags that give minidetr's tiny preset of that variant
OFFICIAL_FLAGS = {
    "detr": ("detr", "--stage layer3 --num_queries 10".split()),
    "conditional": ("cond", "--stage layer2 --num_queries 40 --num_select 40".split()),
    "smca": ("smca", "--stage layer2 --num_queries 40 --dynamic_scale type3".split()),
    "dn": ("dn", "--stage layer2 --num_queries 40 --num_select 40 --modelname dn_dab_detr "
                 "--use_dn".split()),
}
SIDES = ("official", "minidetr")


# finished runs' log.txt, kept with the results (a few lines each), so that a later session
# or machine continues the benchmark instead of repeating it
ARCHIVE = ROOT / "benchmarks" / "official_logs"


def run_dir(runs, side, variant, seed):
    return Path(runs) / f"{side}_{variant}_s{seed}"


def log_of(folder):
    """A run's log.txt: the archived copy if there is one, else the one in its folder."""
    archived = ARCHIVE / f"{Path(folder).name}.txt"
    return archived if archived.exists() else Path(folder) / "log.txt"


def per_epoch(path):
    """log.txt (minidetr's or the official one: one JSON line per evaluated epoch) ->
    {epoch: (train_loss, AP, AP50)}: both sides log epochs, and the table compares them epoch
    by epoch (the official log has no step)."""
    rows = {}
    for row in evaluations(path):
        ap = row["test_coco_eval_bbox"]
        rows[int(row["epoch"])] = (row["train_loss"], ap[0], ap[1])
    return rows


def is_complete(folder):
    return (EPOCHS - 1) in per_epoch(log_of(folder))


def command(side, variant, seed, folder, args):
    if side == "minidetr":
        # fp32 backbone as the official code (the tiny preset's 'auto' runs it in bf16 on
        # CPUs that have bf16 instructions, which is a speed choice, not the reference's)
        # and the 5 epochs (1,250 steps) of the official side's COMMON, which the tiny preset
        # had when this benchmark was built (it has 10 since)
        return [sys.executable, str(ROOT / "train.py"), "--variant", variant, "--seed", str(seed),
                "--backbone_precision", "fp32", "--epochs", "5", "--lr_drop", "4",
                "--output_dir", str(folder)]
    name, flags = OFFICIAL_FLAGS[variant]
    refs = args.refs_smca if variant == "smca" else args.refs
    return [args.ref_python, args.harness, "--refs", refs, name, "--coco_path",
            str(coco_layout(args.runs)), "--output_dir", str(folder), "--save_init",
            str(Path(folder) / "init.pt"), *COMMON, *flags, "--seed", str(seed)]


def coco_layout(runs):
    """A COCO-2017-layout folder of symbolic links to the built-in shapes dataset."""
    from minidetr.config import Config
    from minidetr.shapes import make_shapes_dataset
    cfg = Config.for_variant("dn", "tiny")
    paths = make_shapes_dataset(num_train=cfg.shapes_train, num_val=cfg.shapes_val)
    root = Path(runs) / "coco"
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    links = {"train2017": paths["train_images"], "val2017": paths["val_images"],
             "annotations/instances_train2017.json": paths["train_json"],
             "annotations/instances_val2017.json": paths["val_json"]}
    for name, target in links.items():
        if not (root / name).exists():
            os.symlink(os.path.abspath(target), root / name)
    return root


def run_all(args):
    """Start every missing run, `args.jobs` at a time, one thread each; returns when all ended."""
    todo = [(side, v, s) for v in args.variants for s in args.seeds for side in args.sides
            if not is_complete(run_dir(args.runs, side, v, s))]
    if any(side == "official" for side, _, _ in todo) and not (args.refs and args.ref_python
                                                               and args.harness):
        sys.exit("error: the official side needs --refs, --ref_python and --harness "
                 "(or --sides minidetr)")
    if any(side == "official" and v == "smca" for side, v, _ in todo) and not args.refs_smca:
        sys.exit("error: the official smca runs need --refs_smca: a copy of SMCA-DETR with its "
                 "grid constant set to the stage's stride (see this script's docstring)")
    if args.print_commands:   # for a queue of one's own: one shell line per missing run
        for side, variant, seed in todo:
            folder = run_dir(args.runs, side, variant, seed)
            print(f"mkdir -p {folder} && OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 NTHREADS=1 "
                  f"{shlex.join(command(side, variant, seed, folder, args))} > {folder}/stdout.txt 2>&1")
        sys.exit(0)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", NTHREADS="1")
    running = []
    while todo or running:
        while todo and len(running) < args.jobs:
            side, variant, seed = todo.pop(0)
            folder = run_dir(args.runs, side, variant, seed)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "log.txt").unlink(missing_ok=True)     # an unfinished run starts again
            argv = command(side, variant, seed, folder, args)
            (folder / "command.txt").write_text(shlex.join(argv) + "\n")
            print(f"[official.py] start {folder.name}", flush=True)
            with open(folder / "stdout.txt", "w") as out:
                proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            running.append((proc, folder, time.time()))
        time.sleep(5)
        for item in list(running):
            proc, folder, start = item
            if proc.poll() is not None:
                running.remove(item)
                done = (EPOCHS - 1) in per_epoch(Path(folder) / "log.txt")
                if done:
                    archive(Path(folder) / "log.txt", ARCHIVE / f"{Path(folder).name}.txt")
                state = "done" if done else f"FAILED (exit {proc.returncode})"
                print(f"[official.py] {folder.name}: {state} in {(time.time() - start) / 60:.1f} min",
                      flush=True)
                report(args)                              # partial results as they come


def collect(args):
    """{(variant, side): [per-seed {epoch: (loss, AP, AP50)}]} of the complete runs."""
    found = {}
    for variant in args.variants:
        for side in SIDES:
            logs = [per_epoch(log_of(run_dir(args.runs, side, variant, s))) for s in args.seeds]
            found[(variant, side)] = [log for log in logs if (EPOCHS - 1) in log]
    return found


def render(found, args):
    lines = [f"Machine: {machine_description()}. {args.note + ' ' if args.note else ''}Every run: one "
             f"thread, {args.jobs} runs at a time (one per core). Seeds {', '.join(map(str, args.seeds))}; mean "
             "(min-max) over the seeds that finished. Train loss = the weighted total each side "
             "logs (its own loss terms, the same formula).", "",
             "| variant | side | seeds | train loss, epochs 0-4 | AP50 after epochs 0-4 | final AP | final AP50 |",
             "|---|---|---|---|---|---|---|"]
    verdicts = []
    for variant in args.variants:
        finals = {}
        for side in SIDES:
            runs = found[(variant, side)]
            if not runs:
                lines.append(f"| {variant} | {side} | 0 | | | | |")
                continue
            mean = [[sum(r[e][i] for r in runs) / len(runs) for e in range(EPOCHS)] for i in range(3)]
            finals[side] = [r[EPOCHS - 1][2] for r in runs]
            lines.append(f"| {variant} | {side} | {len(runs)} | {' '.join(f'{x:.2f}' for x in mean[0])} "
                         f"| {' '.join(f'{x:.3f}' for x in mean[2])} "
                         f"| {fmt_spread([r[EPOCHS - 1][1] for r in runs])} "
                         f"| {fmt_spread(finals[side])} |")
        if len(finals) == 2 and min(len(v) for v in finals.values()) < 2:
            verdicts.append(f"- {variant}: one seed on a side so far; no verdict (the seed spread "
                            "is the yardstick, and one run has none)")
        elif len(finals) == 2:
            off, ours = finals["official"], finals["minidetr"]
            floor = sum(off) / len(off) - (max(off) - min(off))
            mean_ours = sum(ours) / len(ours)
            verdicts.append(f"- {variant}: minidetr mean final AP50 {mean_ours:.3f}, official "
                            f"{sum(off) / len(off):.3f} (spread {max(off) - min(off):.3f}): "
                            f"{'meets' if mean_ours >= floor else 'BELOW'} the bar official mean - "
                            f"spread = {floor:.3f}")
    lines += ["", *verdicts, "", "Made by `python benchmarks/official.py --refs DIR --refs_smca DIR2 --ref_python PY "
              "--harness H` (each run's command line in its folder's command.txt).", "",
              "![AP50 per epoch, minidetr (solid) and the official code (dashed), min-max bands]"
              "(official.png)"]
    return "\n".join(lines)


def plot(found, args, path):
    plt = pyplot()
    if plt is None:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return
    fig, axes = plt.subplots(1, len(args.variants), figsize=(4 * len(args.variants), 3.4), squeeze=False)
    for ax, variant in zip(axes[0], args.variants):
        for side, style in (("official", "--"), ("minidetr", "-")):
            runs = found[(variant, side)]
            if not runs:
                continue
            steps = [250 * (e + 1) for e in range(EPOCHS)]
            per_epoch = [[r[e][2] for r in runs] for e in range(EPOCHS)]
            mean = [sum(v) / len(v) for v in per_epoch]
            line, = ax.plot(steps, mean, style, label=f"{side} ({len(runs)} seeds)")
            ax.fill_between(steps, [min(v) for v in per_epoch], [max(v) for v in per_epoch],
                            color=line.get_color(), alpha=0.2)
        ax.set_title(variant)
        ax.set_xlabel("step")
        ax.set_ylabel("AP50")
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def render_controls(runs):
    """Rows for the controlled initialisation runs: folders control_<variant>_<what>_s<seed>
    (train.py --resume of a benchmarks/swap_init.py checkpoint)."""
    rows = []
    names = {f.name for f in Path(runs).glob("control_*")} | {f.stem for f in ARCHIVE.glob("control_*")}
    for name in sorted(names):
        folder = Path(runs) / name
        log = per_epoch(log_of(folder))
        if (EPOCHS - 1) not in log:
            continue
        loss = " ".join(f"{log[e][0]:.2f}" for e in range(EPOCHS))
        ap50 = " ".join(f"{log[e][2]:.3f}" for e in range(EPOCHS))
        rows.append(f"| {name[len('control_'):]} | {loss} | {ap50} | "
                    f"{log[EPOCHS - 1][1]:.3f} / {log[EPOCHS - 1][2]:.3f} |")
    if not rows:
        return ""
    return "\n".join(["", "", "Controlled initialisation runs (see below for what each swaps):", "",
                      "| run | train loss, epochs 0-4 | AP50 after epochs 0-4 | final AP / AP50 |",
                      "|---|---|---|---|", *rows])


def report(args):
    found = collect(args)
    body = "## Against the official code\n\n" + render(found, args) + render_controls(args.runs)
    update_section(ROOT / "benchmarks" / "RESULTS.md", "against-official", body)
    plot(found, args, ROOT / "benchmarks" / "official.png")
    print(body)


def get_args(argv=None):
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_argument("--refs", help="folder of the official repositories")
    cli.add_argument("--ref_python", help="the Python of the official code's environment")
    cli.add_argument("--refs_smca", help="folder holding SMCA-DETR/ with its grid constant set "
                     "to the tiny stage's stride (8): see the docstring")
    cli.add_argument("--harness", help="the reference-training harness's ref_train.py")
    cli.add_argument("--variants", nargs="+", default=list(OFFICIAL_FLAGS), choices=list(OFFICIAL_FLAGS))
    cli.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    cli.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    cli.add_argument("--jobs", type=int, default=2, help="runs at a time (one per core)")
    cli.add_argument("--runs", default=str(ROOT / "out" / "official"), help="where run folders go")
    cli.add_argument("--report_only", action="store_true")
    cli.add_argument("--note", default="", help="a sentence for the report's machine line")
    cli.add_argument("--print_commands", action="store_true",
                     help="print a shell line per missing run instead of running them")
    return cli.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    if not args.report_only:
        run_all(args)
    report(args)


if __name__ == "__main__":
    main()
