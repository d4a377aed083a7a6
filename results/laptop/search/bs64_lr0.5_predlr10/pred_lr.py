"""Lever of the laptop search (not a flag of co_byol.py): co_byol.py with the predictor lr x PRED_LR_MULT.

Ran at commit 355d675 (2026-12-01); co_byol.py has no param_groups since 2026-12-07 (make_optimizer sets the
lr): `git checkout 355d675` to rerun it as it ran."""
import os, sys
sys.path.insert(0, ".")  # run from the repository root:
# PRED_LR_MULT=10 python results/laptop/search/bs64_lr0.5_predlr10/pred_lr.py --recipe laptop --ws 0 ...
import co_byol

MULT = float(os.environ.get("PRED_LR_MULT", "10"))
_orig = co_byol.param_groups

def param_groups(net, args, scale):
    groups = _orig(net, args, scale)
    pred = {id(p) for n, p in net.named_parameters() if n.startswith(("predictor.", "local_predictor."))}
    out = []
    for g in groups[:2]:
        mine = [p for p in g["params"] if id(p) in pred]
        rest = [p for p in g["params"] if id(p) not in pred]
        out.append({**g, "params": rest})
        out.append({**g, "params": mine, "lr": g["lr"] * MULT, "base_lr": g["base_lr"] * MULT})
    return out + groups[2:]

co_byol.param_groups = param_groups
co_byol.main(co_byol.parse_args(sys.argv[1:]))
