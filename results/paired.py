"""The one standard for comparing two arms (issue 39): per-seed paired differences (same seed, so the same initial
network and the same views' seed), their mean, and two simple tests with n stated: the sign test (exact, two-sided)
and the paired t test (two-sided). The wording follows the tests: "ahead on every seed, p = ..." or "no difference
shown with n = ...". The verdict follows the paired t test; no sign test can reach p < 0.05 with 3 seeds (its
smallest two-sided p is 0.25), so a sign shared by every seed is reported as such, never alone as a finding.

    python results/paired.py results/laptop/byol_s results/laptop/co_byol_s          # CO-BYOL minus BYOL
    python results/paired.py results/geo_dino_laptop/none_s results/geo_dino_laptop/geo_s --seeds 0,1
    python results/paired.py --all      # results/README.md's "Comparisons": every claim's test

Each arm is a folder prefix before the seed: PREFIX{seed}/final_metrics.json (`linear_top1` from readout.json
for runs older than the readout, as results/summary.py reads them).
"""
import argparse
import json
import math
import sys
from pathlib import Path

KEYS = ("knn_top1", "linear_top1")


def sign_test(diffs: list[float]) -> float:
    """Two-sided exact sign test (zeros dropped): the probability of a split at least this uneven under p = 1/2."""
    pos, neg = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    n = pos + neg
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(pos, neg) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def t_test(diffs: list[float]) -> tuple[float, float]:
    """Paired t test: (t, two-sided p) with n - 1 degrees of freedom (Simpson's rule on Student's density)."""
    n = len(diffs)
    if n < 2:
        return float("nan"), float("nan")
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    if sd == 0:
        return math.copysign(math.inf, mean) if mean else 0.0, 0.0 if mean else 1.0
    t, df = mean / (sd / math.sqrt(n)), n - 1
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    density = lambda x: c * (1 + x * x / df) ** (-(df + 1) / 2)
    steps, x_max = 4000, abs(t)
    h = x_max / steps
    area = density(0) + density(x_max) + sum((4 if i % 2 else 2) * density(i * h) for i in range(1, steps))
    return t, max(0.0, 1 - 2 * area * h / 3)


def describe(diffs: list[float], what: str = "B") -> str:
    """The sentence the standard allows for these paired differences: the verdict follows the paired t test
    (p < 0.05), the sign test is stated beside it (with n = 2 or 3 it cannot go below 0.5 or 0.25)."""
    n, p_sign = len(diffs), sign_test(diffs)
    t, p_t = t_test(diffs)
    mean = sum(diffs) / n
    ahead = "ahead" if mean > 0 else "behind"
    every = all(d > 0 for d in diffs) or all(d < 0 for d in diffs)
    tests = f"paired t p = {p_t:.2g}, sign test p = {p_sign:.2g}, n = {n}"
    if p_t < 0.05:
        verdict = f"{what} {ahead}{' on every seed' if every else ''} ({tests})"
    elif every:
        verdict = f"{what} {ahead} on every seed, no difference shown with n = {n} ({tests})"
    else:
        verdict = f"no difference shown with n = {n} ({tests})"
    return f"{' / '.join(f'{d:+.2f}' for d in diffs)}: mean {mean:+.2f}; {verdict}"


def read(folder: Path) -> dict:
    """final_metrics.json, with `linear_top1` from readout.json for runs older than the readout (as summary.py)."""
    if not (folder / "final_metrics.json").exists():
        raise SystemExit(f"paired.py: error: no final_metrics.json in {folder}")
    final = json.loads((folder / "final_metrics.json").read_text())
    if "linear_top1" not in final and (folder / "readout.json").exists():
        final["linear_top1"] = json.loads((folder / "readout.json").read_text())["linear_top1"]
    return final


def arm(prefix: str, seeds: list[int]) -> dict:
    return {s: read(Path(f"{prefix}{s}")) for s in seeds}


R = Path(__file__).resolve().parent
# The project's comparisons (results/README.md, "Comparisons"): (B, A, the folders' prefixes under results/, seeds)
COMPARISONS = [("CO-BYOL - BYOL, 3 epochs", "laptop/co_byol_s", "laptop/byol_s", "0,1,2"),
               ("CO-BYOL - BYOL, 12 epochs", "laptop/co_byol12_s", "laptop/byol12_s", "0,1,2"),
               ("CO-DINO - DINO, 12 epochs", "co_dino_laptop/co_dino12_s", "co_dino_laptop/dino12_s", "0,1,2"),
               ("geo_dino: sim - none", "geo_dino_laptop/sim_s", "geo_dino_laptop/none_s", "0,1"),
               ("geo_dino: geo - none", "geo_dino_laptop/geo_s", "geo_dino_laptop/none_s", "0,1"),
               ("geo_dino: geo - sim", "geo_dino_laptop/geo_s", "geo_dino_laptop/sim_s", "0,1"),
               *[(f"geo_dino, 100 per class: {b} - {a}", f"geo_dino_laptop/sub100_{b}_s",
                  f"geo_dino_laptop/sub100_{a}_s", "0,1") for b, a in (("sim", "none"), ("geo", "none"),
                                                                           ("geo", "sim"))]]


def learning(prefix: str, seeds: list[int], key: str) -> list[float] | None:
    """Per seed: the run's last online readout minus its epoch-0 one (the same network at random initialisation,
    the same 10k bank, the same precision, the same process): the learning claim's own reference."""
    diffs = []
    for s in seeds:
        rows = [json.loads(line) for line in (R / f"{prefix}{s}" / "metrics.jsonl").read_text().splitlines()]
        evals = [r for r in rows if key in r and "step" in r]
        if not evals or evals[0]["step"] != 0:
            return None
        diffs.append(evals[-1][key] - evals[0][key])
    return diffs


def all_comparisons() -> str:
    """The markdown of results/README.md's "Comparisons" section."""
    sys.path.insert(0, str(R))
    import summary  # the README table's rows

    lines = ["| comparison | readout | per seed: B - A, mean; verdict |", "|---|---|---|"]
    for name, _, prefix in summary.ROWS:
        seeds = sorted(summary.seeds_of(prefix))
        for key in KEYS:
            diffs = learning(f"{prefix}_s", seeds, key)
            if diffs:
                lines.append(f"| {name}: last online readout - epoch 0 | {key} (10k bank) | "
                             f"{describe(diffs, 'trained')} |")
    for label, b, a, seeds in COMPARISONS:
        seeds = [int(s) for s in seeds.split(",")]
        runs_a, runs_b = arm(str(R / a), seeds), arm(str(R / b), seeds)
        for key in KEYS:
            what = label.split(": ")[-1].split(" - ")[0]  # B's name
            lines.append(f"| {label} | {key} | {describe([runs_b[s][key] - runs_a[s][key] for s in seeds], what)} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", nargs="?", help="arm A: folder prefix before the seed (e.g. results/laptop/byol_s)")
    p.add_argument("b", nargs="?", help="arm B: folder prefix before the seed")
    p.add_argument("--seeds", default="0,1,2", help="the seeds both arms ran")
    p.add_argument("--keys", default=",".join(KEYS), help="final_metrics.json entries to compare")
    p.add_argument("--all", action="store_true", help="print the project's comparisons as markdown")
    args = p.parse_args(argv)
    if args.all:
        print(all_comparisons())
        return
    if not (args.a and args.b):
        p.error("give two arms (A and B), or --all")
    seeds = [int(s) for s in args.seeds.split(",")]
    a, b = arm(args.a, seeds), arm(args.b, seeds)
    for key in args.keys.split(","):
        diffs = [b[s][key] - a[s][key] for s in seeds]
        print(f"{key}, B - A per seed {seeds}: {describe(diffs)}")


if __name__ == "__main__":
    main()
