"""Sweep oneDNN's CPU convolutions for crashes: forward + backward of one Conv2d in channels_last per shape.

    python results/onednn_sweep/sweep.py --isa DEFAULT        # the CPU's own kernels
    python results/onednn_sweep/sweep.py --isa AVX512_CORE    # as on an AVX-512 CPU without bf16
    ATEN_CPU_CAPABILITY=avx2 python results/onednn_sweep/sweep.py --isa AVX2   # as on an AVX2-only CPU

Each shape runs in a child process that walks the list in order and prints each shape before running it; when the
child dies (segfault, abort), the parent records the shape and starts a new child after it. With
LD_PRELOAD=libc_malloc_debug.so.0 MALLOC_CHECK_=3 (glibc >= 2.34) heap corruption aborts at the next free, so a
crash may name the shape after the guilty one: rerun a named shape alone to confirm it.
Shapes: kernel 1 and 3, stride 1 and 2, 3-64 input channels, 1x or 2x as many outputs, 8-66 px, batch 4 and 8,
fp32 and bf16 autocast, one thread.
"""
import argparse
import os
import subprocess
import sys


def cases():
    out = []
    for dtype in ("fp32", "bf16"):
        for k, s in ((3, 1), (3, 2), (1, 1), (1, 2)):
            for cin in (3, 4, 8, 12, 16, 24, 32, 48, 64):
                for mult in (1, 2):
                    for hw in (8, 9, 16, 17, 18, 33, 34, 64, 66):
                        for b in (4, 8):
                            out.append((dtype, k, s, cin, cin * mult if cin > 3 else 8 * mult, hw, b))
    return out


def child(start: int) -> None:
    import torch
    import torch.nn as nn
    torch.set_num_threads(1)
    for i, (dtype, k, s, cin, cout, hw, b) in enumerate(cases()):
        if i < start:
            continue
        print(i, dtype, k, s, cin, cout, hw, b, flush=True)
        conv = nn.Conv2d(cin, cout, k, stride=s, padding=k // 2, bias=False).to(memory_format=torch.channels_last)
        x = torch.randn(b, cin, hw, hw).contiguous(memory_format=torch.channels_last).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            y = conv(x)
        y.float().sum().backward()
    print("DONE", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--isa", default="DEFAULT", help="ONEDNN_MAX_CPU_ISA for the children")
    p.add_argument("--child", type=int, default=-1, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child >= 0:
        return child(a.child)
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA=a.isa, OMP_NUM_THREADS="1")
    start, crashed = 0, []
    while True:
        proc = subprocess.run([sys.executable, __file__, "--child", str(start)], env=env, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln and ln[0].isdigit()]
        if "DONE" in proc.stdout or not lines:
            break
        crashed.append(f"rc={proc.returncode} {lines[-1]}")
        print(crashed[-1], flush=True)
        start = int(lines[-1].split()[0]) + 1
    print(f"{len(crashed)} of {len(cases())} shapes crashed (isa {a.isa}); columns: index dtype kernel stride in out px batch")


if __name__ == "__main__":
    main()
