"""How fast does CLIP learn each attribute of the synthetic world? A diagnostic for the quickstart.

    python benchmarks/clip_shape_probe.py --steps 330 --every 55            # the quickstart budget
    python benchmarks/clip_shape_probe.py --steps 1000 --every 100 --pool mean
    python benchmarks/clip_shape_probe.py --pool mean --vision convnet --text-layers 0 --token-init-std 1  # the quickstart's towers
    python benchmarks/clip_shape_probe.py --pool mean --vision convnet --text-layers 0 --token-init-std 1 --steps 440 \
        --loss siglip --init-logit-scale 20                                # SigLIP's quickstart

Trains a quickstart-shaped CLIP (by default the ViT and 3-layer text tower the quickstart used
until issue 16; the last line above gives today's ConvNet and bag of words; same AdamW groups,
warmup + cosine, clipping, logit-scale clamp as `lit-vlm fit`) with a plain loop on images decoded
once into memory (no crop augmentation, no DataLoader), so a run costs only model compute. Every
``--every`` steps it prints the val mean R@1 and zero-shot top-1; at the end, linear probes
(L-BFGS logistic regression fitted on the test split, scored on val) of the image features for the
largest object's shape, colour and grid cell and the object count, the zero-shot prediction
histogram and the cosine similarities of the class embeddings. Figures: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import math
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lit_vlm.datamodules.synth import CLASSNAMES, COLOURS, SHAPES, TEMPLATES
from lit_vlm.datamodules.tokenizer import Tokenizer
from lit_vlm.datamodules.transforms import CLIP_MEAN, CLIP_STD
from lit_vlm.metrics import retrieval_metrics
from lit_vlm.models.clip import CLIP
from lit_vlm.modules import ConvNet, TextTransformer, VisionTransformer
from lit_vlm.optim import build_adamw, param_groups, warmup_cosine

CONTEXT = 56


def load_split(root: Path, split: str, size: int, tokenizer: Tokenizer) -> dict:
    images, captions, labels, objects = [], [], [], []
    for shard in sorted(glob.glob(str(root / split / "*.tar"))):
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, ext = m.name.rsplit(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(m).read()
        for key in sorted(members):
            meta = json.loads(members[key]["json"])
            img = Image.open(io.BytesIO(members[key]["jpg"])).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
            images.append(np.asarray(img))
            captions.append(meta["captions"][:5])
            labels.append(meta["label"])
            objects.append(meta["objects"])
    ids, mask = tokenizer.encode([c for cs in captions for c in cs], CONTEXT)  # [N*5, L]
    n = len(captions)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255  # [N, 3, H, W]
    return {"image": (pixels - mean) / std, "ids": ids.view(n, 5, -1), "mask": mask.view(n, 5, -1),
            "label": torch.tensor(labels), "objects": objects}


def attribute_targets(objects: list) -> dict[str, torch.Tensor]:
    large = [next(o for o in objs if o["size"] == "large") for objs in objects]
    return {
        "shape": torch.tensor([SHAPES.index(o["shape"]) for o in large]),
        "colour": torch.tensor([COLOURS.index(o["colour"]) for o in large]),
        "cell": torch.tensor([("top", "middle", "bottom").index(o["row"]) * 3 + ("left", "center", "right").index(o["col"]) for o in large]),
        "count": torch.tensor([len(objs) - 1 for objs in objects]),
    }


def linear_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor) -> float:
    classes = int(max(y_train.max(), y_test.max())) + 1
    w = torch.zeros(x_train.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x_train @ w + b, y_train) + 1e-3 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return ((x_test @ w + b).argmax(1) == y_test).float().mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="data/synth", help="synthetic world (lit-vlm data synth --out ...)")
    p.add_argument("--steps", type=int, default=330, help="optimizer steps (330 x 128 = the quickstart's 42k samples)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--pool", default="cls", help="vision pooling (cls|mean); the text tower uses eot for cls, mean for mean")
    p.add_argument("--every", type=int, default=55)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vision", default="vit", choices=["vit", "convnet"], help="image tower: the ViT of earlier quickstarts or the ConvNet")
    p.add_argument("--norm", default="batch", choices=["batch", "group"], help="the ConvNet's normalisation")
    p.add_argument("--text-layers", type=int, default=3, help="text transformer blocks (0: a bag of words)")
    p.add_argument("--token-init-std", type=float, default=0.02, help="std of the text token embedding's init")
    p.add_argument("--loss", default="clip", choices=["clip", "siglip"], help="CLIP's InfoNCE or SigLIP's pairwise sigmoid")
    p.add_argument("--init-logit-scale", type=float, default=None, help="initial exp(t) (unset: the loss's default, 14.3 or 10)")
    p.add_argument("--init-logit-bias", type=float, default=None, help="--loss siglip: initial bias (unset: -10)")
    a = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    tok = Tokenizer.synthetic()
    root = Path(a.root)
    train, val, test = (load_split(root, s, 64, tok) for s in ("train", "val", "test"))
    if a.vision == "convnet":
        vision = ConvNet(channels=(32, 64, 128, 128), strides=(2, 2, 2, 1), norm=a.norm, image_size=64)
    else:
        vision = VisionTransformer(preset="small", image_size=64, patch_size=8, width=128, layers=4, heads=4, stem="conv", pool=a.pool)
    text = TextTransformer(preset="small", width=128, layers=a.text_layers, heads=4, vocab_size=tok.vocab_size, context_length=CONTEXT,
                           pad_id=tok.pad_id, pool="mean" if a.pool == "mean" or a.text_layers == 0 else "eot",
                           token_init_std=a.token_init_std)
    scale = None if a.init_logit_scale is None else math.log(a.init_logit_scale)
    model = CLIP(vision, text, embed_dim=128, lr=a.lr, weight_decay=0.1, loss=a.loss, init_logit_scale=scale,
                 init_logit_bias=a.init_logit_bias)
    opt = build_adamw(param_groups(model, 0.1), a.lr, (0.9, 0.98), 1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(a.steps, int(0.05 * a.steps), 0.0))

    def encode_images(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([model.encode_image(x[i:i + 250]) for i in range(0, len(x), 250)])  # [N, E]

    def class_embeddings() -> torch.Tensor:
        rows = []
        for name in CLASSNAMES:
            ids, mask = tok.encode([t.format(name) for t in TEMPLATES], CONTEXT)
            rows.append(F.normalize(model.encode_text(ids, mask).mean(0), dim=-1))
        return torch.stack(rows)  # [C, E]

    @torch.no_grad()
    def evaluate() -> tuple[float, float]:
        model.eval()
        image = encode_images(val["image"])
        ids, mask = val["ids"].flatten(0, 1), val["mask"].flatten(0, 1)
        text_emb = torch.cat([model.encode_text(ids[i:i + 500], mask[i:i + 500]) for i in range(0, len(ids), 500)])
        r = retrieval_metrics(image, text_emb, torch.arange(len(image)).repeat_interleave(5))
        zs = ((image @ class_embeddings().T).argmax(1) == val["label"]).float().mean().item()
        model.train()
        return r["mean_R@1"], zs

    g = torch.Generator().manual_seed(0)
    perm, pos, start = torch.randperm(len(train["image"]), generator=g), 0, time.time()
    for step in range(1, a.steps + 1):
        if pos + a.batch > len(perm):
            perm, pos = torch.randperm(len(train["image"]), generator=g), 0
        idx = perm[pos:pos + a.batch]
        pos += a.batch
        pick = torch.randint(0, 5, (a.batch,), generator=g)  # one random caption per image
        terms = model({"image": train["image"][idx], "text_ids": train["ids"][idx, pick], "text_mask": train["mask"][idx, pick]})
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, model.max_log_scale)
        if step % a.every == 0 or step == a.steps:
            r1, zs = evaluate()
            print(f"step {step:5d}  samples {step * a.batch:7d}  loss {terms['loss'].item():.3f}  "
                  f"val mean R@1 {r1:.3f}  zero-shot top-1 {zs:.3f}  ({time.time() - start:.0f} s)", flush=True)

    model.eval()
    with torch.no_grad():
        pooled = {s: torch.cat([model.vision(d["image"][i:i + 250]).pooled for i in range(0, len(d["image"]), 250)])
                  for s, d in (("test", test), ("val", val))}
        pred = (encode_images(val["image"]) @ class_embeddings().T).argmax(1)
        cls = class_embeddings()
    y_test, y_val = attribute_targets(test["objects"]), attribute_targets(val["objects"])
    chance = {"shape": 1 / 8, "colour": 1 / 8, "cell": 1 / 9, "count": 1 / 4}
    for name in ("shape", "colour", "cell", "count"):
        acc = linear_probe(pooled["test"], y_test[name], pooled["val"], y_val[name])
        print(f"linear probe of the image tower's pooled features, {name:6s}: {acc:.3f}  (chance {chance[name]:.3f})")
    print("zero-shot predictions per class:", torch.bincount(pred, minlength=len(CLASSNAMES)).tolist())
    print("class-embedding cosine similarity (", " ".join(CLASSNAMES), "):")
    print((cls @ cls.T).numpy().round(2))


if __name__ == "__main__":
    main()
