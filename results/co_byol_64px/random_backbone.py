"""Write the backbone.pt of a co_byol.py run's network at random initialisation, for eval_linear.py:

    python results/co_byol_64px/random_backbone.py OUT.pt --recipe laptop --image-size 64 --width 12 \
        --arch rf29_resnet18 --ws 0.2

The flags are co_byol.py's; the backbone is built as co_byol.py builds it (torch.manual_seed(--seed), then
rf_resnet.build_backbone with the run's arch, stem, MLP and width) and saved in co_byol.py's format.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import co_byol  # noqa: E402
import rf_resnet  # noqa: E402

if __name__ == "__main__":
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    args = co_byol.parse_args(argv + ["--output-dir", str(out.parent / "unused_run_dir")])
    torch.manual_seed(args.seed)
    backbone = rf_resnet.build_backbone(args.arch, stem=args.stem, mlp=False if args.no_mlp else None,
                                        width=args.width)
    out.parent.mkdir(parents=True, exist_ok=True)
    co_byol.save_backbone(out, backbone, args)
    print(f"wrote {out}: {args.arch}, width {args.width}, stem {args.stem}, seed {args.seed}, random weights")
