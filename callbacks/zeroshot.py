"""Zero-shot classification with prompt-template ensembling (Radford et al., 2021)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from lit_vlm.callbacks.base import EvalCallback, _tensorboard_writer, md_code, md_escape, require_capability
from lit_vlm.callbacks.visuals import GREEN, RED, confusion_image, image_grid, make_thumbnail, normalisation, ranked
from lit_vlm.capabilities import encoder_name
from lit_vlm.errors import UserError
from lit_vlm.metrics import confusion_matrix, true_class_ranks, zeroshot_metrics, zeroshot_predictions

__all__ = ["ZeroShotEvaluation", "class_embeddings"]

log = logging.getLogger("lit_vlm.eval")

TOP = 3  # predicted classes shown per example image
_TABLE_MAX_CLASSES = 20  # confusion matrix as a Markdown table up to this many classes


@torch.no_grad()
def class_embeddings(
    pl_module: Any,
    tokenizer: Any,
    context_length: int,
    classnames: Sequence[str],
    templates: Sequence[str],
) -> torch.Tensor:
    """Zero-shot classifier weights ``[C, E]``: per class, the mean of its L2-normalised template
    embeddings, renormalised (the CLIP prompt ensemble).

    Args:
        pl_module: Anything with ``encode_text(ids [N, L], mask [N, L]) -> [N, E]`` and ``device``.
        tokenizer: Anything with ``encode(texts, context_length) -> (ids, mask)``.
        context_length: Token length ``L`` of every prompt.
        classnames: Class names, index = label.
        templates: Prompt templates, each with exactly one ``{}`` for the class name.
    """
    if not classnames:
        raise UserError("class_embeddings needs at least one class name")
    if not templates:
        raise UserError("class_embeddings needs at least one prompt template")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise UserError(f"prompt templates need exactly one '{{}}': {bad}")
    device = getattr(pl_module, "device", torch.device("cpu"))
    out = []
    for name in classnames:
        ids, mask = tokenizer.encode([t.format(name) for t in templates], context_length)  # [P, L]
        emb = pl_module.encode_text(ids.to(device), mask.to(device)).float()  # [P, E]
        out.append(F.normalize(F.normalize(emb, dim=-1).mean(dim=0), dim=-1))  # [E]
    return torch.stack(out)  # [C, E]


class ZeroShotEvaluation(EvalCallback):
    """Top-1, top-5 (with >= 5 classes) and mean per-class recall of zero-shot classification.

    Class names and prompt templates come from the arguments or, when left unset, from the
    DataModule (``classnames``/``templates``, e.g. the synthetic world's zeroshot.json). Reads the
    batch keys ``image``, ``label`` (-1 = unlabelled, ignored) and ``sample_id``; uses the
    DataModule's ``tokenizer`` and ``context_length``. Logged as ``{stage}/zeroshot/top1``,
    ``top5``, ``mean_per_class_recall``. With a TensorBoard logger it also logs the confusion
    matrix (text ``{stage}/zeroshot/confusion_matrix`` and an image of the row-normalised matrix)
    and a few images with their top-3 classes (image ``examples``, text ``examples``).

    ``modality`` classifies another modality by the same recipe: the batch key of its name (plus
    ``<name>_mask`` when present), embedded by the family's ``encode_<name>`` (e.g. ``audio``).
    ``label_key`` reads another label (a clip's ``audio_label``); its class names and templates then
    default to the DataModule's ``label_classes(label_key)`` (the dataset manifest's ``classes``).

    Args:
        splits: Stages to evaluate on, among "val" and "test".
        classnames: Class names, index = label; default: the DataModule's.
        templates: Prompt templates with one ``{}``; default: the DataModule's, else "a photo of a {}.".
        num_examples: Example images (per rank, the first ones seen) in the TensorBoard logs; 0: none.
        thumbnail_size: Longest side of an example thumbnail in pixels.
        prefix: Metric namespace.
        modality: The modality that is classified (``image``: the batch's images).
        label_key: The batch key of the labels.
    """

    def __init__(
        self,
        splits: tuple[str, ...] | list[str] = ("val", "test"),
        classnames: list[str] | None = None,
        templates: list[str] | None = None,
        num_examples: int = 4,
        thumbnail_size: int = 64,
        prefix: str = "zeroshot",
        modality: str = "image",
        label_key: str = "label",
    ) -> None:
        super().__init__(splits, prefix)
        if not isinstance(modality, str) or not modality.isidentifier():
            raise UserError(f"ZeroShotEvaluation modality must be a name such as image or audio, got {modality!r}")
        self.modality = modality
        self.label_key = label_key
        if num_examples < 0 or thumbnail_size < 1:
            raise UserError("ZeroShotEvaluation needs num_examples >= 0 and thumbnail_size >= 1")
        self.classnames = classnames
        self.templates = templates
        self.num_examples = num_examples
        self.thumbnail_size = thumbnail_size
        self._class_emb: torch.Tensor | None = None
        self._names: list[str] = []
        self._examples = False
        self._thumbs_left = 0
        self._norm: tuple[torch.Tensor, torch.Tensor] | None = None

    def setup_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> bool:
        require_capability(pl_module, encoder_name(self.modality), "encode_text", by="ZeroShotEvaluation")
        dm = trainer.datamodule
        own = dm.label_classes(self.label_key) if callable(getattr(dm, "label_classes", None)) else {}
        classnames = self.classnames or own.get("classnames") or (
            getattr(dm, "classnames", None) if self.label_key == "label" else None)
        templates = self.templates or own.get("templates") or getattr(dm, "templates", None) or ["a photo of a {}."]
        if not classnames:
            log.warning("ZeroShotEvaluation: no class names (set classnames or use a dataset that has them); skipped")
            return False
        for attr in ("tokenizer", "context_length"):
            if getattr(dm, attr, None) is None:
                raise AttributeError(f"ZeroShotEvaluation needs the DataModule's '{attr}' to encode the class prompts")
        self._names = [str(c) for c in classnames]
        self._templates = [str(t) for t in templates]
        self._class_emb = class_embeddings(pl_module, dm.tokenizer, dm.context_length, self._names, list(templates))
        self._examples = self.modality == "image" and self.num_examples > 0 and _tensorboard_writer(trainer) is not None
        self._thumbs_left = self.num_examples if self._examples else 0
        self._norm = normalisation(trainer)
        return True

    def collect(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: dict) -> dict[str, Any]:
        for key in (self.modality, self.label_key, "sample_id"):
            if key not in batch:
                raise UserError(f"ZeroShotEvaluation needs batch key '{key}'")
        encode = getattr(pl_module, encoder_name(self.modality))
        mask = batch.get(f"{self.modality}_mask")
        image_emb = (encode(batch[self.modality]) if mask is None else encode(batch[self.modality], mask)).float()  # [B, E]
        logits = (image_emb @ self._class_emb.to(image_emb.device).T).cpu()  # [B, C]
        labels = batch[self.label_key].cpu()  # [B]
        records: dict[str, Any] = {}
        for i, sid in enumerate(batch["sample_id"]):
            label = int(labels[i])
            if label < 0:
                continue  # unlabelled
            if label >= len(self._names):
                raise UserError(
                    f"ZeroShotEvaluation: sample {sid} has label {label} but there are {len(self._names)} class names"
                )
            record: dict[str, Any] = {"id": sid, "logits": logits[i].clone(), "label": label}  # clone: own storage
            if self._thumbs_left > 0:
                record["thumb"] = make_thumbnail(batch["image"][i], self._norm, self.thumbnail_size)  # [3, h, w]
                self._thumbs_left -= 1
            records[sid] = record
        return records

    def compute(self, records: list[dict[str, Any]]) -> dict[str, float]:
        logits = torch.stack([r["logits"] for r in records])  # [N, C]
        labels = torch.tensor([r["label"] for r in records])  # [N]
        return zeroshot_metrics(logits, labels)

    def sample_scores(self, records: list[dict[str, Any]]) -> dict[str, tuple[list[float], list[float]]]:
        """Per image: whether the true class is in the top 1 (top 5)."""
        logits = torch.stack([r["logits"] for r in records])  # [N, C]
        labels = torch.tensor([r["label"] for r in records])  # [N]
        rank = true_class_ranks(logits, labels)  # [N], pessimistic ties as zeroshot_metrics
        ones = [1.0] * len(records)
        out = {"top1": ((rank < 1).double().tolist(), ones)}
        if logits.shape[1] >= 5:
            out["top5"] = ((rank < 5).double().tolist(), ones)
        return out

    def protocol(self) -> dict[str, Any]:
        """The class names and templates (hashed): another template set is another protocol."""
        import hashlib
        import json

        names = getattr(self, "_names", None)
        templates = getattr(self, "_templates", None)
        digest = hashlib.sha256(json.dumps([names, templates]).encode()).hexdigest()[:16] if names else None
        return {**super().protocol(), "modality": self.modality, "label_key": self.label_key,
                "classes": len(names) if names else None,
                "classnames_templates_sha256": digest}

    def log_examples(self, writer: Any, stage: str, step: int, ids: list[str], records: list[dict[str, Any]]) -> None:
        if self.num_examples <= 0:
            return
        tag = f"{stage}/{self.prefix}"
        logits = torch.stack([r["logits"] for r in records])  # [N, C]
        labels = torch.tensor([r["label"] for r in records])  # [N]
        names = self._names if len(self._names) == logits.shape[1] else [str(c) for c in range(logits.shape[1])]
        num_classes = logits.shape[1]
        preds = zeroshot_predictions(logits, labels)  # [N]
        cm = confusion_matrix(labels, preds, num_classes)  # [C, C]
        writer.add_text(f"{tag}/confusion_matrix", _confusion_markdown(cm, names), step)
        writer.add_image(f"{tag}/confusion_matrix", confusion_image(cm, names), step, dataformats="CHW")

        picks = [i for i, r in enumerate(records) if r.get("thumb") is not None][: self.num_examples]
        if not picks:
            return
        lines = [f"Top-{TOP} classes of example images (left to right in `examples`; green frame = top-1 correct).", ""]
        for n, i in enumerate(picks):
            truth = records[i]["label"]
            top = ranked(logits[i], torch.arange(num_classes) == truth)[:TOP].tolist()  # pessimistic ties, as top1
            shown = ", ".join(f"{md_escape(names[c])} ({float(logits[i, c]):.3f})" for c in top)
            lines.append(
                f"{n}. {md_code(ids[i])}: true **{md_escape(names[truth])}**, predicted {shown}"
                f"{' - correct' if int(preds[i]) == truth else ''}"
            )
        writer.add_text(f"{tag}/examples", "\n".join(lines), step)
        colours = [GREEN if int(preds[i]) == records[i]["label"] else RED for i in picks]
        grid = image_grid([records[i]["thumb"] for i in picks], colours, self.thumbnail_size)
        writer.add_image(f"{tag}/examples", grid, step, dataformats="CHW")


def _confusion_markdown(cm: torch.Tensor, names: list[str]) -> str:
    """Markdown for a confusion matrix ``[C, C]``: the full table for few classes, and always the
    largest off-diagonal confusions."""
    num_classes = cm.shape[0]
    lines = ["Rows: true class, columns: predicted (top-1, pessimistic ties).", ""]
    if num_classes <= _TABLE_MAX_CLASSES:
        lines.append("| true \\ predicted | " + " | ".join(md_escape(n) for n in names) + " |")
        lines.append("|---" * (num_classes + 1) + "|")
        for c in range(num_classes):
            lines.append(f"| **{md_escape(names[c])}** | " + " | ".join(str(int(v)) for v in cm[c]) + " |")
        lines.append("")
    off = cm.clone()
    off.fill_diagonal_(0)
    count = min(10, int((off > 0).sum()))
    if count:
        values, flat = off.flatten().topk(count)
        lines.append("Most frequent confusions:")
        lines.append("")
        for v, f in zip(values.tolist(), flat.tolist(), strict=True):
            lines.append(f"- {md_escape(names[f // num_classes])} -> {md_escape(names[f % num_classes])}: {v}")
    else:
        lines.append("No confusions.")
    return "\n".join(lines)
