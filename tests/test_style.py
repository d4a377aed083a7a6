"""The house rules that keep the four method files readable side by side (STYLE.md, docs/README reading guide).

- plumbing that the files share is byte-identical (so a diff between two method files shows the algorithm);
- the ten section banners, in order; the same step contract everywhere; main() short enough to read as the
  paper's loop; every command-line flag documented; README a front door of at most 10 KB.
"""
import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["co_byol", "co_dino", "bag_ssl", "geo_dino"]
BANNERS = ["Header: paper, what this file implements, how to run, reading order", "Arguments",
           "Distributed, device, precision", "Data: datasets and views", "Model: backbone, heads, EMA teacher",
           "Loss", "Schedules: lr, weight decay, EMA momentum, temperatures",
           "Plumbing: checkpoint and resume, metrics log, stop flag, outputs", "Linear evaluation", "Training loop"]
# Top-level names that several method files define on purpose differently (the method itself, or its notation);
# every other name defined in two or more method files must be byte-identical there.
PER_METHOD = {
    "build_parser": "each method's flags", "parse_args": "each method's checks and defaults",
    "MultiView": "the method's views (two crops, patches, multi-crop with boxes)",
    "Encoder": "the method's heads", "OnlineNetwork": "BYOL's theta (predictor, local heads)",
    "StudentNetwork": "DINO's student (geo_dino: local head on matched cells)",
    "Nets": "the method's networks",
    "build_training": "the method's networks and optimiser", "Schedule": "the method's schedules",
    "train_step": "the algorithm", "main": "the method's names and outputs", "plot_curves": "the method's monitors",
    "ema_update": "the paper's notation: theta/xi (BYOL) or student/teacher (DINO)",
    "tau_at": "cites BYOL or DINO", "make_loaders": "geo_dino: --train-per-class subsets (paper Sec. 4.5.1)",
    "save_backbone": "geo_dino also saves Swin-T", "LAPTOP_RECIPE": "each method's laptop values",
    "RECIPES": "each method's named recipes",
}


def top_level(path: Path) -> dict[str, str]:
    """name -> source text (decorators included) of every top-level def, class and plain assignment."""
    src = path.read_text()
    lines = src.splitlines()
    out = {}
    for node in ast.parse(src).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            name = node.name
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
        else:
            continue
        start = node.decorator_list[0].lineno if getattr(node, "decorator_list", None) else node.lineno
        out[name] = "\n".join(lines[start - 1:node.end_lineno])
    return out


DEFS = {m: top_level(ROOT / f"{m}.py") for m in METHODS}


def shared_names():
    names = sorted({n for d in DEFS.values() for n in d})
    return [n for n in names if sum(n in d for d in DEFS.values()) >= 2 and n not in PER_METHOD]


@pytest.mark.parametrize("name", shared_names())
def test_duplicated_plumbing_is_byte_identical(name):
    texts = {m: d[name] for m, d in DEFS.items() if name in d}
    first = next(iter(texts.values()))
    differ = [m for m, t in texts.items() if t != first]
    assert not differ, f"{name} differs between {sorted(texts)}: copy one version into all (or list it in PER_METHOD)"


def test_the_plumbing_that_every_loop_calls_is_in_every_file():
    for name in ("Run", "TrainClock", "MetricsLog", "Checkpointer", "StopFlag", "ResumableSampler", "end_of_epoch",
                 "finish_training", "write_final", "KNNMonitor", "StepOut", "keep_freed_memory"):
        assert all(name in d for d in DEFS.values()), name


def test_swin_backbone_is_the_same_in_geo_dino_and_eval_linear():
    assert DEFS["geo_dino"]["SwinBackbone"] == top_level(ROOT / "eval_linear.py")["SwinBackbone"]


@pytest.mark.parametrize("name", METHODS)
def test_ten_section_banners_in_order(name):
    found = re.findall(r"^# ==== (\d+)\. (.+) ====$", (ROOT / f"{name}.py").read_text(), flags=re.M)
    assert found == [(str(i), title) for i, title in enumerate(BANNERS)]


@pytest.mark.parametrize("name", METHODS)
def test_one_step_contract_and_a_short_main(name):
    tree = ast.parse((ROOT / f"{name}.py").read_text())
    funcs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    step = funcs["train_step"]
    assert [a.arg for a in step.args.args] == ["nets", "optimizer", "batch", "schedule", "args"]
    assert ast.unparse(step.returns) == "StepOut"
    main = funcs["main"]
    assert main.end_lineno - main.lineno + 1 <= 80, "main() must read as the paper's loop: move plumbing out"
    loops = [n for n in main.body if isinstance(n, ast.While)]
    assert len(loops) == 1 and loops[0].end_lineno - loops[0].lineno + 1 <= 35


@pytest.mark.parametrize("name", METHODS + ["eval_linear"])
def test_every_flag_has_a_help_string(name):
    parser = importlib.import_module(name).build_parser()
    undocumented = [a.option_strings[0] for a in parser._actions
                    if a.option_strings and a.dest != "help" and not (a.help or "").strip()]
    assert not undocumented


def test_readme_is_a_front_door():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 10 * 1024
    for name in METHODS:
        assert (ROOT / "docs" / f"{name}.md").is_file() and f"docs/{name}.md" in readme
    assert (ROOT / "results" / "README.md").is_file()
