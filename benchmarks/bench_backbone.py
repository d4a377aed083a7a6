"""Benchmark (not a test): the bare backbone's forward + backward, the floor under every training step.

    python benchmarks/bench_backbone.py --out results/bench_backbone_cpu.md
    python benchmarks/bench_backbone.py --configs resnet18:32:128:16 --amp off,bf16 --channels-last 0,1

For each configuration (arch:image_size:batch:width), precision (fp32 or bf16 autocast) and memory format
(contiguous or channels_last): SGD steps of the backbone alone on a random batch (forward, a scalar loss on
.h, backward, optimiser step), median of --steps timed steps after --warmup untimed ones, as images per
second. torch.set_flush_denormal(True) as in the training loops. Each row runs in this process, one after
the other, so run it on an otherwise idle machine.
"""
import argparse
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rf_resnet  # noqa: E402


def measure(arch: str, size: int, batch: int, width: int, amp: str, channels_last: bool, steps: int, warmup: int):
    torch.manual_seed(0)
    stem = "cifar" if size <= 64 else "imagenet"
    net = rf_resnet.build_backbone(arch, stem=stem, width=width)
    x = torch.randn(batch, 3, size, size)
    if channels_last:
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if amp == "bf16" else nullcontext()
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        with ctx:
            h = net(x).h
        h.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="resnet18:32:128:16,resnet18:32:128:32,resnet18:32:128:64",
                   help="comma-separated arch:image_size:batch:width")
    p.add_argument("--amp", default="off,bf16", help="comma-separated: off, bf16")
    p.add_argument("--channels-last", default="0,1", help="comma-separated 0/1")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", help="write the markdown table here")
    a = p.parse_args()
    torch.set_flush_denormal(True)
    native = any(f() for f in (getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported",
                                                                     "_is_amx_tile_supported")) if f)
    lines = [f"Command: `python benchmarks/bench_backbone.py {' '.join(sys.argv[1:])}`  ",
             f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
             f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16: {native}, torch "
             f"{torch.__version__}, {time.strftime('%Y-%m-%d')}.", "",
             "| arch | px | batch | width | precision | memory format | img/s (forward + backward + SGD) |",
             "|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for spec in a.configs.split(","):
        arch, size, batch, width = spec.split(":")
        for amp in a.amp.split(","):
            for cl in a.channels_last.split(","):
                ips = measure(arch, int(size), int(batch), int(width), amp, cl == "1", a.steps, a.warmup)
                lines.append(f"| {arch} | {size} | {batch} | {width} | {'bf16' if amp == 'bf16' else 'fp32'} | "
                             f"{'channels_last' if cl == '1' else 'contiguous'} | {ips:.0f} |")
                print(lines[-1], flush=True)
    if a.out:
        Path(a.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
