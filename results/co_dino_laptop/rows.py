"""The 12-epoch table of docs/co_dino.md ("Longer: 12 epochs"), from the committed runs in this folder.

    python results/co_dino_laptop/rows.py

Per run (dino12_sS: DINO, co_dino12_sS: CO-DINO, `--epochs 12`): training minutes, the online k-NN (k = 200,
10k bank) at epochs 0 / 3 / 6 / 9 / 12, the final k-NN and linear readout on the whole training set, and the
teacher entropy at the end (collapse monitor). Then, per arm, the seeds' mean and spread (max - min) beside
the same networks at random initialisation (results/laptop/random_init, the fp32 readout of seeds 0-2).
"""
import json
from pathlib import Path

R = Path(__file__).resolve().parent
RANDOM_INIT = {0: (33.84, 35.24), 1: (31.23, 34.02), 2: (33.08, 34.20)}  # results/laptop/random_init: k-NN, linear
EPOCHS = (0, 3, 6, 9, 12)


def read(folder: Path) -> tuple[list[dict], dict]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return rows, json.loads((folder / "final_metrics.json").read_text())


def run_row(folder: Path) -> str:
    rows, final = read(folder)
    knn = {round(r["epoch"]): r["knn_top1"] for r in rows if "knn_top1" in r}
    entropy = [r["teacher_entropy"] for r in rows if "teacher_entropy" in r][-1]
    curve = " / ".join(f"{knn[e]:.2f}" for e in EPOCHS if e in knn)
    return (f"| {folder.name} | {final['train_s'] / 60:.1f} | {curve} | {final['knn_top1']:.2f} % | "
            f"{final['linear_top1']:.2f} % | {entropy:.2f} |")


def arm_row(name: str, values: dict) -> str:
    def cell(i: int) -> str:
        v = [values[s][i] for s in sorted(values)]
        if len(v) == 1:
            return f"{v[0]:.2f}"
        return (" / ".join(f"{x:.2f}" for x in v) + f": **{sum(v) / len(v):.2f}** ({max(v) - min(v):.2f})")
    return f"| {name} | {','.join(map(str, sorted(values)))} | {cell(0)} | {cell(1)} |"


def main() -> None:
    print("| run | training minutes | k-NN, 10k bank, epoch 0 / 3 / 6 / 9 / 12 | final k-NN | final linear | "
          "teacher entropy at the end (nats) |")
    print("|---|---|---|---|---|---|")
    arms = {"DINO, 12 epochs": {}, "CO-DINO, 12 epochs": {}}
    for prefix, arm in (("dino12_s", "DINO, 12 epochs"), ("co_dino12_s", "CO-DINO, 12 epochs")):
        for folder in sorted(R.glob(prefix + "[0-9]")):
            print(run_row(folder))
            _, final = read(folder)
            arms[arm][int(folder.name[-1])] = (final["knn_top1"], final["linear_top1"])
    seeds = sorted({s for v in arms.values() for s in v})
    print()
    print("| network | seeds | final k-NN: per seed: **mean** (spread) | final linear |")
    print("|---|---|---|---|")
    print(arm_row("random initialisation", {s: RANDOM_INIT[s] for s in seeds}))
    for name, values in arms.items():
        if values:
            print(arm_row(name, values))


if __name__ == "__main__":
    main()
