"""Speed benchmark: training-step time, inference images/s, peak memory and FLOPs per variant.

    python benchmarks/speed.py                                   # tiny + paper presets, all variants
    python benchmarks/speed.py --quick                           # tiny preset, a few iterations
    python benchmarks/speed.py --presets paper --variants detr --iters 1 --warmup 0
    python benchmarks/speed.py --device cuda --amp none bf16 fp16   # the default on a GPU
    python benchmarks/speed.py --report_only                     # rewrite the section from speed.json

Two input sizes: the tiny preset's (its batch size, image_size x image_size) and the
paper preset's (ResNet-50, batch 2, 800 x 1066: an image of 4:3 resized to DETR's 800 px
shorter side). Images and boxes are random: the cost of a step does not depend on what
the pixels show, only the number of objects (the matcher's and the losses' work) does:
4 per tiny image, 7 per paper image (COCO train2017 has ~7.3 per image).

What one measurement is:
  - training step: train.py's own `train_step` (the function its loop calls) over the same
    batch already on the device: forward under autocast, the set criterion with its
    Hungarian matching, backward, gradient clipping, AdamW step, and the loop's own
    bookkeeping (LossMeter; its finiteness check, which train.py makes every --log_every
    steps, runs once after the timed steps here). Time between
    consecutive steps (time.perf_counter, torch.cuda.synchronize on a GPU); the first
    `warmup` steps dropped, the median of the next `iters` reported.
  - matcher share: criterion.matcher wrapped so every HungarianMatcher call is timed
    (one call per step for all decoder layers), summed per step, median over steps.
  - inference: model.eval() forward under no_grad and autocast, then post-processing.
  - peak memory: on a GPU torch.cuda.max_memory_allocated, reset before each phase; on the
    CPU the process peak RSS (getrusage ru_maxrss), which only grows, so every
    configuration runs in a fresh subprocess and inference (the smaller) is measured first.
  - FLOPs: torch.utils.flop_counter.FlopCounterMode over one inference forward and one
    training forward + backward, with attention forced to the math backend so that its
    matrix products are counted on every device (the fused CPU kernel has no FLOP formula).
    Matmuls, convolutions and attention only. Achieved TFLOP/s = FLOPs / median time,
    given as a fraction of the device's dense peak for that precision where it is known.
Results are merged into speed.json beside RESULTS.md (one entry per machine, preset,
variant, precision; a new measurement replaces the old one) and RESULTS.md's "Speed"
section is rewritten from it.
"""
import argparse
import datetime
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import ROOT, cpu_model, update_section, usable_cores   # first: it puts ROOT on sys.path
from minidetr import Config, build
from minidetr.engine import LossMeter
from minidetr.optim import build_optimizer
from train import train_step      # the training step itself, as train.py's loop runs it
from minidetr.evaluation import autocast
from minidetr.losses import total_loss

VARIANTS = ("detr", "conditional", "smca", "dn")
OBJECTS = {"tiny": 4, "paper": 7}
# Dense (no sparsity) peak TFLOP/s from NVIDIA's data sheets. 'none' = fp32 on the CUDA
# cores; note that PyTorch lets cuDNN convolutions use TF32 by default, so a conv-heavy
# fp32 model can exceed this figure.
PEAK_TFLOPS = {
    "H100 SXM": {"none": 67.0, "bf16": 989.0, "fp16": 989.0},
    "H100 PCIe": {"none": 51.0, "bf16": 756.0, "fp16": 756.0},
    "H200": {"none": 67.0, "bf16": 989.0, "fp16": 989.0},      # H100 SXM's compute
    "A100": {"none": 19.5, "bf16": 312.0, "fp16": 312.0},
}


def peak_tflops(device_name, amp):
    """Known dense peak for a CUDA device name ('NVIDIA H100 80GB HBM3', ...) or None."""
    name = device_name.upper()
    if "H200" in name:
        key = "H200"
    elif "H100" in name:
        key = "H100 PCIe" if "PCIE" in name else "H100 SXM" if ("HBM3" in name or "SXM" in name) else None
    elif "A100" in name:
        key = "A100"
    else:
        key = None
    return PEAK_TFLOPS[key][amp] if key else None


# ---- inputs and instruments ----

def random_batch(batch, height, width, num_classes, objects, seed=0):
    """(images [B, 3, H, W], mask [B, H, W] all False, targets with `objects` random boxes each)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, height, width, generator=g)
    mask = torch.zeros(batch, height, width, dtype=torch.bool)
    targets = []
    for i in range(batch):
        centre = 0.2 + 0.6 * torch.rand(objects, 2, generator=g)
        size = 0.05 + 0.25 * torch.rand(objects, 2, generator=g)
        targets.append({"labels": torch.randint(0, num_classes, (objects,), generator=g),
                        "boxes": torch.cat([centre, size], 1),          # [t, 4] cxcywh in [0, 1]
                        "image_id": i, "orig_size": torch.tensor([height, width]),
                        "size": torch.tensor([height, width])})
    return images, mask, targets


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TimedMatcher(torch.nn.Module):
    """Wraps criterion.matcher: same results, and `seconds` accumulates the time of its calls."""

    def __init__(self, matcher, device):
        super().__init__()
        self.matcher, self.device, self.seconds = matcher, device, 0.0

    def forward(self, outputs, targets):
        return self.timed(self.matcher, outputs, targets)

    def match_layers(self, layers, targets):
        return self.timed(self.matcher.match_layers, layers, targets)

    def timed(self, match, *args):
        sync(self.device)           # the forward's queued kernels are not the matcher's
        start = time.perf_counter()
        indices = match(*args)
        sync(self.device)
        self.seconds += time.perf_counter() - start
        return indices


def peak_memory_mib(device):
    """GPU: max_memory_allocated since the last reset; CPU: process peak RSS (ru_maxrss, KiB on Linux)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def count_flops(fn):
    """FLOPs of fn() (matmul, conv, attention) with attention on the math backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# ---- one configuration (runs in its own process) ----

def measure(preset, variant, device, amp, iters, warmup, flops=True):
    """Time one (preset, variant, device, precision); returns a dict of plain numbers."""
    device = torch.device(device)
    torch.manual_seed(0)
    cfg = Config.for_variant(variant, preset, device=str(device), amp=amp)
    batch, height, width = cfg.batch_size, *((cfg.image_size,) * 2 if preset == "tiny" else (800, 1066))
    images, mask, targets = random_batch(batch, height, width, cfg.num_classes, OBJECTS[preset])
    images, mask = images.to(device), mask.to(device)
    targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
    model, criterion, postprocess = build(cfg)
    model.to(device)
    criterion.matcher = TimedMatcher(criterion.matcher, device)
    optimizer, _ = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    orig_sizes = torch.stack([t["orig_size"] for t in targets])
    sync(device)
    out = dict(preset=preset, variant=variant, device=device.type, amp=amp, batch=batch, height=height,
               width=width, iters=iters, warmup=warmup, baseline_mib=peak_memory_mib(device))

    # Inference first: on the CPU the peak RSS can only grow, and training needs more.
    model.eval()
    reset_peak(device)
    times = []
    with torch.no_grad():
        for _ in range(warmup + iters):
            sync(device)
            start = time.perf_counter()
            with autocast(device, amp):
                outputs = model(images, mask)
            postprocess(outputs, orig_sizes)
            sync(device)
            times.append(time.perf_counter() - start)
    out["infer_ms"] = 1000 * statistics.median(times[warmup:])
    out["infer_img_s"] = batch / statistics.median(times[warmup:])
    out["infer_mem_mib"] = peak_memory_mib(device)

    # Training: train.py's loop over the same batch; a stamp at the end of every step.
    reset_peak(device)
    stamps, matcher = [time.perf_counter()], [0.0]
    model.train()
    meter = LossMeter()
    for step in range(warmup + iters):
        loss, losses = train_step(model, criterion, optimizer, scaler, (images, mask, targets), cfg, device)
        meter.add(loss, losses, criterion.weight_dict, 0, step)   # train.py looks every N steps
        sync(device)
        stamps.append(time.perf_counter())
        matcher.append(criterion.matcher.seconds)
    message = meter.non_finite()     # train.py looks every --log_every steps; here once, untimed
    if message:
        raise RuntimeError(message)
    steps = [b - a for a, b in zip(stamps, stamps[1:])][warmup:]
    matcher_steps = [b - a for a, b in zip(matcher, matcher[1:])][warmup:]
    out["step_ms"] = 1000 * statistics.median(steps)
    out["step_ms_min_max"] = [1000 * min(steps), 1000 * max(steps)]
    out["matcher_ms"] = 1000 * statistics.median(matcher_steps)
    out["train_mem_mib"] = peak_memory_mib(device)

    if flops:   # one more forward (and backward), after the timed phases
        def infer():   # not under no_grad: FlopCounterMode's module hooks fail on views made there
            model(images, mask)

        def forward_backward():   # not train_step: it would also step the optimiser
            losses = criterion(model(images, mask, targets), targets)
            total_loss(losses, criterion.weight_dict).backward()
        model.eval()
        out["fwd_flops_per_img"] = count_flops(infer) / batch
        model.train()
        out["train_flops_per_img"] = count_flops(forward_backward) / batch
        optimizer.zero_grad(set_to_none=True)
    return out


def describe_machine(device):
    """(the machine's name for grouping results, a longer description)."""
    device = torch.device(device)
    threads = torch.get_num_threads()
    cores = usable_cores()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return name, (f"{name} (CUDA {torch.version.cuda}), host {cpu_model()} {cores} cores, "
                      f"torch {torch.__version__}")
    return (f"CPU {cpu_model()} ({threads} threads)",
            f"{cpu_model()}, {cores} cores, torch {torch.__version__}, {threads} threads")


def worker(spec):
    """--worker entry: measure one configuration, print one JSON line."""
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    result = measure(spec["preset"], spec["variant"], spec["device"], spec["amp"], spec["iters"],
                     spec["warmup"], spec["flops"])
    machine, description = describe_machine(spec["device"])
    peak = peak_tflops(machine, spec["amp"]) if result["device"] == "cuda" else None
    result.update(machine=machine, machine_description=description, peak_tflops=peak,
                  threads=torch.get_num_threads(), torch=torch.__version__, load=f"{os.getloadavg()[0]:.1f}",
                  cores=usable_cores(),
                  date=datetime.date.today().isoformat(), command=spec["command"])
    print("RESULT " + json.dumps(result), flush=True)


# ---- the report ----

def entry_key(r):
    return (r["machine"], r["preset"], r["variant"], r["amp"])


def merge(old, new):
    """Entries of `old` not measured again in `new`, then `new`; sorted for the table."""
    fresh = {entry_key(r) for r in new}
    order = {name: i for i, name in enumerate(VARIANTS)}
    amps = {"none": 0, "bf16": 1, "fp16": 2}
    return sorted([r for r in old if entry_key(r) not in fresh] + list(new),
                  key=lambda r: (r["machine"], r["preset"] != "tiny", order.get(r["variant"], 9),
                                 amps[r["amp"]]))


def achieved(flops, seconds, peak, unit):
    """'rate (p% of peak)' for `flops` done in `seconds`, rate in `unit` FLOP/s (1e9 or 1e12)."""
    if not flops:
        return "-"
    rate = flops / seconds
    return f"{rate / unit:.3g} ({100 * rate / (peak * 1e12):.1f}%)" if peak else f"{rate / unit:.3g}"


def table_row(r, unit):
    """One measurement as a Markdown table row (see render for the columns)."""
    lo, hi = r["step_ms_min_max"]
    step = f"{r['step_ms']:.1f}" + (f" ({lo:.1f}-{hi:.1f})" if r["iters"] > 1 else "")
    matcher = f"{r['matcher_ms']:.1f} ({100 * r['matcher_ms'] / r['step_ms']:.0f}%)"
    fwd, train = r.get("fwd_flops_per_img"), r.get("train_flops_per_img")
    flops = f"{fwd / 1e9:.1f} / {train / 1e9:.1f}" if fwd else "-"
    train_rate = achieved(train and train * r["batch"], r["step_ms"] / 1000, r.get("peak_tflops"), unit)
    infer_rate = achieved(fwd and fwd * r["batch"], r["infer_ms"] / 1000, r.get("peak_tflops"), unit)
    cells = [r["preset"], f"{r['batch']}x{r['height']}x{r['width']}", r["variant"], r["amp"], step, matcher,
             f"{r['train_mem_mib']:.0f}", f"{r['infer_img_s']:.2f}", f"{r['infer_mem_mib']:.0f}", flops,
             train_rate, infer_rate, f"{r['iters']} ({r['warmup']})"]
    return "| " + " | ".join(cells) + " |"


def render(results):
    """The Markdown of the Speed section, one table per machine."""
    lines = ["## Speed", "", "Random images and boxes (4 objects per tiny image, 7 per paper image), "
             "train.py's training loop on one batch; medians over the timed iterations after the "
             "warm-up (see benchmarks/speed.py). Matcher: the Hungarian matching inside the step "
             "(every decoder layer). FLOPs: FlopCounterMode (matmul, conv, attention) per image; "
             "achieved = FLOPs / median time, as a fraction of the device's dense peak for that precision. "
             "A multiply-add counts as 2 FLOPs here; the DETR paper's 86 GFLOPs (R50) count it as 1 "
             "(fvcore), so halve these figures to compare."]
    for machine in dict.fromkeys(r["machine"] for r in results):
        rows = [r for r in results if r["machine"] == machine]
        gpu = rows[0]["device"] == "cuda"
        mem = "max allocated" if gpu else "process peak RSS"
        unit, unit_name = (1e12, "TFLOP/s (% of peak)") if gpu else (1e9, "GFLOP/s")
        lines += ["", f"### {rows[0]['machine_description']}", "",
                  f"| preset | input | variant | amp | train step ms (min-max) | matcher ms (share) | "
                  f"train {mem} MiB | infer img/s | infer {mem} MiB | GFLOPs/img fwd / train | "
                  f"train {unit_name} | infer {unit_name} | iters (warm-up) |", "|" + "---|" * 13]
        lines += [table_row(r, unit) for r in rows]
        if gpu and rows[0].get("peak_tflops") is None:
            lines += ["", "Peak FLOP/s of this GPU: unknown (not in speed.py's PEAK_TFLOPS)."]
        if not gpu:
            base = sorted({round(r["baseline_mib"]) for r in rows})
            loads = [float(r["load"]) for r in rows if "load" in r]
            cores = max(r.get("cores", 0) for r in rows)
            lines += ["", f"CPU memory is the process peak RSS (torch and the model included: the process "
                          f"held {base[0]}-{base[-1]} MiB before the first step). Peak FLOP/s of a CPU: unknown."]
            if cores and loads and max(loads) > cores:
                lines[-1] += (f" The 1-minute load average reached {max(loads):.1f} on {cores} cores during "
                              f"these measurements: other work shared the CPU and the times are inflated.")
    commands = list(dict.fromkeys(r["command"] for r in results))
    dates = sorted({r["date"] for r in results})
    lines += ["", "Reproduce:", "", "```", *commands, "```", "",
              f"Date: {dates[0]}" + (f" to {dates[-1]}" if len(dates) > 1 else "") + "."]
    return "\n".join(lines)


# ---- main ----

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=None, choices=["tiny", "paper"],
                   help="default tiny paper (--quick: tiny)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", nargs="+", default=None, choices=["none", "bf16", "fp16"],
                   help="default none bf16 fp16 on a GPU, none on the CPU")
    p.add_argument("--iters", type=int, default=None, help="timed iterations (default 20; 3 for the "
                   "paper preset on the CPU; --quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default 3; "
                   "1 for the paper preset on the CPU; --quick 1)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch's default)")
    p.add_argument("--no_flops", dest="flops", action="store_false", help="skip FLOP counting")
    p.add_argument("--quick", action="store_true",
                   help="tiny preset, 3 iterations, into benchmarks/runs_quick")
    p.add_argument("--results", default=None, help="RESULTS.md to update (default benchmarks/RESULTS.md, "
                   "--quick: benchmarks/runs_quick/RESULTS.md); raw numbers go to speed.json beside it")
    p.add_argument("--report_only", action="store_true", help="only rewrite the section from speed.json")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if (args.iters is not None and args.iters < 1) or (args.warmup is not None and args.warmup < 0):
        p.error("--iters must be >= 1 and --warmup >= 0")
    args.presets = args.presets or (["tiny"] if args.quick else ["tiny", "paper"])
    args.amp = args.amp or (["none", "bf16", "fp16"] if args.device.startswith("cuda") else ["none"])
    folder = ROOT / "benchmarks" / ("runs_quick" if args.quick else "")
    args.results = Path(args.results) if args.results else folder / "RESULTS.md"
    return args


def counts(args, preset):
    """(iters, warmup): the flags, else the defaults (fewer for the paper preset on the CPU)."""
    slow = preset == "paper" and not args.device.startswith("cuda")
    iters = args.iters if args.iters is not None else 3 if (slow or args.quick) else 20
    warmup = args.warmup if args.warmup is not None else 1 if (slow or args.quick) else 3
    return iters, warmup


def save(args, results):
    """Merge `results` into speed.json beside RESULTS.md and rewrite the Speed section."""
    raw = args.results.parent / "speed.json"
    merged = merge(json.loads(raw.read_text()) if raw.exists() else [], results)
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps(merged, indent=1))
    if merged:
        update_section(args.results, "speed", render(merged))
    return raw, merged


def main(argv=None):
    from tqdm import tqdm
    args = get_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    command = "python benchmarks/speed.py " + shlex.join(
        x for x in (sys.argv[1:] if argv is None else argv) if x != "--report_only")
    configs = [] if args.report_only else [
        (p, v, a) for p in args.presets for v in args.variants for a in args.amp]
    failed = 0
    for preset, variant, amp in tqdm(configs, desc="speed", unit="config", disable=not configs):
        iters, warmup = counts(args, preset)
        spec = dict(preset=preset, variant=variant, device=args.device, amp=amp, iters=iters, warmup=warmup,
                    flops=args.flops, threads=args.threads, command=command.strip())
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], cwd=ROOT,
                              capture_output=True, text=True)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not lines:
            tqdm.write(f"{preset} {variant} {amp}: failed (exit status {proc.returncode})\n"
                       f"{proc.stderr[-3000:]}")
            failed += 1
            continue
        result = json.loads(lines[-1][len("RESULT "):])
        tqdm.write(f"{preset:5s} {variant:11s} {amp:4s}: step {result['step_ms']:8.1f} ms "
                   f"(matcher {result['matcher_ms']:.1f}), infer {result['infer_img_s']:7.2f} img/s, "
                   f"train mem {result['train_mem_mib']:.0f} MiB")
        save(args, [result])   # after every configuration: an interrupted run keeps what it measured
    raw, merged = save(args, [])
    print(f"wrote the Speed section of {args.results} ({len(configs) - failed} new, {len(merged)} in all; "
          f"raw numbers: {raw})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
