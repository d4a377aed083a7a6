"""The EMP-SSL lever search table of docs/bag_ssl.md, from the runs in this folder.

    python results/bag_ssl_laptop/emp_search/rows.py

Per run: its flags (besides the common ones in docs/bag_ssl.md), the loss terms at the first and last logged
step (coding rate, mean cosine to the image's mean patch projection, z_std: ~1 healthy, -> 0 collapsed), the
training minutes, and the readout: linear and k-NN (k = 20) on the mean of 16 patches and on the whole image
(2,000 / 1,000 images), the whole-image k-NN (k = 200, all 50,000 training images); last, the same network
at random initialisation (random_init_s0: bag_ssl.py --eval-only on results/co_byol_64px/random_backbone.py's
seed-0 network; its whole-image k-NN is results/laptop/random_init's).
"""
import json
from pathlib import Path

R = Path(__file__).resolve().parent


def row(folder: Path) -> str:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "coding_rate" in r]
    final = json.loads((folder / "final_metrics.json").read_text())
    a, ev = final["args"], final["eval"]
    terms = " -> ".join(f"{r['coding_rate']:.1f} / {r['cos_mean']:.3f} / {r['z_std']:.2f}" for r in (steps[0], steps[-1]))
    return (f"| {folder.name} | `--optimizer {a['optimizer']} --lr {a['lr']:g} --weight-decay {a['weight_decay']:g} "
            f"--emp-lambda {a['emp_lambda']:g}` | {terms} | {final['train_s'] / 60:.1f} | "
            f"{ev['patches_16']['linear_top1']:.1f} / {ev['patches_16']['knn_top1']:.1f} | "
            f"{ev['central']['linear_top1']:.1f} / {ev['central']['knn_top1']:.1f} | {final['knn_top1']:.2f} |")


def main() -> None:
    print("| run | flags | coding rate / cos to mean / z_std: first -> last logged step | training minutes | "
          "16 patches: linear / k-NN | whole image: linear / k-NN | whole-image k-NN, k = 200 |")
    print("|---|---|---|---|---|---|---|")
    for folder in sorted(p for p in R.iterdir() if (p / "metrics.jsonl").is_file()):
        print(row(folder))
    random = json.loads((R / "random_init_s0" / "final_metrics.json").read_text())["eval"]
    print(f"| random_init_s0 | the same network at random initialisation | | 0 | "
          f"{random['patches_16']['linear_top1']:.1f} / {random['patches_16']['knn_top1']:.1f} | "
          f"{random['central']['linear_top1']:.1f} / {random['central']['knn_top1']:.1f} | 33.84 (co_byol.md) |")


if __name__ == "__main__":
    main()
