import os
import sys
from pathlib import Path

# The method files are scripts at the top of the repository, not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# oneDNN (PyTorch's CPU convolutions) picks its kernels by the CPU's instruction set: AVX2, AVX-512, AVX512-BF16,
# AMX. The test machines differ, and one of them aborted in a backward pass that passes on the others
# (docs/rf_resnet.md, "oneDNN's CPU kernels"). The tests cap oneDNN below AMX, at the AVX512-BF16 kernels: those
# swept for crashes and out-of-bounds writes on the development machine (natively, and capped at AVX-512 and at
# AVX2 for CPUs without them). Subprocesses inherit the cap. `ONEDNN_MAX_CPU_ISA=DEFAULT pytest` tests the CPU's own kernels.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")


import signal  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_stop_signal_handlers():
    """In-process runs install the method files' stop handlers (a SIGTERM then only asks the run to stop): put
    the previous ones back after each test, so that a later test and pytest itself see the usual actions (before,
    a SIGTERM to a pytest that had run one in-process training was swallowed)."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)
