"""k-NN and linear readout of a laptop backbone, as the runs log them at their end (for runs older than the readout).

    python results/laptop/readout.py runs/laptop/byol_s1/backbone.pt results/laptop/byol_s1/readout.json
    python results/laptop/readout.py random:1 results/laptop/random_init/readout_seed1.json

The features, the k-NN (k = 200 on the whole training set) and `linear_top1` (the logistic regression on the
same frozen features) are co_byol.py's KNNMonitor with `full_bank=True`, i.e. what a run now writes as
`knn_top1` / `linear_top1` in final_metrics.json. `random:S` is the network a seed-S run starts from
(`torch.manual_seed(S)`, then co_byol.OnlineNetwork of the laptop recipe: what main() builds before its first step).
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

source, out_path = sys.argv[1], Path(sys.argv[2])
args = co_byol.parse_args(["--recipe", "laptop", "--ws", "0", "--num-workers", "0"] + sys.argv[3:])
if source.startswith("random:"):
    torch.manual_seed(int(source.split(":")[1]))
    backbone = co_byol.OnlineNetwork(args).encoder.backbone
else:
    backbone, _ = eval_linear.load_backbone(source)
backbone = backbone.to(memory_format=torch.channels_last)
train_base, val, num_classes = co_byol.load_datasets(args, 0)
cpu = types.SimpleNamespace(device=torch.device("cpu"), autocast=contextlib.nullcontext())  # a Run's fields
monitor = co_byol.KNNMonitor(args, train_base, val, num_classes, cpu)
start = time.time()
result = monitor(backbone, full_bank=True)
out = {"backbone": source, **result, "readout_s": round(time.time() - start, 1),
       "torch_threads": torch.get_num_threads(), "how": "results/laptop/readout.py"}
out_path.parent.mkdir(parents=True, exist_ok=True)
out_path.write_text(json.dumps(out, indent=1))
print(json.dumps(out))
