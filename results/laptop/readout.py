"""k-NN and linear readout of a laptop backbone, as the runs log them at their end (for runs older than the readout).

    python results/laptop/readout.py runs/laptop/byol_s1/backbone.pt results/laptop/byol_s1/readout.json
    python results/laptop/readout.py random:1 results/laptop/random_init/readout_seed1.json
    python results/laptop/readout.py random:1 results/laptop/random_init/readout_seed1_bf16.json --bf16

The features, the k-NN (k = 200 on the whole training set) and `linear_top1` (the logistic regression on the
same frozen features) are co_byol.py's KNNMonitor with `full_bank=True`, i.e. what a run now writes as
`knn_top1` / `linear_top1` in final_metrics.json. `random:S` is the network a seed-S run starts from
(`torch.manual_seed(S)`, then co_byol.OnlineNetwork of the laptop recipe: what main() builds before its first step).
`--bf16`: the features in bf16 autocast, as the runs with `--amp auto` on a CPU with native bf16 read them (the
default is fp32, as the runs on the Xeon without it): the random reference evaluated as its runs are.
"""
import contextlib
import types
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import co_byol  # noqa: E402
import eval_linear  # noqa: E402

bf16 = "--bf16" in sys.argv
source, out_path, *rest = [a for a in sys.argv[1:] if a != "--bf16"]
out_path = Path(out_path)
args = co_byol.parse_args(["--recipe", "laptop", "--ws", "0", "--num-workers", "0"] + rest)
if source.startswith("random:"):
    torch.manual_seed(int(source.split(":")[1]))
    backbone = co_byol.OnlineNetwork(args).encoder.backbone
else:
    backbone, _ = eval_linear.load_backbone(source)
backbone = backbone.to(memory_format=torch.channels_last)
train_base, val, num_classes = co_byol.load_datasets(args, 0)
autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
cpu = types.SimpleNamespace(device=torch.device("cpu"), autocast=autocast)  # a Run's fields
monitor = co_byol.KNNMonitor(args, train_base, val, num_classes, cpu)
start = time.time()
result = monitor(backbone, full_bank=True)
out = {"backbone": source, **result, "readout_s": round(time.time() - start, 1),
       "torch_threads": torch.get_num_threads(), "precision": "bfloat16" if bf16 else "float32",
       "how": "results/laptop/readout.py"}
out_path.parent.mkdir(parents=True, exist_ok=True)
out_path.write_text(json.dumps(out, indent=1))
print(json.dumps(out))
