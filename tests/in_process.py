"""`python SCRIPT ARGS` inside the test process: the script's own `if __name__ == "__main__":` block runs (runpy),
with sys.argv, the working directory, stdout and stderr as a child process would have them, and the result comes
back as the subprocess.CompletedProcess that subprocess.run(..., capture_output=True, text=True) returns.

Why: a new Python process pays `import torch, torchvision` again, 2-5 s on a 2-core CPU, more than most tiny runs
take. Tests of what only a real process shows (a signal to the process or its group, kill -9, torchrun, a loader
worker's death) still start one; everything else runs here. What differs from a child process: state that lives
in the process stays (thread count, flush-denormal, malloc options: all set the same by every run), the stop
signal handlers are put back after each test (conftest.py), and output written by C++ straight to the file
descriptors is not captured.
"""
import contextlib
import io
import os
import runpy
import subprocess
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(script, args, cwd=ROOT) -> subprocess.CompletedProcess:
    """Runs ROOT/script (a path relative to the repository) as __main__ with the command line `args`."""
    args = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_cwd, code = sys.argv, os.getcwd(), 0
    sys.argv = [str(script), *args]
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(str(ROOT / script), run_name="__main__")
            except SystemExit as e:  # what the interpreter does with it at exit
                if isinstance(e.code, int) or e.code is None:
                    code = e.code or 0
                else:
                    print(e.code, file=sys.stderr)
                    code = 1
            except Exception:  # an uncaught exception: its traceback, exit status 1
                traceback.print_exc()
                code = 1
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
    return subprocess.CompletedProcess([sys.executable, str(script), *args], code, out.getvalue(), err.getvalue())
