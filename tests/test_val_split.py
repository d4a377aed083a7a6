"""--val-split N (issue 39): N training images, class-balanced and the same for every --seed, are held out as the
readouts' queries; the rest is the training set and the k-NN bank; eval_linear.py --val-split N holds out the same
images. Recipes are then chosen without reading the test set."""
import json
from pathlib import Path

import pytest
import torch

import co_byol
import co_dino
import eval_linear
import in_process

ROOT = Path(__file__).resolve().parents[1]


class Labelled(torch.utils.data.Dataset):
    """A tiny labelled data set with torchvision's `targets` and `transform` attributes."""

    def __init__(self, labels):
        self.targets, self.transform = list(labels), None

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        x = torch.full((3, 4, 4), float(i))
        return (self.transform(x) if self.transform else x), self.targets[i]


def test_the_split_is_class_balanced_disjoint_fixed_and_the_same_in_eval_linear():
    labels = [i % 10 for i in range(37)] + [3] * 13  # classes of unequal size
    data = Labelled(labels)
    train, held = co_byol.split_off_val(data, 20, 10)
    assert sorted(train.indices + held.indices) == list(range(len(labels)))  # disjoint, and every image once
    assert sorted(co_byol.labels_of(held)) == sorted(list(range(10)) * 2)  # 2 of each class
    assert held.indices != sorted(i for i in range(len(labels)) if labels[i] in range(10))[:20]  # drawn, not the first
    again = co_dino.split_off_val(data, 20, 10)[1]  # another method file, another process' draw: the same images
    evaluated = eval_linear.split_off_val(data, 20, 10)[1]
    assert held.indices == again.indices == evaluated.indices
    # a subset of the training part is still one Subset of the data set (as_tensors reads one level)
    sub = co_byol.subset(train, [0, 2])
    assert sub.dataset is data and sub.indices == [train.indices[0], train.indices[2]]
    assert co_byol.labels_of(sub) == [labels[train.indices[0]], labels[train.indices[2]]]


def test_load_datasets_returns_the_held_out_images_with_the_evaluation_transform():
    args = co_byol.parse_args(["--dataset", "fake", "--fake-size", "40", "--val-split", "10", "--image-size", "16"])
    train, val, num_classes = co_byol.load_datasets(args, rank=0)
    held = co_byol.labels_of(val)  # FakeData's labels are random: a class may have no image to hold out
    assert num_classes == 10 and 8 <= len(val) <= 10 and len(set(held)) == len(held) and len(train) + len(val) == 40
    assert not set(train.indices) & set(val.indices)
    x, _ = val[0]
    assert isinstance(x, torch.Tensor) and x.shape == (3, 16, 16)  # eval_transform: normalised tensors
    assert train.dataset.transform is None  # the training images stay PIL (the views are made on the device)


def test_a_run_trains_without_the_held_out_images_and_reads_them_instead_of_the_test_set(tmp_path):
    out = tmp_path / "run"
    cmd = ["--dataset", "fake", "--image-size", "16", "--fake-size", "40", "--width", "8",
           "--val-split", "10", "--batch-size", "8", "--epochs", "1", "--proj-hidden", "32", "--pred-hidden", "32",
           "--proj-dim", "16", "--num-workers", "0", "--knn-k", "5", "--knn-bank", "0", "--output-dir", str(out)]
    proc = in_process.run("co_byol.py", cmd)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "training images held out as the readouts' queries; the test set is not used" in proc.stdout
    assert ", 3 steps/epoch" in proc.stdout  # 30-32 training images / batch 8 (40 without the split: 5)
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["args"]["val_split"] == 10 and 0 <= final["knn_top1"] <= 100


@pytest.mark.parametrize("argv,message", [
    (["--val-split", "-1"], "--val-split"),
    (["--dataset", "folder", "--data-dir", ".", "--val-split", "10"], "no labels for --train-per-class or --val-split"),
])
def test_bad_val_split_is_refused_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit):
        co_byol.parse_args(argv)
    assert message in capsys.readouterr().err


def test_a_val_split_smaller_than_the_classes_stops_with_one_line(capsys):
    args = co_byol.parse_args(["--dataset", "fake", "--fake-size", "40", "--val-split", "5"])
    with pytest.raises(SystemExit) as e:
        co_byol.load_datasets(args, rank=0)
    assert "at least one image of each of the 10 classes" in str(e.value)


def test_eval_linear_val_split_evaluates_on_the_held_out_images(tmp_path, capsys):
    """eval_linear.py --val-split N: the probe and the k-NN read the N held-out training images, not the test set."""
    args = co_byol.parse_args(["--dataset", "fake", "--image-size", "16", "--width", "8", "--ws", "0"])
    torch.manual_seed(0)
    co_byol.save_backbone(tmp_path / "backbone.pt", co_byol.OnlineNetwork(args).encoder.backbone, args)
    res = eval_linear.main(eval_linear.parse_args([
        "--checkpoint", str(tmp_path / "backbone.pt"), "--dataset", "fake", "--fake-size", "40", "--val-split", "10",
        "--epochs", "1", "--batch-size", "8", "--num-workers", "0", "--knn", "--knn-k", "3", "--precompute",
        "--output-dir", str(tmp_path / "eval")]))
    out = capsys.readouterr().out
    train, val = (int(w) for w in out.split(" val images")[0].split("; ")[-1].split(" train / "))
    assert train + val == 40 and 8 <= val <= 10  # FakeData's random labels: a class may have no image
    assert res["args"]["val_split"] == 10 and 0 <= res["knn"]["top1"] <= 100
