"""Benchmark (not a test): each method's full training step against its floor, in time and in FLOPs.

    python benchmarks/bench_floor.py --out results/bench_floor_cpu.md          # every method, the default configs
    python benchmarks/bench_floor.py --configs resnet18:32:64 --width 16 --recipe laptop   # the laptop network
    python benchmarks/bench_floor.py --device cuda --amp bf16 --configs resnet50:224:64,rf99_resnet50:224:64

The floor is the work no implementation of the method can skip: forward + backward of the trained backbone on
every view of the batch, plus (methods with an EMA network) the target / teacher backbone's forward on its two
views. The full step is the method file's own `train_step` (heads, losses, optimiser, EMA, centres),
on the same batch from the method's own loader, built by the same code as benchmarks/bench_step.py. Reported
per method, configuration and variant (base and CO / local-loss variant): both times (median of --steps after
--warmup), step / floor, both FLOP counts (torch.utils.flop_counter: matmuls and convolutions, forward and
backward), the achieved GFLOP/s of the step, and the variant / base ratios of time and of FLOPs side by side.
Floor and step are timed in turn (floor, step, floor, ...), so that a busy spell of the machine falls on both.
Both are also measured in CPU time of this process (`time.process_time`, all its threads): on a machine
shared with other work, wall time counts the spells this process waits for a core, CPU time does not.
With one thread (`OMP_NUM_THREADS=1`) CPU time is the step's own compute; measured on the 2-core EPYC beside
two training runs, a CO-DINO laptop step took 0.65-0.80 s of wall time and 0.42-0.50 s of CPU time.
"""
import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_step  # noqa: E402  (PAIRS, build, median_time: the same construction as the step benchmark)

DEFAULT = "resnet18:32:64,resnet50:224:8,rf99_resnet50:224:8"


def floor_fn(nets, batch, run_state):
    """Forward + backward of the trained backbone on every view, and the EMA backbone's forward on two."""
    import torch

    views = batch[0] if torch.is_tensor(batch[0][0]) else batch[0][0]  # geo_dino's batch: ((views, boxes, flips), y)
    device = run_state.device
    mod = sys.modules[type(nets).__module__]  # the method file: its normalize turns the uint8 views into input
    views = [mod.normalize(v.to(device)).contiguous(memory_format=torch.channels_last) for v in views]
    backbone = (getattr(nets, "online", None) or getattr(nets, "student", None)).encoder.backbone  # the trained one
    ema = getattr(nets, "target", None) or getattr(nets, "teacher", None)

    def run():
        backbone.zero_grad(set_to_none=True)
        with run_state.autocast:
            out = sum(backbone(v).h.float().mean() for v in views)
            if ema is not None:
                with torch.no_grad():
                    for v in views[:2]:
                        ema.backbone(v)
        out.backward()
        return out
    return run


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def interleaved_medians(fns: list, steps: int, warmup: int) -> tuple[list[float], list[float]]:
    """Median wall time and median CPU time of each function, the functions run in turn (f1, f2, f1, f2, ...):
    a slower or faster spell of a shared machine then falls on all of them alike, not on one (their ratio is
    what the table reads)."""
    wall, cpu = [[] for _ in fns], [[] for _ in fns]
    for i in range(warmup + steps):
        for fn, w, c in zip(fns, wall, cpu):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            if i >= warmup:
                w.append(time.perf_counter() - t0)
                c.append(time.process_time() - c0)
    return [statistics.median(t) for t in wall], [statistics.median(t) for t in cpu]


def one(method: str, spec: str, variant: int, device: str, amp: str, steps: int, warmup: int, width: int,
        recipe: str = "") -> dict:
    import torch

    name, flags = bench_step.PAIRS[method][variant]
    with tempfile.TemporaryDirectory() as out_dir:
        mod, args, run, nets, optimizer, batch, schedule = bench_step.build(method, spec, variant, device, amp, width,
                                                                            out_dir, recipe)
        step = lambda: mod.train_step(nets, optimizer, batch, schedule, args, run).loss.item()  # noqa: E731
        floor = floor_fn(nets, batch, run)
        sync = (lambda: torch.cuda.synchronize()) if run.device.type == "cuda" else (lambda: None)
        (floor_s, step_s), (floor_cpu_s, step_cpu_s) = interleaved_medians([lambda: (floor(), sync()), step], steps,
                                                                            warmup)
        floor_flops, step_flops = count_flops(floor), count_flops(step)
    arch, size, b = spec.split(":")
    return {"method": method, "name": name, "flags": " ".join(flags), "arch": arch, "width": width,
            "image_size": int(size), "batch": int(b), "floor_s": floor_s, "step_s": step_s,
            "step_over_floor": step_s / floor_s, "floor_cpu_s": floor_cpu_s, "step_cpu_s": step_cpu_s,
            "step_over_floor_cpu": step_cpu_s / floor_cpu_s, "floor_gflop": floor_flops / 1e9, "step_gflop": step_flops / 1e9,
            "step_gflop_per_s": step_flops / 1e9 / step_s, "recipe": args.recipe_used, "device": device,
            "amp": str(run.dtype),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def table(rows: list[dict]) -> list[str]:
    """The markdown table of rows measured in (base, variant) pairs. "step / floor per FLOP" is the CPU-time
    ratio divided by the FLOP ratio: how much slower than the floor's rate the step's FLOPs run (1.00: at the
    rate of the backbone's convolutions; above: work the FLOP counter does not see, e.g. softmaxes, copies).

    "variant / base, against own floors" compares the two steps each in units of its own floor: (step / floor
    CPU time x floor FLOPs) of the variant over the same of the base. The base and the variant run in different
    processes, and measured on the 2-core EPYC the same floor (the same backbone work) read 0.14-0.19 s in the
    processes of one table: the plain time ratio carries that +-15 %; each step against the floor timed in turn
    with it in its own process does not. It equals the FLOP ratio when both steps run at their floors' rate."""
    lines = ["| method | arch | px | batch | floor (s) | step (s) | step / floor | step / floor, CPU time | "
             "floor GFLOP | step GFLOP | step / floor per FLOP | step GFLOP/s | variant / base: time | "
             "variant / base: CPU time | variant / base: CPU time against own floors | variant / base: FLOPs |",
             "|" + "---|" * 16]
    for r0, r1 in zip(rows[::2], rows[1::2]):  # base, variant
        own_floor = (r1["step_over_floor_cpu"] * r1["floor_gflop"]) / (r0["step_over_floor_cpu"] * r0["floor_gflop"])
        for r in (r0, r1):
            ratio = (f"{r1['step_s'] / r0['step_s']:.3f} | {r1['step_cpu_s'] / r0['step_cpu_s']:.3f} | "
                     f"{own_floor:.3f} | {r1['step_gflop'] / r0['step_gflop']:.3f}" if r is r1 else "| | |")
            flags = " ".join(filter(None, [f"--recipe {r['recipe']}" if r["recipe"] else "", r["flags"]]))
            per_flop = r["step_over_floor_cpu"] / (r["step_gflop"] / r["floor_gflop"])
            lines.append(f"| {r['name']} (`{flags}`) | {r['arch']} | {r['image_size']} | {r['batch']} | "
                         f"{r['floor_s']:.3f} | {r['step_s']:.3f} | {r['step_over_floor']:.2f} | "
                         f"{r['step_over_floor_cpu']:.2f} | {r['floor_gflop']:.2f} | {r['step_gflop']:.2f} | "
                         f"{per_flop:.2f} | {r['step_gflop_per_s']:.1f} | {ratio} |")
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(sorted(bench_step.PAIRS)), help="comma-separated method files")
    p.add_argument("--configs", default=DEFAULT, help="comma-separated arch:image_size:batch")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run")
    p.add_argument("--amp", default="off", choices=["off", "bf16", "fp16", "auto"], help="autocast precision")
    p.add_argument("--width", type=int, default=64, help="base width of the backbone (the laptop recipe: 16)")
    p.add_argument("--recipe", default="", help="the files' --recipe (e.g. laptop: its heads, crops and optimiser); "
                   "empty: their defaults")
    p.add_argument("--steps", type=int, default=3, help="timed repetitions (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions first")
    p.add_argument("--out", help="write the markdown table here (and the raw rows next to it as .jsonl)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: method:arch:size:batch:variant, print JSON
    a = p.parse_args()
    if a.one:
        method, spec, variant = a.one.split(":", 1)[0], ":".join(a.one.split(":")[1:4]), int(a.one.split(":")[4])
        print(json.dumps(one(method, spec, variant, a.device, a.amp, a.steps, a.warmup, a.width, a.recipe)))
        return
    rows, t_start = [], time.time()
    for method in a.methods.split(","):
        for spec in a.configs.split(","):
            for variant in (0, 1):  # each in its own process: one configuration's memory and threads
                out = subprocess.run([sys.executable, __file__, "--one", f"{method}:{spec}:{variant}", "--device",
                                      a.device, "--amp", a.amp, "--width", str(a.width), "--steps", str(a.steps),
                                      "--warmup", str(a.warmup), "--recipe", a.recipe], capture_output=True, text=True,
                                     check=True)
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(rows[-1], flush=True)
    lines = [f"Command: `python benchmarks/bench_floor.py {' '.join(sys.argv[1:])}`  ",
             f"Machine: {platform.processor() or platform.machine()}, {rows[0]['threads']} torch threads, device "
             f"{a.device}, amp {a.amp} ({rows[0]['amp']}), width {a.width}, torch {rows[0]['torch']}, "
             f"{time.strftime('%Y-%m-%d')}; total wall time {time.time() - t_start:.0f} s.", "", *table(rows)]
    print("\n".join(lines))
    if a.out:
        Path(a.out).write_text("\n".join(lines) + "\n")
        Path(a.out).with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
