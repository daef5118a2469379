"""DN-DETR's mechanism measured: does denoising make the bipartite matching more stable?

    python benchmarks/instability.py                    # every configuration, seeds 0 1 2, 1,500 steps (~3 core-hours)
    python benchmarks/instability.py --runs dn dab --seeds 0 --steps 1500
    python benchmarks/instability.py --report_only      # rewrite RESULTS.md from the runs so far

DN-DETR (Li et al., CVPR 2022, Sec. 3.1 and Fig. 2) explains DETR's slow start by the
instability of the Hungarian matching: the same object is matched to one query in one epoch
and to another in the next, so no query keeps a target. It measures the instability per
epoch, with and without denoising, and shows that denoising lowers it. Here:
`train.py --log_instability` (minidetr/instability.py) matches 200 fixed, unaugmented
training images at every evaluation and logs `train_instability`, the fraction of their
ground truths whose matched query changed since the previous evaluation.

The runs use the long race's configuration (long_race.py: the tiny preset, ResNet-18 to
layer2, 10 queries for DETR and 30 for the others, a constant learning rate, an evaluation
every epoch of 250 steps) for the first 1,500 steps, where the matching settles: DAB-DETR
against DN-DETR (DN-DETR's own comparison: the same model without and with denoising),
Conditional DETR without and with `--dn`, and vanilla DETR, which has no `--dn` (its queries
carry no box to noise), as the line the others start from.
Runs are resumable (benchmarks/common.run_one): stop with Ctrl-C, start again, and each run
continues from its checkpoint; a run whose committed log already reaches the steps is not
repeated. --jobs run at a time, one thread each.
"""
import argparse
import concurrent.futures as cf
import os

from common import ROOT, evaluations, fmt_spread, machine_description, pyplot, run_one, update_section

RUNS = {   # name: the variant's flags (queries as the long race: DETR 10, the others 30)
    # vanilla DETR without denoising only: its queries carry no box, so a noised box has nowhere
    # to go (Config refuses --dn for detr; DN-DETR adds denoising to DAB-DETR's anchor boxes)
    "detr": ["--variant", "detr", "--num_queries", "10", "--num_select", "10"],
    "conditional": ["--variant", "conditional", "--num_queries", "30", "--num_select", "30"],
    "conditional_dn": ["--variant", "conditional", "--dn", "--num_queries", "30", "--num_select", "30"],
    "dab": ["--variant", "dab", "--num_queries", "30", "--num_select", "30"],
    "dn": ["--variant", "dn", "--num_queries", "30", "--num_select", "30"],
}
PAIRS = [("dab", "dn"), ("conditional", "conditional_dn"), ("detr", None)]   # without, with
COMMON = ["--preset", "tiny", "--backbone_stage", "layer2", "--epochs", "400", "--lr_drop", "400",
          "--eval_every", "1", "--log_instability", "--instability_images", "200"]
STEPS_PER_EPOCH = 250
OUT = ROOT / "benchmarks" / "runs" / "instability"
LOGS = ROOT / "benchmarks" / "instability_logs"


def argv_of(name, seed, steps):
    return [*RUNS[name], *COMMON, "--seed", str(seed), "--max_steps", str(steps),
            "--output_dir", str(OUT / f"{name}_s{seed}")]


def finished(name, seed, steps):
    """True when the committed log already reaches `steps` (a new machine has no checkpoints,
    only the logs: without this a finished run would train again from step 0)."""
    return any(row["step"] >= steps for row in evaluations(LOGS / f"{name}_s{seed}.txt"))


def train(name, seed, steps):
    run_dir = OUT / f"{name}_s{seed}"
    if finished(name, seed, steps) and not (run_dir / "checkpoint.pth").exists():
        return name, seed, 0
    os.environ["OMP_NUM_THREADS"] = "1"   # one thread a run; --jobs runs share the cores
    code = run_one(argv_of(name, seed, steps), run_dir, {"steps": steps, "steps_per_epoch": STEPS_PER_EPOCH},
                   write=lambda line: None)
    if (run_dir / "log.txt").exists():
        LOGS.mkdir(parents=True, exist_ok=True)
        (LOGS / f"{name}_s{seed}.txt").write_text((run_dir / "log.txt").read_text())
    return name, seed, code


def curves(names, seeds):
    """{name: {step: [instability of each seed]}} and {name: {step: [AP50 ...]}} from the logs."""
    inst, ap50 = {}, {}
    for name in names:
        for seed in seeds:
            for row in evaluations(LOGS / f"{name}_s{seed}.txt"):
                if row.get("train_instability") is not None:
                    inst.setdefault(name, {}).setdefault(row["step"], []).append(row["train_instability"])
                ap50.setdefault(name, {}).setdefault(row["step"], []).append(row["test_coco_eval_bbox"][1])
    return inst, ap50


def render(names, seeds):
    inst, ap50 = curves(names, seeds)
    steps = sorted({s for c in inst.values() for s in c})
    lines = [f"Machine: {machine_description()}; runs one thread each, two at a time.", "",
             "`python benchmarks/instability.py`: the long race's configuration, `--log_instability` "
             "(200 fixed training images, unaugmented, matched at every evaluation): the fraction of "
             "their ground truths whose matched query changed since the evaluation 250 steps "
             "before. Mean over the seeds given (min-max); AP50 on the 200 val images.", "",
             "| run | seeds | " + " | ".join(f"{s:,}" for s in steps) + " steps |",
             "|---|---|" + "---|" * len(steps)]
    for name in names:
        if name not in inst:
            continue
        n = max(len(v) for v in inst[name].values())
        lines.append(f"| {name} | {n} | " + " | ".join(
            fmt_spread(inst[name][s]) if s in inst[name] else "" for s in steps) + " |")
    lines += ["", "AP50 at the same evaluations:", "",
              "| run | " + " | ".join(f"{s:,}" for s in steps) + " steps |", "|---|" + "---|" * len(steps)]
    for name in names:
        if name in ap50:
            lines.append(f"| {name} | " + " | ".join(
                f"{sum(ap50[name][s]) / len(ap50[name][s]):.3f}" if s in ap50[name] else "" for s in steps) + " |")
    plot(inst, ROOT / "benchmarks" / "instability.png")
    return "\n".join(lines)


def plot(inst, out_png):
    plt = pyplot()
    if plt is None or not inst:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for color, (without, with_dn) in zip(("C0", "C1", "C2"), PAIRS):   # a pair, one colour
        for name, style in ((without, "--"), (with_dn, "-")):
            if name in inst:   # (None: no run with denoising)
                steps = sorted(inst[name])
                ax.plot(steps, [sum(inst[name][s]) / len(inst[name][s]) for s in steps], style,
                        color=color, label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel("ground truths on another query")
    ax.set_title("Matching instability (dashed: without denoising)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--report_only", action="store_true")
    args = p.parse_args(argv)
    if not args.report_only:
        with cf.ThreadPoolExecutor(args.jobs) as pool:
            for name, seed, code in pool.map(lambda job: train(*job, args.steps),
                                             [(n, s) for s in args.seeds for n in args.runs]):
                print(f"{name} seed {seed}: exit {code}", flush=True)
    table = render(args.runs, args.seeds)
    print(table)
    update_section(ROOT / "benchmarks" / "RESULTS.md", "instability", table)


if __name__ == "__main__":
    main()
