"""Benchmark (not a test): time and peak memory of one training step, BYOL vs CO-BYOL or DINO vs CO-DINO.

    python benchmarks/bench_step.py --out results/bench_co_byol_cpu.md              # the default configurations
    python benchmarks/bench_step.py --method co_dino --out results/bench_co_dino_cpu.md
    python benchmarks/bench_step.py --configs resnet50:224:64 --device cuda --amp bf16 --out results/bench_gpu.md
    python benchmarks/bench_step.py --configs resnet18:32:128 --width 16 --amp bf16    # the laptop recipe's network

Each configuration (arch:image_size:batch) runs twice (ws = 0 and ws = 0.2), each in a process of its own so
that the peak memory is that configuration's (CPU: peak resident set size of the process; CUDA:
torch.cuda.max_memory_allocated). Inputs are random tensors of FakeData's shape, so only the step itself is
timed (forward of both networks, the loss, backward, LARS, EMA, DINO centres), through the method file's
train_step, the function its training loop calls. Reported: the median over --steps timed steps after --warmup untimed ones.
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


def one(method: str, spec: str, ws: float, device: str, amp: str, steps: int, warmup: int, width: int) -> dict:
    sys.path.insert(0, str(ROOT))
    import importlib

    import torch

    mod = importlib.import_module(method)  # co_byol or co_dino
    arch, size, batch = spec.split(":")
    args = mod.parse_args(["--arch", arch, "--image-size", size, "--batch-size", batch, "--ws", str(ws),
                           "--dataset", "fake", "--device", device, "--amp", amp, "--width", str(width)])
    dev = torch.device(device)
    if dev.type == "cpu":
        torch.set_flush_denormal(True)  # as the training loops do
    torch.manual_seed(0)
    net = (mod.OnlineNetwork if method == "co_byol" else mod.StudentNetwork)(args, num_classes=10).to(dev)
    ema = mod.copy.deepcopy(net.encoder).requires_grad_(False)
    net, ema = net.to(memory_format=torch.channels_last), ema.to(memory_format=torch.channels_last)  # as main()
    optimizer = mod.LARS(mod.param_groups(net, args, int(batch) / 256), lr=args.lr)
    dtype = mod.amp_dtype(args, dev)
    scaler = torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16)
    autocast = torch.autocast(dev.type, dtype=dtype) if dtype else nullcontext()
    b, s = int(batch), int(size)
    views = [torch.randn(b, 3, s, s, device=dev).contiguous(memory_format=torch.channels_last) for _ in range(2)]
    labels = torch.randint(0, 10, (b,), device=dev)
    centers = (torch.zeros(1, getattr(args, "out_dim", 1), device=dev),) * 2
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        if method == "co_byol":
            loss = mod.train_step(net, net, ema, optimizer, scaler, views, labels, ws, 0.99, autocast)[0]
        else:
            (loss, *_), centers, _ = mod.train_step(net, net, ema, optimizer, scaler, views, labels, centers, args,
                                                    0.996, 0.04, False, autocast)
        loss.item()  # wait for the device
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    return {"method": method, "arch": arch, "width": width, "image_size": s, "batch": b, "ws": ws, "step_s": step_s,
            "img_per_s": b / step_s, "peak_mem_mb": mod.peak_memory_mb(dev), "device": device, "amp": str(dtype),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="co_byol", choices=["co_byol", "co_dino"], help="which method file")
    p.add_argument("--configs", default=DEFAULT, help="comma-separated arch:image_size:batch")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run")
    p.add_argument("--amp", default="off", choices=["off", "bf16", "fp16", "auto"], help="autocast precision "
                   "(auto: the method file's choice)")
    p.add_argument("--width", type=int, default=64, help="base width of the backbone (the laptop recipe: 16)")
    p.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--out", help="write the markdown table here (and the raw rows next to it as .jsonl)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration and print JSON
    p.add_argument("--ws", type=float, default=0.0, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(a.method, a.one, a.ws, a.device, a.amp, a.steps, a.warmup, a.width)))
        return
    rows, t_start = [], time.time()
    for spec in a.configs.split(","):
        for ws in (0.0, 0.2):
            out = subprocess.run([sys.executable, __file__, "--method", a.method, "--one", spec, "--ws", str(ws),
                                  "--device", a.device,
                                  "--amp", a.amp, "--steps", str(a.steps), "--warmup", str(a.warmup),
                                  "--width", str(a.width)],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    base, co = ("BYOL", "CO-BYOL") if a.method == "co_byol" else ("DINO", "CO-DINO")
    lines = [f"Command: `python benchmarks/bench_step.py {' '.join(sys.argv[1:])}`  ",
             f"Machine: {platform.processor() or platform.machine()}, {rows[0]['threads']} torch threads, "
             f"device {a.device}, amp {a.amp} ({rows[0]['amp']}), width {a.width}, torch {rows[0]['torch']}; "
             f"total wall time {time.time() - t_start:.0f} s.",
             "", f"| arch | px | batch | {base} step (s) | {co} step (s) | {co} / {base} time | {base} img/s | "
             f"{co} img/s | {base} peak mem (MiB) | {co} peak mem (MiB) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r0, r1 in zip(rows[::2], rows[1::2]):  # ws = 0, ws = 0.2
        lines.append(f"| {r0['arch']} | {r0['image_size']} | {r0['batch']} | {r0['step_s']:.3f} | "
                     f"{r1['step_s']:.3f} | {r1['step_s'] / r0['step_s']:.3f} | {r0['img_per_s']:.1f} | "
                     f"{r1['img_per_s']:.1f} | {r0['peak_mem_mb']:.0f} | {r1['peak_mem_mb']:.0f} |")
    print("\n".join(lines))
    if a.out:
        Path(a.out).write_text("\n".join(lines) + "\n")
        Path(a.out).with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
