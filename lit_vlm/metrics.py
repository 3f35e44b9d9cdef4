"""Set-level evaluation metrics as pure functions on embeddings / score matrices (no Lightning).

Retrieval
---------
``I`` images, ``T`` captions; ``owner[t]`` is the image of caption ``t`` (any number >= 1 of
captions per image).  Ranks are 0-based (0 = retrieved first):

* image->text (``i2t``, one rank per image): the rank of the image's *best-ranked* own caption,
  i.e. the number of other images' captions scoring at least as high as the best own caption.
  A recall@k hit is ``rank < k``: *any* caption of the image is among the top k
  (Karpathy & Fei-Fei 2015; VSE++; CLIP; LAVIS).
* text->image (``t2i``, one rank per caption): the number of other images scoring at least as
  high as the caption's own image.

**Ties are pessimistic**: a wrong candidate whose score *equals* the best correct one counts as
ranked *above* it.  The rule is deterministic, independent of sort stability and of chunking,
and a collapsed model (all scores equal) gets no free hits.  An implementation based on a
(stable) argsort instead ranks tied candidates by index, which can only give better ranks.

The similarity is never materialised whole: ``chunk_size`` rows at a time are computed from the
embeddings (or sliced from a given similarity matrix) into one reused buffer and reduced to ranks
immediately, so the extra memory is about ``chunk_size * max(I, T) * 4`` bytes (one float32
chunk; the comparison is written back into it), never an ``[I, T]`` score, rank or argsort
matrix (see ``benchmarks/retrieval_memory.py``).

Summary numbers (all fractions in [0, 1], not percent):

* ``i2t_R@k``, ``t2i_R@k`` for every ``k`` in ``ks``;
* ``rmean``: the mean of those recalls (LAVIS' ``r_mean`` / 100 with the default ks);
* ``rsum``: their sum (the "R-sum" of VSE/SCAN-style papers / 100; at most ``2 * len(ks)``);
* ``mean_R@1``: mean of the two recall@1 (only when 1 is in ``ks``);
* ``i2t_medr``, ``t2i_medr``: median 1-based rank, the statistical median (mean of the two
  middle values for an even count; VSE++ instead floors the 0-based median before adding 1);
* ``i2t_meanr``, ``t2i_meanr``: mean 1-based rank.

Zero-shot classification
------------------------
``logits [N, C]`` against true labels ``[N]``, with the same pessimistic tie rule (a class scoring
equal to the true one ranks above it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = [
    "confusion_matrix",
    "describe_metric",
    "in_batch_accuracy",
    "retrieval_metrics",
    "retrieval_metrics_from_ranks",
    "retrieval_metrics_from_similarity",
    "retrieval_ranks",
    "retrieval_ranks_from_similarity",
    "true_class_ranks",
    "zeroshot_metrics",
    "zeroshot_predictions",
]


# --------------------------------------------------------------------------------------------
# Retrieval
# --------------------------------------------------------------------------------------------


def _check_owner(owner: torch.Tensor, num_images: int, num_captions: int) -> torch.Tensor:
    """Validate the caption->image correspondence; return it as a long tensor."""
    if owner.dim() != 1 or owner.shape[0] != num_captions:
        raise ValueError(
            f"owner must have shape [{num_captions}] (one image index per caption), got {list(owner.shape)}"
        )
    if owner.dtype.is_floating_point or owner.dtype == torch.bool or owner.is_complex():
        raise ValueError(f"owner must hold integer image indices, got dtype {owner.dtype}")
    if num_images == 0 or num_captions == 0:
        raise ValueError(f"retrieval needs at least one image and one caption, got {num_images} and {num_captions}")
    owner = owner.long()
    lo, hi = int(owner.min()), int(owner.max())
    if lo < 0 or hi >= num_images:
        bad = owner[(owner < 0) | (owner >= num_images)]
        raise ValueError(f"caption owner index out of range [0, {num_images}): e.g. {bad[:5].tolist()}")
    counts = torch.bincount(owner, minlength=num_images)  # [I]
    if bool((counts == 0).any()):
        missing = (counts == 0).nonzero().flatten()
        raise ValueError(
            f"{missing.numel()} image(s) have no caption (e.g. image rows {missing[:5].tolist()}); "
            "image->text recall is undefined"
        )
    return owner


def _check_chunk(chunk_size: int) -> None:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")


def _no_nan(sim: torch.Tensor, where: str, start: int) -> None:
    if bool(torch.isnan(sim.amax())):  # amax propagates NaN and allocates nothing big
        row = int(torch.isnan(sim).any(dim=1).nonzero()[0, 0]) + start
        raise ValueError(f"NaN similarity for {where} {row} (non-finite embeddings?); ranks would be meaningless")


# Counting in a float buffer is exact while every count stays below 2**24 (float32 integers).
_FLOAT32_EXACT = 2**24


def _count_at_least(sim: torch.Tensor, threshold: torch.Tensor, scratch: torch.Tensor | None) -> torch.Tensor:
    """Per row, how many entries of ``sim [c, N]`` are >= ``threshold [c, 1]`` -> long [c].

    The comparison is written as 0/1 into ``scratch [c, N]`` (which may be ``sim`` itself) and
    summed there, so no ``[c, N]`` int64 copy is made (``bool.sum`` would make one: 8 bytes per
    entry). Without scratch, or for rows too long for exact float32 counts, the plain path is used.
    """
    if scratch is None or (scratch.dtype == torch.float32 and sim.shape[1] >= _FLOAT32_EXACT):
        return (sim >= threshold).sum(dim=1)  # [c]
    torch.ge(sim, threshold, out=scratch)  # [c, N] 0/1
    return scratch.sum(dim=1).long()  # [c]


class _CaptionIndex:
    """Captions grouped by owner: ``order[offsets[i]:offsets[i + 1]]`` are image ``i``'s captions."""

    def __init__(self, owner: torch.Tensor, num_images: int) -> None:
        self.order = torch.sort(owner, stable=True).indices  # [T]
        counts = torch.bincount(owner, minlength=num_images)  # [I]
        self.offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).tolist()  # I + 1 ints
        self.owner = owner


def _i2t_chunk(sim: torch.Tensor, index: _CaptionIndex, start: int, scratch: torch.Tensor | None) -> torch.Tensor:
    """Ranks of images ``start .. start + c`` from their similarity rows ``sim [c, T]`` -> [c]."""
    c = sim.shape[0]
    own = index.order[index.offsets[start] : index.offsets[start + c]]  # [n] captions of these images
    rows = index.owner[own] - start  # [n] their row in the chunk
    own_score = sim[rows, own]  # [n]
    best = torch.full((c,), float("-inf"), dtype=sim.dtype, device=sim.device)  # [c]
    best = best.scatter_reduce(0, rows, own_score, reduce="amax")  # [c] best own caption score
    own_at_best = torch.zeros(c, dtype=torch.long, device=sim.device)  # [c]
    own_at_best = own_at_best.scatter_add(0, rows, (own_score >= best[rows]).long())  # [c] own ones tied at best
    at_least_best = _count_at_least(sim, best.unsqueeze(1), scratch)  # [c] all captions scoring >= it
    return at_least_best - own_at_best  # [c] wrong captions scoring >= the best own one


def _t2i_chunk(sim_t: torch.Tensor, owner: torch.Tensor, scratch: torch.Tensor | None) -> torch.Tensor:
    """Ranks of captions from their similarity rows ``sim_t [c, I]`` and owners ``[c]`` -> [c]."""
    pos = sim_t.gather(1, owner.unsqueeze(1))  # [c, 1] score of the own image
    return _count_at_least(sim_t, pos, scratch) - 1  # [c] images scoring >= the own one, minus itself


# rows(start, stop, buffer) -> (sim [c, N], scratch): the chunk's similarity rows and a writable
# float [c, N] tensor for the comparison (the chunk itself when it was computed into the buffer).
_Rows = Callable[[int, int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _ranks(
    num_images: int,
    num_captions: int,
    owner: torch.Tensor,
    image_rows: _Rows,
    caption_rows: _Rows,
    chunk_size: int,
    buffer_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both rank vectors, one chunk of rows at a time, reusing one ``[chunk, N]`` buffer per direction."""
    device = owner.device
    index = _CaptionIndex(owner, num_images)
    i2t = []
    buffer = torch.empty(min(chunk_size, num_images), num_captions, dtype=buffer_dtype, device=device)  # [c, T]
    for start in range(0, num_images, chunk_size):
        stop = min(start + chunk_size, num_images)
        sim, scratch = image_rows(start, stop, buffer[: stop - start])  # [c, T]
        _no_nan(sim, "image row", start)
        i2t.append(_i2t_chunk(sim, index, start, scratch))
    del buffer, sim, scratch
    t2i = []
    buffer = torch.empty(min(chunk_size, num_captions), num_images, dtype=buffer_dtype, device=device)  # [c, I]
    for start in range(0, num_captions, chunk_size):
        stop = min(start + chunk_size, num_captions)
        sim_t, scratch = caption_rows(start, stop, buffer[: stop - start])  # [c, I]
        _no_nan(sim_t, "caption", start)
        t2i.append(_t2i_chunk(sim_t, owner[start:stop], scratch))
    return torch.cat(i2t), torch.cat(t2i)  # [I], [T]


def retrieval_ranks(
    image_emb: torch.Tensor,  # [I, D] normalised image embeddings
    text_emb: torch.Tensor,  # [T, D] normalised caption embeddings
    owner: torch.Tensor,  # [T] long, index in [0, I) of each caption's image
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based ranks for image->text ([I], the best of each image's captions) and text->image ([T]).

    The similarity is the dot product, computed ``chunk_size`` rows at a time (``[chunk, T]`` for
    image->text, ``[chunk, I]`` for text->image) in at least float32 into one reused buffer, and
    reduced to ranks before the next chunk; ties are pessimistic (see the module docstring).

    Args:
        image_emb: Image embeddings ``[I, D]`` (normalise them for cosine similarity).
        text_emb: Caption embeddings ``[T, D]``.
        owner: Integer ``[T]``, the image row of each caption; every image needs >= 1 caption.
        chunk_size: Rows of the similarity processed at a time (bounds memory).
    """
    _check_chunk(chunk_size)
    if image_emb.dim() != 2 or text_emb.dim() != 2 or image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(
            "image_emb [I, D] and text_emb [T, D] need the same D, "
            f"got {list(image_emb.shape)} and {list(text_emb.shape)}"
        )
    owner = _check_owner(owner.to(image_emb.device), image_emb.shape[0], text_emb.shape[0])
    dtype = torch.promote_types(torch.promote_types(image_emb.dtype, text_emb.dtype), torch.float32)
    img, txt = image_emb.to(dtype), text_emb.to(dtype)  # no copy when already float32

    def image_rows(a: int, b: int, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sim = torch.matmul(img[a:b], txt.T, out=out)  # [c, T]
        return sim, sim

    def caption_rows(a: int, b: int, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sim_t = torch.matmul(txt[a:b], img.T, out=out)  # [c, I]
        return sim_t, sim_t

    return _ranks(img.shape[0], txt.shape[0], owner, image_rows, caption_rows, chunk_size, dtype)


def retrieval_ranks_from_similarity(
    sim: torch.Tensor,  # [I, T] image-caption scores
    owner: torch.Tensor,  # [T] long, index in [0, I) of each caption's image
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`retrieval_ranks` for a precomputed similarity matrix (e.g. ITM re-ranking scores).

    The matrix is only read: comparisons of ``chunk_size`` rows (then columns) at a time are
    written into one reused float32 buffer. Scores are compared exactly as given (integer
    matrices as float64), ties between equal entries are pessimistic.

    Args:
        sim: Scores ``[I, T]``, higher = more similar; ``-inf`` is allowed, NaN is an error.
        owner: Integer ``[T]``, the image row of each caption; every image needs >= 1 caption.
        chunk_size: Rows (images, then captions) processed at a time (bounds memory).
    """
    _check_chunk(chunk_size)
    if sim.dim() != 2:
        raise ValueError(f"sim must be a matrix [I, T], got shape {list(sim.shape)}")
    if sim.dtype == torch.bool or sim.is_complex():
        raise ValueError(f"sim must hold real scores, got dtype {sim.dtype}")
    owner = _check_owner(owner.to(sim.device), sim.shape[0], sim.shape[1])
    exact = (lambda x: x) if sim.dtype.is_floating_point else (lambda x: x.double())  # per chunk

    def image_rows(a: int, b: int, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return exact(sim[a:b]), out  # [c, T] view

    def caption_rows(a: int, b: int, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return exact(sim[:, a:b].T), out  # [c, I] view

    return _ranks(sim.shape[0], sim.shape[1], owner, image_rows, caption_rows, chunk_size, torch.float32)


def _median(x: torch.Tensor) -> float:
    """Statistical median of a 1-D tensor (mean of the two middle values for an even count)."""
    s = torch.sort(x.double()).values  # [n]
    n = s.numel()
    return float((s[(n - 1) // 2] + s[n // 2]) / 2)


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in ks) or len(set(ks)) != len(ks):
        raise ValueError(f"ks must be distinct positive integers, got {ks!r}")
    return ks


def retrieval_metrics_from_ranks(
    i2t_ranks: torch.Tensor,  # [I] 0-based
    t2i_ranks: torch.Tensor,  # [T] 0-based
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@k, ``rmean``, ``rsum``, ``mean_R@1``, median and mean rank from 0-based ranks.

    Args:
        i2t_ranks: Image->text rank of every image ``[I]``.
        t2i_ranks: Text->image rank of every caption ``[T]``.
        ks: The k of recall@k (distinct positive integers).
    """
    ks = _check_ks(ks)
    out: dict[str, float] = {}
    for name, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        if ranks.numel() == 0:
            raise ValueError(f"no {name} ranks to summarise")
        for k in ks:
            out[f"{name}_R@{k}"] = (ranks < k).double().mean().item()
        out[f"{name}_medr"] = _median(ranks) + 1
        out[f"{name}_meanr"] = ranks.double().mean().item() + 1
    recalls = [out[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in ks]
    out["rsum"] = sum(recalls)
    out["rmean"] = out["rsum"] / len(recalls)
    if 1 in ks:
        out["mean_R@1"] = (out["i2t_R@1"] + out["t2i_R@1"]) / 2
    return out


def retrieval_metrics(
    image_emb: torch.Tensor,  # [I, D]
    text_emb: torch.Tensor,  # [T, D]
    owner: torch.Tensor,  # [T]
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Image<->text retrieval metrics from embeddings (see the module docstring for every name).

    Args:
        image_emb: Image embeddings ``[I, D]`` (normalise them for cosine similarity).
        text_emb: Caption embeddings ``[T, D]``.
        owner: Integer ``[T]``, the image row of each caption; every image needs >= 1 caption.
        ks: The k of recall@k.
        chunk_size: Rows of the similarity processed at a time (bounds memory).
    """
    ks = _check_ks(ks)
    return retrieval_metrics_from_ranks(*retrieval_ranks(image_emb, text_emb, owner, chunk_size), ks)


def retrieval_metrics_from_similarity(
    sim: torch.Tensor,  # [I, T]
    owner: torch.Tensor,  # [T]
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Image<->text retrieval metrics from a similarity matrix and the caption->image map.

    Args:
        sim: Scores ``[I, T]``, higher = more similar.
        owner: Integer ``[T]``, the image row of each caption; every image needs >= 1 caption.
        ks: The k of recall@k.
        chunk_size: Rows processed at a time (bounds memory).
    """
    ks = _check_ks(ks)
    return retrieval_metrics_from_ranks(*retrieval_ranks_from_similarity(sim, owner, chunk_size), ks)


# --------------------------------------------------------------------------------------------
# Zero-shot classification
# --------------------------------------------------------------------------------------------


def _check_logits(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dim() != 2 or labels.dim() != 1 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"logits [N, C] and labels [N] do not match: {list(logits.shape)} and {list(labels.shape)}")
    if logits.shape[0] == 0:
        raise ValueError("zero-shot classification needs at least one labelled sample")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    bad = (labels < 0) | (labels >= logits.shape[1])
    if bool(bad.any()):
        raise ValueError(
            f"labels out of range [0, {logits.shape[1]}) at rows {bad.nonzero().flatten()[:5].tolist()}: "
            f"{labels[bad][:5].tolist()}"
        )
    if bool(torch.isnan(logits).any()):
        raise ValueError(f"NaN logits at rows {torch.isnan(logits).any(dim=1).nonzero().flatten()[:5].tolist()}")


def true_class_ranks(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """0-based rank of each row's true class ([N, C] scores, [N] labels -> [N]); ties pessimistic."""
    true = logits.gather(1, labels.long().unsqueeze(1))  # [N, 1]
    return (logits >= true).sum(dim=1) - 1  # [N] other classes scoring >= the true one


def zeroshot_metrics(
    logits: torch.Tensor,  # [N, C] image-to-class scores
    labels: torch.Tensor,  # [N] long, true class
) -> dict[str, float]:
    """``top1``, ``top5`` (only with >= 5 classes) accuracy and ``mean_per_class_recall``.

    ``mean_per_class_recall`` is the top-1 recall averaged over the classes *present* in
    ``labels`` (classes without samples are left out rather than counted as 0). Ties are
    pessimistic: a class scoring equal to the true one ranks above it.

    Args:
        logits: Scores ``[N, C]`` of every labelled image against every class.
        labels: True class index ``[N]`` in ``[0, C)``.
    """
    _check_logits(logits, labels)
    rank = true_class_ranks(logits, labels)  # [N]
    out = {"top1": (rank < 1).double().mean().item()}
    if logits.shape[1] >= 5:
        out["top5"] = (rank < 5).double().mean().item()
    hit = (rank < 1).double()  # [N]
    per_class = [hit[labels == c].mean() for c in labels.unique()]
    out["mean_per_class_recall"] = torch.stack(per_class).mean().item()
    return out


def zeroshot_predictions(
    logits: torch.Tensor,  # [N, C]
    labels: torch.Tensor,  # [N]
) -> torch.Tensor:
    """Top-1 predicted class ``[N]`` consistent with the pessimistic ``top1`` of :func:`zeroshot_metrics`.

    The prediction is the true class only when it scores strictly above every other class;
    otherwise the lowest-index other class with the maximal score.  Hence
    ``(predictions == labels).mean() == top1`` exactly.

    Args:
        logits: Scores ``[N, C]``.
        labels: True class index ``[N]`` in ``[0, C)``.
    """
    _check_logits(logits, labels)
    labels = labels.long()
    others = logits.scatter(1, labels.unsqueeze(1), float("-inf"))  # [N, C] true class masked
    best_other = others.argmax(dim=1)  # [N] first maximal index (unused when C == 1)
    return torch.where(true_class_ranks(logits, labels) == 0, labels, best_other)  # [N]


def confusion_matrix(
    labels: torch.Tensor,  # [N] true classes
    predictions: torch.Tensor,  # [N] predicted classes
    num_classes: int,
) -> torch.Tensor:
    """``[C, C]`` long counts: row = true class, column = predicted class.

    Args:
        labels: True class index ``[N]``.
        predictions: Predicted class index ``[N]``.
        num_classes: ``C``.
    """
    if labels.shape != predictions.shape or labels.dim() != 1:
        raise ValueError(
            f"labels and predictions must be [N] alike, got {list(labels.shape)} and {list(predictions.shape)}"
        )
    for name, t in (("labels", labels), ("predictions", predictions)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
            raise ValueError(f"{name} out of range [0, {num_classes})")
    flat = labels.long() * num_classes + predictions.long()  # [N]
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)  # [C, C]


def in_batch_accuracy(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Top-1 accuracy of the matching pairs on the diagonal of ``logits`` [B, B] (row i = image i)."""
    labels = torch.arange(logits.shape[0], device=logits.device)  # [B]
    return {
        "acc_i2t": (logits.argmax(dim=1) == labels).float().mean(),
        "acc_t2i": (logits.argmax(dim=0) == labels).float().mean(),
    }


def describe_metric(name: str) -> dict[str, Any]:
    """What a logged metric is, from its last name component whatever the callback's prefix:
    ``{"higher_is_better": bool | None, "unit": "fraction" | "rank" | "count" | "loss" | "score"}``
    (``rsum`` is a sum of fractions, CIDEr a score that can exceed 1). For leaderboards."""
    leaf = name.rsplit("/", 1)[-1]
    if leaf.endswith("_std"):  # a spread over seeds (FewShotEvaluation), in its metric's unit
        return {"higher_is_better": None, "unit": describe_metric(name.removesuffix("_std"))["unit"]}
    if leaf.endswith(("_medr", "_meanr")) or leaf in ("medr", "meanr"):
        return {"higher_is_better": False, "unit": "rank"}
    if leaf.startswith("num_") or leaf.endswith("_count"):
        return {"higher_is_better": None, "unit": "count"}
    if "loss" in leaf:
        return {"higher_is_better": False, "unit": "loss"}
    if leaf in ("rsum", "CIDEr") or leaf.startswith("CIDEr"):
        return {"higher_is_better": True, "unit": "score"}
    fractions = ("R@", "rmean", "top1", "top5", "recall", "acc", "BLEU", "METEOR", "ROUGE", "overall", "SPICE")
    compositional = "/compositional/" in f"/{name}"  # accuracy per negative kind (CompositionalEvaluation)
    if any(tag in leaf for tag in fractions) or "/answer_type/" in name or "/question_type/" in name or compositional:
        return {"higher_is_better": True, "unit": "fraction"}
    return {"higher_is_better": None, "unit": "score"}
