"""benchmarks/: the pure helpers of common.py, convergence.py, speed.py and long_race.py, against
hand-worked numbers.

Smoke-level on purpose: the scripts themselves run train.py and time models (minutes);
here only the bookkeeping that turns logs into the reported numbers is checked.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import common  # noqa: E402
import convergence  # noqa: E402
import speed  # noqa: E402


def test_update_section_replaces_only_its_block(tmp_path):
    """A section is replaced between its markers; text around it and other sections stay."""
    path = tmp_path / "RESULTS.md"
    path.write_text("# title\n\nintro\n\n<!-- a:start -->\nold a\n<!-- a:end -->\n\n"
                    "<!-- b:start -->\nkeep b\n<!-- b:end -->\ntail\n")
    common.update_section(path, "a", "new a")
    assert path.read_text() == ("# title\n\nintro\n\n<!-- a:start -->\nnew a\n<!-- a:end -->\n\n"
                                "<!-- b:start -->\nkeep b\n<!-- b:end -->\ntail\n")
    common.update_section(path, "c", "c body")          # absent: appended once
    common.update_section(path, "c", "c body 2")
    text = path.read_text()
    assert text.count("<!-- c:start -->") == 1 and text.endswith("<!-- c:start -->\nc body 2\n<!-- c:end -->\n")


def test_interpolation_from_the_origin():
    """value_at interpolates (0, 0), (10, .1), (20, .3), (40, .2) linearly."""
    steps, ap = [10, 20, 40], [0.1, 0.3, 0.2]
    assert common.value_at(steps, ap, 5) == pytest.approx(0.05)
    assert common.value_at(steps, ap, 20) == pytest.approx(0.3)
    assert common.value_at(steps, ap, 30) == pytest.approx(0.25)
    assert common.value_at(steps, ap, 50) == pytest.approx(0.2)


def test_steps_to_reach_first_crossing():
    """The first crossing: 0.2 is reached at 10 + 10 * (0.2 - 0.1) / (0.3 - 0.1) = 15."""
    steps, ap = [10, 20, 40], [0.1, 0.3, 0.2]
    assert common.steps_to_reach(steps, ap, 0.2) == pytest.approx(15)
    assert common.steps_to_reach(steps, ap, 0.05) == pytest.approx(5)
    assert common.steps_to_reach(steps, ap, 0.3) == pytest.approx(20)
    assert common.steps_to_reach(steps, ap, 0.31) is None


def test_reach_cells_against_the_baseline():
    """conditional reaches detr's final AP 0.2 at step 15 of 40: fraction 0.375, 2.7x fewer."""
    detr = {0: [(10, 0.1, 0, 0), (20, 0.15, 0, 0), (40, 0.2, 0, 0)]}
    cond = {0: [(10, 0.1, 0, 0), (20, 0.3, 0, 0), (40, 0.35, 0, 0)]}
    slow = {0: [(10, 0.0, 0, 0), (20, 0.1, 0, 0), (40, 0.15, 0, 0)]}
    found = {"detr": detr, "conditional": cond, "smca": slow}
    assert convergence.reach_cells(found, "conditional", 40) == ["15", "0.38 (2.7x fewer)", "0.38"]
    assert convergence.reach_cells(found, "detr", 40) == ["40", "1.00 (1.0x fewer)", "1.00"]
    assert convergence.reach_cells(found, "smca", 40)[:2] == ["not reached", "not reached"]


def test_schedule_budget_and_compression():
    """Default budget = epochs * ceil(shapes_train / batch_size); a shorter one compresses lr_drop too."""
    from minidetr.config import Config
    cfg = Config.for_variant("detr", "tiny", shapes_train=24)
    per_epoch = -(-24 // cfg.batch_size)
    full = convergence.schedule(shapes_train=24)
    assert (full["steps"], full["steps_per_epoch"], full["flags"]) == (cfg.epochs * per_epoch, per_epoch, [])
    short = convergence.schedule(2 * per_epoch + 1, shapes_train=24)
    lr_drop = max(1, round(cfg.lr_drop * 3 / cfg.epochs))
    assert short["flags"] == ["--epochs", "3", "--lr_drop", str(lr_drop)]


def test_run_state_from_log_checkpoint_and_settings(tmp_path):
    """complete when the log reaches the budget, resume with a checkpoint, other settings refused."""
    row = {"test_coco_eval_bbox": [0.1, 0.2, 0.05] + [0] * 9, "step": 5, "epoch": 0}
    (tmp_path / "log.txt").write_text(json.dumps(row) + "\n" + json.dumps({**row, "step": 10}) + "\n")
    assert common.read_curve(tmp_path / "log.txt") == [(5, 0.1, 0.2, 0.05), (10, 0.1, 0.2, 0.05)]
    assert convergence.run_state(tmp_path, 10) == "complete"
    assert convergence.run_state(tmp_path, 12) == "fresh"
    (tmp_path / "checkpoint.pth").write_bytes(b"")
    assert convergence.run_state(tmp_path, 12) == "resume"
    saved = {"train_argv": ["--seed", "0"], "config": {"seed": 0, "lr": 1e-4}}
    (tmp_path / "benchmark.json").write_text(json.dumps(saved))
    assert convergence.run_state(tmp_path, 10, saved) == "complete"
    retuned = {"train_argv": ["--seed", "0"], "config": {"seed": 0, "lr": 2e-4}}
    assert convergence.run_state(tmp_path, 10, retuned) == "other settings"
    assert common.settings_diff(tmp_path, retuned) == ["lr"]
    other_seed = {"train_argv": ["--seed", "1"], "config": {"seed": 1, "lr": 1e-4}}
    assert common.settings_diff(tmp_path, other_seed) == ["train.py arguments", "seed"]


def test_peak_table_lookup():
    """Device names map to the data-sheet peaks; an unknown device gives None."""
    assert speed.peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert speed.peak_tflops("NVIDIA H200", "none") == 67.0
    assert speed.peak_tflops("NVIDIA H100 PCIe", "fp16") == 756.0
    assert speed.peak_tflops("Tesla T4", "bf16") is None
    assert speed.achieved(2e12, 1.0, 4.0, 1e12) == "2 (50.0%)"
    assert speed.achieved(3e9, 1.5, None, 1e9) == "2"


def test_timed_matcher_passes_through_and_times():
    """The wrapper returns the matcher's result unchanged and adds up its wall time."""
    import torch

    def slow_matcher(outputs, targets):
        time.sleep(0.02)
        return "indices"
    timed = speed.TimedMatcher(slow_matcher, torch.device("cpu"))
    assert timed({}, []) == "indices" and timed({}, []) == "indices"
    assert 0.04 <= timed.seconds < 1.0


def test_random_batch_boxes_are_valid():
    """Every random box lies inside the image (cx +- w/2 in [0, 1]) and labels are in range."""
    images, mask, targets = speed.random_batch(2, 16, 24, num_classes=7, objects=5)
    assert images.shape == (2, 3, 16, 24) and not mask.any()
    for t in targets:
        b = t["boxes"]
        assert b.shape == (5, 4) and (b[:, :2] - b[:, 2:] / 2 >= 0).all() and (b[:, :2] + b[:, 2:] / 2 <= 1).all()
        assert ((t["labels"] >= 0) & (t["labels"] < 7)).all()


def test_merge_replaces_the_same_measurement():
    """A new measurement of (machine, preset, variant, amp) replaces the old; others are kept."""
    def entry(variant, step_ms):
        return dict(machine="m", preset="tiny", variant=variant, amp="none", step_ms=step_ms)
    merged = speed.merge([entry("detr", 1.0), entry("dn", 2.0)], [entry("detr", 3.0)])
    assert [(r["variant"], r["step_ms"]) for r in merged] == [("detr", 3.0), ("dn", 2.0)]


def test_speed_measure_runs_end_to_end_on_the_cpu():
    """One configuration through speed.measure, timing and FLOP counting included (a name
    shadowed inside it once made every configuration fail on every device). The FLOP count is
    checked against the rule of thumb a training step obeys: backward costs about twice the
    forward, so forward + backward is about 3x the forward alone."""
    out = speed.measure("tiny", "detr", "cpu", "none", iters=1, warmup=0)
    assert out["step_ms"] > 0 and out["infer_ms"] > 0 and out["infer_img_s"] > 0
    ratio = out["train_flops_per_img"] / out["fwd_flops_per_img"]
    assert 2.5 < ratio < 3.5, ratio


def test_race_budget_stays_at_1250_steps_of_5_epochs():
    """The race keeps the 1,250-step budget its tables were built on, whatever the tiny
    preset's own schedule (10 epochs since issue 14): 1,250 / 250 steps per epoch = 5 epochs,
    lr drop after round(8 * 5 / 10) = 4. --quick keeps its plumbing budget; --steps 0 is the
    preset's full schedule."""
    assert convergence.get_args([]).steps == 1250
    assert convergence.schedule(1250)["flags"] == ["--epochs", "5", "--lr_drop", "4"]
    assert convergence.get_args(["--quick"]).steps == 12
    assert convergence.get_args(["--steps", "0"]).steps is None


# ---- long_race.py: the convergence rule and the race's schedule ----

import long_race  # noqa: E402


def test_long_race_convergence_rule_by_hand():
    """Mean AP 0.1, 0.2, 0.3, 0.305 at steps 1000..4000. At 2000: AP(1500) = 0.15, 0.2 is a
    33% gain; at 3000: AP(2250) = 0.225, 0.3 is 33%; at 4000: AP(3000) = 0.3 and 0.305 is
    1.7% < 5%: converged at 4000. Check points are multiples of the chunk, from min_steps."""
    steps, ap = [1000, 2000, 3000, 4000], [0.1, 0.2, 0.3, 0.305]
    assert long_race.converged_step(steps, ap, chunk=1000, min_steps=2000) == 4000
    assert long_race.converged_step(steps[:3], ap[:3], chunk=1000, min_steps=2000) is None
    # a flat start is not convergence: AP(3N/4) must be above 0
    assert long_race.converged_step([1000, 2000], [0.0, 0.0], chunk=1000, min_steps=1000) is None
    # 0.3 -> 0.31 between 3000 and 4000 is 3.3% but 4000 is not a multiple of a 3000-step chunk
    assert long_race.converged_step([1000, 2000, 3000, 4000, 6000], [0.1, 0.2, 0.3, 0.31, 0.311],
                                    chunk=3000, min_steps=0) == 6000


def test_long_race_mean_curve_uses_steps_every_seed_has():
    """Seeds evaluated at (250, 500) and (250, 500, 750): the mean stops at 500."""
    a = [(250, 0.1, 0, 0), (500, 0.3, 0, 0)]
    b = [(250, 0.2, 0, 0), (500, 0.1, 0, 0), (750, 0.4, 0, 0)]
    steps, ap = long_race.mean_at_shared_steps([a, b], upto=10**6)
    assert steps == [250, 500] and ap == pytest.approx([0.15, 0.2])
    assert long_race.mean_at_shared_steps([a, b], upto=250) == ([250], [pytest.approx(0.15)])


def test_long_race_target_is_the_next_check_point_past_detr():
    """DETR seeds at 2000 and 1250: the frontier is 1250, the next multiple of 1000 is 2000;
    never past the cap; once converged, the converged step."""
    done = {("detr", 0): 2000, ("detr", 1): 1250, ("smca", 0): 3000}
    assert long_race.next_target(done, [0, 1], chunk=1000, cap=10000, converged_at=None) == 2000
    assert long_race.next_target(done, [0, 1], chunk=1000, cap=1500, converged_at=None) == 1500
    assert long_race.next_target(done, [0, 1], chunk=1000, cap=10000, converged_at=3000) == 3000
    assert long_race.next_target({}, [0, 1], chunk=500, cap=10000, converged_at=None) == 500


def test_long_race_settings_ignore_the_budget_and_folder(tmp_path):
    """A run extended to a later target, or moved to another folder, is the same run; a
    different seed or query count is not."""
    folder = tmp_path / "detr_seed0"
    folder.mkdir()
    argv = long_race.train_argv("detr", 0, folder, 1000)
    (folder / "benchmark.json").write_text(json.dumps(common.settings(argv)))
    assert long_race.other_settings(folder, long_race.train_argv("detr", 0, tmp_path / "x", 5000)) == []
    diff = long_race.other_settings(folder, long_race.train_argv("detr", 1, folder, 1000))
    assert diff == ["train.py arguments", "seed"]
    assert "--num_queries" in argv and argv[argv.index("--num_queries") + 1] == "10"
    cond = long_race.train_argv("conditional", 0, folder, 1000)
    assert cond[cond.index("--num_queries") + 1] == "30"


def test_long_race_official_log_steps_and_archive(tmp_path):
    """The official log has one line per epoch: epoch e ends at step (e + 1) * 250. A run's
    archived log is replaced by a longer log, never by a shorter one (a run started again)."""
    official_log = tmp_path / "log.txt"
    official_log.write_text("\n".join(json.dumps({"epoch": e, "test_coco_eval_bbox": [0.1 * e, 0.2, 0.3] + [0] * 9})
                                      for e in (0, 1, 3)) + "\n")
    assert common.read_curve(official_log, steps_per_epoch=250) == [
        (250, 0.0, 0.2, 0.3), (500, 0.1, 0.2, 0.3), (1000, pytest.approx(0.3), 0.2, 0.3)]
    run = tmp_path / "runs" / "detr_seed0"
    run.mkdir(parents=True)
    kept = tmp_path / "archive" / "detr_seed0.txt"
    (run / "log.txt").write_text("a\nb\n")
    common.archive(run / "log.txt", kept)
    (run / "log.txt").write_text("a\n")
    common.archive(run / "log.txt", kept)
    assert kept.read_text() == "a\nb\n"


def test_long_race_official_resume_draws_new_data_orders(tmp_path, monkeypatch):
    """The official main.py reseeds torch when it starts, so a resumed chunk must not get the
    first chunk's seed (it would replay its data orders): seed 0 for the first chunk, then
    seed 0 + the chunk's first step, with the run's checkpoint."""
    import official
    monkeypatch.setattr(official, "coco_layout", lambda runs: Path(runs) / "coco")   # no dataset needed
    args = argparse.Namespace(ref_python="PY", harness="H", refs="R", out=tmp_path)
    folder = tmp_path / "official_detr_seed0"
    folder.mkdir()

    def flag(argv, name):
        return argv[argv.index(name) + 1] if name in argv else None

    first = long_race.official_argv("detr", 0, folder, 1000, args)
    assert flag(first, "--seed") == "0" and flag(first, "--resume") is None and flag(first, "--max_steps") == "1000"
    (folder / "checkpoint.pth").write_bytes(b"")
    later = long_race.official_argv("detr", 0, folder, 1000, args, done=3000)
    assert flag(later, "--seed") == "3000" and flag(later, "--resume") == str(folder / "checkpoint.pth")
    assert first.count("--seed") == later.count("--seed") == 1


def test_long_race_report_reads_steps_and_fractions(tmp_path, monkeypatch):
    """Hand-built logs, 2 seeds. DETR (both seeds alike): AP 0.1, 0.2, 0.3, 0.305 at steps
    1000..4000: converged at 4000 (AP 0.305). smca: AP 0.2 at 1000, 0.4 at 2000 (both seeds),
    so it reaches 0.305 at 1000 + 1000 * (0.305 - 0.2) / 0.2 = 1525: fraction 1525 / 4000 = 0.38;
    its AP at DETR's 4000 steps is its last value, 0.5."""
    monkeypatch.setattr(long_race, "ARCHIVE", tmp_path / "archive")

    def write(name, seed, aps):
        folder = tmp_path / "runs" / f"{name}_seed{seed}"
        folder.mkdir(parents=True)
        rows = [{"step": 1000 * (i + 1), "test_coco_eval_bbox": [ap, 2 * ap, ap] + [0] * 9} for i, ap in enumerate(aps)]
        (folder / "log.txt").write_text("".join(json.dumps(r) + "\n" for r in rows))

    for seed in (0, 1):
        write("detr", seed, [0.1, 0.2, 0.3, 0.305])
        write("smca", seed, [0.2, 0.4, 0.45, 0.5])
    write("dn", 0, [0.1, 0.2])     # under way: mean AP (0.2 + 0.3) / 2 = 0.25 at 2000, which
    write("dn", 1, [0.1, 0.3])     # DETR's curve reaches at 2000 + 1000 * 0.05 / 0.1 = 2500: 0.80
    # the official code, two seeds (its log: one line per 250-step epoch), one of them archived only:
    # AP 0.2 and 0.4 at 2000, so 0.300 (0.200-0.400) there, beside our DETR's 0.200 at 2000
    for seed, ap in ((0, 0.2), (1, 0.4)):
        rows = [{"epoch": e, "test_coco_eval_bbox": [a, 0, 0] + [0] * 9} for e, a in ((3, 0.1), (7, ap))]
        log = (tmp_path / "runs" / f"official_detr_seed{seed}" / "log.txt" if seed == 0
               else tmp_path / "archive" / f"official_detr_seed{seed}.txt")
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = tmp_path / "RESULTS.md"
    n_star = long_race.report(tmp_path / "runs", ["detr", "smca", "dn"], [0, 1], chunk=1000, cap=8000,
                              min_steps=2000, results=results, official=["detr"])
    text = results.read_text()
    assert n_star == (4000, pytest.approx(0.305)) and "**DETR converged at step 4000**: mean AP 0.305" in text
    smca = next(line for line in text.splitlines() if line.startswith("| smca |"))
    assert "| 1525 | 0.38 (2.6x fewer) | 0.500 (0.500-0.500) at 4000 | 1.000 (1.000-1.000) |" in smca
    assert "| beyond DETR's 4000 |" in smca        # 0.5: more than DETR ever had
    dn = next(line for line in text.splitlines() if line.startswith("| dn |"))
    assert "| not by 2000 | - | 0.250 (0.200-0.300) at 2000 |" in dn and "| 2500 (0.80) |" in dn
    # DETR cut earlier: its AP at N = 500, 1000, 1500, 2000, 3000, 4000 is 0.05 (from the origin),
    # 0.1, 0.15, 0.2, 0.3, 0.305; smca's curve (0.2 per 1000 steps up to 2000) reaches the first
    # five at N / 2 (fraction 0.50), the last at 1525 (0.38); dn (mean 0.1 at 1000, 0.25 at 2000)
    # reaches 0.05 at 500 (1.00), 0.1 at 1000 (1.00), 0.15 at 1333 (0.89), 0.2 at 1667 (0.83),
    # and never 0.3 within its 2000 steps
    assert "| N = 500 (DETR's AP 0.050) | N = 1000 (DETR's AP 0.100) |" in text
    assert "| smca | 0.50 | 0.50 | 0.50 | 0.50 | 0.50 | 0.38 |" in text
    assert "| dn | 1.00 | 1.00 | 0.89 | 0.83 | - | - |" in text
    official = next(line for line in text.splitlines() if line.startswith("| detr, official code"))
    assert official.startswith("| detr, official code (seeds 0 1) | 2 (2000, 2000) | - |")
    assert "| 0.300 (0.200-0.400) at 2000 (minidetr: 0.200 (0.200-0.200)) |" in official
    # the rule that ends a variant's run: its mean passes DETR's AP (at 1525 here), or never
    smca_curves = [long_race.curve_of(tmp_path / "runs", "smca", s) for s in (0, 1)]
    assert long_race.passed_at(smca_curves, 0.305) == pytest.approx(1525)
    assert long_race.passed_at(smca_curves, 0.6) is None


def test_long_race_nearest_order_by_hand():
    """--order nearest. smca's seeds at AP 0.3 / 0.5 (mean 0.4 at step 2000, the last step both
    have), dn's 0.2 / 0.2 at 1000 (seed 1 has not gone further), dab nothing yet (0):
    smca, then dn, then dab; within smca the less advanced seed first; official runs last,
    or one of them first when the race gives them a slot."""
    smca = [[(1000, 0.1), (2000, 0.3)], [(1000, 0.2), (2000, 0.5), (3000, 0.6)]]
    assert long_race.ap_now(smca) == pytest.approx(0.4)
    assert long_race.ap_now([[(1000, 0.2), (2000, 0.9)], [(1000, 0.2)]]) == pytest.approx(0.2)
    assert long_race.ap_now([[(1000, 0.2)], []]) == 0.0
    runs = [("detr", 0), ("smca", 0), ("smca", 1), ("dn", 0), ("dab", 0), ("official_detr", 0), ("official_conditional", 0)]
    done = {("smca", 0): 2000, ("smca", 1): 1000, ("dn", 0): 1000, ("dab", 0): 0,
            ("official_detr", 0): 3000, ("official_conditional", 0): 1000}
    ap = {"smca": 0.4, "dn": 0.2}
    pending = [("dab", 0), ("official_detr", 0), ("dn", 0), ("smca", 0), ("official_conditional", 0), ("smca", 1)]
    expected = [("smca", 1), ("smca", 0), ("dn", 0), ("dab", 0), ("official_conditional", 0), ("official_detr", 0)]
    assert long_race.nearest_first(pending, done, ap, runs, official_slot=False) == expected
    assert long_race.nearest_first(pending, done, ap, runs, official_slot=True) == [expected[4]] + expected[:4] + [expected[5]]


def test_long_race_official_alone_by_hand():
    """Official DETR (two seeds) converges at 4000 by the rule: mean AP 0.42 at 4000 against
    0.41 at 3000 (+2.4%); official conditional's longer seed reaches 0.42 halfway between
    1000 (0.30) and 2000 (0.54): step 1500, 0.375 of 4000; its seed stopped at 1000 is left
    out; minidetr's conditional (0.21 at 1000, 0.63 at 2000) at 1500 too."""
    def curve(aps):
        return [(1000 * (i + 1), ap, 0.0, 0.0) for i, ap in enumerate(aps)]
    detr = {0: curve([0.02, 0.20, 0.40, 0.41]), 1: curve([0.04, 0.22, 0.42, 0.43])}
    official = {"detr": detr, "conditional": {1: curve([0.30, 0.54]), 0: curve([0.01])}}
    ours = {"conditional": {0: curve([0.21, 0.63])}}
    text = long_race.official_alone(official, ours, chunk=1000, min_steps=2000)[0]
    assert "converges by the race's rule at step 4000: mean AP 0.420 (+2.4% over its last quarter)" in text
    assert "Official conditional (seed 1) reaches that AP at step 1500, **0.38** of its DETR's steps" in text
    assert "minidetr's conditional at step 1500 (0.38)" in text
    short = {"detr": {0: curve([0.02, 0.20, 0.40])}}   # 0.25 at 2250 (interpolated), 0.40 at 3000
    assert "has not converged by step 3000: mean AP 0.400 (+60.0% over its last quarter)" in \
        long_race.official_alone(short, {}, chunk=1000, min_steps=2000)[0]
    assert long_race.official_alone({"conditional": official["conditional"]}, ours, 1000, 2000) == []
