"""Losses as pure functions with shape comments. Each returns a dict of named terms.

The contrastive losses follow the "local loss" scheme of open_clip: every rank scores its own rows
against the features gathered (with gradients) from all ranks. With DDP averaging gradients over
ranks, loss and gradients then equal those of a single process holding the whole global batch
(tests/test_ddp.py proves it with 2 CPU processes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lit_vlm.distributed import gather_with_grad, rank_and_world


def clip_loss(
    image_emb: torch.Tensor,  # [B, D] L2-normalised image embeddings of this rank
    text_emb: torch.Tensor,  # [B, D] L2-normalised text embeddings of this rank (row i pairs with image i)
    logit_scale: torch.Tensor,  # [] the multiplier exp(t), already exponentiated
    gather: bool = True,
) -> dict[str, torch.Tensor]:
    """Symmetric InfoNCE of CLIP (Radford et al., 2021).

    loss = (CE(s * I T^T, diag) + CE(s * T I^T, diag)) / 2, each cross-entropy averaged over rows.
    Under DDP (``gather=True``) the local rows are scored against the global batch; the returned
    ``loss`` is this rank's local mean, whose DDP average is the global-batch loss.

    Returns: {"loss", "loss_i2t", "loss_t2i", "acc_i2t", "acc_t2i"} (accuracies are of this rank's rows).
    """
    rank, world = rank_and_world() if gather else (0, 1)
    batch = image_emb.shape[0]
    all_image = gather_with_grad(image_emb) if world > 1 else image_emb  # [W*B, D]
    all_text = gather_with_grad(text_emb) if world > 1 else text_emb  # [W*B, D]
    logits_i2t = logit_scale * image_emb @ all_text.T  # [B, W*B]
    logits_t2i = logit_scale * text_emb @ all_image.T  # [B, W*B]
    labels = torch.arange(batch, device=image_emb.device) + rank * batch  # [B] positives' columns
    loss_i2t = F.cross_entropy(logits_i2t, labels)
    loss_t2i = F.cross_entropy(logits_t2i, labels)
    with torch.no_grad():
        acc_i2t = (logits_i2t.argmax(dim=1) == labels).float().mean()
        acc_t2i = (logits_t2i.argmax(dim=1) == labels).float().mean()
    return {
        "loss": (loss_i2t + loss_t2i) / 2,
        "loss_i2t": loss_i2t,
        "loss_t2i": loss_t2i,
        "acc_i2t": acc_i2t,
        "acc_t2i": acc_t2i,
    }
