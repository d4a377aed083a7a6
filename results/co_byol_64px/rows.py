"""The table of docs/co_byol.md ("64 px: bounded receptive fields"), from the committed runs in this folder.

    python results/co_byol_64px/rows.py

Training runs (byol_sS, co_sS): training minutes, median img/s, the online k-NN (k = 200, 10k bank) at epoch 0
(the random network) and at the end, the final k-NN and linear readout on the whole training set. Then, per
network (trained, and at random initialisation: random_byol, random_co), eval_linear.py's readout
(eval_<name>/results.json): the .h linear probe on clean test images, its top-1 with 50-90 % of the local
representations dropped before pooling (internal masking), their mean, and that mean relative to clean.
"""
import json
import statistics
from pathlib import Path

R = Path(__file__).resolve().parent


def training_row(folder: Path) -> str:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    final = json.loads((folder / "final_metrics.json").read_text())
    knn = " / ".join(f"{r['knn_top1']:.2f}" for r in rows if "knn_top1" in r)
    speed = statistics.median(r["img_per_s"] for r in rows if "img_per_s" in r)
    return (f"| {folder.name} | {final['train_s'] / 60:.1f} | {speed:.1f} | {knn} | {final['knn_top1']:.2f} | "
            f"{final['linear_top1']:.2f} |")


def eval_row(folder: Path) -> str:
    res = json.loads((folder / "results.json").read_text())
    rob = res["robustness"]
    masked = " / ".join(f"{v:.2f}" for v in rob["masking"].values())
    return (f"| {folder.name.removeprefix('eval_')} | {res['linear']['final (.h)']:.2f} | {res['knn']['top1']:.2f} | "
            f"{masked} | {rob['masking_mean']:.2f} | {rob['masking_mean'] / rob['clean']:.3f} |")


def main() -> None:
    print("| run | training minutes (1 thread) | img/s | k-NN, 10k bank, epoch 0 / 1 | final k-NN | final linear |")
    print("|---|---|---|---|---|---|")
    for folder in sorted(R.glob("*_s[0-9]")):
        if not folder.name.startswith("eval_"):
            print(training_row(folder))
    print()
    print("| network | linear .h (clean) | k-NN (k = 20) | masked 50 / 60 / 70 / 80 / 90 % | masked mean | "
          "mean / clean |")
    print("|---|---|---|---|---|---|")
    for folder in sorted(R.glob("eval_*")):
        print(eval_row(folder))


if __name__ == "__main__":
    main()
