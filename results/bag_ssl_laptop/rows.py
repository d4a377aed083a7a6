"""The laptop table of docs/bag_ssl.md ("Laptop recipe results"), from the runs in this folder.

    python results/bag_ssl_laptop/rows.py

Per arm and seed (0 / 1, then the mean in bold): the bag-of-patch evaluation's top-1 (linear, then k-NN with
k = 20, on 5,000 / 2,000 images) of the whole image and of the mean embedding of 1, 16 and 64 views, and the
whole-image k-NN (k = 200) on all 50,000 / 10,000 images. Arms: patch_sS (BagSSL, BYOL loss, 14x14 patches),
multiscale_sS (the bag-of-crops evaluation of co_byol.py's BYOL laptop backbones, the multi-scale arm's
training bit for bit: their whole-image k-NN is results/laptop/byol_sS/readout.json's), emp_sS (EMP-SSL,
`--loss emp --num-patches 20`, 1 epoch) and random_sS (the network every arm of seed S starts from, at random
initialisation, read with patches: its whole-image k-NN is results/laptop/random_init's).
"""
import json
import statistics
from pathlib import Path

R = Path(__file__).resolve().parent
LAPTOP = R.parent / "laptop"
ARMS = (("patch", "patch 14x14"), ("multiscale", "multi-scale (0.08, 1)"), ("emp", "EMP-SSL, 20 patches, 1 epoch"),
        ("random", "random initialisation, read with 14x14 patches"))


def whole_image_knn(arm: str, seed: int, final: dict) -> float:
    if arm == "multiscale":
        return json.loads((LAPTOP / f"byol_s{seed}" / "readout.json").read_text())["knn_top1"]
    if arm == "random":
        return json.loads((LAPTOP / "random_init" / f"readout_seed{seed}.json").read_text())["knn_top1"]
    return final["knn_top1"]


def cell(values: list[float], digits: int = 1) -> str:
    text = " / ".join(f"{v:.{digits}f}" for v in values)
    return f"{text}: **{statistics.mean(values):.{digits}f}**" if len(values) > 1 else text


def main() -> None:
    print("| top-1 %, seed 0 / 1: **mean** | Central (whole image) | 1 patch / crop | 16 | 64 | "
          "whole-image k-NN (k = 200, all 50k) |")
    print("|---|---|---|---|---|---|")
    for arm, label in ARMS:
        runs = [(s, json.loads((R / f"{arm}_s{s}" / "final_metrics.json").read_text())) for s in (0, 1)
                if (R / f"{arm}_s{s}" / "final_metrics.json").is_file()]
        if not runs:
            continue
        for clf, name in (("linear_top1", "linear"), ("knn_top1", "k-NN (k = 20)")):
            cols = [cell([f["eval"][key][clf] for _, f in runs]) for key in
                    ("central", "patches_1", "patches_16", "patches_64")]
            knn = cell([whole_image_knn(arm, s, f) for s, f in runs], 2) if clf == "linear_top1" else ""
            print(f"| {label}, {name} | {' | '.join(cols)} | {knn} |")


if __name__ == "__main__":
    main()
