"""Benchmark (not a test): CO-DINO's and geo_dino's local head and local loss at the laptop shapes, in CPU time.

    OMP_NUM_THREADS=1 python benchmarks/bench_local_dino.py [--compile] [--steps]

What results/bench_floor_laptop_cpu.md cites for the part of a CO-DINO step that its FLOPs do not explain.
(1) The local head (co_dino.DINOHead with the laptop sizes, BatchNorm) on 64 images x 5 x 5 positions (the
laptop network's local map), forward + backward under bf16 autocast: run by `per_position` as Linear layers (the
files' way) and as the same layers written as 1x1 convolutions on the channels_last map (the files' way until
2026-12-03).
(2) One view order of `co_dino.local_dino_loss` (B = 64, K = 4096, 5 x 5 positions, bf16 logits), forward +
backward, beside its form until 2026-12-03 (the products with the other view's distribution per cell, before
the mean over cells) and rewrites that were measured and not kept: chunks of images (for the cache), logsumexp
minus a batched matrix-vector product; and its two terms alone.
(3) geo_dino's local loss at the laptop shapes (B = 64, K = 4096, 5 x 5 cells per global crop, 2 x 2 per small
crop; the six pairs of App. A.2, random matchings with 80 % of the cells valid), forward + backward:
`local_distributions` + `local_pair_loss` as in geo_dino.py, beside the teacher targets picked by torch.gather
with the index expanded over the prototypes (the form until 2026-12-03), and the distributions alone.
With --compile, (2) and (3) also time the local loss compiled by torch.compile (as co_dino.py and geo_dino.py
compile their losses under --compile) and print each one's first call, the compile.
(4) With --steps: the whole laptop training step of CO-DINO and of geo_dino (the file's `train_step` on one batch,
benchmarks/bench_step.py's construction) with its loss compiled and the network eager, beside the same step
eager and its floor (benchmarks/bench_floor.py): what compiling the loss buys a step.
Medians of CPU time (`time.process_time`), the variants interleaved so that a busy spell of the machine falls on
all of them.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import co_dino  # noqa: E402
import geo_dino  # noqa: E402


def interleaved(fns: dict, reps: int, warmup: int = 5) -> dict:
    times = {k: [] for k in fns}
    for i in range(warmup + reps):
        for k, f in fns.items():
            t0 = time.process_time()
            f()
            if i >= warmup:
                times[k].append(time.process_time() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def conv_copy(head: co_dino.DINOHead) -> nn.Module:
    """The same layers as 1x1 convolutions on a (B, C, n, n) map, weights copied (the prototypes' g and v too)."""
    layers = []
    for m in head.mlp:
        if isinstance(m, nn.Linear):
            conv = nn.Conv2d(m.in_features, m.out_features, 1)
            conv.weight.data, conv.bias.data = m.weight.data[:, :, None, None].clone(), m.bias.data.clone()
            layers.append(conv)
        elif isinstance(m, nn.BatchNorm1d):
            layers.append(nn.BatchNorm2d(m.num_features))
        else:
            layers.append(m)

    class ConvHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = nn.Sequential(*layers)
            src = head.last_layer.parametrizations.weight  # weight = g * v / |v|: copy g and v
            k, d = src.original1.shape
            self.last_layer = nn.utils.parametrizations.weight_norm(nn.Conv2d(d, k, 1, bias=False))
            dst = self.last_layer.parametrizations.weight
            dst.original0.data = src.original0.data.reshape(k, 1, 1, 1).clone()
            dst.original1.data = src.original1.data[:, :, None, None].clone()

        def forward(self, x):
            return self.last_layer(F.normalize(self.mlp(x), dim=1))
    return ConvHead().to(memory_format=torch.channels_last)


def whole_steps(method: str, backend: str = "inductor", reps: int = 15, amp: str = "bf16", warmup: int = 3,
                spec: str = "resnet18:32:64", width: int = 16) -> dict:
    """(4): median CPU seconds of the floor, of the eager laptop step and of the same step with its loss compiled
    (`Nets.loss_fn`, as --compile sets it; the network stays eager), interleaved, after the compile (printed), and
    the two steps' losses on the same first batch (equal up to the compiler's rounding). `amp`: the laptop
    recipe's bf16 (on a CPU without native bf16 a step is ~10x slower: the test passes "off"). `spec` (arch:px:batch)
    and `width`: the laptop recipe's network and batch; the test's are smaller."""
    import copy
    import dataclasses
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_floor  # noqa: E402  (floor_fn; it imports bench_step: build)

    with tempfile.TemporaryDirectory() as out_dir:
        mod, args, run, nets, optimizer, batch, schedule = bench_floor.bench_step.build(
            method, spec, 1, "cpu", amp, width, out_dir, "laptop")
        loss_fn = {"co_dino": "co_dino_loss", "geo_dino": "geo_dino_loss"}[method]
        # one call: the optimiser keeps the copy's parameters
        nets_c, optimizer_c = copy.deepcopy((nets, optimizer))
        nets_c = dataclasses.replace(nets_c, loss_fn=torch.compile(getattr(mod, loss_fn), backend=backend))
        eager_loss = mod.train_step(nets, optimizer, batch, schedule, args, run).loss.item()
        t0 = time.time()  # the compiled step's first call starts from the same state as the eager one above
        compiled_loss = mod.train_step(nets_c, optimizer_c, batch, schedule, args, run).loss.item()
        print(f"{method} step, loss compiled: first step (the compile) {time.time() - t0:.1f} s")
        fns = {"floor": bench_floor.floor_fn(nets, batch, run),
               "step": lambda: mod.train_step(nets, optimizer, batch, schedule, args, run).loss.item(),
               "step, loss compiled": lambda: mod.train_step(nets_c, optimizer_c, batch, schedule, args, run).loss.item()}
        times = {k: v / 1e3 for k, v in interleaved(fns, reps, warmup=warmup).items()}
    return times | {"eager_loss": eager_loss, "compiled_loss": compiled_loss}


def compiled(label: str, fn, compiled_fn) -> dict:
    """{label: compiled_fn} after its first forward + backward (the compile, printed) and a check that it computes
    fn's value."""
    t0 = time.time()
    value = compiled_fn()
    value.backward()
    print(f"{label}: first forward + backward (the compile) {time.time() - t0:.1f} s")
    reference = fn()
    assert torch.allclose(value, reference, rtol=1e-4, atol=1e-5), (value, reference)
    return {label: compiled_fn}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compile", action="store_true", help="also time the local losses under torch.compile")
    p.add_argument("--steps", action="store_true", help="also time whole laptop steps with the loss compiled (4)")
    a = p.parse_args()
    compile_too = a.compile
    co_dino.keep_freed_memory()
    torch.set_flush_denormal(True)
    args = co_dino.parse_args(["--recipe", "laptop", "--ws", "0.2"])
    B, n, C, K = 64, args.local_map, 128, args.out_dim  # width-16 ResNet-18 at 32 px: 128 channels, a 5 x 5 map
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); B {B}, {n}x{n} positions, K {K}")

    head = co_dino.DINOHead(C, args.head_hidden, args.bottleneck, K, use_bn=args.head_bn)
    conv = conv_copy(head)
    x = torch.randn(B, C, n, n).contiguous(memory_format=torch.channels_last).requires_grad_()

    def fb(fn):
        def run():
            head.zero_grad(set_to_none=True)
            conv.zero_grad(set_to_none=True)
            x.grad = None
            with torch.autocast("cpu", torch.bfloat16):
                y = fn()
            y.float().sum().backward()
        return run
    res = interleaved({"Linear layers (per_position)": fb(lambda: co_dino.per_position(head, x)),
                       "1x1 convolutions": fb(lambda: conv(x))}, reps=20)
    print("local head, forward + backward:", ", ".join(f"{k} {v:.1f} ms" for k, v in res.items()))

    g = torch.Generator().manual_seed(0)
    sl = torch.randn(B, K, n, n, generator=g).bfloat16().contiguous(memory_format=torch.channels_last)
    tl = torch.randn(B, K, n, n, generator=g).bfloat16().contiguous(memory_format=torch.channels_last)
    sg, tg = torch.randn(B, K, generator=g).bfloat16(), torch.randn(B, K, generator=g).bfloat16()
    sl.requires_grad_(), sg.requires_grad_()
    c, lc, Ts, Tt = torch.randn(1, K) * 0.1, torch.randn(1, K) * 0.1, 0.1, 0.04

    def chunked(k):
        return lambda: sum(co_dino.local_dino_loss(a, b, e, d, c, lc, Ts, Tt) * a.shape[0]
                           for a, b, e, d in zip(sl.split(k), tl.split(k), sg.split(k), tg.split(k))) / B

    def products_per_cell():  # the loss until 2026-12-03: the products with the other view's distribution per cell
        s_l = F.log_softmax(sl.float().flatten(2).transpose(1, 2) / Ts, dim=-1)
        t_g = F.softmax((tg.float() - c) / Tt, dim=-1)
        t_l = F.softmax((tl.float().flatten(2).transpose(1, 2) - lc) / Tt, dim=-1)
        s_g = F.log_softmax(sg.float() / Ts, dim=-1)
        return (-(t_g.unsqueeze(1) * s_l).sum(-1) - (t_l * s_g.unsqueeze(1)).sum(-1)).mean()

    def lse_bmm():
        s = sl.float().flatten(2).transpose(1, 2) / Ts  # (B, n*n, K)
        t_g = F.softmax((tg.float() - c) / Tt, dim=-1)
        l2g = torch.logsumexp(s, -1) - torch.bmm(s, t_g.unsqueeze(2)).squeeze(2)
        t_l = F.softmax((tl.float().flatten(2).transpose(1, 2) - lc) / Tt, dim=-1)
        return (l2g - torch.bmm(t_l, F.log_softmax(sg.float() / Ts, dim=-1).unsqueeze(2)).squeeze(2)).mean()

    def student_term():
        s_l = F.log_softmax(sl.float().flatten(2).transpose(1, 2) / Ts, dim=-1)
        return -(F.softmax((tg.float() - c) / Tt, dim=-1) * s_l.mean(1)).sum(-1).mean()

    def teacher_term():
        t_l = F.softmax((tl.flatten(2).transpose(1, 2) - lc) / Tt, dim=-1)
        return -(t_l.mean(1) * F.log_softmax(sg.float() / Ts, dim=-1)).sum(-1).mean()

    def fbl(fn):
        def run():
            sl.grad = sg.grad = None
            fn().backward()
        return run
    ref = co_dino.local_dino_loss(sl, tl, sg, tg, c, lc, Ts, Tt).item()
    assert all(abs(f().item() - ref) < 1e-3 * abs(ref) for f in (lse_bmm, chunked(8), products_per_cell))
    fns = {"local_dino_loss": fbl(lambda: co_dino.local_dino_loss(sl, tl, sg, tg, c, lc, Ts, Tt)),
           "products per cell (before)": fbl(products_per_cell),
           "in chunks of 8 images": fbl(chunked(8)), "logsumexp + bmm": fbl(lse_bmm),
           "its student term alone": fbl(student_term), "its teacher term alone": fbl(teacher_term)}
    if compile_too:
        loss_c = torch.compile(co_dino.local_dino_loss)
        fns |= compiled("local_dino_loss, torch.compile", lambda: co_dino.local_dino_loss(sl, tl, sg, tg, c, lc, Ts, Tt),
                        lambda: loss_c(sl, tl, sg, tg, c, lc, Ts, Tt))
        fns["local_dino_loss, torch.compile"] = fbl(fns["local_dino_loss, torch.compile"])
    res = interleaved(fns, reps=20)
    print("local loss, one view order, forward + backward:", ", ".join(f"{k} {v:.1f} ms" for k, v in res.items()))

    res = interleaved(geo_local_loss_variants(B, K, args_geo_grids(), compile_too)[0], reps=20)
    print("geo_dino local loss, six pairs, forward + backward:", ", ".join(f"{k} {v:.1f} ms" for k, v in res.items()))
    for method in ("co_dino", "geo_dino") if a.steps else ():
        r = whole_steps(method)
        print(f"{method} laptop step, CPU time: floor {r['floor']:.3f} s, step {r['step']:.3f} s (/ floor "
              f"{r['step'] / r['floor']:.2f}), loss compiled {r['step, loss compiled']:.3f} s (/ floor "
              f"{r['step, loss compiled'] / r['floor']:.2f}); first-step loss {r['eager_loss']:.5f} eager, "
              f"{r['compiled_loss']:.5f} compiled")


def args_geo_grids() -> tuple:
    args = geo_dino.parse_args(["--recipe", "laptop"])
    return args.grid_global, args.grid_local


def geo_local_loss_variants(B: int, K: int, grids: tuple, compile_too: bool = False) -> tuple[dict, list]:
    """Forward + backward of geo_dino's local loss (L_L of App. A.2) on random bf16 logits in the heads' layout,
    as geo_dino.py computes it and as it did until 2026-12-03 (torch.gather): ({label: function}, the student
    logits whose .grad each function fills); both forms give the same value."""
    ng, nl = grids
    g = torch.Generator().manual_seed(0)

    def logits(n):  # the local head's output: (B, n, n, K) memory seen as (B, K, n, n)
        return (torch.randn(B, n, n, K, generator=g) * 3).bfloat16().permute(0, 3, 1, 2)
    student = [geo_dino.DINOOut(None, None, None, logits(n).requires_grad_()) for n in (ng, ng, nl, nl)]
    teacher = [geo_dino.DINOOut(None, None, None, logits(ng)) for _ in range(2)]
    lc, Ts, Tt = torch.randn(1, K, generator=g) * 0.1, 0.1, 0.04
    pairs = [(iq, v) for iq in range(2) for v in range(4) if v != iq]
    index = {(iq, v): torch.randint(0, ng * ng, (B, (ng if v < 2 else nl) ** 2), generator=g) for iq, v in pairs}
    valid = {p: torch.rand(i.shape, generator=g) > 0.2 for p, i in index.items()}

    def gathered(log_p_s, p_t, idx, ok):  # local_pair_loss until 2026-12-03
        t = torch.gather(p_t, 1, idx.unsqueeze(-1).expand(-1, -1, p_t.shape[-1]))
        ce = -(t * log_p_s).sum(-1)
        return ((ce * ok).sum(1) / ce.shape[1]).mean()

    def loss(pair_loss):
        def run():
            log_p_s, p_t = geo_dino.local_distributions(student, teacher, lc, Ts, Tt)
            return sum(pair_loss(log_p_s[v], p_t[iq], index[iq, v], valid[iq, v]) for iq, v in pairs) / len(pairs)
        return run

    def distributions_only():
        log_p_s, p_t = geo_dino.local_distributions(student, teacher, lc, Ts, Tt)
        return sum(x.mean() for x in log_p_s) + sum(x.mean() for x in p_t)

    def fb(fn):
        def run():
            for o in student:
                o.logits_l.grad = None
            fn().backward()
        return run
    assert torch.equal(loss(geo_dino.local_pair_loss)(), loss(gathered)())
    fns = {"local_pair_loss (index_select)": fb(loss(geo_dino.local_pair_loss)),
           "torch.gather (before)": fb(loss(gathered)), "the distributions alone": fb(distributions_only)}
    if compile_too:
        label = "local_pair_loss, torch.compile"
        fns |= compiled(label, loss(geo_dino.local_pair_loss), torch.compile(loss(geo_dino.local_pair_loss)))
        fns[label] = fb(fns[label])
    return fns, [o.logits_l for o in student]


if __name__ == "__main__":
    main()
