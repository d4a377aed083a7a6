"""benchmarks/bench_step.py times every method through the same code path: the file's own build_training,
Schedule and train_step on one batch of its own loader (no per-method branch in the benchmark)."""
import importlib.util
from pathlib import Path

import pytest

import in_process

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_step", ROOT / "benchmarks" / "bench_step.py")
bench_step = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_step)


@pytest.mark.parametrize("method,variant", [(m, 1) for m in sorted(bench_step.PAIRS)] + [("co_byol", 0)])
def test_bench_step_times_every_method_base_and_variant(method, variant):
    row = bench_step.one(method, "resnet18:32:4", variant, "cpu", "off", steps=1, warmup=0, width=8)
    name, flags = bench_step.PAIRS[method][variant]
    assert row["name"] == name and row["flags"] == " ".join(flags) and row["method"] == method
    assert row["step_s"] > 0 and row["img_per_s"] == pytest.approx(4 / row["step_s"]) and row["peak_mem_mb"] > 0


def test_benchmarked_step_is_a_steady_step_between_logged_ones(tmp_path):
    """The benchmarks time a step as most steps of a run are: not a logged one, so geo_dino skips its local
    collapse monitors (every cell of both teacher crops; computed on logged steps only). With one step per epoch
    the step the benchmark picks would otherwise be a run's last, hence logged (laptop geo_dino: 2 epochs)."""
    import geo_dino

    args = geo_dino.parse_args(["--recipe", "laptop", "--dataset", "fake", "--output-dir", str(tmp_path)])
    step = min(args.epochs - 1, max(1, args.freeze_last_layer))
    assert geo_dino.Schedule(args, 1)(step)["log_step"]  # the case this guards: as a run's step, it is logged
    schedule = bench_step.steady_schedule(geo_dino, args)
    assert schedule["log_step"] is False
    assert {k: v for k, v in schedule.items() if k != "log_step"} == {
        k: v for k, v in geo_dino.Schedule(args, 1)(step).items() if k != "log_step"}


floor_spec = importlib.util.spec_from_file_location("bench_floor", ROOT / "benchmarks" / "bench_floor.py")
bench_floor = importlib.util.module_from_spec(floor_spec)
floor_spec.loader.exec_module(bench_floor)


@pytest.mark.parametrize("method,variant", [("bag_ssl", 0), ("geo_dino", 1)])  # no EMA network / boxed batches
def test_floor_benchmark_counts_the_backbone_work_inside_the_step(method, variant):
    """The floor (backbone forward + backward, EMA backbone forward) is part of every step: fewer FLOPs."""
    row = bench_floor.one(method, "resnet18:32:4", variant, "cpu", "off", steps=1, warmup=0, width=8)
    assert 0 < row["floor_gflop"] < row["step_gflop"] and row["recipe"] == ""
    assert row["floor_s"] > 0 and row["step_over_floor"] == pytest.approx(row["step_s"] / row["floor_s"])
    assert row["floor_cpu_s"] > 0 and row["step_over_floor_cpu"] == pytest.approx(row["step_cpu_s"] / row["floor_cpu_s"])


def test_floor_benchmark_recipe_builds_the_files_recipe():
    """--recipe laptop builds co_dino's laptop heads (4096 prototypes instead of 65536): the same floor (the
    backbone), a smaller step."""
    paper = bench_floor.one("co_dino", "resnet18:32:4", 0, "cpu", "off", steps=1, warmup=0, width=8)
    laptop = bench_floor.one("co_dino", "resnet18:32:4", 0, "cpu", "off", steps=1, warmup=0, width=8, recipe="laptop")
    assert laptop["recipe"] == "laptop" and laptop["floor_gflop"] == paper["floor_gflop"]
    assert laptop["step_gflop"] < paper["step_gflop"]


def test_floor_table_reads_time_per_flop_against_the_floor():
    """"step / floor per FLOP": a step with 1.5x the floor's FLOPs in 1.5x its CPU time runs at the floor's rate
    (1.00); in 3x its CPU time, at half of it (2.00). The variant / base ratios come from each pair's base; the
    one against each step's own floor cancels a process that runs everything slower (the variant's floor here)."""
    def row(name, step_cpu, step_gflop):
        return {"name": name, "flags": "", "recipe": "", "arch": "a", "image_size": 32, "batch": 4, "floor_s": 1.0,
                "step_s": step_cpu, "step_over_floor": step_cpu, "floor_cpu_s": 1.0, "step_cpu_s": step_cpu,
                "step_over_floor_cpu": step_cpu, "floor_gflop": 10.0, "step_gflop": step_gflop,
                "step_gflop_per_s": step_gflop / step_cpu}
    lines = bench_floor.table([row("base", 1.5, 15.0), row("variant", 3.0, 15.0)])
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    col = cells[0].index("step / floor per FLOP")
    assert [r[col] for r in cells[2:]] == ["1.00", "2.00"]
    assert cells[3][-4:] == ["2.000", "2.000", "2.000", "1.000"] and cells[2][-4:] == ["", "", "", ""]
    # the same steps, the variant's process running everything (its floor too) 1.5x slower: the plain ratios
    # read 3.0, the ratio against each step's own floor still 2.0
    slow = dict(row("variant", 4.5, 15.0), floor_s=1.5, floor_cpu_s=1.5, step_over_floor=3.0, step_over_floor_cpu=3.0)
    lines = bench_floor.table([row("base", 1.5, 15.0), slow])
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert cells[3][-4:] == ["3.000", "3.000", "2.000", "1.000"]


def test_gpu_check_dry_run_on_cpu(tmp_path):
    """benchmarks/gpu_check.py's CPU dry run: the same plumbing as on a GPU (the method's command line, plain and
    under torchrun), a table with img/s and memory for every run, and the loader-vs-step comparison."""
    import json

    out = tmp_path / "gpu_check.md"  # gpu_check.py itself in this process; it starts each run as a process
    proc = in_process.run("benchmarks/gpu_check.py", ["--device", "cpu", "--quick", "--methods", "co_byol",
                                                      "--out", out])
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    runs, floor = rows[:2], rows[2:]
    assert [(r["setting"], r["name"]) for r in runs] == [("off", "CO-BYOL"), ("torchrun, 1 process", "CO-BYOL")]
    assert all(r["img_per_s"] > 0 and r["peak_mem_mb"] > 0 for r in runs)
    # the floor table: base and variant, each step against its backbone's forward + backward, and more FLOPs for CO
    assert [(r["setting"], r["name"]) for r in floor] == [("floor table", "BYOL"), ("floor table", "CO-BYOL")]
    assert all(r["floor_s"] > 0 and r["step_gflop"] > r["floor_gflop"] > 0 for r in floor)
    assert floor[1]["step_gflop"] > floor[0]["step_gflop"]
    text = out.read_text()
    assert "Loader check: CO-BYOL resnet18" in text and "| CO-BYOL (`--ws 0.2`) | resnet18 | 32 | 4 |" in text
    assert "Not started" not in text
    assert "Views (benchmarks/bench_views.py, BYOL's two views): 32 px, batch 8: " in text


def test_gpu_check_stops_starting_runs_when_its_time_budget_is_spent(tmp_path):
    """--budget-s 0: nothing starts after the first check of the clock, and the report says what did not run."""
    out = tmp_path / "gpu_check.md"
    proc = in_process.run("benchmarks/gpu_check.py", ["--device", "cpu", "--quick", "--methods", "co_byol",
                                                      "--budget-s", "0", "--out", out])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.with_suffix(".jsonl").read_text() == ""
    assert ("Not started (the 0 s time budget was spent): off: CO-BYOL resnet18; torchrun, 1 process: CO-BYOL "
            "resnet18; floor table: co_byol resnet18.") in out.read_text()


def test_local_dino_benchmark_compares_the_same_function():
    """bench_local_dino.py times the local head as Linear layers (per_position) against its 1x1-convolution copy:
    both must compute the same logits, or the comparison means nothing."""
    import torch

    spec_l = importlib.util.spec_from_file_location("bench_local_dino", ROOT / "benchmarks" / "bench_local_dino.py")
    bench = importlib.util.module_from_spec(spec_l)
    spec_l.loader.exec_module(bench)
    import co_dino

    torch.manual_seed(0)
    head = co_dino.DINOHead(8, 16, 8, 32, use_bn=True).eval()
    conv = bench.conv_copy(head).eval()
    x = torch.randn(2, 8, 3, 3).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(conv(x), co_dino.per_position(head, x), rtol=1e-4, atol=1e-5)


def test_geo_local_loss_benchmark_times_the_same_loss_both_ways():
    """bench_local_dino.py's geo_dino rows: the loss with its targets picked by index_select (geo_dino.py) and by
    torch.gather (before) give the same value (asserted inside) and the same gradients, so their times compare."""
    spec_l = importlib.util.spec_from_file_location("bench_local_dino", ROOT / "benchmarks" / "bench_local_dino.py")
    bench = importlib.util.module_from_spec(spec_l)
    spec_l.loader.exec_module(bench)
    import torch

    variants, logits = bench.geo_local_loss_variants(3, 16, (3, 2))
    grads = []
    for label in ("local_pair_loss (index_select)", "torch.gather (before)"):
        variants[label]()
        grads.append([x.grad.clone() for x in logits])
    assert all(torch.equal(a, b) and a.abs().sum() > 0 for a, b in zip(*grads))


def test_compiled_loss_step_benchmark_starts_both_steps_from_the_same_state():
    """bench_local_dino.py --steps times the laptop step with its loss compiled against the eager step: the two run
    on copies of one state (networks, EMA teacher, centres, optimiser), so their first losses are equal when the
    "compiler" changes nothing (torch.compile's eager backend: the trace, no code generation)."""
    spec_l = importlib.util.spec_from_file_location("bench_local_dino", ROOT / "benchmarks" / "bench_local_dino.py")
    bench = importlib.util.module_from_spec(spec_l)
    spec_l.loader.exec_module(bench)
    for method in ("co_dino", "geo_dino"):
        # fp32 (fast on every CPU), a width-8 network and batch 8: the same code as the laptop step's
        r = bench.whole_steps(method, backend="eager", reps=1, amp="off", warmup=0, spec="resnet18:32:8", width=8)
        assert r["compiled_loss"] == r["eager_loss"] > 0, (method, r)
