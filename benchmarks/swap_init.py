"""Controlled initialisation runs: minidetr's initial weights with some tensors taken from
an official model's initial weights, saved as a checkpoint train.py can --resume.

    python benchmarks/swap_init.py --variant dn --seed 0 --official INIT.pt \
        --groups encoder_attn --out swapped.pth
    python train.py --variant dn --seed 0 --resume swapped.pth --output_dir out/swap

INIT.pt is what the reference-training harness writes with `--save_init` (the official
model as built, before any step, as `init_state_dict` under the official names). The model is
built exactly as train.py builds it (same seed, datasets first), so the resumed run has the
same data order and the same random stream as a plain `train.py --seed S` run: only the
swapped tensors differ. The checkpoint holds weights and config only (no optimiser state,
epoch 0, step 0). To swap into an older minidetr's init, put that checkout first on
PYTHONPATH: this script imports whichever minidetr Python finds first.

Groups (minidetr key prefixes after conversion; see GROUPS): encoder_attn, encoder,
decoder_biases, decoder, queries, label_enc, heads, backbone, all.
"""
import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parent.parent))   # after PYTHONPATH entries

from minidetr import build                                      # noqa: E402
from minidetr.config import Config                              # noqa: E402
from minidetr.convert import rename                             # noqa: E402
try:                                                            # this checkout's home of it
    from minidetr.check import build_datasets                   # noqa: E402
except ImportError:                                             # an older minidetr's
    from minidetr.engine import build_datasets                  # noqa: E402

OFFICIAL_NAME = {"detr": "detr", "conditional": "cond", "smca": "smca", "dn": "dn"}
GROUPS = {
    "encoder_attn": lambda k: k.startswith("encoder.") and ".self_attn." in k,
    "encoder": lambda k: k.startswith("encoder."),
    "decoder_biases": lambda k: (k.startswith("decoder.layers.") and k.endswith(".bias")
                                 and ".norm" not in k),
    "decoder": lambda k: k.startswith("decoder.") and not k.startswith("decoder.bbox_embed."),
    "queries": lambda k: k.startswith("queries."),
    "label_enc": lambda k: k.startswith("denoiser."),
    "heads": lambda k: k.startswith(("class_embed.", "bbox_embed.", "decoder.bbox_embed.")),
    "backbone": lambda k: k.startswith(("backbone.", "input_proj.")),
    "all": lambda k: True,
}


def main(argv=None):
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_argument("--variant", default="dn", choices=sorted(OFFICIAL_NAME))
    cli.add_argument("--seed", type=int, default=0)
    cli.add_argument("--official", required=True, help="a ref_train.py --save_init file")
    cli.add_argument("--groups", nargs="*", default=[], choices=sorted(GROUPS),
                     help="tensor groups to take from the official init (none: minidetr's own)")
    cli.add_argument("--out", required=True)
    opt = cli.parse_args(argv)

    cfg = Config.for_variant(opt.variant, "tiny", seed=opt.seed)
    torch.manual_seed(cfg.seed)                 # as train.py: seed, datasets, then the model
    build_datasets(cfg)
    model = build(cfg)[0]
    ours = model.state_dict()

    saved = torch.load(opt.official, map_location="cpu", weights_only=True)
    # init_state_dict: the model as built; `state_dict` there is a perturbed copy for probing
    theirs, _, unmapped = rename(saved["init_state_dict"], OFFICIAL_NAME[opt.variant])
    if unmapped:
        sys.exit(f"error: {opt.official}: keys with no minidetr name: {unmapped[:5]}")
    taken = [k for k in ours if k in theirs and any(GROUPS[g](k) for g in opt.groups)]
    for k in taken:
        if theirs[k].shape != ours[k].shape:
            sys.exit(f"error: {k}: official {tuple(theirs[k].shape)} vs minidetr {tuple(ours[k].shape)}")
        ours[k] = theirs[k].to(ours[k].dtype)
    os.makedirs(os.path.dirname(os.path.abspath(opt.out)), exist_ok=True)
    torch.save({"model": ours, "config": cfg.to_dict(), "epoch": 0, "step": 0}, opt.out)
    print(f"{opt.out}: {len(taken)} of {len(ours)} tensors from {opt.official} "
          f"(groups: {', '.join(opt.groups) or 'none'})")


if __name__ == "__main__":
    main()
