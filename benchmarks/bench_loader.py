"""Benchmark (not a test): what the data pipeline costs beside the training step, per method.

    python benchmarks/bench_loader.py --out results/bench_loader_cpu.md     # laptop recipe + 224 px folder

For each method and setting, the cost of producing one batch in the main process (`--num-workers 0`: decoding,
the method's views, collation; seconds of one core) beside the cost of the training step on the same batch
(benchmarks/bench_step.py's code), and the share of the CPU the loader takes when both run on the same cores:
loader / (loader + step). Settings: the laptop recipe (each file's `--recipe laptop`; real CIFAR-10
from memory, 32 px, batch 64, width 16: needs `python prepare_cifar10.py data`) and a 224 px ImageFolder of JPEGs written to a temporary folder (256 x
256 smooth random images, ResNet-50, batch 8). A share above 10 % means the loader keeps the step from 90 % of
the CPU. Both are measured in wall time and in CPU time of this process (`time.process_time`): on a machine
shared with other work, the CPU-time share is the one to read (with one thread, `OMP_NUM_THREADS=1`).
"""
import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_step  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def write_folder(root: Path, n: int = 64) -> None:
    """n 256 x 256 JPEGs in two classes: blurred noise, so that JPEG decoding costs about what photos cost."""
    import torch
    import torch.nn.functional as F
    from torchvision.utils import save_image

    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in range(2):
            (root / split / f"c{c}").mkdir(parents=True, exist_ok=True)
            for i in range(n // 2):
                img = F.interpolate(torch.rand(1, 3, 32, 32, generator=g), size=256, mode="bicubic").clamp(0, 1)
                save_image(img, root / split / f"c{c}" / f"{i}.jpg")


def one(method: str, setting: str, batches: int, data_dir: str, amp: str = "off") -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    import importlib

    mod = importlib.import_module(method)
    name, flags = bench_step.PAIRS[method][1]
    with tempfile.TemporaryDirectory() as tmp:
        if setting == "laptop":  # the file's --recipe laptop, on the real CIFAR-10
            argv = ["--recipe", "laptop", "--dataset", "cifar10", "--data-dir", data_dir, "--arch", "resnet18",
                    "--width", "16", "--batch-size", "64", "--image-size", "32"]
        else:
            write_folder(Path(tmp) / "folder")
            argv = ["--dataset", "imagefolder", "--data-dir", str(Path(tmp) / "folder"), "--arch", "resnet50",
                    "--batch-size", "8", "--image-size", "224"]
        args = mod.parse_args(argv + ["--num-workers", "0", "--amp", amp, "--device", "cpu", "--output-dir",
                                      str(Path(tmp) / "out"), *flags])
        run = mod.Run(args)
        loader = mod.make_loaders(args, run).loader
        it = iter(loader)
        batch = next(it)  # warm-up (file cache, first decode)
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(batches):
            try:
                batch = next(it)
            except StopIteration:
                it = iter(loader)
                batch = next(it)
        load_s, load_cpu_s = (time.perf_counter() - t0) / batches, (time.process_time() - c0) / batches
        nets, optimizer = mod.build_training(args, run)
        schedule = bench_step.steady_schedule(mod, args)
        step = lambda: mod.train_step(nets, optimizer, batch, schedule, args, run).loss.item()  # noqa: E731
        step_s = bench_step.median_time(step, 3, 1)
        step_cpu_s = bench_step.median_time(step, 3, 0, clock=time.process_time)
    return {"method": method, "name": name, "setting": setting, "batch": args.batch_size, "amp": str(run.dtype),
            "load_s": load_s, "step_s": step_s, "loader_share": load_s / (load_s + step_s), "load_cpu_s": load_cpu_s,
            "step_cpu_s": step_cpu_s, "loader_share_cpu": load_cpu_s / (load_cpu_s + step_cpu_s),
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(sorted(bench_step.PAIRS)), help="comma-separated method files")
    p.add_argument("--settings", default="laptop,folder224", help="laptop (CIFAR-10, 32 px) and/or folder224")
    p.add_argument("--batches", type=int, default=10, help="batches timed per setting")
    p.add_argument("--data-dir", default=str(ROOT / "data"), help="where prepare_cifar10.py wrote CIFAR-10")
    p.add_argument("--amp", default="off", choices=["off", "auto", "bf16"], help="the step's precision (auto: bf16 "
                   "where the CPU has it natively, as the files' default)")
    p.add_argument("--out", help="write the markdown table here (and the raw rows as .jsonl)")
    a = p.parse_args()
    rows, t_start = [], time.time()
    for method in a.methods.split(","):
        for setting in a.settings.split(","):
            rows.append(one(method, setting, a.batches, a.data_dir, a.amp))
            print(json.dumps(rows[-1]), flush=True)
    lines = [f"Command: `python benchmarks/bench_loader.py {' '.join(sys.argv[1:])}`  ",
             f"Machine: {platform.processor() or platform.machine()}, {rows[0]['threads']} torch threads, torch "
             f"{rows[0]['torch']}, {time.strftime('%Y-%m-%d')}; total {time.time() - t_start:.0f} s.", "",
             "| method | setting | batch | step precision | loader, one core (s / batch) | step (s / batch) | "
             "loader share of the CPU | loader, CPU time (s / batch) | step, CPU time (s / batch) | "
             "loader share, CPU time |", "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['name']} | {r['setting']} | {r['batch']} | {r['amp']} | {r['load_s']:.3f} | "
                     f"{r['step_s']:.3f} | {100 * r['loader_share']:.0f} % | {r['load_cpu_s']:.3f} | "
                     f"{r['step_cpu_s']:.3f} | {100 * r['loader_share_cpu']:.0f} % |")
    print("\n".join(lines))
    if a.out:
        Path(a.out).write_text("\n".join(lines) + "\n")
        Path(a.out).with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
