"""One batch of training views per method file, as the current code makes them (views on the device): each row an
image of CIFAR-10's training set, then its views in MultiView's order, with each file's --recipe laptop.

    python results/views/draw.py DATA_DIR        # writes results/views/{co_byol,co_dino,bag_ssl,geo_dino}.png
"""
import importlib
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
EXTRA = {"co_byol": ["--small-crops", "2"], "co_dino": ["--small-crops", "2"], "bag_ssl": [], "geo_dino": []}


def draw(name: str, data_dir: str, n: int = 6) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = importlib.import_module(name)
    args = m.parse_args(["--recipe", "laptop", "--dataset", "cifar10", "--data-dir", data_dir, *EXTRA[name]])
    train, _, _ = m.load_datasets(args, 0)
    images = torch.stack([m.as_tensors(train, args.image_size)[i][0] for i in range(n)]).float() / 255
    views = m.MultiView(args)(images, torch.Generator().manual_seed(0))
    if name == "geo_dino":
        views = views[0]  # (crops, boxes, flips): the crops
    cols = 1 + len(views)
    fig, axes = plt.subplots(n, cols, figsize=(1.3 * cols, 1.3 * n))
    for r in range(n):
        for c, img in enumerate([images[r]] + [v[r] for v in views]):
            axes[r, c].imshow(img.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            axes[r, c].set_axis_off()
            if r == 0:
                axes[r, c].set_title("image" if c == 0 else f"view {c}", fontsize=7)
    fig.suptitle(f"{name}.py --recipe laptop {' '.join(EXTRA[name])}: one batch of views (seed 0)", fontsize=8)
    fig.tight_layout()
    out = Path(__file__).resolve().parent / f"{name}.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


if __name__ == "__main__":
    for method in EXTRA:
        print(draw(method, sys.argv[1] if len(sys.argv) > 1 else "data"))
