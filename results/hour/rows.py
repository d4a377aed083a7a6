"""The search table of results/hour/README.md ("Runs"), from the committed runs in this folder.

    python results/hour/rows.py

Per run folder (R<n>_<name>, each a `--val-split 5000` run; the change against its reference is read from its
arguments): the online k-NN (k = 200, 10,000-image bank, the 5,000 held-out images as queries) at every epoch,
epoch 0 being the same network at random initialisation; the final k-NN and linear readout (the 45,000-image
bank); training minutes; the machine and precision from the run's own environment row.
"""
import json
from pathlib import Path

R = Path(__file__).resolve().parent
# The reference recipes' arguments: a run's "change" is every argument that differs from its method's reference.
REFERENCE = {"co_dino": "R2_dino", "co_byol": "R6_byol"}
IGNORED = {"output_dir", "data_dir", "given_flags", "seed"}


def read(folder: Path) -> tuple[list[dict], dict]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return rows, json.loads((folder / "final_metrics.json").read_text())


def change(final: dict, reference: dict | None) -> str:
    if reference is None:
        return "(no reference run)"
    a, b = final["args"], reference["args"]
    diff = [f"--{k.replace('_', '-')} {a[k]}" for k in sorted(a) if k not in IGNORED and a.get(k) != b.get(k)]
    return " ".join(diff) or "(same arguments)"


def run_row(folder: Path, finals: dict) -> str:
    rows, final = read(folder)
    knn = [f"{r['knn_top1']:.2f}" for r in rows if "knn_top1" in r]
    env = final["environment"][0]
    machine = f"{env['cpu']} ({', '.join(env['cpu_flags']) or 'no AVX'}), {env['threads']} thread(s), {env['precision']}"
    method = "co_dino" if "teacher_temp" in final["args"] else "co_byol"
    what = "(reference)" if folder.name == REFERENCE[method] else change(final, finals.get(REFERENCE[method]))
    return (f"| {folder.name} | {what} | {' / '.join(knn)} | {final['knn_top1']:.2f} / "
            f"{final['linear_top1']:.2f} | {final['train_s'] / 60:.1f} | {machine} | [{folder.name}]({folder.name}) |")


def main() -> None:
    folders = sorted(f for f in R.iterdir() if f.is_dir() and (f / "final_metrics.json").exists())
    finals = {f.name: read(f)[1] for f in folders}
    print("| run | change | k-NN % (10,000-image bank), epochs 0 / 1 / 2 / 3 | final k-NN / linear % (45,000-image "
          "bank) | minutes | machine | folder |")
    print("|---|---|---|---|---|---|---|")
    for folder in folders:
        print(run_row(folder, finals))


if __name__ == "__main__":
    main()
