"""Zero-shot classification with prompt-template ensembling (Radford et al., 2021)."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from lit_vlm.callbacks.base import EvalCallback, require_capability
from lit_vlm.metrics import zeroshot_metrics

log = logging.getLogger("lit_vlm.eval")


@torch.no_grad()
def class_embeddings(pl_module, tokenizer, context_length: int, classnames: list[str], templates: list[str]) -> torch.Tensor:
    """[C, E]: per class, the mean of its L2-normalised template embeddings, renormalised."""
    out = []
    for name in classnames:
        ids, mask = tokenizer.encode([t.format(name) for t in templates], context_length)  # [T, L]
        emb = pl_module.encode_text(ids.to(pl_module.device), mask.to(pl_module.device))  # [T, E]
        out.append(F.normalize(F.normalize(emb.float(), dim=-1).mean(dim=0), dim=-1))  # [E]
    return torch.stack(out)  # [C, E]


class ZeroShotEvaluation(EvalCallback):
    """Top-1, top-5 (with >= 5 classes) and mean per-class recall of zero-shot classification.

    Class names and prompt templates come from the arguments or, when left unset, from the
    DataModule (``classnames``/``templates``, e.g. the synthetic world's zeroshot.json). Reads the
    batch keys ``image``, ``label`` (-1 = unlabelled, ignored) and ``sample_id``; uses the
    DataModule's ``tokenizer`` and ``context_length``. Logged as ``{stage}/zeroshot/top1`` ...

    Args:
        splits: Stages to evaluate on, among "val" and "test".
        classnames: Class names, index = label; default: the DataModule's.
        templates: Prompt templates with one ``{}``; default: the DataModule's, else "a photo of a {}.".
        prefix: Metric namespace.
    """

    def __init__(
        self,
        splits: tuple[str, ...] | list[str] = ("val", "test"),
        classnames: list[str] | None = None,
        templates: list[str] | None = None,
        prefix: str = "zeroshot",
    ) -> None:
        super().__init__(splits, prefix)
        self.classnames = classnames
        self.templates = templates
        self._class_emb: torch.Tensor | None = None

    def setup_epoch(self, trainer, pl_module, stage):
        require_capability(pl_module, "encode_image", "encode_text")
        dm = trainer.datamodule
        classnames = self.classnames or getattr(dm, "classnames", None)
        templates = self.templates or getattr(dm, "templates", None) or ["a photo of a {}."]
        if not classnames:
            log.warning("ZeroShotEvaluation: no class names (set classnames or use a dataset that has them); skipped")
            return False
        bad = [t for t in templates if t.count("{}") != 1]
        if bad:
            raise ValueError(f"ZeroShotEvaluation templates need exactly one '{{}}': {bad}")
        self._class_emb = class_embeddings(pl_module, dm.tokenizer, dm.context_length, list(classnames), list(templates))
        return True

    def collect(self, trainer, pl_module, batch):
        if "label" not in batch:
            raise KeyError("ZeroShotEvaluation needs batch key 'label'")
        image_emb = pl_module.encode_image(batch["image"]).float()  # [B, E]
        logits = (image_emb @ self._class_emb.T).cpu()  # [B, C]
        labels = batch["label"].cpu()  # [B]
        return {sid: (logits[i], int(labels[i])) for i, sid in enumerate(batch["sample_id"]) if labels[i] >= 0}

    def compute(self, records):
        logits = torch.stack([r[0] for r in records])  # [N, C]
        labels = torch.tensor([r[1] for r in records])  # [N]
        return zeroshot_metrics(logits, labels)
