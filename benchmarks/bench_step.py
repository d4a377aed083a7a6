"""Benchmark (not a test): time and peak memory of one training step, BYOL (--ws 0) vs CO-BYOL (--ws 0.2).

    python benchmarks/bench_step.py --out results/bench_co_byol_cpu.md              # the default configurations
    python benchmarks/bench_step.py --configs resnet50:224:64 --device cuda --amp bf16 --out results/bench_gpu.md

Each configuration (arch:image_size:batch) runs twice (ws = 0 and ws = 0.2), each in a process of its own so
that the peak memory is that configuration's (CPU: peak resident set size of the process; CUDA:
torch.cuda.max_memory_allocated). Inputs are random tensors of FakeData's shape, so only the step itself is
timed (forward of both networks, Eq. 3, backward, LARS, EMA), through co_byol.train_step, the function the
training loop calls. Reported: the median over --steps timed steps after --warmup untimed ones.
"""
import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = "resnet18:32:64,resnet50:224:8,rf99_resnet50:224:8"


def one(spec: str, ws: float, device: str, amp: str, steps: int, warmup: int) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch

    import co_byol

    arch, size, batch = spec.split(":")
    args = co_byol.parse_args(["--arch", arch, "--image-size", size, "--batch-size", batch, "--ws", str(ws),
                               "--dataset", "fake", "--device", device, "--amp", amp])
    dev = torch.device(device)
    torch.manual_seed(0)
    online = co_byol.OnlineNetwork(args, num_classes=10).to(dev)
    target = co_byol.copy.deepcopy(online.encoder).requires_grad_(False)
    if dev.type == "cuda":
        online, target = online.to(memory_format=torch.channels_last), target.to(memory_format=torch.channels_last)
    optimizer = co_byol.LARS(co_byol.param_groups(online, args, int(batch) / 256), lr=args.lr)
    dtype = co_byol.amp_dtype(args, dev)
    scaler = torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16)
    autocast = torch.autocast(dev.type, dtype=dtype) if dtype else nullcontext()
    b, s = int(batch), int(size)
    views = [torch.randn(b, 3, s, s, device=dev) for _ in range(2)]
    if dev.type == "cuda":
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    labels = torch.randint(0, 10, (b,), device=dev)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss = co_byol.train_step(online, online, target, optimizer, scaler, views, labels, ws, 0.99, autocast)[0]
        loss.item()  # wait for the device
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    return {"arch": arch, "image_size": s, "batch": b, "ws": ws, "step_s": step_s, "img_per_s": b / step_s,
            "peak_mem_mb": co_byol.peak_memory_mb(dev), "device": device, "amp": str(dtype),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default=DEFAULT, help="comma-separated arch:image_size:batch")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run")
    p.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"], help="autocast precision")
    p.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--out", help="write the markdown table here (and the raw rows next to it as .jsonl)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration and print JSON
    p.add_argument("--ws", type=float, default=0.0, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a.ws, a.device, a.amp, a.steps, a.warmup)))
        return
    rows, t_start = [], time.time()
    for spec in a.configs.split(","):
        for ws in (0.0, 0.2):
            out = subprocess.run([sys.executable, __file__, "--one", spec, "--ws", str(ws), "--device", a.device,
                                  "--amp", a.amp, "--steps", str(a.steps), "--warmup", str(a.warmup)],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    lines = [f"Command: `python benchmarks/bench_step.py {' '.join(sys.argv[1:])}`  ",
             f"Machine: {platform.processor() or platform.machine()}, {rows[0]['threads']} torch threads, "
             f"device {a.device}, amp {a.amp}, torch {rows[0]['torch']}; total wall time {time.time() - t_start:.0f} s.",
             "", "| arch | px | batch | BYOL step (s) | CO-BYOL step (s) | CO-BYOL / BYOL time | BYOL img/s | "
             "CO-BYOL img/s | BYOL peak mem (MiB) | CO-BYOL peak mem (MiB) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for byol, co in zip(rows[::2], rows[1::2]):
        lines.append(f"| {byol['arch']} | {byol['image_size']} | {byol['batch']} | {byol['step_s']:.3f} | "
                     f"{co['step_s']:.3f} | {co['step_s'] / byol['step_s']:.3f} | {byol['img_per_s']:.1f} | "
                     f"{co['img_per_s']:.1f} | {byol['peak_mem_mb']:.0f} | {co['peak_mem_mb']:.0f} |")
    print("\n".join(lines))
    if a.out:
        Path(a.out).write_text("\n".join(lines) + "\n")
        Path(a.out).with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
