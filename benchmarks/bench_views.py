"""Benchmark (not a test): views per second, made on the device a batch at a time (the method files' appendix:
ViewSpec, make_view) against torchvision's PIL transforms one image at a time in the loader (the method files'
path before 2026-12-07), BYOL's two views of co_byol.py.

    python benchmarks/bench_views.py --out results/bench_views_cpu.md     # this CPU, 32 and 224 px
    python benchmarks/bench_views.py --device cuda --sizes 32,224          # a GPU (benchmarks/gpu_check.py runs it)

Images are smooth random uint8 images at the training frame (32 px; 256 px for 224 px views, as as_tensors
resizes folders). Device path: the two views of a batch (crop, resize, flip, colour jitter, grayscale, blur above
32 px, solarisation), timed with the device synchronised; PIL path: the same two views per image with the PIL
pipeline on one core (a loader worker's work, without decoding). Reported: views per second and the ratio.
"""
import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision.transforms as T

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import co_byol  # noqa: E402  (the appendix is one text in every method file)


def pil_view(size: int, scale, blur_p: float, solarize_p: float) -> T.Compose:
    """The PIL pipeline of the method files before 2026-12-07 (their byol_view)."""
    ops = [T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
           T.RandomHorizontalFlip(), T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
           T.RandomGrayscale(p=0.2)]
    if blur_p > 0:
        ops.append(T.RandomApply([T.GaussianBlur(kernel_size=min(23, size // 2 * 2 - 1), sigma=(0.1, 2.0))],
                                 p=blur_p))
    if solarize_p > 0:
        ops.append(T.RandomSolarize(threshold=128, p=solarize_p))
    return T.Compose(ops + [T.PILToTensor()])


def measure(size: int, batch: int, device: str, repeats: int) -> dict:
    side = size if size <= 64 else int(size * 256 / 224)
    g = torch.Generator().manual_seed(0)
    images = (F.interpolate(torch.rand(batch, 3, 8, 8, generator=g), size=side, mode="bicubic").clamp(0, 1) * 255
              ).to(torch.uint8)
    blur = 0.0 if size <= 32 else 1.0
    specs = [co_byol.ViewSpec(size, (0.2, 1.0), 1.0 * blur, 0.0), co_byol.ViewSpec(size, (0.2, 1.0), 0.1 * blur, 0.2)]
    dev = torch.device(device)
    x = images.to(dev).float().div_(255)
    gen = torch.Generator(dev).manual_seed(0)

    def device_views():
        views = [co_byol.make_view(x, spec, gen)[0] for spec in specs]
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return views

    device_views()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        device_views()
        times.append(time.perf_counter() - t0)
    device_s = statistics.median(times)
    pil = [pil_view(size, (0.2, 1.0), s.blur_p, s.solarize_p) for s in specs]
    imgs = [T.functional.to_pil_image(img) for img in images[:min(batch, 64)]]
    t0 = time.perf_counter()
    for img in imgs:
        for view in pil:
            view(img)
    pil_s = (time.perf_counter() - t0) / len(imgs)  # per image, both views
    return {"size": size, "batch": batch, "device": device, "device_views_per_s": 2 * batch / device_s,
            "pil_views_per_s_one_core": 2 / pil_s, "threads": torch.get_num_threads(), "torch": torch.__version__}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--sizes", default="32,224", help="comma-separated view sizes")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", help="write the markdown table here (and the raw rows as .jsonl)")
    a = p.parse_args(argv)
    rows = [measure(int(s), a.batch, a.device, a.repeats) for s in a.sizes.split(",")]
    for r in rows:
        print(json.dumps(r), flush=True)
    lines = [f"Command: `python benchmarks/bench_views.py {' '.join(sys.argv[1:] if argv is None else argv)}`  ",
             f"Machine: {platform.processor() or platform.machine()}, {rows[0]['threads']} torch threads, torch "
             f"{rows[0]['torch']}, {time.strftime('%Y-%m-%d')}.", "",
             "| view size | batch | device | views/s on the device (a batch at a time) | views/s with PIL (one core) | "
             "ratio |", "|" + "---|" * 6]
    for r in rows:
        lines.append(f"| {r['size']} | {r['batch']} | {r['device']} | {r['device_views_per_s']:.0f} | "
                     f"{r['pil_views_per_s_one_core']:.0f} | {r['device_views_per_s'] / r['pil_views_per_s_one_core']:.1f} |")
    print("\n".join(lines))
    if a.out:
        Path(a.out).write_text("\n".join(lines) + "\n")
        Path(a.out).with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


if __name__ == "__main__":
    main()
