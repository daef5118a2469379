"""The main job, `python train.py --variant dn`, timed end to end on CPUs with and without bf16.

    python benchmarks/main_job.py                       # every configuration, seeds 42 0 1
    python benchmarks/main_job.py --configs avx2 --seeds 42
    python benchmarks/main_job.py --report_only         # rewrite RESULTS.md from the runs

The README promises the main job in about ten minutes on two CPU cores. The tiny preset runs
its ResNet in bf16 where the CPU has bf16 instructions (AVX-512 BF16, AMX), in float32 where
it has not, and keeps as many of its 10 epochs as fit in --time_limit (9.5 minutes). This
measures that promise on one machine in three configurations:

  native     the machine as it is (here: bf16 instructions);
  avx2       oneDNN's and ATen's kernels capped at AVX2 (ONEDNN_MAX_CPU_ISA=AVX2
             ATEN_CPU_CAPABILITY=avx2): a CPU without bf16, two cores;
  avx2_1core the same on one core (taskset): a slower machine without bf16, as two
             hyperthreads of one core or an older core would be. The two 1-core runs of a
             pair run at once, one per core.

Each run is the README's command with --seed and --output_dir added (neither changes what is
trained), one at a time on the otherwise idle machine except the 1-core pairs; the wall time
is the whole process, Python's start and the dataset check included (the dataset itself was
generated before). AP / AP50 after every epoch come from the run's log.txt, whose lines are
copied to benchmarks/main_job_logs/ (committed with the table).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from common import ROOT, evaluations, fmt_spread, machine_description, update_section

AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
CONFIGS = {"native": ({}, None), "avx2": (AVX2, None), "avx2_1core": (AVX2, "1core")}
RUNS = ROOT / "benchmarks" / "runs" / "main_job"
LOGS = ROOT / "benchmarks" / "main_job_logs"
WALLS = "walls.json"   # {run name: seconds}, beside the runs


def run_name(config, seed):
    return f"{config}_s{seed}"


def start(config, seed, core=None):
    """Popen of the README's command for one run (pinned to `core` for the 1-core stand-in)."""
    env, _ = CONFIGS[config]
    out = RUNS / run_name(config, seed)
    argv = [sys.executable, str(ROOT / "train.py"), "--variant", "dn", "--seed", str(seed),
            "--output_dir", str(out)]
    if core is not None:
        argv = ["taskset", "-c", str(core)] + argv
    out.mkdir(parents=True, exist_ok=True)
    if (out / "log.txt").exists():   # a new run, not a resumed one: its log starts empty
        (out / "log.txt").unlink()
    with open(out / "stdout.txt", "w") as stdout:   # the child keeps its own copy of the handle
        return subprocess.Popen(argv, env={**os.environ, **env}, cwd=ROOT, stdout=stdout,
                                stderr=subprocess.STDOUT)


def record(walls, name, seconds):
    walls[name] = round(seconds, 1)
    (RUNS / WALLS).write_text(json.dumps(walls, indent=1))
    LOGS.mkdir(parents=True, exist_ok=True)
    shutil.copy(RUNS / name / "log.txt", LOGS / f"{name}.txt")


def measure(configs, seeds):
    walls = json.loads((RUNS / WALLS).read_text()) if (RUNS / WALLS).exists() else {}
    for config in configs:
        pinned = CONFIGS[config][1] == "1core"
        groups = [seeds[i:i + 2] for i in range(0, len(seeds), 2)] if pinned else [[s] for s in seeds]
        for group in groups:   # the 1-core runs two at a time, one per core
            began = time.time()
            procs = {seed: start(config, seed, core=i if pinned else None) for i, seed in enumerate(group)}
            for seed, proc in procs.items():
                if proc.wait():
                    sys.exit(f"{run_name(config, seed)} failed: see {RUNS / run_name(config, seed)}/stdout.txt")
                record(walls, run_name(config, seed), time.time() - began)
                print(f"{run_name(config, seed)}: {walls[run_name(config, seed)]:.0f} s", flush=True)
    return walls


def render(walls, configs, seeds):
    lines = [f"Machine: {machine_description()}.", "",
             "`python benchmarks/main_job.py`: the README's `python train.py --variant dn` (with "
             "`--seed` and `--output_dir`), whole-process wall time, the built-in dataset already "
             "generated; AP / AP50 on its 200 val images after the last epoch. avx2 = oneDNN and "
             "ATen capped at AVX2, the stand-in for a CPU without bf16 instructions; avx2_1core = "
             "the same pinned to one core, two such runs at once (one per core).", "",
             "| configuration | ResNet | seed | epochs kept | wall time | AP | AP50 |", "|---|---|---|---|---|---|---|"]
    summary = {}
    for config in configs:
        for seed in seeds:
            name = run_name(config, seed)
            rows = evaluations(LOGS / f"{name}.txt")
            if not rows or name not in walls:
                continue
            ap, ap50 = rows[-1]["test_coco_eval_bbox"][:2]
            summary.setdefault(config, []).append((walls[name], ap, ap50))
            lines.append(f"| {config} | {'fp32' if CONFIGS[config][0] else 'bf16'} | {seed} | {len(rows)} "
                         f"| {walls[name] / 60:.1f} min | {ap:.3f} | {ap50:.3f} |")
    lines += ["", "Mean over the seeds (min-max):", "", "| configuration | wall time (min) | AP | AP50 |",
              "|---|---|---|---|"]
    for config, runs in summary.items():
        lines.append(f"| {config} | {fmt_spread([w / 60 for w, _, _ in runs], 1)} | "
                     f"{fmt_spread([a for _, a, _ in runs])} | {fmt_spread([a for _, _, a in runs])} |")
    lines += ["", "AP50 after each epoch:", "", "| run | " + " | ".join(str(250 * e) for e in range(1, 11))
              + " steps |", "|---|" + "---|" * 10]
    for config in configs:
        for seed in seeds:
            rows = evaluations(LOGS / f"{run_name(config, seed)}.txt")
            if rows:
                cells = [f"{r['test_coco_eval_bbox'][1]:.3f}" for r in rows] + [""] * (10 - len(rows))
                lines.append(f"| {run_name(config, seed)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--seeds", nargs="+", type=int, default=[42, 0, 1])
    p.add_argument("--report_only", action="store_true")
    args = p.parse_args(argv)
    walls = (json.loads((RUNS / WALLS).read_text()) if (RUNS / WALLS).exists() else {}) if args.report_only \
        else measure(args.configs, args.seeds)
    table = render(walls, args.configs, args.seeds)
    print(table)
    update_section(ROOT / "benchmarks" / "RESULTS.md", "main_job", table)


if __name__ == "__main__":
    main()
