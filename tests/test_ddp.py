"""Every method file under torchrun: two gloo processes on the CPU end with identical weights (DDP averages the
gradients; BatchNorm statistics stay per process, no SyncBN on CPU), and the statistics of the global batch
agree on both ranks: DINO's centres, VICReg's variance and covariance (bag_ssl's gather_with_grad).

One torchrun launch runs the four files one after the other in the same two processes (tests/ddp_worker.py): a
process start with torch costs 2-5 s on a 2-core CPU, more than a tiny run. A torchrun restart after a
preemption is in test_faults.py."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import test_bag_ssl
import test_co_byol
import test_co_dino
import test_geo_dino

ROOT = Path(__file__).resolve().parents[1]
# Each file's tiny configuration (its test file's TINY), one epoch, two processes.
RUNS = {
    "co_byol": test_co_byol.TINY + ["--epochs", "1"],  # 32 images / 8: 4 steps
    "co_dino": test_co_dino.TINY + ["--epochs", "1"],  # 4 steps
    "bag_ssl": test_bag_ssl.TINY + test_bag_ssl.NO_EVAL + ["--epochs", "1", "--max-steps", "2"],  # VICReg, batch 4
    "geo_dino": test_geo_dino.TINY + ["--epochs", "1", "--knn-k", "0"],  # 8 images / 4: 2 steps
}
STEPS = {"co_dino": 4, "geo_dino": 2}  # the DINO files' training steps


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    """One `torchrun --standalone --nproc_per_node=2` of tests/ddp_worker.py over RUNS: its output folder."""
    out = tmp_path_factory.mktemp("ddp")
    (out / "runs.json").write_text(json.dumps(RUNS))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "tests" / "ddp_worker.py"), str(out / "runs.json"), str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("name", list(RUNS))
def test_two_processes_keep_identical_weights(ddp, name):
    out = ddp
    r0, r1 = (torch.load(out / name / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert len(r0["nets"]) == len(r1["nets"]) >= 1
    for net0, net1 in zip(r0["nets"], r1["nets"]):
        for k, v in net0.items():
            if "running_" in k or "num_batches" in k:
                continue  # CPU/gloo: BatchNorm statistics are per process (no SyncBN), by design
            assert torch.equal(v, net1[k]), f"{name}: {k} differs between ranks"
    final = json.loads((out / name / "final_metrics.json").read_text())  # written by rank 0
    assert final["environment"][0]["world_size"] == 2


@pytest.mark.parametrize("name", list(STEPS))
def test_dino_centres_are_statistics_of_the_global_batch(ddp, name):
    """Both ranks compute the same centres at every step (a global and a local one per step)."""
    out = ddp
    r0, r1 = (torch.load(out / name / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert len(r0["centres"]) == len(r1["centres"]) == 2 * STEPS[name]
    for c0, c1 in zip(r0["centres"], r1["centres"]):
        torch.testing.assert_close(c0, c1)
