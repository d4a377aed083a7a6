"""The README's results table, from the committed runs: k-NN and linear readout of every laptop-recipe run.

    python results/summary.py            # prints the markdown table of README.md (links from the repo root)

Per method and seed it reads `final_metrics.json` of results/<folder>_s<seed>: `knn_top1` (k = 200 on the whole
training set), `linear_top1` (the logistic-regression readout on the same frozen features; for runs made before
it existed, the same readout computed afterwards by results/laptop/readout.py into `readout.json`) and `train_s`.
The random initialisation: readout.py's `random:S`, the network a seed-S run starts from, read in fp32 (as the
Xeon runs) and in bf16 (`--bf16`, as the runs with native bf16). Mean and spread
(max - min) over the seeds found. The CPU and precision of each run come from final_metrics.json's `environment`
(runs since 2026-12-07), else from its train.log ("amp ... (native bf16 / no native bf16 on this CPU)"): the runs so far were made on three 2-core machines, an Intel Xeon without
native bf16 ("Xeon"), an AMD EPYC with it ("EPYC") and an Intel Xeon with AMX-BF16 ("Xeon-AMX", CPU_OF below).
"""
import json
import statistics
from pathlib import Path

R = Path(__file__).resolve().parent
# (name, file and flags, run folders without the _s<seed> suffix); the 3-epoch DINO / CO-DINO runs
# (co_dino_laptop/dino_s*, co_dino_s*), the recipe before 12 epochs, are in docs/co_dino.md only
ROWS = [("BYOL", "co_byol.py --ws 0", "laptop/byol"), ("CO-BYOL", "co_byol.py --ws 0.2", "laptop/co_byol"),
        ("BYOL, 12 epochs", "co_byol.py --ws 0 --epochs 12", "laptop/byol12"),
        ("CO-BYOL, 12 epochs", "co_byol.py --ws 0.2 --epochs 12", "laptop/co_byol12"),
        ("DINO, 12 epochs", "co_dino.py --ws 0", "co_dino_laptop/dino12"),  # co_dino's recipe: 12 epochs
        ("CO-DINO, 12 epochs", "co_dino.py --ws 0.2", "co_dino_laptop/co_dino12"),
        ("DINO + 2 small crops", "geo_dino.py --local-loss none", "geo_dino_laptop/none"),
        ("+ local loss, sim. matching", "geo_dino.py --local-loss sim", "geo_dino_laptop/sim"),
        ("+ local loss, geo. matching", "geo_dino.py --local-loss geo", "geo_dino_laptop/geo"),
        ("BagSSL, 14x14 patches", "bag_ssl.py", "bag_ssl_laptop/patch"),
        ("EMP-SSL, 20 patches, 1 epoch", "bag_ssl.py --recipe laptop-emp", "bag_ssl_laptop/emp")]


def seeds_of(prefix: str) -> dict[int, dict]:
    """seed -> final_metrics.json of results/<prefix>_s<seed>, with `linear_top1` from readout.json if missing."""
    out = {}
    for s in range(10):
        folder = R / f"{prefix}_s{s}"
        if (folder / "final_metrics.json").exists():
            final = json.loads((folder / "final_metrics.json").read_text())
            if "linear_top1" not in final:  # runs older than the readout: results/laptop/readout.py
                final["linear_top1"] = json.loads((folder / "readout.json").read_text())["linear_top1"]
            out[s] = final
    return out


# runs whose train.log does not tell their CPU: the device line of the 2-core Intel Xeon with AMX-BF16 (2026-12-06
# and 2026-12-07) reads "native bf16", as the EPYC's does
CPU_OF = {"laptop/byol12_s2": "Xeon-AMX", "laptop/co_byol12_s2": "Xeon-AMX",
          **{f"geo_dino_laptop/{loss}_s{s}": "Xeon-AMX" for loss in ("none", "sim", "geo") for s in (0, 1)}}


# runs stopped and resumed on more threads than they started with (their train.log says so)
THREADS_NOTE = {"co_dino_laptop/co_dino12_s1": " (1, then 2 threads)"}


def machine(folder: Path) -> str:
    """'Xeon fp32', 'EPYC fp32', 'EPYC bf16' or 'Xeon-AMX bf16': from final_metrics.json's environment (runs since
    2026-12-07), else from the run's train.log (its device line) and CPU_OF."""
    envs = json.loads((folder / "final_metrics.json").read_text()).get("environment")
    if envs:
        names = []
        for env in envs:  # one per process: a resumed run may have moved
            cpu = "EPYC" if "EPYC" in env["cpu"] else "Xeon-AMX" if "amx_bf16" in env["cpu_flags"] else "Xeon"
            names.append(f"{cpu} {'bf16' if env['precision'] == 'bfloat16' else 'fp32'}")
        return " + ".join(dict.fromkeys(names))
    line = next(l for l in (folder / "train.log").read_text().splitlines() if " amp " in l)
    cpu = CPU_OF.get(folder.relative_to(R).as_posix(), "Xeon" if "no native bf16" in line else "EPYC")
    return f"{cpu} {'bf16' if 'bfloat16' in line else 'fp32'}"


def cell(values: list[float]) -> str:
    """'a / b / c: **mean** (spread)', or the one value."""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    spread = max(values) - min(values)
    return f"{' / '.join(f'{v:.2f}' for v in values)}: **{statistics.mean(values):.2f}** ({spread:.2f})"


def main() -> None:
    print("| method | seeds | k-NN top-1 %: per seed: **mean** (spread) | linear top-1 % | minutes per seed "
          "(1 thread) | CPU, precision | runs |")
    print("|---|---|---|---|---|---|---|")
    for suffix, name, where in (("", "same network at random initialisation", "fp32"),
                                ("_bf16", "the same, read in bf16", "Xeon-AMX bf16")):  # as the runs of each precision
        init = [json.loads((R / f"laptop/random_init/readout_seed{s}{suffix}.json").read_text()) for s in (0, 1, 2)]
        print(f"| {name} | 0,1,2 | {cell([r['knn_top1'] for r in init])} | {cell([r['linear_top1'] for r in init])} "
              f"| 0 | {where} | [random_init](results/laptop/random_init) |")
    for name, flags, prefix in ROWS:
        runs = seeds_of(prefix)
        if not runs:
            continue
        minutes = " / ".join(f"{f['train_s'] / 60:.1f}{THREADS_NOTE.get(f'{prefix}_s{s}', '')}"
                             for s, f in runs.items())
        machines = [machine(R / f"{prefix}_s{s}") for s in runs]
        groups = {m: ",".join(str(s) for s, ms in zip(runs, machines) if ms == m) for m in dict.fromkeys(machines)}
        where = machines[0] if len(groups) == 1 else ", ".join(
            f"{m} ({'seeds' if ',' in s else 'seed'} {s})" for m, s in groups.items())
        folder, seeds = Path(prefix).parent, ",".join(str(s) for s in runs)
        knn, linear = cell([f["knn_top1"] for f in runs.values()]), cell([f["linear_top1"] for f in runs.values()])
        print(f"| {name} (`{flags}`) | {seeds} | {knn} | {linear} | {minutes} | {where} | "
              f"[{folder}](results/{folder}) |")


if __name__ == "__main__":
    main()
