"""Image<->text retrieval evaluation with any number of captions per image."""

from __future__ import annotations

import torch

from lit_vlm.callbacks.base import EvalCallback, require_capability
from lit_vlm.metrics import retrieval_metrics


class RetrievalEvaluation(EvalCallback):
    """Recall@k in both directions, their mean, and median/mean rank, on the val/test split.

    Reads the batch keys ``image``, ``caption_ids``, ``caption_mask``, ``caption_owner`` and
    ``sample_id``; calls the family's ``encode_image`` and ``encode_text``. Exact under DDP:
    per-image records are gathered by sample id, duplicates dropped, metrics computed once.
    Logged as ``{stage}/retrieval/i2t_R@1`` ... ``rmean``, ``mean_R@1``.

    Args:
        splits: Stages to evaluate on, among "val" and "test".
        ks: The k of recall@k.
        chunk_size: Rows of the similarity matrix processed at a time (bounds memory).
        prefix: Metric namespace.
    """

    def __init__(
        self,
        splits: tuple[str, ...] | list[str] = ("val", "test"),
        ks: tuple[int, ...] | list[int] = (1, 5, 10),
        chunk_size: int = 1024,
        prefix: str = "retrieval",
    ) -> None:
        super().__init__(splits, prefix)
        self.ks = tuple(ks)
        self.chunk_size = chunk_size

    def setup_epoch(self, trainer, pl_module, stage):
        require_capability(pl_module, "encode_image", "encode_text")
        return True

    def collect(self, trainer, pl_module, batch):
        for key in ("caption_ids", "caption_mask", "caption_owner"):
            if key not in batch:
                raise KeyError(f"RetrievalEvaluation needs batch key '{key}' (an evaluation split with captions)")
        image_emb = pl_module.encode_image(batch["image"]).float().cpu()  # [B, E]
        caption_emb = pl_module.encode_text(batch["caption_ids"], batch["caption_mask"]).float().cpu()  # [N, E]
        owner = batch["caption_owner"].cpu()  # [N]
        return {sid: (image_emb[i], caption_emb[owner == i]) for i, sid in enumerate(batch["sample_id"])}

    def compute(self, records):
        image_emb = torch.stack([img for img, _ in records])  # [I, E]
        caption_emb = torch.cat([caps for _, caps in records])  # [T, E]
        owner = torch.cat([torch.full((caps.shape[0],), i) for i, (_, caps) in enumerate(records)])  # [T]
        return retrieval_metrics(image_emb, caption_emb, owner, self.ks, self.chunk_size)
