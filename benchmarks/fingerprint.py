"""Behaviour fingerprint of the four method files: tiny fixed-seed CPU runs of each (the tests' TINY configs and a
few variants) -> the sha256 of the final backbone and of every checkpointed tensor, the logged losses and the k-NN
rows. A refactoring that should not change what is trained must leave the backbones, losses and k-NN rows equal.

    python benchmarks/fingerprint.py run . /tmp/after.json            # this tree (one thread per run, ~2.5 min)
    python benchmarks/fingerprint.py run /tmp/old /tmp/before.json    # another checkout (git worktree add /tmp/old REF)
    python benchmarks/fingerprint.py compare /tmp/before.json /tmp/after.json

`compare` ignores the metrics that measure time or memory and the keys only one side logs (a removed monitor).
"""
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

# what a run writes that is not what it computes: timings, and where it ran (the environment rows, commit included)
TIMING = {"img_per_s", "peak_mem_mb", "train_s", "knn_s", "wall_s", "wall_s_total", "eval_wall_s", "eval_s",
          "environment"}


def tiny_configs(repo: Path) -> dict:
    tiny = {}
    for m in ["co_byol", "co_dino", "bag_ssl", "geo_dino"]:
        src = (repo / "tests" / f"test_{m}.py").read_text()
        start = src.index("TINY = ")
        ns = {}
        exec(src[start:src.index("]\n", start) + 1], ns)
        tiny[m] = ns["TINY"]
    return {"co_byol_ws0.2": ("co_byol", tiny["co_byol"]),
            "co_byol_ws0_multicrop": ("co_byol", tiny["co_byol"] + ["--ws", "0", "--small-crops", "2",
                                                                     "--small-crop-size", "8"]),
            "co_byol_shared_grid_sgd": ("co_byol", tiny["co_byol"] + ["--shared-head", "--local-grid", "2",
                                                                       "--optimizer", "sgd"]),
            "co_dino_ws0.2": ("co_dino", tiny["co_dino"]),
            "co_dino_ws0_multicrop": ("co_dino", tiny["co_dino"] + ["--ws", "0", "--small-crops", "2",
                                                                     "--small-crop-size", "8"]),
            "bag_ssl_vicreg": ("bag_ssl", tiny["bag_ssl"]),
            "bag_ssl_emp": ("bag_ssl", tiny["bag_ssl"] + ["--loss", "emp", "--num-patches", "4"]),
            "geo_dino_geo": ("geo_dino", tiny["geo_dino"]),
            "geo_dino_sim": ("geo_dino", tiny["geo_dino"] + ["--local-loss", "sim"]),
            "geo_dino_none_adamw": ("geo_dino", tiny["geo_dino"] + ["--local-loss", "none", "--optimizer", "adamw",
                                                                     "--lr", "5e-4"])}


def tensor_hash(obj, h=None, key=""):
    h = h or hashlib.sha256()
    if isinstance(obj, torch.Tensor):
        h.update(key.encode())
        h.update(obj.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if obj.numel() else b"")
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            tensor_hash(obj[k], h, f"{key}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            tensor_hash(v, h, f"{key}.{i}")
    return h


def run(repo: Path, out: Path, only: list[str]) -> None:
    result, env = {}, dict(os.environ, OMP_NUM_THREADS="1")
    for name, (method, argv) in tiny_configs(repo).items():
        if only and name not in only:
            continue
        with tempfile.TemporaryDirectory() as d:
            proc = subprocess.run([sys.executable, f"{method}.py", *argv, "--output-dir", d], cwd=repo, env=env,
                                  capture_output=True, text=True)
            if proc.returncode:
                result[name] = {"error": proc.stderr[-2000:]}
                continue
            ckpt = torch.load(Path(d) / "checkpoint.pt", map_location="cpu", weights_only=True)
            states = {k: v for k, v in ckpt.items() if isinstance(v, dict) and k not in ("args", "history", "rng")}
            backbone = torch.load(Path(d) / "backbone.pt", map_location="cpu", weights_only=True)["state_dict"]
            rows = [json.loads(line) for line in (Path(d) / "metrics.jsonl").read_text().splitlines()]
            result[name] = {"backbone": tensor_hash(backbone).hexdigest()[:16],
                            "state": tensor_hash(states).hexdigest()[:16],
                            "rows": [{k: v for k, v in r.items() if k not in TIMING} for r in rows
                                     if "environment" not in r]}
        print(name, result[name].get("backbone", "ERROR"), flush=True)
    out.write_text(json.dumps(result, indent=1, sort_keys=True))


def compare(a: Path, b: Path) -> int:
    before, after, differ = json.loads(a.read_text()), json.loads(b.read_text()), 0
    for name in sorted(set(before) & set(after)):
        x, y = before[name], after[name]
        rows = lambda r: [{k: v for k, v in row.items() if k in common} for row in r["rows"]  # noqa: E731
                          if any(k in common for k in row if k not in ("step", "epoch"))]
        common = ({k for r in x["rows"] for k in r} & {k for r in y["rows"] for k in r})
        same = {"backbone": x["backbone"] == y["backbone"], "losses and k-NN rows": rows(x) == rows(y)}
        differ += not all(same.values())
        print(f"{name:28s} " + ", ".join(f"{k} {'equal' if v else 'DIFFER'}" for k, v in same.items()))
    return differ


if __name__ == "__main__":
    if sys.argv[1] == "run":
        run(Path(sys.argv[2]).resolve(), Path(sys.argv[3]), sys.argv[4:])
    else:
        sys.exit(compare(Path(sys.argv[2]), Path(sys.argv[3])))
