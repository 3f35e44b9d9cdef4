"""Few-shot in-context evaluation, Flamingo's protocol as OpenFlamingo runs it.

For every seed and number of shots k, a prompt of k demonstrations (an image and its text, each
chunk closed by ``<|endofchunk|>``) then the query image is given to the family's
``generate_interleaved`` (captioning, VQA) or ``continuation_log_likelihood`` (classification):

    captioning      <image>Output: a red circle.<|endofchunk|> ... <image>Output:
    vqa             <image>Question: is it red? Short answer: yes<|endofchunk|> ... <image>Question: q Short answer:
    classification  <image>Output: circle<|endofchunk|> ... <image>Output:   + each class name, scored

Demonstrations come from the first ``pool_size`` training images of ``root``: drawn at random
per query, or by RICES (the k pool images most similar to the query by the family's
``encode_image``, the most similar last). Zero-shot is done Flamingo's way: two demonstrations
with their images taken out (text only). The queries are the evaluated split's first
``num_queries`` images (questions for VQA), the same for every seed, so the spread over seeds is
that of the demonstrations (RICES is deterministic: its spread is 0 beyond zero-shot);
``resample_queries`` draws them per seed instead, as OpenFlamingo does. Captions are scored by CIDEr-D against all references, answers by the official
VQA accuracy after OpenFlamingo's post-processing (the text before any ``Question``/``Answer``/
``Short`` and before the first ``", "``), classes by the mean log-likelihood of each class
name's tokens. Logged (TensorBoard, ``results.json``) as
``{stage}/{prefix}/{task}/{demos}/{k}shot/{metric}`` and ``.../{metric}_std`` (the mean and the
standard deviation over seeds); every seed's value is written to ``{prefix}_{stage}.json`` in the
run's folder. Any family with those capabilities is evaluated; none is named here.
"""

from __future__ import annotations

import json
import logging
import re
import statistics
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lit_vlm.callbacks.base import require_capability
from lit_vlm.captioning import caption_metrics, require_java
from lit_vlm.distributed import all_gather_objects, rank_and_world
from lit_vlm.errors import UserError
from lit_vlm.vqa import load_annotations, question_accuracy

log = logging.getLogger("lit_vlm.eval")

TASKS = ("captioning", "vqa", "classification")
DEMOS = ("random", "rices")
IMAGE, END = "<image>", "<|endofchunk|>"
#: Each task's demonstration and query text (a space after each colon: how the embedded world's
#: pages write them; OpenFlamingo's prompts have none).
FORMATS = {
    "captioning": ("Output: {caption}", "Output:"),
    "vqa": ("Question: {question} Short answer: {answer}", "Question: {question} Short answer:"),
    "classification": ("Output: {classname}", "Output:"),
}
METRIC = {"captioning": "CIDEr", "vqa": "accuracy", "classification": "top1"}


def postprocess_caption(text: str) -> str:
    """OpenFlamingo's: the text before any ``Output``."""
    return re.split("Output", text, maxsplit=1)[0].strip()


def postprocess_answer(text: str) -> str:
    """OpenFlamingo's: the text before any ``Question``/``Answer``/``Short``, then before ``", "``."""
    return re.split(", ", re.split("Question|Answer|Short", text, maxsplit=1)[0], maxsplit=1)[0].strip()


@dataclass
class _Images:
    """Images of one split with what each is about (captions, label, questions)."""

    images: torch.Tensor  # [I, 3, H, W]
    features: torch.Tensor | None = None  # [I, F] L2-normalised (RICES)
    ids: list[Any] = field(default_factory=list)
    captions: list[list[str]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    questions: list[tuple[int, int, str, str | None]] = field(default_factory=list)  # (image row, qid, text, answer)


class FewShotEvaluation(pl.Callback):
    """Few-shot in-context captioning, VQA and classification (see the module docstring).

    Args:
        root: The image-text dataset the tasks come from (the synthetic world, or a converted one
            with captions, VQA annotations and class labels): queries from the evaluated split,
            demonstrations from its train split.
        tasks: Among ``captioning``, ``vqa``, ``classification``.
        shots: Numbers of demonstrations (0: two text-only ones, Flamingo's zero-shot).
        seeds: One evaluation per seed (its own queries and random demonstrations).
        demonstrations: ``random``, ``rices`` or both.
        num_queries: Queries per task (images; questions for VQA).
        resample_queries: Draw each seed's queries at random from the split (OpenFlamingo) instead
            of taking the first ``num_queries`` for every seed.
        pool_size: Training images demonstrations are drawn from.
        image_size: Image side; default the DataModule's ``image_size``.
        classnames: Class names (label i is ``classnames[i]``); default the dataset's ``zeroshot.json``.
        max_new_tokens: Generation budget per task (``captioning``, ``vqa``).
        batch_size: Prompts per ``generate_interleaved`` call.
        splits: Stages to evaluate on, among ``val`` and ``test``.
        prefix: Metric namespace.
    """

    def __init__(self, root: str = "data/synth", tasks: list[str] = list(TASKS), shots: list[int] = [0, 4, 8],
                 seeds: list[int] = [0, 1, 2], demonstrations: list[str] = ["random", "rices"], num_queries: int = 100,
                 resample_queries: bool = False,
                 pool_size: int = 2048, image_size: int | None = None, classnames: list[str] | None = None,
                 max_new_tokens: dict[str, int] | None = None, batch_size: int = 16,
                 splits: list[str] = ["test"], prefix: str = "fewshot") -> None:
        bad = [t for t in tasks if t not in TASKS] + [d for d in demonstrations if d not in DEMOS]
        bad += [s for s in splits if s not in ("val", "test")]
        if bad or not tasks or not demonstrations or any(int(k) < 0 for k in shots) or num_queries < 1:
            raise UserError(f"FewShotEvaluation: tasks among {TASKS}, demonstrations among {DEMOS}, splits among "
                            f"val/test, shots >= 0 and num_queries >= 1; got {bad or (tasks, demonstrations, shots, num_queries)}")
        self.root, self.tasks, self.shots, self.seeds = str(root), list(tasks), [int(k) for k in shots], [int(s) for s in seeds]
        self.demonstrations, self.num_queries, self.pool_size = list(demonstrations), int(num_queries), int(pool_size)
        self.resample_queries = bool(resample_queries)
        self.image_size, self.classnames, self.batch_size = image_size, classnames, int(batch_size)
        self.max_new_tokens = {"captioning": 20, "vqa": 5, **(max_new_tokens or {})}
        self.splits, self.prefix = list(splits), prefix
        self.results: dict[str, dict[str, Any]] = {}  # stage -> every seed's value
        self._pool: _Images | None = None

    def protocol(self) -> dict[str, Any]:
        from lit_vlm.datamodules.manifests import dataset_identity

        return {"callback": type(self).__name__, "dataset": {"root": self.root, **dataset_identity(self.root, "test")},
                "formats": FORMATS, "zero_shot": "two text-only demonstrations",
                "num_queries": self.num_queries, "resample_queries": self.resample_queries, "pool_size": self.pool_size, "seeds": self.seeds,
                "postprocessing": "OpenFlamingo", "vqa_metric": "official VQA accuracy", "caption_metric": "CIDEr-D"}

    # ---- data -----------------------------------------------------------------------------------
    def _datamodule(self, trainer: pl.Trainer) -> Any:
        from lit_vlm.datamodules import ImageTextDataModule

        size = self.image_size or getattr(trainer.datamodule, "image_size", None) or getattr(
            getattr(trainer.datamodule, "corpus", None), "image_size", 64)
        dm = ImageTextDataModule(root=self.root, image_size=int(size), batch_size=64, num_workers=0)
        dm.prepare_data()
        return dm

    def _read(self, dm: Any, split: str, limit: int | None) -> _Images:
        out, chunks = _Images(torch.empty(0)), []
        for batch in dm.sample_loader(split):
            take = batch["image"].shape[0] if limit is None else min(batch["image"].shape[0], limit - len(out.ids))
            base = len(out.ids)
            chunks.append(batch["image"][:take])
            out.ids += list(batch["image_id"][:take])
            out.captions += [list(c) for c in batch["captions"][:take]]
            out.labels += batch["label"][:take].tolist()
            owners = batch["question_owner"].tolist()
            out.questions += [(base + o, qid, q, a) for o, qid, q, a in zip(owners, batch["question_id"], batch["question"],
                                                                          batch.get("question_answer") or [None] * len(owners)) if o < take]
            if limit is not None and len(out.ids) >= limit:
                break
        if not chunks:
            raise UserError(f"FewShotEvaluation: root={self.root!r} has no {split} images")
        out.images = torch.cat(chunks)
        return out

    def _features(self, pl_module: pl.LightningModule, images: torch.Tensor) -> torch.Tensor:
        feats = [pl_module.encode_image(images[i: i + 256].to(pl_module.device)).float().cpu() for i in range(0, len(images), 256)]
        return torch.nn.functional.normalize(torch.cat(feats), dim=-1)  # [I, F]

    # ---- prompts --------------------------------------------------------------------------------
    def _demo_text(self, task: str, pool: _Images, item: Any) -> str:
        if task == "vqa":
            _, _, question, answer = item
            return FORMATS[task][0].format(question=question, answer=answer)
        if task == "captioning":
            return FORMATS[task][0].format(caption=pool.captions[item][0])
        return FORMATS[task][0].format(classname=self._classes[pool.labels[item]])

    def _demos(self, task: str, method: str, k: int, rng: torch.Generator, query_row: int, queries: _Images) -> list[Any]:
        """k demonstration items of the pool (image rows; VQA: pool questions), the most similar last."""
        pool = self._pool
        items = self._pool_questions if task == "vqa" else list(range(len(pool.ids)))
        if method == "random":
            return [items[int(i)] for i in torch.randperm(len(items), generator=rng)[:k]]
        sims = pool.features @ queries.features[query_row]  # [P]
        if task == "vqa":
            order = sorted(range(len(items)), key=lambda i: -float(sims[items[i][0]]))
        else:
            order = sims.argsort(descending=True).tolist()
        return [items[i] for i in reversed(order[:k])]

    def _prompt(self, task: str, method: str, k: int, rng: torch.Generator, queries: _Images,
                query: Any) -> tuple[str, list[torch.Tensor]]:
        """The prompt's text and its images (demonstrations', then the query's)."""
        row = query[0] if task == "vqa" else query
        demos = self._demos(task, method, k or 2, rng, row, queries)
        rows = [d[0] if task == "vqa" else d for d in demos]
        chunks = [self._demo_text(task, self._pool, d) for d in demos]
        if k == 0:  # Flamingo's zero-shot: two demonstrations, text only
            text, images = "".join(c + END for c in chunks), []
        else:
            text, images = "".join(IMAGE + c + END for c in chunks), [self._pool.images[r] for r in rows]
        ask = FORMATS[task][1].format(question=query[2]) if task == "vqa" else FORMATS[task][1]
        return text + IMAGE + ask, images + [queries.images[row]]

    # ---- one evaluation -------------------------------------------------------------------------
    def _run(self, pl_module: pl.LightningModule, task: str, method: str, k: int, seed: int,
             queries: _Images, picked: list[Any]) -> dict[Any, Any]:
        """This rank's share of ``picked`` queries -> {query id: prediction or score}."""
        rank, world = rank_and_world()
        mine = picked[rank::world]
        out: dict[Any, Any] = {}
        for start in range(0, len(mine), self.batch_size if task != "classification" else 1):
            chunk = mine[start: start + (self.batch_size if task != "classification" else 1)]
            prompts, media = [], []
            for query in chunk:
                rng = torch.Generator().manual_seed(zlib.crc32(repr((seed, task, method, k, query)).encode()))
                text, images = self._prompt(task, method, k, rng, queries, query)
                prompts.append(text)
                media.append(images)
            n = max(map(len, media))
            images = torch.zeros(len(chunk), n, *media[0][0].shape)  # [B, N, 3, H, W]
            media_mask = torch.zeros(len(chunk), n, dtype=torch.bool)  # [B, N]
            for b, imgs in enumerate(media):
                images[b, : len(imgs)], media_mask[b, : len(imgs)] = torch.stack(imgs), True
            images, media_mask = images.to(pl_module.device), media_mask.to(pl_module.device)
            if task == "classification":
                names = [" " + c for c in self._classes]
                scores = pl_module.continuation_log_likelihood(images, media_mask, prompts[0], names)  # [C]
                out[chunk[0]] = int(scores.argmax()) == queries.labels[chunk[0]]
                continue
            texts = pl_module.generate_interleaved(images, media_mask, prompts, max_new_tokens=self.max_new_tokens[task])
            for query, text in zip(chunk, texts):
                if task == "vqa":
                    out[query[1]] = postprocess_answer(text)
                else:
                    out[queries.ids[query]] = postprocess_caption(text)
        return out

    def _score(self, task: str, queries: _Images, picked: list[Any], predictions: dict[Any, Any]) -> float:
        if task == "classification":
            return sum(bool(v) for v in predictions.values()) / len(predictions)
        if task == "vqa":
            return sum(question_accuracy(predictions[q[1]], self._answers[q[1]]) for q in picked) / len(picked)
        refs = {str(queries.ids[i]): queries.captions[i] for i in picked}
        return caption_metrics({str(k): v for k, v in predictions.items()}, refs, metrics=("CIDEr",))["CIDEr"]

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        needs = ["generate_interleaved"] * bool({"captioning", "vqa"} & set(self.tasks))
        needs += ["continuation_log_likelihood"] * ("classification" in self.tasks) + ["encode_image"] * ("rices" in self.demonstrations)
        require_capability(pl_module, *needs, by="FewShotEvaluation")
        if "captioning" in self.tasks:
            require_java()
        dm = self._datamodule(trainer)
        if self._pool is None:
            self._pool = self._read(dm, "train", self.pool_size)
            self._pool_questions = [q for q in self._pool.questions if q[3]]
            if "vqa" in self.tasks and not self._pool_questions:
                raise UserError(f"FewShotEvaluation vqa: the train images of {self.root!r} carry no answers (JSON questions' multiple_choice_answer)")
        queries = self._read(dm, stage, None)
        self._classes = self.classnames or json.loads((Path(self.root) / "zeroshot.json").read_text())["classnames"]
        if "vqa" in self.tasks:
            path = dm.eval_annotations(stage).get("vqa_annotations")
            if path is None:
                raise UserError(f"FewShotEvaluation vqa: {self.root!r} has no VQA annotations for the {stage} split")
            self._answers = {a["question_id"]: a["answers"] for a in load_annotations(path)}
        was_training = pl_module.training
        pl_module.eval()
        if "rices" in self.demonstrations:
            self._pool.features, queries.features = self._features(pl_module, self._pool.images), self._features(pl_module, queries.images)
        values: dict[str, dict[str, list[float]]] = {}
        with torch.no_grad():
            for task in self.tasks:
                items = queries.questions if task == "vqa" else list(range(len(queries.ids)))
                for seed in self.seeds:
                    order = (torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
                             if self.resample_queries else list(range(len(items))))
                    picked = [items[i] for i in sorted(order[: self.num_queries])]
                    for method in self.demonstrations:
                        for k in self.shots:
                            parts = all_gather_objects(self._run(pl_module, task, method, k, seed, queries, picked))
                            merged = {key: v for part in parts for key, v in part.items()}
                            score = self._score(task, queries, picked, merged)
                            values.setdefault(f"{task}/{method}/{k}shot/{METRIC[task]}", []).append(score)
                            log.info("few-shot %s %s %d-shot seed %d: %s %.4f", task, method, k, seed, METRIC[task], score)
        pl_module.train(was_training)
        self.results[stage] = values
        for name, vals in values.items():
            pl_module.log(f"{stage}/{self.prefix}/{name}", statistics.fmean(vals), sync_dist=False, rank_zero_only=False)
            pl_module.log(f"{stage}/{self.prefix}/{name}_std", statistics.pstdev(vals) if len(vals) > 1 else 0.0,
                          sync_dist=False, rank_zero_only=False)
        log_dir = trainer.log_dir  # a collective under DDP: read it on every rank
        if trainer.is_global_zero and log_dir:
            path = Path(log_dir) / f"{self.prefix}_{stage}.json"
            path.write_text(json.dumps({"protocol": self.protocol(), "values": values}, indent=1))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "val" in self.splits and not trainer.sanity_checking:
            self._evaluate(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "test" in self.splits:
            self._evaluate(trainer, pl_module, "test")


__all__ = ["FewShotEvaluation", "postprocess_answer", "postprocess_caption"]
