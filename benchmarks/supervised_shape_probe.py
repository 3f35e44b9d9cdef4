"""Can the quickstart's vision tower learn the large object's shape from a direct label, and how fast?

    python benchmarks/supervised_shape_probe.py --pool mean             # the quickstart's pooling
    python benchmarks/supervised_shape_probe.py --pool cls
    python benchmarks/supervised_shape_probe.py --pool mean --image-size 128 --patch-size 16
    python benchmarks/supervised_shape_probe.py --tower convnet [--norm group]   # the quickstart's tower

A linear classifier of the zero-shot label (the large object's shape, 8 classes) on the tower's
pooled features, trained with the tower through the real data pipeline (the DataModule, its
augmentation, one loader worker): batch 128, AdamW, one-cycle lr. It prints the val accuracy
every 50 steps. This is a diagnostic of what the tower can learn at this budget, not a zero-shot
method: it uses the labels. Figures: benchmarks/README.md ("Every family learns the embedded world").
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from lit_vlm.datamodules import ImageTextDataModule, image_text
from lit_vlm.modules import ConvNet, VisionTransformer


class _LabelledCollator(image_text.ImageTextCollator):
    """The training collator, plus each sample's label (evaluation batches have it already)."""

    def __call__(self, samples):
        batch = super().__call__(samples)
        batch["label"] = torch.tensor([s["label"] for s in samples])  # [B]
        return batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="data/synth")
    parser.add_argument("--tower", default="vit", choices=["vit", "convnet"])
    parser.add_argument("--norm", default="batch", choices=["batch", "group"], help="the ConvNet's normalisation")
    parser.add_argument("--pool", default="mean", choices=["mean", "cls", "attn"], help="the ViT's pooling")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--patch-size", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    image_text.ImageTextCollator = _LabelledCollator  # the corpus builds its collators from this name
    dm = ImageTextDataModule(root=args.root, image_size=args.image_size, context_length=56, batch_size=128,
                             eval_batch_size=250, num_workers=1, train_epoch_samples=14000)
    dm.prepare_data()
    dm.setup("fit")
    if args.tower == "convnet":
        tower = ConvNet(channels=(32, 64, 128, 128), strides=(2, 2, 2, 1), norm=args.norm, image_size=args.image_size)
    else:
        tower = VisionTransformer("small", patch_size=args.patch_size, width=128, layers=4, heads=4, stem="conv",
                                  pool=args.pool, image_size=args.image_size)
    head = torch.nn.Linear(128, 8)
    opt = torch.optim.AdamW([*tower.parameters(), *head.parameters()], lr=args.lr, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps, pct_start=0.05)
    val = list(dm.val_dataloader())
    step, start = 0, time.perf_counter()
    while step < args.steps:
        for batch in dm.train_dataloader():
            loss = F.cross_entropy(head(tower(batch["image"]).pooled), batch["label"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
            step += 1
            if step % 50 == 0 or step == args.steps:
                tower.eval()
                with torch.no_grad():
                    right = sum((head(tower(v["image"]).pooled).argmax(1) == v["label"]).sum().item() for v in val)
                tower.train()
                accuracy = right / sum(len(v["label"]) for v in val)
                print(f"step {step}  samples {step * 128}  loss {loss.item():.3f}  val accuracy {accuracy:.3f}  "
                      f"{time.perf_counter() - start:.0f} s", flush=True)
            if step >= args.steps:
                break


if __name__ == "__main__":
    main()
