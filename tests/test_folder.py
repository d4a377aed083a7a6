"""--dataset folder: pre-training on a folder of images without labels (any subfolders), end to end on a tiny folder
the test writes; the k-NN and linear readout from an optional labelled --val-dir; eval_linear.py on the result."""
import importlib
import json

import numpy as np
import pytest
from PIL import Image

import eval_linear

METHODS = ["co_byol", "co_dino", "bag_ssl", "geo_dino"]
TINY = {  # each file's smallest network; 16 px
    "co_byol": ["--proj-hidden", "16", "--pred-hidden", "16", "--proj-dim", "8", "--local-pred-hidden", "16"],
    "co_dino": ["--out-dim", "32", "--head-hidden", "16", "--bottleneck", "8"],
    "bag_ssl": ["--patch-size", "8", "--proj-hidden", "16", "--proj-dim", "8", "--pred-hidden", "16",
                "--eval-patches", "1,2", "--linear-epochs", "2"],
    "geo_dino": ["--out-dim", "32", "--head-hidden", "16", "--bottleneck", "8", "--local-crops", "2",
                 "--local-crop-size", "8"],
}
COMMON = ["--dataset", "folder", "--image-size", "16", "--batch-size", "4", "--epochs", "1", "--width", "8",
          "--arch", "resnet18", "--stem", "cifar", "--num-workers", "0", "--warmup-epochs", "0.5", "--log-every", "1"]


def write_images(root, n, size=(20, 24), seed=0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        path = root / f"part{i % 3}" / ("deeper" if i % 2 else "") / f"img{i}.{'png' if i % 2 else 'jpg'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    (root / "notes.txt").write_text("not an image")


def labelled(root):
    for split, n in (("train", 6), ("val", 4)):
        for c in ("cat", "dog"):
            write_images(root / split / c, n, seed=len(c) + n)


@pytest.mark.parametrize("name", METHODS)
def test_folder_pretrains_without_labels_and_says_there_is_no_readout(name, tmp_path, capsys):
    write_images(tmp_path / "photos", 9)
    m = importlib.import_module(name)
    final = m.main(m.parse_args(COMMON + TINY[name] + ["--data-dir", str(tmp_path / "photos"),
                                                       "--output-dir", str(tmp_path / "run")]))[-1]
    assert final["step"] == 2 and "knn_top1" not in final  # 9 images (8 trained: whole batches), no labels
    out = capsys.readouterr().out
    assert f"--dataset folder: 9 images under {tmp_path / 'photos'}; no --val-dir" in out
    assert (tmp_path / "run" / "backbone.pt").is_file()


def test_folder_with_val_dir_reads_out_and_eval_linear_reads_its_backbone(tmp_path):
    write_images(tmp_path / "photos", 8)
    labelled(tmp_path / "labelled")
    m = importlib.import_module("co_byol")
    run = tmp_path / "run"
    final = m.main(m.parse_args(COMMON + TINY["co_byol"] + ["--data-dir", str(tmp_path / "photos"), "--val-dir",
                                                            str(tmp_path / "labelled"), "--knn-k", "3",
                                                            "--output-dir", str(run)]))[-1]
    assert 0 <= final["knn_top1"] <= 100 and final["knn_top1_random_init"] is not None
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "knn_top1" in r] == [0, 2]
    result = eval_linear.main(eval_linear.parse_args([
        "--checkpoint", str(run / "backbone.pt"), "--dataset", "imagefolder", "--data-dir", str(tmp_path / "labelled"),
        "--image-size", "16", "--epochs", "1", "--batch-size", "4", "--num-workers", "0", "--knn", "--knn-k", "3",
        "--output-dir", str(tmp_path / "eval")]))
    assert result["trained_with"]["dataset"] == "folder" and 0 <= result["knn"]["top1"] <= 100
    assert all(0 <= top1 <= 100 for top1 in result["linear"].values())


@pytest.mark.parametrize("extra,expected", [
    (["--data-dir", "/nonexistent/photos"], "/nonexistent/photos is not a folder"),
    (["--train-per-class", "2"], "has no labels for --train-per-class"),
    (["--val-dir", "/nonexistent/labelled"], "--val-dir goes with --dataset folder and needs"),
])
def test_folder_refuses_bad_input_in_one_line(extra, expected, tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    m = importlib.import_module("co_byol")
    with pytest.raises(SystemExit):
        m.parse_args(COMMON + ["--data-dir", str(tmp_path / "photos"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert expected in err[-1]


def test_empty_folder_is_one_line(tmp_path):
    (tmp_path / "photos").mkdir()
    m = importlib.import_module("co_byol")
    with pytest.raises(SystemExit, match="no images under --data-dir"):
        m.main(m.parse_args(COMMON + TINY["co_byol"] + ["--data-dir", str(tmp_path / "photos"),
                                                        "--output-dir", str(tmp_path / "run")]))
