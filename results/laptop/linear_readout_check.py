"""The linear readout (`linear_top1`, logged beside the k-NN) against the offline linear probe, on one backbone.

    python results/laptop/linear_readout_check.py runs/laptop/byol_s0/backbone.pt   # prints JSON

Embeds the training and test sets of CIFAR-10 (un-augmented, as KNNMonitor does), then fits `linear_top1` on
the whole training set and on the 10,000-image class-balanced bank the runs use every epoch. Compare with
`python eval_linear.py --checkpoint BACKBONE --precompute` (100 epochs of SGD on the same frozen features).
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

backbone, _ = eval_linear.load_backbone(sys.argv[1])
args = co_byol.parse_args(["--recipe", "laptop", "--num-workers", "0"] + sys.argv[2:])
train_base, val, num_classes = co_byol.load_datasets(args, 0)
cpu = types.SimpleNamespace(device=torch.device("cpu"), autocast=contextlib.nullcontext())  # a Run's fields
monitor = co_byol.KNNMonitor(args, train_base, val, num_classes, cpu)
backbone.eval()
with torch.no_grad():
    tr_f, tr_y = co_byol.embed(backbone, monitor.train, torch.device("cpu"), contextlib.nullcontext(), 256, 0)
    te_f, te_y = co_byol.embed(backbone, val, torch.device("cpu"), contextlib.nullcontext(), 256, 0)
bank = torch.tensor(monitor.bank)
out = {"backbone": sys.argv[1], "torch_threads": torch.get_num_threads()}
for name, (f, y) in {"whole_train_set": (tr_f, tr_y), "bank_10k": (tr_f[bank], tr_y[bank])}.items():
    t0 = time.time()
    out[f"linear_top1_{name}"] = co_byol.linear_top1(f, y, te_f, te_y, num_classes)
    out[f"fit_s_{name}"] = round(time.time() - t0, 1)
print(json.dumps(out, indent=1))
