"""The 12-epoch table of docs/co_byol.md ("12 epochs"), from the committed runs in this folder.

    python results/laptop/rows12.py

Per run (byol12_sS: BYOL, co_byol12_sS: CO-BYOL, `--recipe laptop --epochs 12`, bf16; seeds 0-1 on the 2-core
AMD EPYC, seed 2 on a 2-core Intel Xeon with AMX-BF16):
training minutes, the online k-NN (k = 200, 10k bank) at epochs 0 / 3 / 6 / 9 / 12, the final k-NN and linear
readout on the whole training set. Then, per arm, the seeds' mean and spread (max - min) beside the same
networks at random initialisation (results/laptop/random_init, the fp32 readout of seeds 0-2) and beside the
3-epoch runs of the same seeds (*_sS/readout.json: 2-core Xeon, fp32).
"""
import json
from pathlib import Path

R = Path(__file__).resolve().parent
RANDOM_INIT = {0: (33.84, 35.24), 1: (31.23, 34.02), 2: (33.08, 34.20)}  # random_init/readout_seed*.json
EPOCHS = (0, 3, 6, 9, 12)


def read(folder: Path) -> tuple[list[dict], dict]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return rows, json.loads((folder / "final_metrics.json").read_text())


def run_row(folder: Path) -> str:
    rows, final = read(folder)
    knn = {round(r["epoch"]): r["knn_top1"] for r in rows if "knn_top1" in r}
    curve = " / ".join(f"{knn[e]:.2f}" for e in EPOCHS if e in knn)
    return (f"| {folder.name} | {final['train_s'] / 60:.1f} | {curve} | {final['knn_top1']:.2f} % | "
            f"{final['linear_top1']:.2f} % |")


def cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    mean, spread = sum(values) / len(values), max(values) - min(values)
    return " / ".join(f"{x:.2f}" for x in values) + f": **{mean:.2f}** ({spread:.2f})"


def main() -> None:
    print("| run | training minutes | k-NN, 10k bank, epoch 0 / 3 / 6 / 9 / 12 | final k-NN | final linear |")
    print("|---|---|---|---|---|")
    arms = {"BYOL": {}, "CO-BYOL": {}}
    three = {"BYOL": {}, "CO-BYOL": {}}
    for prefix, arm, short in (("byol12_s", "BYOL", "byol_s"), ("co_byol12_s", "CO-BYOL", "co_byol_s")):
        for folder in sorted(R.glob(prefix + "[0-9]")):
            print(run_row(folder))
            seed = int(folder.name[-1])
            _, final = read(folder)
            arms[arm][seed] = (final["knn_top1"], final["linear_top1"])
            r3 = json.loads((R / f"{short}{seed}" / "readout.json").read_text())
            three[arm][seed] = (r3["knn_top1"], r3["linear_top1"])
    seeds = sorted({s for v in arms.values() for s in v})
    print()
    print("| network | seeds | final k-NN: per seed: **mean** (spread) | final linear |")
    print("|---|---|---|---|")
    print(f"| random initialisation | {','.join(map(str, seeds))} | {cell([RANDOM_INIT[s][0] for s in seeds])} | "
          f"{cell([RANDOM_INIT[s][1] for s in seeds])} |")
    for arm in arms:
        for label, table in ((f"{arm}, 3 epochs (Xeon, fp32)", three[arm]), (f"{arm}, 12 epochs", arms[arm])):
            if table:
                v = [table[s] for s in sorted(table)]
                print(f"| {label} | {','.join(map(str, sorted(table)))} | {cell([x[0] for x in v])} | "
                      f"{cell([x[1] for x in v])} |")


if __name__ == "__main__":
    main()
