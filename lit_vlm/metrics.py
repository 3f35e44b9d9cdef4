"""Set-level evaluation metrics as pure functions on embeddings / score matrices.

Ties are counted pessimistically everywhere: a wrong candidate whose score equals the best
correct one ranks ahead of it. This is deterministic, independent of sort stability, and a
collapsed model (all scores equal) gets no free hits.
"""

from __future__ import annotations

import torch


def _ranks_i2t(sim: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """Rank (0 = best) of each image's best-scoring own caption. sim [I, T], owner [T] -> [I]."""
    own = owner.unsqueeze(0) == torch.arange(sim.shape[0], device=sim.device).unsqueeze(1)  # [I, T]
    best_pos = sim.masked_fill(~own, float("-inf")).amax(dim=1, keepdim=True)  # [I, 1]
    return ((sim >= best_pos) & ~own).sum(dim=1)  # [I] wrong captions scoring >= the best right one


def retrieval_ranks(
    image_emb: torch.Tensor,  # [I, D] normalised image embeddings
    text_emb: torch.Tensor,  # [T, D] normalised caption embeddings
    owner: torch.Tensor,  # [T] long, index in [0, I) of each caption's image
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks for image->text ([I], the best of each image's captions) and text->image ([T]).

    The similarity matrix is processed ``chunk_size`` rows at a time, so memory grows with one
    chunk (chunk_size x T or chunk_size x I), not with the full I x T rank computation.
    """
    if image_emb.shape[0] == 0 or text_emb.shape[0] == 0:
        raise ValueError("retrieval needs at least one image and one caption")
    if int(owner.min()) < 0 or int(owner.max()) >= image_emb.shape[0]:
        raise ValueError("caption owner index out of range of the images")
    has_caption = torch.zeros(image_emb.shape[0], dtype=torch.bool, device=owner.device)
    has_caption[owner] = True
    if not bool(has_caption.all()):
        raise ValueError(f"{int((~has_caption).sum())} image(s) have no caption; image->text recall is undefined")
    i2t = []
    for start in range(0, image_emb.shape[0], chunk_size):
        sim = image_emb[start : start + chunk_size] @ text_emb.T  # [c, T]
        shifted_owner = owner - start  # captions of rows outside the chunk get indices outside [0, c)
        i2t.append(_ranks_i2t(sim, shifted_owner))
    t2i = []
    for start in range(0, text_emb.shape[0], chunk_size):
        sim = text_emb[start : start + chunk_size] @ image_emb.T  # [c, I]
        pos = sim.gather(1, owner[start : start + chunk_size].unsqueeze(1))  # [c, 1]
        t2i.append((sim >= pos).sum(dim=1) - 1)  # [c] images scoring >= the right one, minus itself
    return torch.cat(i2t), torch.cat(t2i)


def retrieval_metrics(
    image_emb: torch.Tensor,  # [I, D]
    text_emb: torch.Tensor,  # [T, D]
    owner: torch.Tensor,  # [T]
    ks: tuple[int, ...] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Image->text and text->image recall@k (an image->text hit when ANY of its captions is in the
    top k), their mean (``rmean``), and median / mean rank (1-based) in both directions."""
    i2t, t2i = retrieval_ranks(image_emb, text_emb, owner, chunk_size)
    out: dict[str, float] = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in ks:
            out[f"{name}_R@{k}"] = (ranks < k).float().mean().item()
        out[f"{name}_medr"] = (ranks.float() + 1).quantile(0.5).item()  # statistical median (mean of the middle two)
        out[f"{name}_meanr"] = (ranks.float() + 1).mean().item()
    recalls = [out[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in ks]
    out["rmean"] = sum(recalls) / len(recalls)
    out["mean_R@1"] = (out["i2t_R@1"] + out["t2i_R@1"]) / 2 if 1 in ks else float("nan")
    return out


def zeroshot_metrics(
    logits: torch.Tensor,  # [N, C] image-to-class scores
    labels: torch.Tensor,  # [N] long, true class
) -> dict[str, float]:
    """Top-1, top-5 (only when there are at least 5 classes) and mean per-class recall (over the
    classes present in ``labels``)."""
    if logits.shape[0] == 0:
        raise ValueError("zero-shot classification needs at least one labelled sample")
    true = logits.gather(1, labels.unsqueeze(1))  # [N, 1]
    rank = (logits >= true).sum(dim=1) - 1  # [N] other classes scoring >= the true one
    out = {"top1": (rank < 1).float().mean().item()}
    if logits.shape[1] >= 5:
        out["top5"] = (rank < 5).float().mean().item()
    hit = (rank < 1).float()
    per_class = [hit[labels == c].mean() for c in labels.unique()]
    out["mean_per_class_recall"] = torch.stack(per_class).mean().item()
    return out
