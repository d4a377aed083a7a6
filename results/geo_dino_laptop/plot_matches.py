"""The paper's Fig. 3 for a geo_dino.py run: two global crops of one training image, each student cell of crop A
linked to its geometric match (top: cells without a valid match marked x) and to its similarity match (bottom) in
crop B, with the features of the run's backbone.pt (the teacher's backbone).

    python results/geo_dino_laptop/plot_matches.py runs/geo_dino_laptop/backbone.pt matches.png [--index 0]

The crops are geometric only (no colour changes), so the picture shows positions. The run's arguments (data set,
image size, crop scale, seed) come from backbone.pt; --data-dir overrides where the data set is read.
"""
import argparse
import math
import sys
from argparse import Namespace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import geo_dino  # noqa: E402


@torch.no_grad()
def plot_matches(path: str, backbone: torch.nn.Module, dataset, args, index: int = 0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = geo_dino.as_tensors(dataset, args.image_size)[index][0][None].float() / 255  # (1, 3, H, W)
    view = geo_dino.MultiView(args)  # the run's two global crops, geometric only
    view.specs = [spec._replace(jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0) for spec in view.specs[:2]]
    crops, boxes, flips = view(image, torch.Generator().manual_seed(args.seed + 12345))  # a fixed pair per seed
    crops, boxes, flips = [c[0] for c in crops], boxes[0], flips[0]  # 2 x (3, S, S), (2, 4), (2,)
    local = backbone.eval()(geo_dino.normalize(torch.stack(crops))).local.float()  # (2, C, n, n)
    n, size = local.shape[-1], args.image_size
    pos = geo_dino.cell_centers(boxes, flips, n)  # (2, n*n, 2)
    diag = geo_dino.cell_diagonal(boxes, n)  # (2,)
    geo_index, geo_valid = geo_dino.geometric_matching(pos[0], pos[1], diag[0], diag[1])  # (n*n,)
    feats = local.flatten(2).transpose(1, 2)  # (2, C, n, n) -> (2, n*n, C)
    sim_index = geo_dino.similarity_matching(feats[0], feats[1])  # (n*n,)

    gap = size // 4
    canvas = torch.ones(3, size, 2 * size + gap)  # [crop A | gap | crop B] in [0, 1]
    canvas[:, :, :size], canvas[:, :, size + gap:] = crops[0], crops[1]
    cell = size / n
    centre = [((k % n + 0.5) * cell, (k // n + 0.5) * cell) for k in range(n * n)]  # (x, y) in crop pixels
    fig, axes = plt.subplots(2, 1, figsize=(8, 8.5))
    agree = (sim_index == geo_index)[geo_valid].float().mean().item() if geo_valid.any() else float("nan")
    titles = [f"geometric matching: {int(geo_valid.sum())}/{n * n} cells valid (d < s)",
              f"similarity matching (EsViT): {100 * agree:.0f}% of valid cells land on the geometric match"]
    for ax, title, idx, ok in zip(axes, titles, (geo_index, sim_index), (geo_valid, torch.ones_like(geo_valid))):
        ax.imshow(canvas.permute(1, 2, 0).numpy(), interpolation="nearest")  # (3, H, W) -> (H, W, 3)
        for offset in (0, size + gap):  # the feature-map cells of both crops
            for t in range(1, n):
                ax.plot([offset + t * cell - 0.5] * 2, [-0.5, size - 0.5], color="k", lw=0.8, alpha=0.7)
                ax.plot([offset - 0.5, offset + size - 0.5], [t * cell - 0.5] * 2, color="k", lw=0.8, alpha=0.7)
        arc = torch.linspace(0, 1, 30)
        for k in range(n * n):
            (xa, ya), (xb, yb) = centre[k], centre[int(idx[k])]
            color = plt.cm.hsv(k / (n * n))
            if ok[k]:  # an arc (bulging by the student column) so that the links of one row do not hide each other
                bulge = (k % n - (n - 1) / 2 + 0.5) * cell * 0.5
                xs = xa - 0.5 + (size + gap + xb - xa) * arc
                ys = ya - 0.5 + (yb - ya) * arc - bulge * torch.sin(math.pi * arc)
                ax.plot(xs.numpy(), ys.numpy(), "-", color=color, lw=1.2)
                ax.plot([xa - 0.5, size + gap + xb - 0.5], [ya - 0.5, yb - 0.5], "o", color=color, ms=4)
            else:
                ax.plot(xa - 0.5, ya - 0.5, "x", color=color, ms=6)
        ax.set_title(title, fontsize=9)
        ax.set_axis_off()
    fig.suptitle(f"{args.local_loss} model, {args.arch}: crop A (student cells) -> crop B (teacher cells); "
                 f"boxes {[[round(v) for v in b.tolist()] for b in boxes]}, flips {flips.tolist()}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("backbone", help="a geo_dino.py run's backbone.pt")
    p.add_argument("out", help="the figure (PNG)")
    p.add_argument("--index", type=int, default=0, help="which training image")
    p.add_argument("--data-dir", default=None, help="where the run's data set is (default: the run's --data-dir)")
    a = p.parse_args(argv)
    saved = torch.load(a.backbone, map_location="cpu", weights_only=True)
    args = Namespace(**saved["args"])
    args.data_dir = a.data_dir or args.data_dir
    backbone = geo_dino.build_backbone(args)
    backbone.load_state_dict(saved["state_dict"])
    train, _, _ = geo_dino.load_datasets(args, rank=0)
    plot_matches(a.out, backbone, train, args, a.index)


if __name__ == "__main__":
    main()
