"""Table 1 and Fig. 3a of a bag_ssl.py run, laid out from its final_metrics.json (after training or --eval-only):

    python results/bag_ssl_report.py RUN_DIR [RUN_DIR ...]

writes RUN_DIR/table1.md (the paper's Table 1 layout: a row per classifier, a column per evaluation: the central
crop, N patches, Table 5's grid) and RUN_DIR/convergence.png (Fig. 3a: the cosine between the mean embedding of N
patches and the whole image's, against N), and prints the table.
"""
import json
import sys
from pathlib import Path

METHOD_NAMES = {"vicreg": "VICReg", "simclr": "SimCLR", "tcr": "TCR", "byol": "BYOL", "emp": "EMP-SSL"}


def table1_markdown(final: dict) -> str:
    """The paper's Table 1 layout for this run: a row per classifier, a column per evaluation."""
    res, cfg, a = final["eval"], final["eval_config"], final["args"]
    unit = "patch" if cfg["eval_crop"] == "patch" else "crop"
    cols = [("central", "Central crop")] + [
        (f"patches_{n}", f"{n} {unit}{'es' if unit == 'patch' else 's'}" if n > 1 else f"1 {unit}")
        for n in cfg["patches"]]
    if "grid_local" in res:
        g = cfg["grid"]
        cols += [("grid_mean", f"{g}x{g} grid, mean"),
                 ("grid_local", f"{g}x{g} grid, local 3x3/2 concat")]
    training = (f"patch-based ({a['patch_size']}x{a['patch_size']})" if a["crop"] == "patch"
                else f"multi-scale ({a['min_scale']:g}, 1)")
    lines = ["| Method | Pre-training | Classifier | " + " | ".join(c[1] for c in cols) + " |",
             "|---|---|---|" + "---|" * len(cols)]
    method = a.get("method_label") or METHOD_NAMES[a["loss"]]
    # runs before --eval-knn-k evaluated with the k of the online k-NN, --knn-k (20 then)
    for key, name in (("linear_top1", "linear"), ("knn_top1", f"k-NN (k={a.get('eval_knn_k', a.get('knn_k'))})")):
        if key in res["central"]:
            lines.append(f"| {method} ({a['arch']}) | {training} | {name} | "
                         + " | ".join(f"{res[c][key]:.1f}" for c, _ in cols) + " |")
    return "\n".join(lines) + "\n"


def plot_convergence(convergence: dict, path: Path, title: str) -> None:
    """convergence.png, as the paper's Fig. 3a: cos(aggregated N-patch, whole-image embedding)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(convergence["n"], convergence["cosine"], marker="o", label="N random patches")
    if "grid_cosine" in convergence:
        ax.axhline(convergence["grid_cosine"], color="C1", linestyle="--",
                   label=convergence["grid_label"])
    if "cosine_between_images" in convergence:
        ax.axhline(convergence["cosine_between_images"], color="gray", linestyle=":",
                   label="reference: two different whole images")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("N, patches aggregated"), ax.set_ylabel("cosine to whole-image embedding")
    ax.set_title(title, fontsize=9), ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(run_dirs: list[str]) -> None:
    for run_dir in map(Path, run_dirs):
        final = json.loads((run_dir / "final_metrics.json").read_text())
        a, cfg = final["args"], final["eval_config"]
        table = table1_markdown(final)
        (run_dir / "table1.md").write_text(table)
        plot_convergence(final["convergence"], run_dir / "convergence.png",
                         f"{a['arch']}, {a['crop']} training, {cfg['eval_crop']} "
                         f"{cfg['eval_patch_size']} px views, {cfg['test_images']} test images")
        print(f"{run_dir}: Table 1 layout (top-1 %)\n{table}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
