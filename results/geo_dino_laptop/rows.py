"""The per-run table of docs/geo_dino.md ("Laptop recipe results"), from the committed runs in this folder.

    python results/geo_dino_laptop/rows.py                  # the runs in this folder
    python results/geo_dino_laptop/rows.py batched_crops    # the runs before 2026-12-07 (crops of a size batched)

One row per run folder (none_sS, sim_sS, geo_sS: the whole training set; sub100_*: 100 images per class):
training minutes, k-NN (k = 200) on the 10,000-image bank at every evaluation, the final k-NN and linear
readout on the whole training set, the online probe (runs before 2026-12-07), the global and local teachers'
entropy and KL(mean P_t || uniform) at the last logged step (log K = 8.32 nats for K = 4096), and
sim_geo_agree, the last epoch's mean.
"""
import json
import math
import sys
from pathlib import Path

R = Path(__file__).resolve().parent


def row(folder: Path, with_probe: bool) -> str:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    final = json.loads((folder / "final_metrics.json").read_text())
    knn = " / ".join(f"{r['knn_top1']:.2f}" for r in rows if "knn_top1" in r)
    last = [r for r in rows if "teacher_entropy" in r][-1]
    local = (f"{last['local_teacher_entropy']:.2f} / {last['local_teacher_kl_uniform']:.2f}"
             if "sim" in folder.name or "geo" in folder.name else "-")
    probe = f" {final['val_acc_h']:.2f} |" if with_probe else ""  # the online probe, removed 2026-12-07
    # the last epoch's mean sim_geo_agree: over its every step in runs before 2026-12-07 (their own row), since
    # then over its logged steps
    if "sim_geo_agree_epoch" in final:
        agree = final["sim_geo_agree_epoch"]
    else:
        start = math.ceil(final["epochs"]) - 1  # the last epoch began here (a run may stop within it)
        logged = [r["sim_geo_agree"] for r in rows if "sim_geo_agree" in r and r["epoch"] > start]
        agree = sum(logged) / len(logged)
    return (f"| {folder.name} | {final['train_s'] / 60:.1f} | {knn} | {final['knn_top1']:.2f} | "
            f"{final['linear_top1']:.2f} |{probe} {last['teacher_entropy']:.2f} / "
            f"{last['teacher_kl_uniform']:.2f} | {local} | {agree:.3f} |")


def main(folder: Path = R) -> None:
    order = {"none": 0, "sim": 1, "geo": 2}
    folders = [f for f in folder.iterdir() if (f / "final_metrics.json").exists()]
    with_probe = all("val_acc_h" in json.loads((f / "final_metrics.json").read_text()) for f in folders)
    print("| run | training minutes (1 thread) | k-NN, 10k bank, per evaluation | final k-NN | final linear | "
          + "online probe | " * with_probe + "global teacher: entropy / KL to uniform (nats) | local teacher: "
          "entropy / KL | sim_geo_agree (last epoch) |")
    print("|---" * (8 + with_probe) + "|")
    for f in sorted(folders, key=lambda f: (f.name.startswith("sub"), f.name[-1], order[f.name.split("_")[-2]])):
        print(row(f, with_probe))


if __name__ == "__main__":
    main(R / sys.argv[1] if len(sys.argv) > 1 else R)
