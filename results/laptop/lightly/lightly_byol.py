"""BYOL from lightly's parts with lightly's CIFAR-10 benchmark recipe, on the laptop recipe's network.

Reference arm for results/laptop: same backbone (co_byol's width-16 ResNet-18, built after
torch.manual_seed(seed) exactly as co_byol.main() builds it, so both arms start from the same weights),
same data (real CIFAR-10 train set), same batch (64), same number of epochs (3) = same images seen,
same k-NN evaluation (co_byol.KNNMonitor: 10k balanced bank every epoch, the whole training set at the end).
Everything else is the BYOLModel of lightly's CIFAR-10 benchmark (docs/source/getting_started/benchmarks/
cifar10_benchmark.py in lightly's repository), built from lightly 1.6.0's modules: BYOLProjectionHead(feat, 1024,
256), BYOLPredictionHead(256, 1024, 256), NegativeCosineSimilarity symmetrised with 0.5, update_momentum with
fixed m = 0.99, SGD lr 6e-2 * batch / 128, momentum 0.9, wd 5e-4, CosineAnnealingLR(T_max = epochs) stepped per
epoch, no warm-up, BYOLTransform(BYOLView{1,2}Transform(input_size=32, gaussian_blur=0.0)).

usage (from the repository root, lightly in its own environment or target folder, e.g.
`pip install --target /tmp/lightly_pkgs lightly lightning_utilities --no-deps`):
    PYTHONPATH=/tmp/lightly_pkgs OMP_NUM_THREADS=1 python results/laptop/lightly/lightly_byol.py SEED OUTDIR [DATA]
DATA: where prepare_cifar10.py wrote CIFAR-10 (default: data).
"""
import contextlib, copy, json, sys, time, types
from pathlib import Path

import torch
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.transforms.byol_transform import BYOLTransform, BYOLView1Transform, BYOLView2Transform

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root
import co_byol  # noqa: E402

seed, out = int(sys.argv[1]), Path(sys.argv[2])
data = sys.argv[3] if len(sys.argv) > 3 else "data"
out.mkdir(parents=True, exist_ok=True)
torch.set_flush_denormal(True)
a = co_byol.parse_args(["--recipe", "laptop", "--ws", "0", "--seed", str(seed), "--num-workers", "1",
                        "--data-dir", data])
torch.manual_seed(a.seed)  # as co_byol.main(): the same starting network as results/laptop/byol_s{seed}
backbone = co_byol.OnlineNetwork(a).encoder.backbone
feat = 8 * a.width  # .h of a ResNet-18 of base width w
proj, pred = BYOLProjectionHead(feat, 1024, 256), BYOLPredictionHead(256, 1024, 256)
backbone_m, proj_m = copy.deepcopy(backbone), copy.deepcopy(proj)
deactivate_requires_grad(backbone_m)
deactivate_requires_grad(proj_m)
criterion = NegativeCosineSimilarity()

transform = BYOLTransform(view_1_transform=BYOLView1Transform(input_size=32, gaussian_blur=0.0),
                          view_2_transform=BYOLView2Transform(input_size=32, gaussian_blur=0.0))
train = co_byol.CIFAR10Batches(data, train=True, transform=transform)  # the same PIL images as torchvision's CIFAR10
loader = torch.utils.data.DataLoader(train, batch_size=a.batch_size, shuffle=True, drop_last=True,
                                     num_workers=1, persistent_workers=True,
                                     generator=torch.Generator().manual_seed(seed))
params = list(backbone.parameters()) + list(proj.parameters()) + list(pred.parameters())
opt = torch.optim.SGD(params, lr=6e-2 * a.batch_size / 128, momentum=0.9, weight_decay=5e-4)
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, a.epochs)

train_base, val, n = co_byol.load_datasets(a, 0)
cpu = types.SimpleNamespace(device=torch.device("cpu"), autocast=contextlib.nullcontext())  # a Run's fields
knn = co_byol.KNNMonitor(a, train_base, val, n, cpu)
log = open(out / "metrics.jsonl", "a")


def record(d):
    print(json.dumps(d), flush=True)
    log.write(json.dumps(d) + "\n")
    log.flush()


train_time, step = 0.0, 0
record({"epoch": 0, "step": 0, "knn_top1": knn(backbone), "train_minutes": 0.0})
for epoch in range(a.epochs):
    backbone.train(); proj.train(); pred.train()
    t0 = time.time()
    for (x0, x1), _ in loader:
        update_momentum(backbone, backbone_m, m=0.99)
        update_momentum(proj, proj_m, m=0.99)
        p0, p1 = pred(proj(backbone(x0).h)), pred(proj(backbone(x1).h))
        with torch.no_grad():
            z0, z1 = proj_m(backbone_m(x0).h), proj_m(backbone_m(x1).h)
        loss = 0.5 * (criterion(p0, z1) + criterion(p1, z0))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 100 == 0:
            record({"step": step, "loss": loss.item(), "lr": opt.param_groups[0]["lr"],
                    "train_minutes": (train_time + time.time() - t0) / 60})
    sched.step()
    train_time += time.time() - t0
    record({"epoch": epoch + 1, "step": step, "knn_top1": knn(backbone), "train_minutes": train_time / 60})
final = {"seed": seed, "knn_top1_full_bank": knn(backbone, full_bank=True), "train_minutes": train_time / 60,
         "images_seen": step * a.batch_size, "lightly": "1.6.0", "recipe": __doc__.split("usage")[0].strip()}
record(final)
(out / "final_metrics.json").write_text(json.dumps(final, indent=2))
co_byol.save_backbone(out / "backbone.pt", backbone, a)
