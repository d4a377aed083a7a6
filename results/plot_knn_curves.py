"""k-NN top-1 against training minutes for several runs, one colour per method (the README's learning curve).

    python results/plot_knn_curves.py --out results/laptop/knn_curves.png \
        "BYOL=results/laptop/byol_s*" "CO-BYOL=results/laptop/co_byol_s*"

Each LABEL=GLOB names run folders (with metrics.jsonl) of one method; every run is one line, the seeds of a
method share its colour. Epoch 0 of every run is the network at random initialisation (dotted line: its
mean). Also prints a markdown table: final k-NN (whole training set as memory bank) per run, mean and
spread (max - min) per method.
"""
import argparse
import glob
import json
import statistics
from pathlib import Path


def load(run: Path):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    curve = [(r["train_s"] / 60, r["knn_top1"]) for r in rows if "knn_top1" in r]
    final = json.loads((run / "final_metrics.json").read_text()) if (run / "final_metrics.json").exists() else {}
    return curve, final


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("methods", nargs="+", help="LABEL=GLOB of run folders")
    ap.add_argument("--out", required=True, help="the PNG to write")
    ap.add_argument("--minutes", default="2-core CPU", help="how the runs were timed, for the x label")
    a = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    table = ["| method | runs | final k-NN top-1 (%), whole train set as bank | mean | spread (max - min) | "
             "random init (epoch 0, 10k bank) | training minutes |", "|---|---|---|---|---|---|---|"]
    randoms = []
    for i, spec in enumerate(a.methods):
        label, pattern = spec.split("=", 1)
        runs = sorted(Path(p) for p in glob.glob(pattern) if (Path(p) / "metrics.jsonl").exists())
        finals, minutes, rand = [], [], []
        for j, run in enumerate(runs):
            curve, final = load(run)
            ax.plot(*zip(*curve), marker="o", ms=3, color=f"C{i}", alpha=0.85, label=label if j == 0 else None)
            if curve and curve[0][0] == 0:
                rand.append(curve[0][1])
            if "knn_top1" in final:
                finals.append(final["knn_top1"])
                minutes.append(final.get("train_s", 0) / 60)
        randoms += rand
        if finals:
            spread = max(finals) - min(finals)
            table.append(f"| {label} | {len(finals)} | {', '.join(f'{x:.2f}' for x in finals)} | "
                         f"{statistics.mean(finals):.2f} | {spread:.2f} | "
                         f"{statistics.mean(rand):.2f} | {statistics.mean(minutes):.1f} |")
    if randoms:
        ax.axhline(statistics.mean(randoms), color="grey", ls=":", label="random init (epoch 0)")
    ax.set_xlabel(f"training minutes ({a.minutes}; evaluations excluded)")
    ax.set_ylabel("k-NN top-1 (%), CIFAR-10 test")
    ax.set_title("online k-NN (k=200, bank: 10k balanced train images)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=110)
    print("\n".join(table))


if __name__ == "__main__":
    main()
