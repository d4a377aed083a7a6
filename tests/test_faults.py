"""Fault handling, the same in the four method files: a killed, preempted, diverging or misconfigured run loses
at most the work since its last checkpoint and says what went wrong in one line.

Most cases run in-process on tiny FakeData (a few steps of a narrow ResNet-18; tests/in_process.py for whole
command lines); those that need a real process (kill -9, a torchrun restart, a stop signal to the process or to
its whole group with its loader worker) start one: a process start with torch costs 2-5 s on a 2-core CPU. The
NaN guard is in each method's own test file.
"""
import importlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import in_process

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--dataset", "fake", "--image-size", "16", "--batch-size", "4", "--epochs", "2", "--num-workers", "0",
          "--knn-k", "0", "--log-every", "1", "--warmup-epochs", "1", "--width", "8"]
# Each method's narrowest heads; 16 fake images with batch 4 = 4 steps per epoch.
TINY = {
    "co_byol": COMMON + ["--fake-size", "16", "--proj-hidden", "16", "--pred-hidden", "16", "--proj-dim", "8"],
    "co_dino": COMMON + ["--fake-size", "16", "--out-dim", "32", "--head-hidden", "16", "--bottleneck", "8"],
    "bag_ssl": COMMON + ["--fake-size", "16", "--arch", "resnet18", "--stem", "cifar", "--patch-size", "8",
                         "--proj-hidden", "16", "--proj-dim", "8", "--pred-hidden", "16", "--eval-patches", "1",
                         "--eval-knn-k", "0", "--linear-epochs", "1"],
    "geo_dino": COMMON + ["--fake-size", "16", "--local-crop-size", "8", "--local-crops", "2", "--out-dim", "32",
                          "--head-hidden", "16", "--bottleneck", "8"],
}
METHODS = list(TINY)
# Float flags that every file has, and the method's own ones.
BAD_VALUES = {
    "co_byol": [("--ws", "nan"), ("--tau-base", "nan")],
    "co_dino": [("--student-temp", "nan"), ("--teacher-temp", "inf"), ("--ws", "inf")],
    "bag_ssl": [("--temperature", "nan"), ("--tau-base", "inf")],
    "geo_dino": [("--student-temp", "inf"), ("--clip-grad", "nan"), ("--local-weight", "nan")],
}
SHARED_BAD = [("--lr", "nan"), ("--lr", "inf"), ("--weight-decay", "inf"), ("--warmup-epochs", "nan"),
              ("--knn-temperature", "nan"), ("--checkpoint-every", "nan"), ("--lars-eta", "-1"),
              ("--checkpoint-every", "-1")]


class Payload:
    def __reduce__(self):  # unpickling this would run os.system
        return (os.system, ("echo owned",))


def module(name):
    return importlib.import_module(name)


def run(name, tmp_path, *extra, out="run"):
    m = module(name)
    return m.main(m.parse_args(TINY[name] + ["--output-dir", str(tmp_path / out), *extra]))


def one_error_line(excinfo_or_err: str) -> str:
    lines = [ln for ln in str(excinfo_or_err).strip().splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("name,flag,value", [(n, f, v) for n in METHODS for f, v in SHARED_BAD + BAD_VALUES[n]])
def test_non_finite_and_out_of_range_floats_are_one_argparse_line(name, flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        module(name).parse_args(TINY[name] + [flag, value])
    assert e.value.code == 2  # argparse's error, before any work
    line = one_error_line([ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln][0])
    assert flag in line


@pytest.mark.parametrize("name", METHODS)
def test_resume_refuses_changed_flags_and_accepts_a_declared_epochs_change(name, tmp_path):
    run(name, tmp_path, "--max-steps", "1")
    ckpt = tmp_path / "run" / "checkpoint.pt"
    before = ckpt.read_bytes()
    with pytest.raises(SystemExit) as e:
        run(name, tmp_path, "--max-steps", "2", "--lr", "0.7")
    line = one_error_line(e.value)
    assert "--lr" in line and "another --output-dir" in line
    with pytest.raises(SystemExit) as e:
        run(name, tmp_path, "--max-steps", "2", "--epochs", "3")
    assert "--allow-epochs-change" in one_error_line(e.value)
    assert ckpt.read_bytes() == before  # a refused resume touches nothing
    run(name, tmp_path, "--max-steps", "2", "--epochs", "3", "--allow-epochs-change")
    assert torch.load(ckpt, weights_only=True)["step"] == 2


@pytest.mark.parametrize("name", METHODS)
def test_checkpoint_every_minutes_writes_within_the_epoch(name, tmp_path, monkeypatch):
    m, steps = module(name), []
    real_save = m.save_checkpoint
    monkeypatch.setattr(m, "save_checkpoint", lambda path, state: (steps.append(state.get("step")),
                                                                   real_save(path, state)))
    run(name, tmp_path, "--max-steps", "3", "--checkpoint-every", "1e-9")  # due after every step
    assert [s for s in steps if s is not None][:3] == [1, 2, 3]  # steps 1, 2: within the 4-step epoch
    steps.clear()
    run(name, tmp_path, "--max-steps", "3", "--checkpoint-every", "0", out="epoch_ends_only")
    assert {s for s in steps if s is not None} == {3}  # only the run's end (before and after its evaluation)


@pytest.mark.parametrize("name", METHODS)
def test_preemption_signal_checkpoints_writes_backbone_and_exits_non_zero(name, tmp_path, monkeypatch):
    m = module(name)
    real_step, calls = m.train_step, []

    def step_then_signal(*a, **kw):
        calls.append(1)
        if len(calls) == 2:  # SLURM's warning signal arrives during step 2
            os.kill(os.getpid(), signal.SIGUSR1)
        return real_step(*a, **kw)

    monkeypatch.setattr(m, "train_step", step_then_signal)
    with pytest.raises(SystemExit) as e:
        run(name, tmp_path)
    assert e.value.code == 128 + signal.SIGUSR1  # non-zero: torchrun --max-restarts / SLURM --requeue restart it
    out = tmp_path / "run"
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
    assert (out / "backbone.pt").exists() and not (out / "final_metrics.json").exists()
    monkeypatch.setattr(m, "train_step", real_step)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    run(name, tmp_path)  # the same command resumes and finishes
    assert (out / "final_metrics.json").exists()


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated zip", "pickled code", "other method"])
def test_empty_truncated_pickled_or_foreign_checkpoint_is_one_line_and_kept(name, content, tmp_path):
    out = tmp_path / "run"
    if content == "other method":
        other = METHODS[(METHODS.index(name) + 1) % len(METHODS)]
        run(other, tmp_path, "--max-steps", "1")
        expected = "was not written by"
    elif content == "pickled code":  # weights_only loading never runs code from a checkpoint
        out.mkdir()
        torch.save({"step": 1, "payload": Payload()}, out / "checkpoint.pt")
        expected = "cannot read"
    else:
        out.mkdir()
        (out / "checkpoint.pt").write_bytes(content)
        expected = "cannot read"
    before = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(SystemExit) as e:
        run(name, tmp_path)
    assert expected in one_error_line(e.value)
    assert (out / "checkpoint.pt").read_bytes() == before


@pytest.mark.parametrize("name", METHODS)
def test_output_dir_that_is_a_file_is_one_line_before_any_work(name, tmp_path):
    (tmp_path / "run").write_text("not a folder")
    with pytest.raises(SystemExit) as e:
        run(name, tmp_path)
    assert "cannot write to --output-dir" in one_error_line(e.value)


@pytest.mark.parametrize("name", METHODS)
def test_full_disk_keeps_the_previous_checkpoint(name, tmp_path, monkeypatch):
    m = module(name)
    run(name, tmp_path, "--max-steps", "1")
    ckpt = tmp_path / "run" / "checkpoint.pt"
    before = ckpt.read_bytes()

    def disk_full(obj, f, *a, **kw):
        Path(f).write_bytes(b"\0" * 10)  # half a file, as a real full disk leaves it
        raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(m.torch, "save", disk_full)
    with pytest.raises(SystemExit) as e:
        run(name, tmp_path, "--max-steps", "2")
    assert "cannot write" in one_error_line(e.value) and "is kept" in str(e.value)
    monkeypatch.undo()
    assert ckpt.read_bytes() == before and not ckpt.with_suffix(".tmp").exists()


def _image_folder(root: Path, n_per_class: int = 4):
    from PIL import Image

    for split in ("train", "val"):
        for c in range(2):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(n_per_class):
                Image.new("RGB", (16, 16), (40 * i, 100 * c, 7)).save(root / split / f"c{c}" / f"{i}.png")
    bad = root / "train" / "c1" / "2.png"
    bad.write_bytes(bad.read_bytes()[:40])  # a truncated PNG: the header reads, the pixels do not
    return bad


@pytest.mark.parametrize("name", METHODS)
def test_truncated_image_stops_with_the_files_name(name, tmp_path):
    m = module(name)
    bad = _image_folder(tmp_path / "data")
    argv = [a if a != "fake" else "imagefolder" for a in TINY[name]]
    args = m.parse_args(argv + ["--data-dir", str(tmp_path / "data"), "--output-dir", str(tmp_path / "run"),
                                "--epochs", "1"])
    with pytest.raises(m.UnreadableImage) as e:
        m.main(args)
    assert str(bad) in str(e.value)


def test_kill_9_while_checkpointing_every_step_leaves_a_loadable_checkpoint(tmp_path):
    """kill -9 at an arbitrary moment of a run that writes a checkpoint after every step: checkpoint.pt is
    always complete (written to .tmp, then renamed) and the same command resumes from it."""
    out = tmp_path / "run"
    argv = [sys.executable, "co_byol.py", *TINY["co_byol"], "--epochs", "500", "--checkpoint-every", "1e-9",
            "--output-dir", str(out)]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.3)  # a few more steps, so the kill lands in some step or some write
    proc.kill()
    proc.wait()
    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    again = in_process.run("co_byol.py", argv[2:] + ["--max-steps", str(step + 1)])  # the same command
    assert again.returncode == 0 and f"at step {step}" in again.stdout, again.stderr[-2000:]


@pytest.mark.parametrize("name,sig", [(m, signal.SIGTERM) for m in METHODS]
                         + [("co_byol", signal.SIGINT), ("co_byol", signal.SIGUSR1)])
def test_stop_signal_to_the_process_group_with_a_loader_worker_checkpoints_and_exits(name, sig, tmp_path):
    """A scheduler (or `kill -- -PGID`, or Ctrl-C) signals the whole process group, the loader worker too: the
    worker must not die of it, so the main process checkpoints and exits 128 + the signal as when it alone is
    signalled; before the fix the run ended in 'DataLoader worker ... is killed by signal' with exit code 1."""
    out = tmp_path / "run"
    argv = list(TINY[name])
    argv[argv.index("--fake-size") + 1] = "400"  # 100 steps per epoch over 50 epochs: the worker stays busy
    argv[argv.index("--epochs") + 1] = "50"  # (FakeData seeds torch for each image: about 1.5 ms each)
    argv[argv.index("--num-workers") + 1] = "1"
    proc = subprocess.Popen([sys.executable, f"{name}.py", *argv, "--output-dir", str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics, deadline = out / "metrics.jsonl", time.time() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):  # a few steps through the worker
        assert time.time() < deadline and proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.1)
    os.killpg(proc.pid, sig)  # the session's group: the main process and its loader worker
    text, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig and "is killed by signal" not in err, err[-2000:]
    assert "stop requested" in text and (out / "backbone.pt").exists()
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] >= 2
    if (name, sig) == ("co_byol", signal.SIGTERM):  # the same command resumes; the results count both processes
        again = in_process.run("co_byol.py", argv + ["--output-dir", out, "--max-steps", ckpt["step"] + 1])
        assert again.returncode == 0, again.stderr[-2000:]
        assert f"resumed from {out / 'checkpoint.pt'} at step {ckpt['step']}" in again.stdout
        final = json.loads((out / "final_metrics.json").read_text())  # both processes' time and environment
        assert final["wall_s"] >= final["train_s"] + final["eval_s"] and final["wall_s"] > ckpt["wall_s"]
        assert [e["from_step"] for e in final["environment"]] == [0, ckpt["step"]]


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # field 4 of /proc/PID/stat: the parent's pid
            kids.append(int(stat.parent.name))
    return kids


def _rank_of(pid: int) -> int | None:
    try:
        env = dict(kv.split(b"=", 1) for kv in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in kv)
        return int(env[b"RANK"]) if b"co_byol.py" in Path(f"/proc/{pid}/cmdline").read_bytes() else None
    except (OSError, KeyError, ValueError):
        return None


def _ranks(pid: int) -> list[int]:
    return [k for k in _children(pid) if _rank_of(k) is not None]


def _last_logged_step(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    steps = [json.loads(ln).get("step", 0) for ln in lines[:-1] if ln.strip()]  # the last line may be half
    return max(steps, default=0)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the workers through /proc")
def test_two_process_run_is_restarted_by_torchrun_twice_and_resumes(tmp_path):
    """SIGTERM to rank 1 of a 2-process gloo run (a preemption): both ranks checkpoint and exit 143, torchrun
    --max-restarts starts them again, and they resume and finish; twice. Before the per-attempt store prefix
    (setup_distributed) a restarted rank often read its dead predecessor's address from torchrun's store
    and failed ('Gloo connectFullMesh failed ... Connection refused') or hung in init: 11 of 15 restarts."""
    out = tmp_path / "run"
    argv = list(TINY["co_byol"])
    argv[argv.index("--epochs") + 1] = "50"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "--max-restarts=2", "co_byol.py", *argv, "--max-steps", "60", "--output-dir", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        stopped_at, killed = 0, set()
        for restart in range(2):
            deadline = time.time() + 120
            while not (_last_logged_step(out) >= stopped_at + 3 and len(set(_ranks(proc.pid)) - killed) == 2):
                assert time.time() < deadline and proc.poll() is None, proc.communicate()[0][-3000:]
                time.sleep(0.1)
            ranks = {_rank_of(k): k for k in _ranks(proc.pid)}
            os.kill(ranks[1], signal.SIGTERM)
            killed |= set(ranks.values())
            while any(_rank_of(k) is not None for k in ranks.values()):  # both ranks of this attempt are gone
                assert time.time() < deadline, "the signalled attempt did not end"
                time.sleep(0.1)
            stopped_at = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
        text, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, text[-3000:]
    assert text.count("resumed from") == 2 and text.count("stop requested") == 2  # rank 0 logs, 2 restarts
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 60
    steps = [r["step"] for r in _metrics_rows(out) if "loss" in r]
    assert steps == list(range(1, 61))


def test_truncated_image_through_a_loader_worker_is_one_line(tmp_path):
    """From the command line, with a data-loading worker: one line naming the file, exit code 1."""
    bad = _image_folder(tmp_path / "data")
    argv = [a if a != "fake" else "imagefolder" for a in TINY["co_byol"]]
    argv[argv.index("--num-workers") + 1] = "1"
    proc = in_process.run("co_byol.py", [*argv, "--data-dir", tmp_path / "data", "--epochs", "1", "--output-dir",
                                         tmp_path / "run"])
    assert proc.returncode == 1
    errors = [ln for ln in proc.stderr.replace("\r", "\n").splitlines() if "error:" in ln]  # not tqdm's bar
    assert len(errors) == 1 and str(bad) in errors[0] and "Traceback" not in proc.stderr


@pytest.mark.parametrize("flag,value", [("--lr", "nan"), ("--weight-decay", "inf"), ("--momentum", "nan"),
                                        ("--momentum", "1.5"), ("--knn-temperature", "inf"), ("--min-crop", "nan")])
def test_eval_linear_refuses_non_finite_and_out_of_range_floats(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        module("eval_linear").parse_args(["--checkpoint", "runs/x/backbone.pt", flag, value])
    assert e.value.code == 2
    assert flag in one_error_line([ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln][0])


def test_keep_freed_memory_reuses_the_pages_of_freed_tensors():
    """Run() on CPU calls keep_freed_memory: a freed 64 MB tensor's pages serve the next one, with no page faults
    (measured cost without it: 150k faults and +50 % time in a geo_dino laptop step). In a fresh process, as the
    setting is process-wide; the four files' copies are byte-identical (test_style.py)."""
    code = """
import resource, sys, torch
sys.path.insert(0, %r)
import co_byol
def faults_of_a_64mb_tensor():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 << 20).fill_(1)  # allocated, touched, freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
def fewest_faults():  # a small allocation may take the start of a freed block: the next one then grows the heap
    return min(faults_of_a_64mb_tensor() for _ in range(4))
default = fewest_faults()
co_byol.keep_freed_memory()
print(default, fewest_faults())
""" % str(ROOT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    default, kept = map(int, out.split())
    if default < 1000:
        pytest.skip(f"this kernel maps large blocks with huge pages ({default} faults for 64 MB): nothing to keep")
    assert default > 10_000 and kept < 100, (default, kept)  # 16,384 pages of 4 KiB, then none


@pytest.mark.parametrize("name", METHODS)
def test_knn_follows_knn_every_and_the_final_readout_comes_after_training(name, tmp_path):
    """--knn-every 2 over 3 epochs: k-NN rows at the random network (epoch 0) and at epoch 2 only (not every
    epoch); the final readout, on the whole training set, comes after training."""
    run(name, tmp_path, "--epochs", "3", "--knn-every", "2", "--knn-k", "3")
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if "knn_top1" in r] == [0.0, 2.0]
    assert [r["epoch"] for r in rows if "knn_top1_full" in r] == [3.0] and "knn_top1_full" in rows[-1]


# ---- Reliability as a cluster user meets it (issue: repeated signals, class folders, stale evaluations,
# ---- non-finite buffers, a clean metrics log, one run per folder, older checkpoints, impossible values) ----
def _metrics_rows(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]  # every line parses


def _wait_for_rows(proc, metrics: Path, n: int = 3, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= n):
        assert time.time() < deadline and proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.05)


@pytest.mark.parametrize("name,sig", [("co_byol", signal.SIGTERM), ("geo_dino", signal.SIGINT)])  # the same Bookkeeper
def test_a_stop_signal_delivered_three_times_still_checkpoints_once_and_exits(name, sig, tmp_path):
    """SLURM signals every process of a job and torchrun forwards the signal again: the worker gets it twice or
    more. Before the fix the second one killed the run before checkpoint.pt or backbone.pt was written."""
    out = tmp_path / "run"
    argv = list(TINY[name])
    argv[argv.index("--fake-size") + 1] = "400"  # 100 steps per epoch, 50 epochs
    argv[argv.index("--epochs") + 1] = "50"
    proc = subprocess.Popen([sys.executable, f"{name}.py", *argv, "--output-dir", str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_rows(proc, out / "metrics.jsonl")
    for _ in range(3):
        os.kill(proc.pid, sig)
        time.sleep(0.02)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err[-2000:]
    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert step >= 2 and (out / "backbone.pt").exists()
    assert [r["step"] for r in _metrics_rows(out) if "loss" in r] == list(range(1, step + 1))


def _state_tensors(ckpt: dict) -> dict:
    skip = {"step", "history", "rng", "args", "train_s", "script"}
    return {f"{k}.{n}": t for k, v in ckpt.items() if k not in skip and isinstance(v, dict)
            for n, t in v.items() if isinstance(t, torch.Tensor)}


@pytest.mark.parametrize("name,how", [("co_byol", "signal"), ("co_dino", "crash"), ("bag_ssl", "crash"),
                                      ("geo_dino", "signal")])
def test_a_stop_or_a_crash_during_the_epochs_evaluation_loses_only_the_evaluation(name, how, tmp_path, monkeypatch):
    """The epoch's checkpoint is written before its evaluation (k-NN, linear readout): a SIGUSR1 that arrives during the
    evaluation stops the run at that epoch's end, and a crash there (kill, OOM) resumes from it; either way the
    finished run equals an uninterrupted one, bit for bit. Before, the checkpoint came after the evaluation."""
    m = module(name)
    knn = ("--knn-k", "3")  # an evaluation at every epoch end
    run(name, tmp_path, *knn, out="whole")
    real_write = m.Bookkeeper.write

    def write(self, row):
        if "knn_top1" in row and row["step"] == 4:  # epoch 1's k-NN and linear readout
            if how == "signal":
                os.kill(os.getpid(), signal.SIGUSR1)
            else:
                raise KeyboardInterrupt("killed during the evaluation")
        return real_write(self, row)

    monkeypatch.setattr(m.Bookkeeper, "write", write)
    with pytest.raises(SystemExit if how == "signal" else KeyboardInterrupt) as e:
        run(name, tmp_path, *knn)
    if how == "signal":
        assert e.value.code == 128 + signal.SIGUSR1
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 4
    monkeypatch.undo()
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    run(name, tmp_path, *knn)
    whole = _state_tensors(torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True))
    resumed = _state_tensors(torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True))
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    steps = [r["step"] for r in _metrics_rows(tmp_path / "run") if "loss" in r]
    assert steps == list(range(1, 9))  # every step once


def _clean_image_folder(root: Path, train_classes, val_classes):
    from PIL import Image

    for split, classes in (("train", train_classes), ("val", val_classes)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (16, 16), (40 * i, 60 * len(c), 7)).save(root / split / c / f"{i}.png")


@pytest.mark.parametrize("val_classes,expected", [(["a", "c"], "lacks b"), (["a", "b", "c", "d"], "has d that")])
def test_train_and_val_class_folders_must_match(val_classes, expected, tmp_path):
    """torchvision numbers each split's class folders on its own: a val split without 'b' (or with an extra
    'd') was scored with shifted labels, exit 0. Now one line names the classes, in training and evaluation."""
    _clean_image_folder(tmp_path / "data", ["a", "b", "c"], val_classes)
    m = module("co_byol")
    argv = [a if a != "fake" else "imagefolder" for a in TINY["co_byol"]]
    with pytest.raises(SystemExit) as e:
        m.main(m.parse_args(argv + ["--data-dir", str(tmp_path / "data"), "--output-dir", str(tmp_path / "run")]))
    assert expected in one_error_line(e.value)
    backbone = tmp_path / "b" / "backbone.pt"
    backbone.parent.mkdir()
    run("co_byol", tmp_path, "--max-steps", "1", out="b")
    ev = module("eval_linear")
    with pytest.raises(SystemExit) as e:
        ev.main(ev.parse_args(["--checkpoint", str(backbone), "--dataset", "imagefolder", "--data-dir",
                               str(tmp_path / "data"), "--epochs", "1", "--num-workers", "0", "--precompute"]))
    assert expected in one_error_line(e.value)


@pytest.mark.parametrize("name", METHODS)
def test_no_checkpoint_or_backbone_ever_holds_a_non_finite_buffer(name, tmp_path, monkeypatch):
    """A diverging run can blow up BatchNorm running variances while its loss and weights are still finite; the
    guard looked only at those, so 'the last good checkpoint' (and a finished run's backbone.pt) held inf."""
    m = module(name)
    real_step = m.train_step

    def step_then_poison(nets, *a, **kw):
        out = real_step(nets, *a, **kw)
        if step_then_poison.calls == 1:  # after step 2
            bn = next(mod for mod in nets.backbone.modules() if isinstance(mod, torch.nn.BatchNorm2d))
            bn.running_var.fill_(float("inf"))
        step_then_poison.calls += 1
        return out

    step_then_poison.calls = 0
    monkeypatch.setattr(m, "train_step", step_then_poison)
    with pytest.raises(SystemExit) as e:
        run(name, tmp_path, "--checkpoint-every", "1e-9")  # a checkpoint after every step
    line = one_error_line(e.value)
    assert "non-finite" in line and "running_var" in line and "by step 2" in line
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 1 and all(torch.isfinite(t).all() for t in _state_tensors(ckpt).values()
                                     if t.is_floating_point())
    assert not (tmp_path / "run" / "backbone.pt").exists()


@pytest.mark.parametrize("name", ["co_byol", "geo_dino"])  # the appendix is one text in the four files
def test_metrics_log_holds_each_step_once_after_a_kill_and_a_cut_row(name, tmp_path, monkeypatch):
    """A run killed after logging steps its last checkpoint does not hold trains them again on resume: they were
    logged twice; a row cut short by the kill was glued to the next one (the file no longer parsed)."""
    m = module(name)
    real_save = m.save_checkpoint

    def save_then_die(path, state):
        if state.get("step") == 3:
            raise KeyboardInterrupt("killed before checkpoint 3")
        return real_save(path, state)

    monkeypatch.setattr(m, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(name, tmp_path, "--checkpoint-every", "1e-9")
    monkeypatch.undo()
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # half a row, as a kill during the write leaves it
    run(name, tmp_path, "--checkpoint-every", "1e-9")
    assert [r["step"] for r in _metrics_rows(tmp_path / "run") if "loss" in r] == list(range(1, 9))


def test_a_full_disk_on_a_metrics_row_is_one_line(tmp_path, monkeypatch):
    m = module("co_byol")

    def full_disk_open(path, mode="r", *a, **kw):  # the kernel's ENOSPC, from /dev/full
        return open("/dev/full", "w") if Path(path).name == "metrics.jsonl" else open(path, mode, *a, **kw)

    monkeypatch.setattr(m, "open", full_disk_open, raising=False)
    with pytest.raises(SystemExit) as e:
        run("co_byol", tmp_path)
    line = one_error_line(e.value)
    assert "cannot write" in line and "metrics.jsonl" in line


def test_one_run_per_output_dir_and_a_killed_run_leaves_no_stuck_lock(tmp_path):
    """Two runs on one --output-dir used to both proceed and resume from each other's checkpoints."""
    out = tmp_path / "run"
    argv = list(TINY["co_byol"])
    argv[argv.index("--fake-size") + 1] = "400"  # 100 steps per epoch, 50 epochs: still running when checked
    argv[argv.index("--epochs") + 1] = "50"
    proc = subprocess.Popen([sys.executable, "co_byol.py", *argv, "--output-dir", str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_rows(proc, out / "metrics.jsonl", n=1)
        with pytest.raises(SystemExit) as e:
            run("co_byol", tmp_path, "--max-steps", "1")
        line = one_error_line(e.value)
        assert "another run is using --output-dir" in line and f"pid {proc.pid}" in line
    finally:
        proc.kill()  # kill -9: no clean-up of any kind
        proc.wait()
    run("co_byol", tmp_path, "--max-steps", "1", "--fake-size", "400", "--epochs", "50")  # the kernel released the lock


@pytest.mark.parametrize("name", ["co_byol", "bag_ssl"])  # load_checkpoint: byte-identical; two recipe sets
def test_a_checkpoint_older_than_a_flag_resumes_with_its_default_and_says_so(name, tmp_path, capsys):
    """A checkpoint written before --lars-eta existed ran with its default: the same command resumes (one
    line says so); another value is refused naming the default, not 'None' as before."""
    run(name, tmp_path, "--max-steps", "1")
    path = tmp_path / "run" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    del ckpt["args"]["lars_eta"]
    torch.save(ckpt, path)
    with pytest.raises(SystemExit) as e:
        run(name, tmp_path, "--max-steps", "2", "--lars-eta", "0.05")
    line = one_error_line(e.value)
    assert "predates --lars-eta" in line and "--lars-eta 0.02" in line and "None" not in line
    capsys.readouterr()
    run(name, tmp_path, "--max-steps", "2")
    assert "predates 1 flag(s)" in capsys.readouterr().out
    assert torch.load(path, weights_only=True)["step"] == 2


def _eval(tmp_path, backbone: Path, *extra):
    ev = module("eval_linear")
    return ev.main(ev.parse_args(["--checkpoint", str(backbone), "--dataset", "fake", "--fake-size", "16",
                                  "--epochs", "2", "--precompute", "--num-workers", "0", "--batch-size", "8",
                                  *extra]))


def test_eval_linear_redoes_the_probe_when_backbone_pt_changed_or_its_checkpoint_is_damaged(tmp_path, capsys):
    """eval_linear.py resumed its probe by path: after training went on and rewrote backbone.pt, the same
    command 'resumed' the finished probe of the old backbone and reported it. Now the probe belongs to the
    backbone's sha256, and a damaged eval_checkpoint.pt is one line and a fresh probe, not a traceback."""
    run("co_byol", tmp_path, "--max-steps", "1")
    backbone = tmp_path / "run" / "backbone.pt"
    _eval(tmp_path, backbone)
    run("co_byol", tmp_path, "--max-steps", "3")  # training goes on: a new backbone.pt
    capsys.readouterr()
    again = _eval(tmp_path, backbone)
    assert "trained on another backbone" in capsys.readouterr().out
    fresh = _eval(tmp_path, backbone, "--output-dir", str(tmp_path / "fresh"))
    assert again["probe_history"] == fresh["probe_history"] and again["linear"] == fresh["linear"]
    assert again["backbone_sha256"] == fresh["backbone_sha256"]
    (tmp_path / "run" / "eval" / "eval_checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    damaged = _eval(tmp_path, backbone)
    assert "cannot be read" in capsys.readouterr().out and damaged["probe_history"] == fresh["probe_history"]


def test_eval_linear_stops_on_repeated_signals_with_one_line_and_resumes(tmp_path):
    run("co_byol", tmp_path, "--max-steps", "1")
    backbone, out = tmp_path / "run" / "backbone.pt", tmp_path / "run" / "eval"
    argv = [sys.executable, "eval_linear.py", "--checkpoint", str(backbone), "--dataset", "fake", "--fake-size",
            "64", "--precompute", "--num-workers", "0", "--batch-size", "8"]
    proc = subprocess.Popen(argv + ["--epochs", "100000"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "eval_checkpoint.pt").exists():
        assert time.time() < deadline and proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err
    assert len([ln for ln in err.replace("\r", "\n").splitlines() if "stopped by signal" in ln]) == 1
    epoch = torch.load(out / "eval_checkpoint.pt", weights_only=True)["epoch"]
    again = in_process.run("eval_linear.py", argv[2:] + ["--epochs", str(epoch + 1)])
    assert again.returncode == 0 and f"at epoch {epoch}" in again.stdout, again.stderr[-2000:]


# Values that pass every check alone but cannot work together: refused by argparse (exit 2) before any work.
IMPOSSIBLE = [(m, ["--warmup-epochs", "3"], "--warmup-epochs") for m in METHODS] + [  # TINY: --epochs 2
    ("co_byol", ["--small-crops", "2", "--small-crop-size", "4"], "--small-crop-size"),  # blur kernel -1
    ("co_dino", ["--small-crops", "2", "--small-crop-size", "1"], "--small-crop-size"),
    ("co_byol", ["--small-crops", "2", "--min-crop", "0.3"], "--min-crop"),  # was silently ignored
    ("co_dino", ["--small-crops", "2", "--min-crop", "0.3"], "--min-crop"),
    ("bag_ssl", ["--eval-train-images", "1"], "--eval-train-images"),  # std of one image: NaN features
]


@pytest.mark.parametrize("name,extra,flag", IMPOSSIBLE)
def test_combinations_that_cannot_work_are_one_argparse_line(name, extra, flag, capsys):
    with pytest.raises(SystemExit) as e:
        module(name).parse_args(TINY[name] + extra)
    assert e.value.code == 2
    assert flag in one_error_line([ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln][0])


@pytest.mark.parametrize("name", ["co_byol", "geo_dino"])
def test_a_knn_bank_smaller_than_the_class_count_is_one_line_before_training(name, tmp_path):
    """A class-balanced bank of 5 images for 10 classes kept no image at all: a torch.cat traceback."""
    with pytest.raises(SystemExit) as e:
        run(name, tmp_path, "--knn-k", "5", "--knn-bank", "5")
    assert "--knn-bank 5" in one_error_line(e.value) and not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.parametrize("name", METHODS + ["eval_linear"])
def test_knn_votes_do_not_overflow_at_a_small_temperature(name):
    """exp(cos / T) overflowed to inf below T = 1/88.7, every class tied and the first one won."""
    e = torch.eye(3)
    train_f = torch.stack([e[0], 0.9 * e[0] + 0.436 * e[1], 0.8 * e[0] + 0.6 * e[2]])  # cos 1, 0.9, 0.8 to e0
    train_y, test_f, test_y = torch.tensor([7, 0, 1]), e[:1], torch.tensor([7])
    for temperature in (0.07, 0.005):
        assert module(name).knn_top1(train_f, train_y, test_f, test_y, 3, temperature, 10) == 100.0


def test_a_knn_every_longer_than_the_run_reports_no_trained_bank_knn(tmp_path):
    """--knn-every 5 in a 2-epoch run: the only online k-NN row is the random network's; final_metrics.json
    labelled its numbers as the trained network's bank k-NN."""
    _, _, final = run("co_byol", tmp_path, "--knn-every", "5", "--knn-k", "3")
    assert final["knn_top1_random_init"] is not None and final["knn_top1_bank_subset"] is None


@pytest.mark.parametrize("name", ["co_dino", "geo_dino"])
def test_frozen_prototypes_for_the_whole_run_are_said(name, tmp_path, capsys):
    run(name, tmp_path, "--freeze-last-layer", "2", "--max-steps", "1")
    assert "--freeze-last-layer 2 >= --epochs 2" in capsys.readouterr().out


@pytest.mark.parametrize("trained,extra,expected", [
    ([], ["--analysis", "--limit-val", "2"], "at least 3 validation images"),
    (["--stem", "imagenet", "--ws", "0"], ["--robustness", "--robustness-parts", "masking"], "1x1 local map"),
    ([], ["--robustness", "--robustness-parts", "corruptions", "--corruptions", "defocus_blur", "--image-size", "8"],
     "defocus_blur at severity 1"),
])
def test_eval_linear_refuses_what_the_backbone_or_data_cannot_measure_before_any_work(trained, extra, expected,
                                                                                      tmp_path):
    """These failed after the probe had trained (a traceback), or reported numbers that measured nothing (a
    ResNet with the ImageNet stem has a 1x1 local map at 16 px: masking 'kept' the one cell at every rate)."""
    run("co_byol", tmp_path, "--max-steps", "1", *trained)
    with pytest.raises(SystemExit) as e:
        _eval(tmp_path, tmp_path / "run" / "backbone.pt", *extra)
    assert expected in one_error_line(e.value)
    assert not (tmp_path / "run" / "eval" / "eval_checkpoint.pt").exists()


@pytest.mark.parametrize("name", METHODS)
def test_common_flags_adamw_and_train_per_class_work_in_every_file(name, tmp_path, capsys):
    """--optimizer adamw and --train-per-class are common flags (the appendix): every method trains with them.
    AdamW is torch's, at the linearly scaled lr, decaying the weights only; the subset holds N images per class and
    says so at start, while the k-NN bank still reads the whole training set."""
    m = module(name)
    args = m.parse_args(TINY[name] + ["--optimizer", "adamw", "--lr", "1e-3", "--train-per-class", "2",
                                      "--fake-size", "64", "--max-steps", "2", "--output-dir", str(tmp_path / "run")])
    run = m.Run(args)
    data = m.make_loaders(args, run)
    labels = [data.base.dataset[i][1] for i in data.base.indices]
    assert len(data.images) == 20 and sorted(labels) == sorted(list(range(10)) * 2)
    assert "pre-training on 20 of 64 images (2 per class, seed 0)" in capsys.readouterr().out
    nets, optimizer = m.build_training(args, run)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [args.weight_decay, 0.0]
    assert optimizer.param_groups[0]["base_lr"] == pytest.approx(1e-3 * 4 / 256)
    final = m.main(args)[2]  # 20 images, batch 4: 5 steps an epoch, of which 2 run
    losses = [r["loss"] for r in _metrics_rows(tmp_path / "run") if "loss" in r]
    assert final["step"] == 2 and len(losses) == 2 and all(math.isfinite(v) for v in losses)
