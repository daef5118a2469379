"""Speed side by side with the official code: the same configuration, the same data, one run.

    python benchmarks/speed_official.py --refs DIR --refs_smca DIR2 --ref_python PY --harness H
    python benchmarks/speed_official.py ... --presets tiny --variants dn --steps 40 --rounds 1

Each measurement is a real training run cut short, on each side through its own training
loop: the official repository through the reference-training harness (H, its ref_train.py,
which times every step, loading included), minidetr through train.py (log.txt's
`step_time_median`, timed the same way). Per run: the median step of `--steps` optimiser
steps, the evaluation of a `--val_images` subset afterwards (images/s, forward +
post-processing + the COCO bookkeeping, as each side's evaluate() does it), and the peak RSS
of the training process (os.wait4). Both sides load data with WORKERS worker processes (the
default of the official main.py and of minidetr's presets; the harness's own default is 0,
which would put the official side's image decoding, ~15-20 ms of a tiny step here, into its
step and leave minidetr's in its workers), so the workers are outside the step and the RSS
on both sides. The runs take turns, one at a time on one thread each (`--threads`), `--rounds`
times; the table gives the median over the rounds and the ratio minidetr / official.

Configurations (DIR, DIR2, PY, H as in benchmarks/official.py, whose docstring says why the
tiny smca row needs the SMCA-DETR copy in DIR2):
  - tiny: the side-by-side training benchmark's (official.py: ResNet-18 to the tiny stage,
    128-d, 1 + 3 layers, batch 8 of ~128 px). minidetr twice: with the fp32 backbone the
    official code has, and with the tiny preset's default (`--backbone_precision auto`: bf16
    on a CPU with bf16 instructions); the paper rows too, though the paper preset's own
    default is fp32.
  - paper: the paper's model, every flag given on both sides (ResNet-50 to layer4 with frozen BatchNorm and stem, 256-d,
    6 + 6 layers, FFN 2048, dropout 0.1, 100 queries for DETR and 300 for the others, lr
    1e-4 / 1e-5) on 2 images of ~512 px (the tiny augmentation at size 512 on both sides,
    so that both see the same image sizes). SMCA at stride 32 needs no patch here.
Results: RESULTS.md section "Speed against the official code".
"""
import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, machine_description, update_section
from official import COMMON, OFFICIAL_FLAGS, coco_layout

# the paper model on both sides: minidetr's tiny preset (for its augmentation) overridden to it
PAPER_MINIDETR = ("--backbone resnet50 --backbone_stage layer4 --frozen_bn --freeze_stem --hidden_dim 256 "
                  "--nheads 8 --dim_feedforward 2048 --enc_layers 6 --dec_layers 6 --dropout 0.1 "
                  "--image_size 512 --batch_size 2 --lr 1e-4 --lr_backbone 1e-5 --num_select 100").split()
PAPER_QUERIES = {"detr": 100, "conditional": 300, "smca": 300, "dn": 300}
# the official repositories' own defaults are the paper model already; these set the data
PAPER_OFFICIAL = ("--transforms tiny --size 512 --num_classes 7 --batch_size 2 --backbone resnet50 "
                  "--hidden_dim 256 --nheads 8 --dim_feedforward 2048 --enc_layers 6 --dec_layers 6 "
                  "--dropout 0.1 --lr 1e-4 --lr_backbone 1e-5").split()   # explicit: SMCA's own default is R18
# data-loading worker processes, both sides (the docstring says why it is given explicitly)
WORKERS = 2
PAPER_OFFICIAL_EXTRA = {"detr": [], "conditional": [], "smca": ["--dynamic_scale", "type3"],
                        "dn": ["--modelname", "dn_dab_detr", "--use_dn"]}


def small_coco(runs, val_images):
    """The built-in dataset as a COCO folder whose val2017 annotations keep the first N images."""
    full = coco_layout(runs)
    root = Path(runs) / f"coco_val{val_images}"
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for name in ("train2017", "val2017", "annotations/instances_train2017.json"):
        if not (root / name).exists():
            os.symlink(os.path.realpath(full / name), root / name)
    val = json.loads((full / "annotations" / "instances_val2017.json").read_text())
    keep = {im["id"] for im in val["images"][:val_images]}
    val["images"] = [im for im in val["images"] if im["id"] in keep]
    val["annotations"] = [a for a in val["annotations"] if a["image_id"] in keep]
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(val))
    return root


def commands(preset, variant, side, coco, folder, args):
    """argv of one run: side in official | minidetr_fp32 | minidetr."""
    if side == "official":
        name, flags = OFFICIAL_FLAGS[variant]
        if preset == "tiny":
            refs = args.refs_smca if variant == "smca" else args.refs
            extra = [*COMMON, *flags]
        else:
            refs, extra = args.refs, [*PAPER_OFFICIAL, *PAPER_OFFICIAL_EXTRA[variant],
                                      "--num_queries", str(PAPER_QUERIES[variant])]
        return [args.ref_python, args.harness, "--refs", refs, name, "--coco_path", str(coco),
                "--output_dir", str(folder), *extra, "--epochs", "1", "--max_steps", str(args.steps),
                "--num_workers", str(WORKERS)]   # after the harness's own 0: the last one counts
    argv = [sys.executable, str(ROOT / "train.py"), "--preset", "tiny", "--variant", variant,
            "--coco_path", str(coco), "--num_classes", "7", "--output_dir", str(folder),
            "--epochs", "1", "--max_steps", str(args.steps), "--num_workers", str(WORKERS)]
    if preset == "paper":
        argv += [*PAPER_MINIDETR, "--num_queries", str(PAPER_QUERIES[variant])]
    if side == "minidetr_fp32":
        argv += ["--backbone_precision", "fp32"]
    return argv


def run(argv, folder, threads):
    """Run one training; returns (stdout text, peak RSS MiB of the process, wall s)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "log.txt").unlink(missing_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), NTHREADS=str(threads))
    start = time.time()
    with open(folder / "stdout.txt", "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)   # this child's own rusage: its peak RSS
    code = os.waitstatus_to_exitcode(status)
    text = (folder / "stdout.txt").read_text()
    if code:
        raise RuntimeError(f"{shlex.join(argv)} failed (exit {code}):\n{text[-3000:]}")
    return text, usage.ru_maxrss / 1024, time.time() - start


def parse(side, text, folder, val_images, batch):
    """(median step s, evaluation images/s) from one run's output."""
    if side == "official":
        steps = re.findall(r"step time median ([\d.]+) s", text)
        evals = re.findall(r"Test:\s+Total time: \S+ \(([\d.]+) s / it\)", text)
        if not steps or not evals:
            raise RuntimeError(f"no step / evaluation time in {folder}/stdout.txt")
        return float(steps[-1]), batch / float(evals[-1])
    rows = [json.loads(line) for line in (folder / "log.txt").read_text().splitlines() if line.strip()]
    return rows[-1]["step_time_median"], rows[-1]["eval_img_s"]


def measure(args):
    coco = small_coco(args.runs, args.val_images)
    sides = ["official", "minidetr_fp32", "minidetr"]
    found = {}
    for preset in args.presets:
        batch = 8 if preset == "tiny" else 2
        for variant in args.variants:
            for rnd in range(args.rounds):
                for side in sides:
                    folder = Path(args.runs) / "speed" / f"{preset}_{variant}_{side}_r{rnd}"
                    text, rss, wall = run(commands(preset, variant, side, coco, folder, args), folder,
                                          args.threads)
                    step, img_s = parse(side, text, folder, args.val_images, batch)
                    found.setdefault((preset, variant, side), []).append((step, img_s, rss))
                    print(f"{preset:5s} {variant:11s} {side:13s} round {rnd}: step {step * 1000:7.1f} ms, "
                          f"eval {img_s:6.1f} img/s, peak RSS {rss:6.0f} MiB ({wall:.0f} s)", flush=True)
    return found


def render(saved, note):
    """The table from every saved entry (speed_official.json), each row with its settings."""
    med = lambda rows, i: statistics.median(r[i] for r in rows)   # noqa: E731
    sides = ("official", "minidetr_fp32", "minidetr")
    machines = sorted({e["settings"]["machine"] for e in saved.values()})
    lines = [f"Machine: {'; '.join(machines)}. {note}", "",
             "Each row: runs of `--steps` training steps, one at a time on one thread each, taking "
             "turns for `--rounds` rounds (median over them); the median step (data loading "
             "included, as the harness times the official code), then the evaluation of "
             "`--val_images` val images (images/s of the batch loop, as DETR's evaluate times it), "
             "and the peak RSS of the training process. minidetr fp32 = `--backbone_precision fp32` "
             "(the official code's precision); minidetr = `--backbone_precision auto` (the tiny "
             "preset's default: the backbone in bf16 on a CPU with bf16 instructions; the paper "
             "preset's default is fp32). Ratio = minidetr / official "
             "(a step or memory below 1, or images/s above 1: minidetr ahead).", "",
             "| preset | variant | steps x rounds | official step ms | minidetr fp32 step ms (ratio) "
             "| minidetr step ms (ratio) | official eval img/s | minidetr fp32 eval img/s (ratio) "
             "| minidetr eval img/s (ratio) | peak RSS MiB official / fp32 / default (ratio) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(saved, key=lambda k: (k.split("/")[0] != "tiny", k)):
        entry, (preset, variant) = saved[key], key.split("/")
        if not all(s in entry for s in sides):
            continue
        rows, st = {s: entry[s] for s in sides}, entry["settings"]
        off_step, off_img, off_rss = med(rows["official"], 0), med(rows["official"], 1), med(rows["official"], 2)
        cells = [f"{st['steps']} x {st['rounds']}", f"{off_step * 1000:.0f}"]
        cells += [f"{med(rows[s], 0) * 1000:.0f} ({med(rows[s], 0) / off_step:.2f})" for s in sides[1:]]
        cells += [f"{off_img:.1f}"]
        cells += [f"{med(rows[s], 1):.1f} ({med(rows[s], 1) / off_img:.2f})" for s in sides[1:]]
        cells += [" / ".join(f"{med(rows[s], 2):.0f}" for s in sides)
                  + f" ({med(rows['minidetr'], 2) / off_rss:.2f})"]
        lines.append(f"| {preset} | {variant} | " + " | ".join(cells) + " |")
    lines += ["", "Made by `python benchmarks/speed_official.py --refs DIR --refs_smca DIR2 --ref_python PY "
              "--harness H --presets P --steps N --rounds R --val_images V` (raw numbers: "
              "speed_official.json)."]
    return "\n".join(lines)


def get_args(argv=None):
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_argument("--refs", required=True, help="folder of the official repositories")
    cli.add_argument("--refs_smca", required=True, help="SMCA-DETR with the tiny stage's grid constant")
    cli.add_argument("--ref_python", required=True, help="the Python of the official code's environment")
    cli.add_argument("--harness", required=True, help="the reference-training harness's ref_train.py")
    cli.add_argument("--presets", nargs="+", default=["tiny", "paper"], choices=["tiny", "paper"])
    cli.add_argument("--variants", nargs="+", default=list(OFFICIAL_FLAGS), choices=list(OFFICIAL_FLAGS))
    cli.add_argument("--steps", type=int, default=40, help="training steps per run")
    cli.add_argument("--rounds", type=int, default=2)
    cli.add_argument("--threads", type=int, default=1)
    cli.add_argument("--val_images", type=int, default=32)
    cli.add_argument("--runs", default=str(ROOT / "out" / "official"), help="where run folders go")
    cli.add_argument("--note", default="", help="a sentence for the machine line (what else ran)")
    cli.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    return cli.parse_args(argv)


def merge(found, path, args):
    """Merge this invocation's rows into the JSON beside RESULTS.md (one entry per preset and
    variant, with the settings it was measured at); returns them all, {key: entry}."""
    saved = json.loads(path.read_text()) if path.exists() else {}
    for (preset, variant, side), rows in found.items():
        entry = saved.setdefault(f"{preset}/{variant}", {})
        entry[side] = rows
        entry["settings"] = dict(steps=args.steps, rounds=args.rounds, threads=args.threads,
                                 val_images=args.val_images, machine=machine_description(), note=args.note)
    path.write_text(json.dumps(saved, indent=1))
    return saved


def main(argv=None):
    args = get_args(argv)
    saved = merge(measure(args), Path(args.results).with_name("speed_official.json"), args)
    body = "## Speed against the official code\n\n" + render(saved, args.note)
    update_section(args.results, "speed-official", body)
    print(body)


if __name__ == "__main__":
    main()
