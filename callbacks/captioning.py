"""Image captioning evaluation: generate a caption per image, score the whole set with the COCO
caption evaluator's metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D; see ``lit_vlm.captioning``),
optionally beside a nearest-neighbour caption baseline scored the same way."""

from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import lightning.pytorch as pl
import torch
import torch.distributed as dist

from lit_vlm.callbacks.base import EvalCallback, annotation_file, md_escape, require_capability
from lit_vlm.callbacks.results import write_json_atomic
from lit_vlm.captioning import align_captions, caption_metrics, load_caption_references, require_java
from lit_vlm.distributed import rank_and_world
from lit_vlm.errors import UserError

log = logging.getLogger("lit_vlm.eval")


class CaptionEvaluation(EvalCallback):
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr(-D) of generated captions, as the COCO caption
    evaluator (pycocoevalcap) computes them, on the whole evaluation set at once.

    Calls the family's ``generate(images, prompts, max_new_tokens)``; reads the batch keys
    ``image``, ``image_id`` (else ``sample_id``) and, when no reference file is known, ``captions``.
    Predictions are keyed by ``str(image_id)``, gathered from every rank with duplicates dropped,
    and scored once (on global rank 0, the result sent to every rank: the scorers run Java and
    METEOR alone takes seconds to start). Logged as ``{stage}/caption/BLEU_1`` ... ``BLEU_4``,
    ``METEOR``, ``ROUGE_L``, ``CIDEr`` and ``num_samples``. Rank 0 also writes the predictions in
    the COCO results format to ``caption_predictions_{stage}.json`` in the run's log directory,
    ready for ``lit-vlm eval caption``. Needs Java on ``PATH``.

    Args:
        splits: Stages to evaluate on, among "val" and "test".
        prompt: Text prompt given to ``generate`` for every image; None (default) generates
            unprompted.
        max_new_tokens: Longest generated caption, in tokens.
        references: COCO caption annotation JSON with the reference captions: one path for every
            split, or ``{"val": path, "test": path}``. Default: the DataModule's
            ``eval_annotations(stage)["captions"]`` when it offers one, else the batch's
            ``captions``. With a file, every predicted image must be in it; images of the file
            that were not evaluated (e.g. ``limit_test_batches``) are left out with a warning.
        prefix: Metric namespace.
        num_examples: Images whose generated and reference captions are logged to TensorBoard as
            a markdown table (0: none).
        metrics: Which metrics to compute, among "BLEU" (BLEU_1..4), "METEOR", "ROUGE_L" and
            "CIDEr" (METEOR's Java start-up costs seconds on every evaluation; leave it out of
            frequent validation if that matters).
        baseline: ``"nearest_neighbour"`` also scores the nearest-neighbour caption baseline
            (Devlin et al., 2015) on the same images against the same references, logged as
            ``{stage}/caption/baseline/<metric>``: each evaluated image takes a caption of the
            most similar images of a reference split (``baseline_split``, by default the
            training data, read through the DataModule's ``sample_loader``), the caption of the
            ``baseline_k`` nearest images that agrees most with the others (mean unigram+bigram
            F1). None: no baseline.
        baseline_features: What "similar" means: ``"pixels"`` (cosine of 8x8 average-pooled
            normalised pixels: the model plays no part) or ``"model"`` (cosine of the family's
            ``encode_image``, recomputed for the bank at every evaluation).
        baseline_split: Split the reference images and captions come from (never the evaluated one).
        baseline_size: Reference images read from that split (the first ones, in shard order).
        baseline_k: Nearest images whose captions compete for each evaluated image.
    """

    def __init__(
        self,
        splits: tuple[str, ...] | list[str] = ("val", "test"),
        prompt: str | None = None,
        max_new_tokens: int = 30,
        references: str | dict[str, str] | None = None,
        prefix: str = "caption",
        num_examples: int = 8,
        metrics: tuple[str, ...] | list[str] = ("BLEU", "METEOR", "ROUGE_L", "CIDEr"),
        baseline: str | None = None,
        baseline_features: str = "pixels",
        baseline_split: str = "train",
        baseline_size: int = 5000,
        baseline_k: int = 1,
    ) -> None:
        super().__init__(splits, prefix)
        if baseline not in (None, "nearest_neighbour"):
            raise UserError(f"CaptionEvaluation baseline must be None or 'nearest_neighbour', got {baseline!r}")
        if baseline_features not in ("pixels", "model"):
            raise UserError(f"CaptionEvaluation baseline_features must be 'pixels' or 'model', got {baseline_features!r}")
        if baseline_size < 1 or baseline_k < 1:
            raise UserError(f"CaptionEvaluation baseline_size and baseline_k must be >= 1, got {baseline_size}, {baseline_k}")
        if baseline is not None and baseline_split in self.splits and baseline_split != "train":
            raise UserError(
                f"CaptionEvaluation baseline_split={baseline_split!r} is also evaluated: the baseline would copy "
                "the references of the very images it is scored on; use 'train'"
            )
        self.baseline = baseline
        self.baseline_features = baseline_features
        self.baseline_split = baseline_split
        self.baseline_size = baseline_size
        self.baseline_k = baseline_k
        self._bank: tuple[torch.Tensor, list[list[str]]] | None = None
        self._bank_key: Any = None
        known = ("BLEU", "METEOR", "ROUGE_L", "CIDEr")
        unknown = [m for m in metrics if m.upper() not in {k.upper() for k in known}]
        if unknown or not metrics:
            raise UserError(f"CaptionEvaluation metrics must be a non-empty subset of {known}, got {list(metrics)}")
        self.caption_metric_names = tuple(metrics)
        if max_new_tokens < 1:
            raise UserError(f"CaptionEvaluation max_new_tokens must be >= 1, got {max_new_tokens}")
        if num_examples < 0:
            raise UserError(f"CaptionEvaluation num_examples must be >= 0, got {num_examples}")
        if isinstance(references, dict):
            bad = [s for s in references if s not in ("val", "test")]
            if bad:
                raise UserError(f"CaptionEvaluation references keys must be among 'val', 'test', got {bad}")
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.references = references
        self.num_examples = num_examples
        self._file_refs: dict[str, list[str]] | None = None
        self._file_refs_path: str | None = None
        self._used_refs: dict[str, list[str]] = {}
        self._results: list[dict[str, Any]] | None = None
        self.last_predictions_path: Path | None = None  # rank 0: the last predictions file written

    # ---- setup ----------------------------------------------------------------------------
    def setup_epoch(self, trainer, pl_module, stage):
        require_capability(pl_module, "generate", by="CaptionEvaluation")
        require_java()  # fail before generating a whole split, not after
        path = annotation_file(trainer, stage, self.references, "captions")
        self._file_refs_path = str(path) if path else None
        self._file_refs = load_caption_references(path) if path else None
        self._results = None
        if self.baseline is not None:
            if self.baseline_features == "model":
                require_capability(pl_module, "encode_image", by="CaptionEvaluation")
            self._build_bank(trainer, pl_module)
        return True

    # ---- nearest-neighbour baseline -------------------------------------------------------------
    def _features(self, pl_module, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> L2-normalised features [B, F] for the baseline's similarity."""
        if self.baseline_features == "model":
            return torch.nn.functional.normalize(pl_module.encode_image(images).float(), dim=-1)
        pooled = torch.nn.functional.adaptive_avg_pool2d(images.float(), 8).flatten(1)  # [B, 3*64]
        return torch.nn.functional.normalize(pooled, dim=-1)

    def _build_bank(self, trainer, pl_module) -> None:
        key = (self.baseline_split, self.baseline_size, self.baseline_features)
        if self._bank is not None and self._bank_key == key and self.baseline_features == "pixels":
            return  # pixels do not change; model features do
        dm = trainer.datamodule
        loader_fn = getattr(dm, "sample_loader", None)
        if not callable(loader_fn):
            raise UserError(
                f"CaptionEvaluation baseline: {type(dm).__name__} has no sample_loader(split) to read "
                f"the {self.baseline_split!r} reference images from"
            )
        feats, captions, seen = [], [], 0
        for batch in loader_fn(self.baseline_split):
            images = batch["image"].to(pl_module.device)
            take = min(images.shape[0], self.baseline_size - seen)
            feats.append(self._features(pl_module, images[:take]).cpu())
            captions += [list(c) for c in batch["captions"][:take]]
            seen += take
            if seen >= self.baseline_size:
                break
        if not seen:
            raise UserError(f"CaptionEvaluation baseline: the {self.baseline_split!r} split has no samples")
        self._bank = (torch.cat(feats), captions)
        self._bank_key = key
        if rank_and_world()[0] == 0:
            log.info("CaptionEvaluation: nearest-neighbour baseline over %d %s images (%s features)",
                     seen, self.baseline_split, self.baseline_features)

    def _baseline_captions(self, pl_module, images: torch.Tensor) -> list[str]:
        bank_feats, bank_caps = self._bank
        sims = self._features(pl_module, images).cpu() @ bank_feats.T  # [B, N]
        nearest = sims.topk(min(self.baseline_k, sims.shape[1]), dim=1).indices  # [B, k]
        return [consensus_caption([c for j in row.tolist() for c in bank_caps[j]]) for row in nearest]

    # ---- per batch --------------------------------------------------------------------------
    def collect(self, trainer, pl_module, batch):
        images = batch["image"]  # [B, 3, H, W]
        n = images.shape[0]
        ids = batch.get("image_id", batch.get("sample_id"))
        if ids is None:
            raise UserError("CaptionEvaluation needs batch key 'image_id' (or 'sample_id')")
        ids = [i.item() if isinstance(i, torch.Tensor) else i for i in ids]
        if self._file_refs is None:
            if "captions" not in batch:
                raise UserError("CaptionEvaluation needs batch key 'captions' (or a references file: set references=...)")
            batch_refs = [list(c) for c in batch["captions"]]
        else:
            batch_refs = [[] for _ in range(n)]  # the file's captions are used
        prompts = [self.prompt] * n if self.prompt is not None else None
        texts = pl_module.generate(images, prompts, max_new_tokens=self.max_new_tokens)
        if len(texts) != n or not all(isinstance(t, str) for t in texts):
            raise UserError(f"{type(pl_module).__name__}.generate must return {n} strings for {n} images, got {texts!r:.200}")
        base = self._baseline_captions(pl_module, images) if self.baseline is not None else [None] * n
        return {str(i): (i, text, refs, b) for i, text, refs, b in zip(ids, texts, batch_refs, base)}

    # ---- once per epoch ---------------------------------------------------------------------
    def compute(self, records):
        predictions = {str(image_id): text for image_id, text, _, _ in records}
        if self._file_refs is not None:
            preds, refs = align_captions(
                predictions, self._file_refs, allow_missing=True,
                predictions_name="CaptionEvaluation", references_name=str(self._file_refs_path),
            )
            if len(preds) < len(self._file_refs) and rank_and_world()[0] == 0:
                log.warning(
                    "CaptionEvaluation: scoring %d of the %d images of %s (the others were not evaluated)",
                    len(preds), len(self._file_refs), self._file_refs_path,
                )
        else:
            preds = predictions
            refs = {str(image_id): batch_refs for image_id, _, batch_refs, _ in records}
        self._used_refs = refs
        self._results = [{"image_id": image_id, "caption": text} for image_id, text, _, _ in records]
        baseline = {str(image_id): b for image_id, _, _, b in records if str(image_id) in preds}

        self._per_image: dict[str, dict[Any, float]] = {}

        def score() -> dict[str, float]:
            out = caption_metrics(preds, refs, metrics=self.caption_metric_names, per_image=self._per_image)
            if self.baseline is not None:
                base = caption_metrics(baseline, refs, metrics=self.caption_metric_names)
                out.update({f"baseline/{k}": v for k, v in base.items()})
            return out

        return _on_rank_zero_for_all(score)

    def sample_scores(self, records):
        """Per image: its ROUGE-L and CIDEr-D (the set-level values are their means; rank zero only)."""
        keys = [str(image_id) for image_id, _, _, _ in records]
        out = {}
        for name, scores in self._per_image.items():
            if all(k in scores for k in keys):
                out[name] = ([scores[k] for k in keys], [1.0] * len(keys))
        return out

    def protocol(self):
        from importlib.metadata import PackageNotFoundError, version

        try:
            evaluator = f"pycocoevalcap {version('pycocoevalcap')}"
        except PackageNotFoundError:  # pragma: no cover
            evaluator = "pycocoevalcap"
        return {**super().protocol(), "evaluator": evaluator, "tokenizer": "PTB", "metrics": list(self.caption_metric_names)}

    def log_examples(self, writer, stage, step, ids, records):
        if self.num_examples == 0:
            return
        rows = ["| image_id | generated | references |", "|---|---|---|"]
        if self.baseline is not None:
            rows = ["| image_id | generated | nearest-neighbour baseline | references |", "|---|---|---|---|"]
        for image_id, text, _, base in records[: self.num_examples]:
            refs = "<br>".join(md_escape(r) for r in self._used_refs.get(str(image_id), []))
            middle = f" {md_escape(base)} |" if self.baseline is not None else ""
            rows.append(f"| {md_escape(image_id)} | {md_escape(text)} |{middle} {refs} |")
        writer.add_text(f"{stage}/{self.prefix}/examples", "\n".join(rows), step)

    def _write_predictions(self, trainer: pl.Trainer, stage: str) -> None:
        results, self._results = self._results, None
        if results is None:
            return
        log_dir = trainer.log_dir  # a collective under DDP: read it on every rank
        if trainer.is_global_zero:
            path = Path(log_dir or trainer.default_root_dir) / f"caption_predictions_{stage}.json"
            write_json_atomic(path, results)
            self.last_predictions_path = path

    def on_validation_epoch_end(self, trainer, pl_module):
        super().on_validation_epoch_end(trainer, pl_module)
        if getattr(self, "_enabled", False):
            self._write_predictions(trainer, "val")

    def on_test_epoch_end(self, trainer, pl_module):
        super().on_test_epoch_end(trainer, pl_module)
        if getattr(self, "_enabled", False):
            self._write_predictions(trainer, "test")


def _ngrams(words: list[str]) -> Counter:
    return Counter(words) + Counter(zip(words, words[1:]))


def consensus_caption(candidates: list[str]) -> str:
    """The candidate that agrees most with the others: the highest mean F1 of unigrams and bigrams
    (as multisets, lower-cased words) against every other candidate; the first one on ties
    (Devlin et al., 2015, pick the consensus caption of the nearest images the same way, with
    BLEU or CIDEr as the agreement)."""
    if not candidates:
        return ""
    grams = [_ngrams(re.findall(r"\w+", c.lower())) for c in candidates]

    def f1(a: Counter, b: Counter) -> float:
        overlap = sum((a & b).values())
        total = sum(a.values()) + sum(b.values())
        return 2 * overlap / total if total else 0.0

    if len(candidates) == 1:
        return candidates[0]
    scores = [sum(f1(g, h) for j, h in enumerate(grams) if j != i) for i, g in enumerate(grams)]
    return candidates[max(range(len(candidates)), key=lambda i: (scores[i], -i))]


def _on_rank_zero_for_all(fn: Callable[[], dict[str, float]]) -> dict[str, float]:
    """Run ``fn`` on global rank 0 only and return its result on every rank (a collective under
    DDP: every rank must call it). An error on rank 0 is raised on every rank, so none hangs."""
    rank, world = rank_and_world()
    if world == 1:
        return fn()
    payload: list[Any] = [None]
    error: BaseException | None = None
    if rank == 0:
        try:
            payload[0] = ("ok", fn())
        except Exception as err:  # noqa: BLE001 - re-raised below after the others are told
            error = err
            payload[0] = ("error", f"{type(err).__name__}: {err}")
    dist.broadcast_object_list(payload, src=0)
    status, value = payload[0]
    if error is not None:
        raise error
    if status == "error":
        raise RuntimeError(f"caption metrics failed on rank 0: {value}")
    return value
