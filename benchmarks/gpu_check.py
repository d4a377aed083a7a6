"""The GPU check, ready to run (not a test): every method's real training loop on a CUDA machine, in one script.

    python benchmarks/gpu_check.py --out results/gpu_check.md        # CUDA: at most about 10 minutes (--budget-s)
    python benchmarks/gpu_check.py --device cpu --quick              # CPU dry run of the same plumbing (tests)

What it runs, each as its own process through the method file's command line (the loader, AMP, DDP, logging
and checkpointing included), on FakeData at 224 px:
1. every method file, base and variant (co_byol --ws 0 / 0.2, co_dino --ws 0 / 0.2, bag_ssl --loss vicreg /
   byol, geo_dino --local-loss none / geo), ResNet-50 and RF99-ResNet50, bf16 autocast, batch 64 per GPU;
2. co_byol ResNet-50 CO and base with fp16 + GradScaler; CO-BYOL, CO-DINO and geo_dino with `--compile` (the
   network; the latter two compile their losses too); CO-BYOL under
   `torchrun --nproc_per_node=1` and, when the machine has more GPUs, `--nproc_per_node=N` (DDP, NCCL, SyncBN);
3. the step alone (benchmarks/bench_step.py's code: no loader) for CO-BYOL ResNet-50, so that the loop's img/s
   over the step's img/s says whether the loader keeps the GPU busy (1.0 = never waits for data);
4. the floor table (benchmarks/bench_floor.py's rows and table) for every method at ResNet-50 and RF99-ResNet50:
   each step against the bare backbone's forward + backward, in time and in FLOPs, base vs variant;
5. first of all, views per second (benchmarks/bench_views.py) at 32 and 224 px: on the GPU, a batch at a time,
   against PIL on one CPU core.
Reported per run: img/s (median of the logged rows after the first), peak memory (torch.cuda.max_memory_allocated),
wall time, and the paper's reference (Table 11: 12 GB for BYOL vs 12.1 GB for CO-BYOL, ResNet-50). The goal
stated for one H100-class GPU: CO-BYOL ResNet-50 at 224 px >= 2,000 img/s in bf16.
Time budget: nothing new starts once --budget-s seconds have passed (default 420, so that the check fits a
10-minute slot); what did not start is listed, and the report (--out) is rewritten after every run, so a check
stopped from outside keeps what it measured. The runs go in order of importance: the goal's pair (BYOL / CO-BYOL
ResNet-50, bf16) first, then fp16, torchrun and DDP, the other methods, ResNet-50's floor table, the same for
RF99-ResNet50, `--compile` last.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_floor  # noqa: E402  (table(): the floor table's markdown)
import bench_step  # noqa: E402  (PAIRS: base and variant of every method; one(): the step alone)
import bench_views  # noqa: E402  (measure(): views per second, on the device and with PIL)

FLOOR_STEPS = {False: (10, 3), True: (1, 0)}  # --quick -> (timed steps, warm-up steps) of the floor table


def floor_row(method: str, spec: str, variant: int, device: str, amp: str, width: int, quick: bool) -> dict:
    """One row of the floor table (the step against the bare backbone), in a process of its own."""
    steps, warmup = FLOOR_STEPS[quick]
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_floor.py"), "--one",
                          f"{method}:{spec}:{variant}", "--device", device, "--amp", amp, "--width", str(width),
                          "--steps", str(steps), "--warmup", str(warmup)], capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": (out.stderr or out.stdout).strip().splitlines()[-1][:300]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def train_run(method: str, flags: list[str], arch: str, size: int, batch: int, steps: int, device: str,
              amp: str, workers: int, width: int, extra: list[str], nproc: int = 0) -> dict:
    """One short training run of METHOD through its command line; its metrics.jsonl, summarised."""
    with tempfile.TemporaryDirectory() as out:
        cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
               if nproc else [sys.executable])
        cmd += [str(ROOT / f"{method}.py"), "--dataset", "fake", "--fake-size", str(batch * max(nproc, 1) * (steps + 1)),
                "--image-size", str(size), "--arch", arch, "--width", str(width), "--batch-size",
                str(batch * max(nproc, 1)), "--epochs", "1", "--max-steps", str(steps), "--warmup-epochs", "0",
                "--log-every", str(max(1, steps // 10)), "--knn-k", "0", "--num-workers", str(workers),
                "--device", device, "--amp", amp, "--checkpoint-every", "0", "--output-dir", out, *flags, *extra]
        if method == "bag_ssl":  # the bag-of-patch evaluation is not part of the training-speed check
            cmd += ["--eval-patches", "1", "--eval-train-images", "10", "--eval-test-images", "10",
                    "--linear-epochs", "1", "--eval-knn-k", "0"]
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wall = time.time() - t0
        if proc.returncode != 0:
            return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1][:300], "wall_s": wall}
        rows = [json.loads(line) for line in open(Path(out) / "metrics.jsonl") if '"img_per_s"' in line]
    speeds = [r["img_per_s"] for r in rows[1:]] or [r["img_per_s"] for r in rows]
    return {"img_per_s": statistics.median(speeds), "peak_mem_mb": max(r["peak_mem_mb"] for r in rows),
            "wall_s": wall, "steps": steps}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cuda: the check; cpu: a dry run")
    p.add_argument("--quick", action="store_true", help="tiny networks and a few steps (the CPU dry run)")
    p.add_argument("--steps", type=int, default=0, help="training steps per run (default: 100, --quick: 2)")
    p.add_argument("--methods", default=",".join(sorted(bench_step.PAIRS)), help="comma-separated method files")
    p.add_argument("--budget-s", type=float, default=420, help="start nothing new after this many seconds")
    p.add_argument("--out", help="write the markdown table here (and the raw rows as .jsonl)")
    a = p.parse_args()
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check.py: error: no CUDA device here; run with --device cpu --quick for the dry run")
    gpus = torch.cuda.device_count() if a.device == "cuda" else 0
    steps = a.steps or (2 if a.quick else 100)
    archs, size, batch, width = (["resnet18"], 32, 4, 8) if a.quick else (["resnet50", "rf99_resnet50"], 224, 64, 64)
    amp = "off" if a.device == "cpu" else "bf16"
    workers = 0 if a.quick else min(16, os.cpu_count() or 1)
    common = dict(size=size, batch=batch, steps=steps, device=a.device, workers=workers, width=width)
    methods = sorted(a.methods.split(","), key=lambda m: m != "co_byol")  # co_byol (the goal's pair) first
    base, co = bench_step.PAIRS["co_byol"]
    dry = a.quick and a.device == "cpu"  # the CPU dry run: the variants only, no compile (minutes on a CPU)
    runs = {arch: [] for arch in archs}  # arch -> [(label, method, name, flags, arch, amp, extra, nproc)], in order
    for arch in archs:
        for method in methods:
            runs[arch] += [(amp, method, name, flags, arch, amp, [], 0)
                           for name, flags in bench_step.PAIRS[method][1 if dry else 0:]]
            if method == "co_byol" and arch == archs[0]:  # right after the goal's pair: fp16, torchrun and DDP
                if a.device == "cuda":
                    runs[arch] += [("fp16 + GradScaler", method, n, f, arch, "fp16", [], 0) for n, f in (base, co)]
                runs[arch].append(("torchrun, 1 process", method, co[0], co[1], arch, amp, [], 1))
                if gpus > 1:
                    runs[arch].append((f"torchrun, {gpus} GPUs (global batch {batch * gpus})", method, co[0], co[1],
                                       arch, amp, [], gpus))
    # minutes to compile: last; co_dino and geo_dino compile their losses too
    compiled = [("--compile", m, *bench_step.PAIRS[m][1], archs[0], amp, ["--compile"], 0)
                for m in ("co_byol", "co_dino", "geo_dino") if m in methods]
    rows, floor_rows, skipped, step_alone, t_start = [], [], [], {}, time.time()
    view_rows = [bench_views.measure(s, 256 if not a.quick else 8, a.device, 5 if not a.quick else 1)
                 for s in ((32, 224) if not a.quick else (32,))]  # seconds: first

    def report(done: bool = False) -> list[str]:
        """The report so far, written after every run: a check stopped from outside keeps what it measured."""
        lines = [f"Command: `python benchmarks/gpu_check.py {' '.join(sys.argv[1:])}`  ",
                 f"Machine: {torch.cuda.get_device_name() if a.device == 'cuda' else platform.processor() or 'cpu'}, "
                 f"{gpus} GPU(s), {os.cpu_count()} CPUs, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; "
                 f"{steps} steps per run, batch {batch} per process, {size} px, FakeData, {workers} loader workers; "
                 f"{time.time() - t_start:.0f} s {'in total' if done else 'so far'}.", "",
                 "| setting | method | arch | img/s | peak memory (MiB) | wall (s) |", "|---|---|---|---|---|---|"]
        for r in rows:
            speed = f"{r['img_per_s']:.0f} | {r['peak_mem_mb']:.0f}" if "img_per_s" in r else f"failed: {r['error']} |"
            lines.append(f"| {r['setting']} | {r['name']} (`{r['flags']}`) | {r['arch']} | {speed} | "
                         f"{r['wall_s']:.0f} |")
        loop = next((r for r in rows if r["name"] == co[0] and r["arch"] == archs[0] and r["setting"] == amp
                     and "img_per_s" in r), None)
        if step_alone and loop:
            busy = loop["img_per_s"] / step_alone["img_per_s"]
            lines += ["", f"Loader check: CO-BYOL {archs[0]}, training loop {loop['img_per_s']:.0f} img/s vs the step "
                      f"alone {step_alone['img_per_s']:.0f} img/s: {busy:.2f} of the step's speed "
                      f"({'the loader keeps up' if busy >= 0.9 else 'the loop waits for data'})."]
        lines += ["", "Views (benchmarks/bench_views.py, BYOL's two views): " + "; ".join(
            f"{r['size']} px, batch {r['batch']}: {r['device_views_per_s']:.0f} views/s on the {r['device']}, "
            f"{r['pil_views_per_s_one_core']:.0f} with PIL on one CPU core" for r in view_rows) + "."]
        lines += ["", "Paper (Table 11, ResNet-50, per GPU): BYOL 12 GB, CO-BYOL 12.1 GB. Goal on one H100-class "
                  "GPU: CO-BYOL ResNet-50 at 224 px >= 2,000 img/s in bf16."]
        if floor_rows:
            lines += ["", f"Floor table (benchmarks/bench_floor.py, medians of {FLOOR_STEPS[a.quick][0]} steps after "
                      f"{FLOOR_STEPS[a.quick][1]}, {amp}, batch {batch}):", "", *bench_floor.table(floor_rows)]
        if skipped:
            lines += ["", f"Not started (the {a.budget_s:.0f} s time budget was spent): " + "; ".join(skipped) + "."]
        if a.out:
            Path(a.out).write_text("\n".join(lines) + "\n")
            Path(a.out).with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + floor_rows))
        return lines

    def in_budget(what: str) -> bool:
        if time.time() - t_start >= a.budget_s:
            skipped.append(what)
            return False
        return True

    def train(label, method, name, flags, arch, run_amp, extra, nproc):
        if in_budget(f"{label}: {name} {arch}"):
            r = train_run(method, flags, arch, amp=run_amp, extra=extra, nproc=nproc, **common)
            rows.append({"setting": label, "method": method, "name": name, "flags": " ".join(flags), "arch": arch,
                         **r})
            print(json.dumps(rows[-1]), flush=True)
            report()

    for arch in archs:  # each network: its training runs, then its floor table
        for run in runs[arch]:
            train(*run)
        if arch == archs[0]:
            step_alone.update(bench_step.one("co_byol", f"{arch}:{size}:{batch}", 1, a.device, amp,
                                             steps=5 if not a.quick else 1, warmup=2 if not a.quick else 0,
                                             width=width))
        for method in methods if not dry else methods[:1]:  # base and variant, bench_floor.py, one process each
            if in_budget(f"floor table: {method} {arch}"):
                pair = [{"setting": "floor table",
                         **floor_row(method, f"{arch}:{size}:{batch}", v, a.device, amp, width, a.quick)}
                        for v in (0, 1)]
                if any("error" in r for r in pair):
                    rows.append({"setting": "floor table", "method": method, "name": method, "flags": "",
                                 "arch": arch, "wall_s": 0, "error": next(r for r in pair if "error" in r)["error"]})
                else:
                    floor_rows.extend(pair)
                report()
    for run in compiled if not dry else []:
        train(*run)
    print("\n".join(report(done=True)))
    if any("error" in r for r in rows):
        sys.exit(1)

if __name__ == "__main__":
    main()
