"""Run evaluation callbacks through ``Trainer.test`` on a tiny hand-built evaluation set, in one
process or as N CPU DDP processes (gloo), and write what they logged to JSON (run by
tests/test_eval_ddp.py as a plain subprocess; Lightning starts the other ranks itself).

The set is deliberately awkward for DDP: an odd number of images split unevenly over the ranks
(rank r gets images r, r + N, ...), no distributed sampler, so nothing is padded or duplicated and
a metric only matches the single-process one if the callback really gathers every rank's samples.

usage: python tests/ddp_eval_worker.py --devices N --out DIR [--callbacks caption ...]
                                       [--captions-json PATH] [--num-images 23] [--batch-size 4]
                                       [--fewshot-root WORLD --model doubles.InterleavedDouble]

Adding a callback is one line in ``CALLBACKS``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/: doubles

#: name -> (callback class path, init args). Every callback evaluates the test split only.
CALLBACKS: dict[str, tuple[str, dict[str, Any]]] = {
    "caption": ("lit_vlm.callbacks.captioning.CaptionEvaluation", {"num_examples": 4}),
    "retrieval": ("lit_vlm.callbacks.retrieval.RetrievalEvaluation", {"chunk_size": 5}),
    "zeroshot": ("lit_vlm.callbacks.zeroshot.ZeroShotEvaluation", {}),
    "vqa": ("lit_vlm.callbacks.vqa.VQAEvaluation", {"batch_size": 3}),
}

COLOURS = ("red", "green", "blue")
SHAPES = ("circle", "square", "star")
WORDS = ("circle", "square", "star", "two", "yes", "no", "a", "the", "large", "small")
TEMPLATES = ("a photo of a {} thing.",)
VOCAB = sorted({*COLOURS, *SHAPES, *WORDS, "and", "shape", "shapes", "what", "colour", "is", "how", "many",
                "are", "there", "photo", "of", "thing", "?", ".", "left", "right", "on"})
IMAGE_SIZE = 16
CONTEXT_LENGTH = 16


def make_samples(num_images: int = 23, seed: int = 0) -> list[dict[str, Any]]:
    """The evaluation set: a pure function of (index, seed), identical in every process.

    Each image is uniform noise with a bias on one channel (its "colour", also its ``label``);
    2-4 distinct reference captions mostly name that colour; 0-2 questions with 10 answers each."""
    samples = []
    for i in range(num_images):
        g = torch.Generator().manual_seed(seed * 100_003 + i)
        colour = i % len(COLOURS)
        image = torch.rand(3, IMAGE_SIZE, IMAGE_SIZE, generator=g)  # [3, H, W]
        image[colour] += 0.3

        def pick(options, g=g):
            return options[int(torch.randint(len(options), (1,), generator=g))]

        captions: list[str] = []
        wanted = 2 + int(torch.randint(3, (1,), generator=g))
        while len(captions) < wanted:  # distinct captions, as in COCO
            c = COLOURS[colour] if torch.rand(1, generator=g) < 0.8 else pick(COLOURS)
            caption = pick((
                f"a {c} {pick(WORDS)} and a {pick(WORDS)} shape.",
                f"the {pick(('large', 'small'))} {c} {pick(SHAPES)} on the {pick(('left', 'right'))}.",
                f"two {c} {pick(SHAPES)}s.",
                f"A {c} {pick(SHAPES)}, and a {pick(SHAPES)}.",
            ))
            if caption not in captions:
                captions.append(caption)
        image_id = 1000 + i
        questions = []
        for j in range(int(torch.randint(3, (1,), generator=g))):
            shape = pick(SHAPES)
            if j % 2 == 0:
                q, a = f"what colour is the {shape}?", COLOURS[colour]
            else:
                q, a = f"how many {shape}s are there?", pick(("two", "yes", "no"))
            questions.append({"question_id": image_id * 10 + j, "question": q, "answers": [a] * 7 + [pick(WORDS)] * 3})
        samples.append({"sample_id": f"img{i:04d}", "image_id": image_id, "image": image, "captions": captions,
                        "label": colour, "questions": questions})
    return samples


def coco_captions(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The samples' captions in the COCO caption annotation format."""
    return {
        "images": [{"id": s["image_id"], "file_name": f"{s['sample_id']}.jpg"} for s in samples],
        "annotations": [{"image_id": s["image_id"], "id": s["image_id"] * 100 + j, "caption": c}
                        for s in samples for j, c in enumerate(s["captions"])],
    }


def vqa_files(samples: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The samples' questions and answers in the official VQAv2 questions / annotations formats."""
    questions, annotations = [], []
    for s in samples:
        for q in s["questions"]:
            questions.append({"question_id": q["question_id"], "image_id": s["image_id"], "question": q["question"]})
            kind = "number" if q["question"].startswith("how many") else "other"
            annotations.append({
                "question_id": q["question_id"], "image_id": s["image_id"],
                "question_type": "how many" if kind == "number" else "what color is the",
                "answer_type": kind, "multiple_choice_answer": q["answers"][0],
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(q["answers"])],
            })
    return {"questions": questions}, {"annotations": annotations}


def collate(samples: list[dict[str, Any]], tokenizer) -> dict[str, Any]:
    """The eval batch contract of lit_vlm.datamodules.image_text."""
    batch: dict[str, Any] = {
        "image": torch.stack([s["image"] for s in samples]),  # [B, 3, H, W]
        "sample_id": [s["sample_id"] for s in samples],
        "image_id": [s["image_id"] for s in samples],
        "captions": [list(s["captions"]) for s in samples],
        "label": torch.tensor([s["label"] for s in samples]),  # [B]
        "question": [q["question"] for s in samples for q in s["questions"]],
        "question_id": [q["question_id"] for s in samples for q in s["questions"]],
        "question_owner": torch.tensor([row for row, s in enumerate(samples) for _ in s["questions"]], dtype=torch.long),  # [Q]
    }
    batch["text_ids"], batch["text_mask"] = tokenizer.encode([s["captions"][0] for s in samples], CONTEXT_LENGTH)  # [B, L]
    every = [c for s in samples for c in s["captions"]]
    batch["caption_ids"], batch["caption_mask"] = tokenizer.encode(every, CONTEXT_LENGTH)  # [N, L]
    batch["caption_owner"] = torch.tensor([row for row, s in enumerate(samples) for _ in s["captions"]])  # [N]
    return batch


def _load(class_path: str):
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def main(argv: list[str] | None = None) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.data import DataLoader, Subset

    from lit_vlm.datamodules.tokenizer import Tokenizer

    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--out", required=True)
    parser.add_argument("--callbacks", nargs="+", default=list(CALLBACKS), choices=list(CALLBACKS))
    parser.add_argument("--model", default="doubles.GeneratingDouble", help="LightningModule class path")
    parser.add_argument("--captions-json", default=None, help="offered by the DataModule as eval_annotations()['captions']")
    parser.add_argument("--num-images", type=int, default=23)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--predict", action="store_true", help="run predict with the PredictionWriter instead of test")
    parser.add_argument("--fewshot-root", default=None, help="run FewShotEvaluation on this synthetic world instead")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    vqa_questions, vqa_annotations = out / "vqa_questions.json", out / "vqa_annotations.json"
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # rank 1 is started by Lightning after rank 0 wrote them
        questions, annotations = vqa_files(make_samples(args.num_images))
        vqa_questions.write_text(json.dumps(questions))
        vqa_annotations.write_text(json.dumps(annotations))

    class EvalWorld(pl.LightningDataModule):
        """The hand-built set, sharded by rank without padding (uneven shards)."""

        classnames = list(COLOURS)
        templates = list(TEMPLATES)
        context_length = CONTEXT_LENGTH
        image_size = IMAGE_SIZE

        def __init__(self) -> None:
            super().__init__()
            self.tokenizer = Tokenizer.from_words(VOCAB)
            self.vocab_size = self.tokenizer.vocab_size
            self.samples = make_samples(args.num_images)

        def eval_annotations(self, stage: str) -> dict[str, str]:
            files = {"vqa_questions": str(vqa_questions), "vqa_annotations": str(vqa_annotations)}
            return {**files, "captions": args.captions_json} if args.captions_json else files

        def _loader(self, overlap: bool = False) -> DataLoader:
            rank, world = self.trainer.global_rank, self.trainer.world_size
            rows = list(range(rank, len(self.samples), world))
            if overlap and 0 not in rows:  # every rank also sees sample 0: the writer must keep it once
                rows.append(0)
            shard = Subset(self.samples, rows)
            return DataLoader(shard, batch_size=args.batch_size, shuffle=False,
                              collate_fn=lambda s: collate(s, self.tokenizer))

        def test_dataloader(self) -> DataLoader:
            return self._loader()

        def val_dataloader(self) -> DataLoader:
            return self._loader()

        def predict_dataloader(self) -> DataLoader:
            return self._loader(overlap=True)

    if args.predict:
        from lit_vlm.callbacks.predictions import PredictionWriter

        callbacks = {"predict": PredictionWriter(dirpath=str(out))}
    elif args.fewshot_root:
        from lit_vlm.callbacks.fewshot import FewShotEvaluation

        callbacks = {"fewshot": FewShotEvaluation(root=args.fewshot_root, shots=[0, 2], seeds=[0, 1], num_queries=5,
                                                  pool_size=6, image_size=32, batch_size=2)}
    else:
        callbacks = {name: _load(CALLBACKS[name][0])(splits=["test"], **CALLBACKS[name][1]) for name in args.callbacks}
    trainer = pl.Trainer(
        accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
        use_distributed_sampler=False, logger=TensorBoardLogger(args.out, name="run", version=0),
        callbacks=list(callbacks.values()), enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False,
    )
    if args.predict:
        trainer.predict(_load(args.model)(), datamodule=EvalWorld(), return_predictions=False)
    else:
        trainer.test(_load(args.model)(), datamodule=EvalWorld())
    log_dir = trainer.log_dir  # a collective under DDP: read it on every rank
    if trainer.is_global_zero:
        out = {
            "world_size": trainer.world_size,
            "log_dir": log_dir,
            "logged": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")},
            "metrics": {} if args.predict else {name: (cb.results if args.fewshot_root else cb.metrics).get("test") for name, cb in callbacks.items()},
            "per_sample": {} if args.predict or args.fewshot_root else {name: cb.per_sample.get("test") for name, cb in callbacks.items()},
        }
        Path(args.out, "metrics.json").write_text(json.dumps(out, indent=2))
    # Leave the process group together and explicitly: a rank whose gloo threads are still alive at
    # interpreter exit can abort ("terminate called without an active exception").
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
