"""Benchmark (not a test): time and peak memory of one training step of each method, base vs variant.

    python benchmarks/bench_step.py --out results/bench_co_byol_cpu.md              # BYOL vs CO-BYOL
    python benchmarks/bench_step.py --method co_dino --out results/bench_co_dino_cpu.md
    python benchmarks/bench_step.py --method geo_dino --configs resnet18:32:64     # --local-loss none vs geo
    python benchmarks/bench_step.py --configs resnet50:224:64 --device cuda --amp bf16 --out results/bench_gpu.md
    python benchmarks/bench_step.py --configs resnet18:32:128 --width 16 --amp bf16    # the laptop recipe's network

Each configuration (arch:image_size:batch) runs twice (the method's base and its variant, PAIRS below), each
in a process of its own so that the peak memory is that configuration's (CPU: peak resident set size of the
process; CUDA: torch.cuda.max_memory_allocated). The batch is one batch of the method's own loader on FakeData
(so geo_dino's boxes and flips are real), built once and reused, so only the step itself is timed: the method
file's `train_step(nets, optimizer, batch, schedule, args, run) -> StepOut`, the function its training loop calls,
with the networks and optimiser of its `build_training` and the schedules of its `Schedule`. One code path for
every method. Reported: the median over --steps timed steps after --warmup untimed ones.
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

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = "resnet18:32:64,resnet50:224:8,rf99_resnet50:224:8"
# method -> ((name, flags), (name, flags)): the base and the variant whose extra cost is measured
PAIRS = {"co_byol": (("BYOL", ["--ws", "0"]), ("CO-BYOL", ["--ws", "0.2"])),
         "co_dino": (("DINO", ["--ws", "0"]), ("CO-DINO", ["--ws", "0.2"])),
         "bag_ssl": (("BagSSL VICReg", ["--loss", "vicreg"]), ("BagSSL BYOL", ["--loss", "byol"])),
         "geo_dino": (("DINO", ["--local-loss", "none"]), ("geo_dino", ["--local-loss", "geo"]))}


def build(method: str, spec: str, variant: int, device: str, amp: str, width: int, out_dir: str, recipe: str = ""):
    """(module, args, run, nets, optimizer, batch, schedule): what the method's training loop would build.
    recipe: the file's --recipe (its heads, optimiser, ...); the spec's network still wins."""
    sys.path.insert(0, str(ROOT))
    import importlib

    mod = importlib.import_module(method)
    arch, size, batch = spec.split(":")
    _, flags = PAIRS[method][variant]
    args = mod.parse_args((["--recipe", recipe] if recipe else []) +
                          ["--arch", arch, "--image-size", size, "--batch-size", batch, "--dataset", "fake",
                           "--fake-size", batch, "--num-workers", "0", "--device", device, "--amp", amp,
                           "--width", str(width), "--output-dir", out_dir, *flags])
    args.recipe_used = recipe
    run = mod.Run(args)  # device, precision, flush-denormal on CPU: as main()
    loader = mod.make_loaders(args, run).loader
    nets, optimizer = mod.build_training(args, run)
    return mod, args, run, nets, optimizer, next(iter(loader)), steady_schedule(mod, args)


def steady_schedule(mod, args) -> dict:
    """The schedules of a step past DINO's frozen-prototype epoch and the lr warm-up, and between two logged steps
    (49 of every 50 at --log-every 50; geo_dino computes its local collapse monitors on logged steps only): the
    steady state's work."""
    schedule = mod.Schedule(args, 1)(min(args.epochs - 1, max(1, getattr(args, "freeze_last_layer", 0))))
    if "log_step" in schedule:  # one step per epoch: the step above would count as logged
        schedule["log_step"] = False
    return schedule


def median_time(fn, steps: int, warmup: int, clock=time.perf_counter) -> float:
    """Median over `steps` calls of fn after `warmup` untimed ones; clock=time.process_time gives CPU time."""
    times = []
    for i in range(warmup + steps):
        t0 = clock()
        fn()
        if i >= warmup:
            times.append(clock() - t0)
    return statistics.median(times)


def one(method: str, spec: str, variant: int, device: str, amp: str, steps: int, warmup: int, width: int) -> dict:
    import torch

    name, flags = PAIRS[method][variant]
    with tempfile.TemporaryDirectory() as out_dir:
        mod, args, run, nets, optimizer, batch, schedule = build(method, spec, variant, device, amp, width, out_dir)
        # .item(): wait for the device
        step_s = median_time(lambda: mod.train_step(nets, optimizer, batch, schedule, args, run).loss.item(), steps, warmup)
    arch, size, b = spec.split(":")
    return {"method": method, "name": name, "flags": " ".join(flags), "arch": arch, "width": width,
            "image_size": int(size), "batch": int(b), "step_s": step_s, "img_per_s": int(b) / step_s,
            "peak_mem_mb": mod.peak_memory_mb(run.device), "device": device, "amp": str(run.dtype),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="co_byol", choices=sorted(PAIRS), help="which method file")
    p.add_argument("--configs", default=DEFAULT, help="comma-separated arch:image_size:batch")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run")
    p.add_argument("--amp", default="off", choices=["off", "bf16", "fp16", "auto"], help="autocast precision "
                   "(auto: the method file's choice)")
    p.add_argument("--width", type=int, default=64, help="base width of the backbone (the laptop recipe: 16)")
    p.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--out", help="write the markdown table here (and the raw rows next to it as .jsonl)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration and print JSON
    p.add_argument("--variant", type=int, default=0, help=argparse.SUPPRESS)  # internal: 0 base, 1 variant
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(a.method, a.one, a.variant, a.device, a.amp, a.steps, a.warmup, a.width)))
        return
    rows, t_start = [], time.time()
    for spec in a.configs.split(","):
        for variant in (0, 1):
            out = subprocess.run([sys.executable, __file__, "--method", a.method, "--one", spec, "--variant", str(variant),
                                  "--device", a.device,
                                  "--amp", a.amp, "--steps", str(a.steps), "--warmup", str(a.warmup),
                                  "--width", str(a.width)],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    (base, _), (co, _) = PAIRS[a.method]
    lines = [f"Command: `python benchmarks/bench_step.py {' '.join(sys.argv[1:])}`  ",
             f"Machine: {platform.processor() or platform.machine()}, {rows[0]['threads']} torch threads, "
             f"device {a.device}, amp {a.amp} ({rows[0]['amp']}), width {a.width}, torch {rows[0]['torch']}; "
             f"total wall time {time.time() - t_start:.0f} s.",
             "", f"| arch | px | batch | {base} step (s) | {co} step (s) | {co} / {base} time | {base} img/s | "
             f"{co} img/s | {base} peak mem (MiB) | {co} peak mem (MiB) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r0, r1 in zip(rows[::2], rows[1::2]):  # base, variant
        lines.append(f"| {r0['arch']} | {r0['image_size']} | {r0['batch']} | {r0['step_s']:.3f} | "
                     f"{r1['step_s']:.3f} | {r1['step_s'] / r0['step_s']:.3f} | {r0['img_per_s']:.1f} | "
                     f"{r1['img_per_s']:.1f} | {r0['peak_mem_mb']:.0f} | {r1['peak_mem_mb']:.0f} |")
    print("\n".join(lines))
    if a.out:
        Path(a.out).write_text("\n".join(lines) + "\n")
        Path(a.out).with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
