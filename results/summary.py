"""The README's results table, from the committed runs: k-NN and linear readout of every laptop-recipe run.

    python results/summary.py            # prints the markdown table of README.md (links from the repo root)

Per method and seed it reads `final_metrics.json` of results/<folder>_s<seed>: `knn_top1` (k = 200 on the whole
training set), `linear_top1` (the logistic-regression readout on the same frozen features; for runs made before
it existed, the same readout computed afterwards by results/laptop/readout.py into `readout.json`) and `train_s`.
The random initialisation: readout.py's `random:S`, the network a seed-S run starts from. Mean and spread (max - min) over the seeds found.
"""
import json
import statistics
from pathlib import Path

R = Path(__file__).resolve().parent
# (name, file and flags, run folders without the _s<seed> suffix)
ROWS = [("BYOL", "co_byol.py --ws 0", "laptop/byol"), ("CO-BYOL", "co_byol.py --ws 0.2", "laptop/co_byol"),
        ("DINO", "co_dino.py --ws 0", "co_dino_laptop/dino"), ("CO-DINO", "co_dino.py --ws 0.2", "co_dino_laptop/co_dino")]


def seeds_of(prefix: str) -> dict[int, dict]:
    out = {}
    for s in range(10):
        path = R / f"{prefix}_s{s}" / "final_metrics.json"
        if path.exists():
            final = json.loads(path.read_text())
            readout, offline = R / f"{prefix}_s{s}" / "readout.json", R / f"{prefix}_s{s}" / "eval_results.json"
            if "linear_top1" not in final and readout.exists():  # results/laptop/readout.py, for older runs
                final["linear_top1"] = json.loads(readout.read_text())["linear_top1"]
            elif "linear_top1" not in final and offline.exists():
                final["linear_offline"] = json.loads(offline.read_text())["linear"]["final (.h)"]
            out[s] = final
    return out


def cell(values: list[float]) -> str:
    """'a / b / c: mean (spread)', or the one value."""
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{' / '.join(f'{v:.2f}' for v in values)}: **{statistics.mean(values):.2f}** ({max(values) - min(values):.2f})"


def random_init() -> tuple[list[float], list[float]]:
    """k-NN and linear readout of the laptop network at random initialisation, seeds 0-2 (readout.py random:S)."""
    runs = [json.loads((R / f"laptop/random_init/readout_seed{s}.json").read_text()) for s in (0, 1, 2)]
    return [r["knn_top1"] for r in runs], [r["linear_top1"] for r in runs]


def main() -> None:
    print("| method | seeds | k-NN top-1 %: per seed: **mean** (spread) | linear top-1 % | training minutes, mean | runs |")
    print("|---|---|---|---|---|---|")
    knn, lin = random_init()
    print(f"| same network at random initialisation | 0,1,2 | {cell(knn)} | {cell(lin)} | 0 | "
          "[random_init](results/laptop/random_init) |")
    for name, flags, prefix in ROWS:
        runs = seeds_of(prefix)
        if not runs:
            continue
        knn = [f["knn_top1"] for f in runs.values()]
        lin = [f["linear_top1"] for f in runs.values() if "linear_top1" in f]
        offline = {s: f["linear_offline"] for s, f in runs.items() if "linear_offline" in f}
        linear = cell(lin) if lin else "; ".join(f"{v:.2f} (seed {s}, offline)" for s, v in offline.items())
        minutes = statistics.mean(f["train_s"] / 60 for f in runs.values())
        seeds = ",".join(str(s) for s in runs)
        print(f"| {name} (`{flags}`) | {seeds} | {cell(knn)} | {linear} | {minutes:.1f} | "
              f"[{Path(prefix).parent}](results/{Path(prefix).parent}) |")


if __name__ == "__main__":
    main()
