"""Where the tiny preset's training step spends its time, on a CPU with and without bf16.

    python benchmarks/step_profile.py                  # native, native float32, AVX2 float32
    python benchmarks/step_profile.py --configs avx2   # one configuration
    python benchmarks/step_profile.py --report_only    # rewrite RESULTS.md from step_profile.json

The main job (`python train.py --variant dn`, the tiny preset) runs its ResNet in bf16 on a
CPU with bf16 instructions (AVX-512 BF16 or AMX) and in float32 on one without. Most CPUs
have none (AMD before Zen 4, most laptops), so this script measures the step both ways on
the one machine: natively, and with oneDNN's and ATen's kernels capped at AVX2
(ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2, which also makes the tiny preset's
`--backbone_precision auto` choose float32: backbone.cpu_has_bf16). Each configuration runs
in a fresh process (the caps are read when torch starts).

One measurement: train.py's own `train_step` on real batches of the built-in dataset (batch 8,
~128 px), after WARMUP untimed steps: the median of STEPS steps, then the same batches again
split into phases, each timed alone around its own call (backbone forward, the rest of the
forward, the criterion with its Hungarian matching, backward, clip + AdamW step), and
torch.profiler's operators by their own time over PROFILED steps. The loader is not in the
step (the batches are in memory): the loop's median step in log.txt adds the workers' share.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from common import ROOT, machine_description, update_section

CONFIGS = {   # name: (environment, --backbone_precision)
    "native": ({}, "auto"),
    "native_fp32": ({}, "fp32"),
    "avx2": ({"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}, "auto"),
}
WARMUP, STEPS, PROFILED = 3, 15, 5
PHASES = ("backbone forward", "rest of the forward", "criterion (matching + losses)", "backward",
          "clip + AdamW step")
RESULTS_JSON = ROOT / "benchmarks" / "step_profile.json"


def measure(precision, threads, variant):
    """One configuration in this process: {median_ms, phases_ms, top_ops, ...}."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from minidetr import Config, build
    from minidetr.backbone import cpu_has_bf16
    from minidetr.check import build_datasets
    from minidetr.data import make_loader
    from minidetr.losses import total_loss
    from minidetr.optim import build_optimizer
    from train import train_step

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = Config.for_variant(variant, "tiny", backbone_precision=precision, num_workers=0)
    train_set, _ = build_datasets(cfg)
    model, criterion, _ = build(cfg)
    optimizer, _ = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loader = iter(make_loader(train_set, cfg, 0, train=True))
    batches = [next(loader) for _ in range(WARMUP + STEPS)]
    cpu = torch.device("cpu")
    for batch in batches[:WARMUP]:
        train_step(model, criterion, optimizer, scaler, batch, cfg, cpu)
    times = []
    for batch in batches[WARMUP:]:
        start = time.perf_counter()
        train_step(model, criterion, optimizer, scaler, batch, cfg, cpu)
        times.append(time.perf_counter() - start)

    def timed(fn):
        start = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - start

    phases = {name: [] for name in PHASES}
    for images, mask, targets in batches[WARMUP:]:
        # the backbone alone, then the whole forward again: the rest is the difference
        _, t_backbone = timed(lambda: model.backbone(images, mask))
        outputs, t_forward = timed(lambda: model(images, mask, targets))
        losses, t_criterion = timed(lambda: criterion(outputs, targets))
        loss = total_loss(losses, criterion.weight_dict)
        optimizer.zero_grad(set_to_none=True)
        _, t_backward = timed(loss.backward)
        _, t_step = timed(lambda: (torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_max_norm),
                                   optimizer.step()))
        for name, t in zip(PHASES, (t_backbone, t_forward - t_backbone, t_criterion, t_backward, t_step)):
            phases[name].append(t)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches[WARMUP:WARMUP + PROFILED]:
            train_step(model, criterion, optimizer, scaler, batch, cfg, cpu)
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    top = [{"op": e.key, "share": e.self_cpu_time_total / total,
            "ms_per_step": e.self_cpu_time_total / 1000 / PROFILED} for e in events[:8]]
    return {"median_ms": 1000 * statistics.median(times),
            "phases_ms": {k: 1000 * statistics.median(v) for k, v in phases.items()},
            "top_ops": top, "bf16_backbone": model.backbone.runs_in_bf16(cpu),
            "cpu_has_bf16": cpu_has_bf16(), "threads": threads,
            "isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "native"), "machine": machine_description()}


def render(results):
    names = [n for n in CONFIGS if n in results]
    lines = [f"Machine: {results[names[0]]['machine']}. Nothing else ran while it measured.", "",
             "`python benchmarks/step_profile.py`: the tiny dn training step (batch 8 of ~128 px, "
             "the built-in dataset's batches held in memory, no loader), median of "
             f"{STEPS} steps after {WARMUP}; AVX2 = oneDNN and ATen capped at AVX2 "
             "(`ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`), which stands in for a CPU without "
             "bf16 instructions.", "",
             "| | " + " | ".join(f"{n} ({'bf16' if results[n]['bf16_backbone'] else 'fp32'} ResNet, "
                                  f"{results[n]['threads']} threads)" for n in names) + " |",
             "|---|" + "---|" * len(names),
             "| **step (ms)** | " + " | ".join(f"**{results[n]['median_ms']:.0f}**" for n in names) + " |"]
    for phase in PHASES:
        lines.append(f"| {phase} | " + " | ".join(
            f"{results[n]['phases_ms'][phase]:.0f} ({results[n]['phases_ms'][phase] / results[n]['median_ms']:.0%})"
            for n in names) + " |")
    lines += ["", "The operators with the most time of their own, in the profiled steps (share of "
              "all operator time):", ""]
    for n in names:
        ops = ", ".join(f"`{o['op'][:48]}` {o['share']:.0%}" for o in results[n]["top_ops"][:6])
        lines.append(f"- {n}: {ops}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--variant", default="dn")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--report_only", action="store_true")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:   # one configuration, in the environment it was started with
        precision = CONFIGS[args.worker][1]
        print(json.dumps(measure(precision, args.threads, args.variant)))
        return
    results = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else {}
    if not args.report_only:
        for name in args.configs:
            env = {**os.environ, **CONFIGS[name][0], "PYTHONPATH": str(ROOT)}
            out = subprocess.run([sys.executable, __file__, "--worker", name, "--threads", str(args.threads),
                                  "--variant", args.variant], env=env, text=True, capture_output=True)
            if out.returncode:
                sys.exit(f"{name} failed:\n{out.stderr[-2000:]}")
            results[name] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{name}: step {results[name]['median_ms']:.0f} ms", flush=True)
            RESULTS_JSON.write_text(json.dumps(results, indent=1))
    table = render(results)
    print(table)
    update_section(ROOT / "benchmarks" / "RESULTS.md", "step_profile", table)


if __name__ == "__main__":
    main()
