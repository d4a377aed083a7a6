"""One method file's tiny test run (tests/test_faults.py's TINY flags, 3 steps), to run under a checker:

    gcc -O2 -shared -fPIC -o /tmp/libguard.so results/onednn_sweep/guard.c -ldl
    LD_PRELOAD=/tmp/libguard.so ONEDNN_MAX_CPU_ISA=AVX512_CORE python results/onednn_sweep/tiny_run.py co_byol /tmp/out
"""
import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from test_faults import TINY  # noqa: E402

name, out, extra = sys.argv[1], sys.argv[2], sys.argv[3:]
m = importlib.import_module(name)
m.main(m.parse_args(TINY[name] + ["--output-dir", out, "--max-steps", "3", *extra]))
print("OK", name)
