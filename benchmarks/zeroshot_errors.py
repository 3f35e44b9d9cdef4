"""Where do a CLIP run's zero-shot errors go? A diagnostic for the synthetic world.

    python benchmarks/zeroshot_errors.py runs/clip-quickstart/version_0/checkpoints/last.ckpt

The zero-shot label is the shape of the scene's large object. For each test image this prints
whether the prediction is that shape, another shape present in the image (the model sees the
shape but not which object is large: a binding error) or a shape absent from it (the model does
not see it), beside the top-1 of guessing uniformly among the shapes present. The preprocessing
is the evaluation transform's; the templates and class names are the world's. Figures:
benchmarks/README.md ("Every family learns the embedded world").
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import tarfile

import torch
from PIL import Image

from lit_vlm.callbacks.zeroshot import class_embeddings
from lit_vlm.datamodules.synth import CLASSNAMES, TEMPLATES
from lit_vlm.datamodules.tokenizer import Tokenizer
from lit_vlm.datamodules.transforms import eval_transform
from lit_vlm.models import CLIP


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a CLIP run's .ckpt file")
    p.add_argument("--root", default="data/synth")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--context-length", type=int, default=56)
    a = p.parse_args()
    model = CLIP.load_from_checkpoint(a.checkpoint, map_location="cpu").eval()
    tok, transform = Tokenizer.synthetic(), eval_transform(a.image_size)
    images, objects = [], []
    for shard in sorted(glob.glob(f"{a.root}/test/*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name in sorted(n for n in members if n.endswith(".jpg")):
                images.append(transform(Image.open(io.BytesIO(tar.extractfile(members[name]).read())).convert("RGB")))
                objects.append(json.loads(tar.extractfile(members[name[:-4] + ".json"]).read())["objects"])
    with torch.no_grad():
        classes = class_embeddings(model, tok, a.context_length, CLASSNAMES, TEMPLATES)  # [C, E], as the callback builds them
        image_emb = torch.cat([model.encode_image(torch.stack(images[i:i + 250])) for i in range(0, len(images), 250)])
        pred = (image_emb @ classes.T).argmax(1).tolist()  # [N]
    right = present = 0
    uniform = 0.0
    for p_idx, objs in zip(pred, objects):
        large = next(o["shape"] for o in objs if o["size"] == "large")
        shapes = {o["shape"] for o in objs}
        right += CLASSNAMES[p_idx] == large
        present += CLASSNAMES[p_idx] in shapes
        uniform += 1 / len(shapes)
    n = len(pred)
    print(f"{n} test images: top-1 {right / n:.3f}; another shape present in the image {(present - right) / n:.3f}; "
          f"a shape absent from it {(n - present) / n:.3f}; guessing uniformly among the shapes present {uniform / n:.3f}")


if __name__ == "__main__":
    main()
