"""benchmarks/bench_step.py times every method through the same code path: the file's own build_training,
Schedule and train_step on one batch of its own loader (no per-method branch in the benchmark)."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_step", ROOT / "benchmarks" / "bench_step.py")
bench_step = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_step)


@pytest.mark.parametrize("method", sorted(bench_step.PAIRS))
@pytest.mark.parametrize("variant", [0, 1])
def test_bench_step_times_every_method_base_and_variant(method, variant):
    row = bench_step.one(method, "resnet18:32:4", variant, "cpu", "off", steps=1, warmup=0, width=8)
    name, flags = bench_step.PAIRS[method][variant]
    assert row["name"] == name and row["flags"] == " ".join(flags) and row["method"] == method
    assert row["step_s"] > 0 and row["img_per_s"] == pytest.approx(4 / row["step_s"]) and row["peak_mem_mb"] > 0
