"""Started by tests/test_ddp.py as `torchrun --nproc_per_node=2 tests/ddp_worker.py RUNS.json OUT`: runs each
method file's main() in turn in the same two processes (one process start with torch instead of four), and
saves what each rank ended with (its networks' weights, and the DINO centres it computed at every step) as
OUT/METHOD/rankR.pt for the test to compare."""
import importlib
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
runs, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
rank = os.environ["RANK"]
for attempt, (name, argv) in enumerate(runs.items()):
    m = importlib.import_module(name)
    # setup_distributed keys each attempt's process group by torchrun's restart count (the store outlives the
    # group): each run here is an attempt of its own, so no run reads the previous run's gloo addresses.
    os.environ["TORCHELASTIC_RESTART_COUNT"] = str(attempt)
    centres = []
    if hasattr(m, "update_center"):  # co_dino, geo_dino: record each centre (global, local, global, ...)
        update = m.update_center
        m.update_center = lambda c, logits, mom, f=update: centres.append(f(c, logits, mom)) or centres[-1]
    nets = m.main(m.parse_args(argv + ["--output-dir", str(out / name)]))[:2]  # online, target / student, teacher
    torch.save({"nets": [net.state_dict() for net in nets if net is not None], "centres": centres},
               out / name / f"rank{rank}.pt")
