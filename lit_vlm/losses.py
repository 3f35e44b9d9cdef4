"""Losses as pure functions with shape comments. Each returns a dict of named terms.

The contrastive losses follow the "local loss" scheme of open_clip: every rank scores its own rows
against the features gathered (with gradients) from all ranks, and returns a local loss whose DDP
average is the global-batch loss. With DDP averaging gradients over ranks, loss and gradients then
equal those of a single process holding the whole global batch (tests/test_ddp_loss.py and
tests/test_ddp_contrastive.py prove it with 2 CPU processes).

* :func:`clip_loss` — symmetric InfoNCE (CLIP).
* :func:`siglip_loss` — pairwise sigmoid loss (SigLIP), "gather" or "ring" exchange, optionally
  chunked so that memory grows with the chunk rather than with the global batch squared.
* :func:`focal_clip_loss` — focal contrastive loss (RO-ViT / MaMMUT), sigmoid or softmax form.
* :func:`hard_negative_columns` — compositional hard negatives as extra text columns (NegCLIP).
* :func:`filip_similarity`, :func:`filip_loss` — FILIP token-wise late interaction.
* :func:`token_cross_entropy`, :func:`caption_loss`, :func:`global_token_mean` — the
  captioning (language-modelling) loss as per-sample sums and counts.
* :func:`momentum_itc_loss`, :func:`itm_hard_negatives` — BLIP's image-text contrastive loss
  against momentum features and queues, and the hard negatives its matching loss is trained on.
* :func:`mae_loss` — MAE's reconstruction loss on the masked patches; :func:`bert_mask` — BERT's
  token masking for masked language modelling (FLAVA).
* :func:`get_loss` — look a loss up by the name a YAML file gives.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from lit_vlm.distributed import gather_no_grad, gather_with_grad, ppermute, rank_and_world
from lit_vlm.errors import UserError


def hard_negative_columns(
    negative_emb: torch.Tensor | None,  # [B, K, D] L2-normalised hard-negative texts of this rank's captions
    negative_valid: torch.Tensor | None,  # [B, K] bool, rows that hold a negative
    gather: bool = True,
) -> torch.Tensor | None:
    """Every rank's hard negatives as extra text columns, [M, D] (M valid rows of the global batch),
    gathered with gradients under DDP as the texts are; None without negatives. NegCLIP
    (Yuksekgonul et al., 2023) appends them to the texts each image is scored against, so they act
    in the image-to-text direction only (they have no image of their own)."""
    if negative_emb is None:
        return None
    flat = negative_emb.flatten(0, 1)  # [B*K, D]
    valid = torch.ones(flat.shape[0], dtype=torch.bool, device=flat.device) if negative_valid is None else negative_valid.flatten()
    _, world = rank_and_world() if gather else (0, 1)
    if world > 1:
        flat = gather_with_grad(flat)  # [W*B*K, D]
        valid = gather_no_grad(valid)  # [W*B*K]
    return flat[valid.bool()]  # [M, D]


def _symmetric_infonce(
    logits_i2t: torch.Tensor,  # [B, N] this rank's images against every text
    logits_t2i: torch.Tensor,  # [B, N] this rank's texts against every image
    labels: torch.Tensor,  # [B] column of each row's positive
) -> dict[str, torch.Tensor]:
    """Mean of the two cross-entropies, with each direction's loss and in-batch accuracy."""
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


def clip_loss(
    image_emb: torch.Tensor,  # [B, D] L2-normalised image embeddings of this rank
    text_emb: torch.Tensor,  # [B, D] L2-normalised text embeddings of this rank (row i pairs with image i)
    logit_scale: torch.Tensor,  # [] the multiplier exp(t), already exponentiated
    gather: bool = True,
    negative_emb: torch.Tensor | None = None,  # [B, K, D] hard negatives of each caption (optional)
    negative_valid: torch.Tensor | None = None,  # [B, K] bool
) -> dict[str, torch.Tensor]:
    """Symmetric InfoNCE of CLIP (Radford et al., 2021).

    loss = (CE(s * I T^T, diag) + CE(s * T I^T, diag)) / 2, each cross-entropy averaged over rows.
    Under DDP (``gather=True``) the local rows are scored against the global batch; the returned
    ``loss`` is this rank's local mean, whose DDP average is the global-batch loss.
    Hard negatives (:func:`hard_negative_columns`) are extra columns of the image-to-text logits.

    Returns: {"loss", "loss_i2t", "loss_t2i", "acc_i2t", "acc_t2i"} (accuracies are of this rank's rows).
    """
    rank, world = rank_and_world() if gather else (0, 1)
    batch = image_emb.shape[0]
    all_image = gather_with_grad(image_emb) if world > 1 else image_emb  # [W*B, D]
    all_text = gather_with_grad(text_emb) if world > 1 else text_emb  # [W*B, D]
    logits_i2t = logit_scale * image_emb @ all_text.T  # [B, W*B]
    logits_t2i = logit_scale * text_emb @ all_image.T  # [B, W*B]
    negatives = hard_negative_columns(negative_emb, negative_valid, gather)  # [M, D] or None
    if negatives is not None:
        logits_i2t = torch.cat([logits_i2t, logit_scale * image_emb @ negatives.T], 1)  # [B, W*B + M]
    labels = torch.arange(batch, device=image_emb.device) + rank * batch  # [B] positives' columns
    return _symmetric_infonce(logits_i2t, logits_t2i, labels)


# ----------------------------------------------------------------------------------------------
# SigLIP
# ----------------------------------------------------------------------------------------------

SIGLIP_MODES = ("gather", "ring")


def _positives_in(batch: int, offset: int | None, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(rows, columns relative to ``start``) of the positive pairs (i, offset + i) inside columns [start, stop)."""
    if offset is None:
        return None
    first, last = max(0, start - offset), min(batch, stop - offset)
    if first >= last:
        return None
    rows = torch.arange(first, last)  # [n]
    return rows, rows + offset - start  # [n], [n]


def _sigmoid_pairs_sum(
    image_emb: torch.Tensor,  # [B, D]
    text_emb: torch.Tensor,  # [N, D]
    logit_scale: torch.Tensor,  # []
    logit_bias: torch.Tensor,  # []
    positive_offset: int | None,  # text row of image i's positive is positive_offset + i; None: no positives
) -> torch.Tensor:
    """-sum_ij log sigmoid(z_ij (s x_i.y_j + b)) over the full [B, N] matrix with plain autograd ops."""
    logits = logit_scale * image_emb @ text_emb.T + logit_bias  # [B, N]
    signs = torch.full_like(logits, -1.0)  # [B, N] z_ij = -1 for negatives
    pos = _positives_in(image_emb.shape[0], positive_offset, 0, text_emb.shape[0])
    if pos is not None:
        signs[pos[0].to(logits.device), pos[1].to(logits.device)] = 1.0
    return -F.logsigmoid(signs * logits).sum()


class _ChunkedSigmoidPairsSum(torch.autograd.Function):
    """The same sum as :func:`_sigmoid_pairs_sum`, computed ``chunk`` text columns at a time.

    Forward keeps one [B, chunk] block of logits alive at a time and saves only its inputs; backward
    recomputes each block's logits and turns them into gradients right away. Peak memory for the
    pairwise part is therefore O(B * chunk) in both passes, instead of several [B, N] tensors that
    plain autograd would save. With u = z * (s * x.y + b): d(-log sigmoid(u))/d logit = -z * sigmoid(-u).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        image_emb: torch.Tensor,  # [B, D]
        text_emb: torch.Tensor,  # [N, D]
        logit_scale: torch.Tensor,  # []
        logit_bias: torch.Tensor,  # []
        positive_offset: int | None,
        chunk: int,
    ) -> torch.Tensor:
        batch, n = image_emb.shape[0], text_emb.shape[0]
        total = torch.zeros((), dtype=image_emb.dtype, device=image_emb.device)
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            u = image_emb @ text_emb[start:stop].T  # [B, c] dot products
            u.mul_(logit_scale).add_(logit_bias).neg_()  # [B, c] z * logit with z = -1 everywhere ...
            pos = _positives_in(batch, positive_offset, start, stop)
            if pos is not None:  # ... and z = +1 on the positives
                rows, cols = pos[0].to(u.device), pos[1].to(u.device)
                u[rows, cols] = -u[rows, cols]
            total -= F.logsigmoid(u).sum()
            del u
        ctx.save_for_backward(image_emb, text_emb, logit_scale, logit_bias)
        ctx.positive_offset, ctx.chunk = positive_offset, chunk
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total: torch.Tensor):  # type: ignore[override]
        image_emb, text_emb, logit_scale, logit_bias = ctx.saved_tensors
        need_img, need_txt, need_scale, need_bias = ctx.needs_input_grad[:4]
        batch, n = image_emb.shape[0], text_emb.shape[0]
        grad_img = torch.zeros_like(image_emb) if need_img else None  # [B, D]
        grad_txt = torch.empty_like(text_emb) if need_txt else None  # [N, D]
        grad_scale = torch.zeros((), dtype=image_emb.dtype, device=image_emb.device)
        grad_bias = torch.zeros((), dtype=image_emb.dtype, device=image_emb.device)
        for start in range(0, n, ctx.chunk):
            stop = min(start + ctx.chunk, n)
            block = text_emb[start:stop]  # [c, D]
            dots = image_emb @ block.T  # [B, c]
            g = torch.sigmoid(dots * logit_scale + logit_bias)  # [B, c] sigmoid(-u) on negatives (z = -1)
            pos = _positives_in(batch, ctx.positive_offset, start, stop)
            if pos is not None:  # positives: -sigmoid(-u) = sigmoid(logit) - 1
                g[pos[0].to(g.device), pos[1].to(g.device)] -= 1.0
            g.mul_(grad_total)  # [B, c] d loss / d logit
            if need_scale:
                grad_scale += (g * dots).sum()
            if need_bias:
                grad_bias += g.sum()
            del dots
            g.mul_(logit_scale)  # [B, c] d loss / d (x.y)
            if need_img:
                grad_img += g @ block  # [B, D]
            if need_txt:
                grad_txt[start:stop] = g.T @ image_emb  # [c, D]
            del g
        return (
            grad_img,
            grad_txt,
            grad_scale.reshape(logit_scale.shape).to(logit_scale.dtype) if need_scale else None,
            grad_bias.reshape(logit_bias.shape).to(logit_bias.dtype) if need_bias else None,
            None,
            None,
        )


def _pairs_sum(
    image_emb: torch.Tensor,  # [B, D]
    text_emb: torch.Tensor,  # [N, D]
    logit_scale: torch.Tensor,  # []
    logit_bias: torch.Tensor,  # []
    positive_offset: int | None,
    chunk_size: int | None,
) -> torch.Tensor:
    if chunk_size is None:
        return _sigmoid_pairs_sum(image_emb, text_emb, logit_scale, logit_bias, positive_offset)
    return _ChunkedSigmoidPairsSum.apply(image_emb, text_emb, logit_scale, logit_bias, positive_offset, chunk_size)


def siglip_loss(
    image_emb: torch.Tensor,  # [B, D] L2-normalised image embeddings of this rank
    text_emb: torch.Tensor,  # [B, D] L2-normalised text embeddings of this rank (row i pairs with image i)
    logit_scale: torch.Tensor,  # [] the multiplier t = exp(t'), already exponentiated
    logit_bias: torch.Tensor,  # [] the bias b
    gather: bool = True,
    mode: str = "gather",
    chunk_size: int | None = None,
    negative_emb: torch.Tensor | None = None,  # [B, K, D] hard negatives of each caption (optional)
    negative_valid: torch.Tensor | None = None,  # [B, K] bool
) -> dict[str, torch.Tensor]:
    """Pairwise sigmoid loss of SigLIP (Zhai et al., 2023, "Sigmoid Loss for Language Image Pre-Training", Eq. 1).

    L = -1/|B| * sum_i sum_j log sigmoid(z_ij * (t * x_i . y_j + b)), z_ij = +1 when image i and
    text j are a pair (the diagonal), -1 otherwise; |B| is the global batch size and the double sum
    runs over all |B|^2 image-text pairs of the global batch. Every pair is an independent binary
    classification, so there is no softmax normalisation over the batch.

    Under DDP (``gather=True`` and a process group of W > 1 ranks) this rank returns
    ``-1/B * sum_{i local} sum_{j global} log sigmoid(...)`` (its B images against all W*B texts):
    the DDP average of these local losses is exactly L, and the gradients that flow back to other
    ranks' texts (through the exchange) make DDP-averaged gradients equal the single-process ones.
    Every rank must pass the same B. Two ways to see every text:

    * ``mode="gather"``: all texts are gathered with gradients (``all_gather``) and scored at once.
      (Images need not be gathered: local images x all texts already covers each pair exactly once.)
    * ``mode="ring"``: the paper's chunked scheme (Sec. 3.3): each rank keeps its images and passes
      its text block round the ring with point-to-point sends (:func:`lit_vlm.distributed.ppermute`),
      W - 1 times, adding the block's negatives at each step (positives only in the first, local,
      block). The backward pass sends the gradients of the text blocks back the opposite way.

    ``chunk_size`` (columns of the [B, N] logit block per step) bounds the pairwise part: logits,
    signs and sigmoids exist for one [B, chunk_size] slice at a time, in the forward pass and —
    through a custom autograd Function that saves only the inputs and recomputes each slice — in the
    backward pass. What stays unbounded: the text features themselves ([W*B, D] gathered in "gather"
    mode; in "ring" mode the W received [B, D] blocks are kept for the backward pass), their
    gradients, and the loss value. ``None``: one block with plain autograd (saves [B, N] tensors).
    Values and gradients are identical (to float rounding) for every chunk size and both modes.

    Args:
        image_emb: this rank's image embeddings, [B, D], L2-normalised.
        text_emb: this rank's text embeddings, [B, D], L2-normalised; row i pairs with image i.
        logit_scale: the temperature t, already exponentiated (t = exp(t'), t' the learned log-scale).
        logit_bias: the learned bias b (the paper initialises t' = log 10, b = -10).
        gather: under DDP, score the local images against the global batch; no-op in one process.
        mode: "gather" (all-gather the texts) or "ring" (pass text blocks round the ring).
        chunk_size: text columns per logit chunk; ``None`` for one block.
        negative_emb, negative_valid: hard negatives (:func:`hard_negative_columns`), each one more
            negative pair (z = -1) for every local image.

    Returns: {"loss"} — this rank's local loss (the global-batch loss in one process).
    """
    if mode not in SIGLIP_MODES:
        raise UserError(f"siglip_loss: mode must be one of {SIGLIP_MODES}, got {mode!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise UserError(f"siglip_loss: chunk_size must be a positive int or None, got {chunk_size!r}")
    if image_emb.shape != text_emb.shape:
        raise ValueError(
            f"siglip_loss: image_emb {tuple(image_emb.shape)} and text_emb {tuple(text_emb.shape)} must both be [B, D]"
        )
    logit_scale = torch.as_tensor(logit_scale, dtype=image_emb.dtype, device=image_emb.device)  # []
    logit_bias = torch.as_tensor(logit_bias, dtype=image_emb.dtype, device=image_emb.device)  # []
    rank, world = rank_and_world() if gather else (0, 1)
    batch = image_emb.shape[0]
    if world == 1:
        total = _pairs_sum(image_emb, text_emb, logit_scale, logit_bias, 0, chunk_size)
    elif mode == "gather":
        all_text = gather_with_grad(text_emb)  # [W*B, D]
        total = _pairs_sum(image_emb, all_text, logit_scale, logit_bias, rank * batch, chunk_size)
    else:
        total = _pairs_sum(image_emb, text_emb, logit_scale, logit_bias, 0, chunk_size)  # own block: positives
        block = text_emb  # [B, D]
        for _ in range(world - 1):
            block = ppermute(block, shift=1)  # [B, D] texts of rank (rank - step) % W: negatives only
            total = total + _pairs_sum(image_emb, block, logit_scale, logit_bias, None, chunk_size)
    negatives = hard_negative_columns(negative_emb, negative_valid, gather)  # [M, D] or None
    if negatives is not None and negatives.shape[0]:
        total = total + _pairs_sum(image_emb, negatives, logit_scale, logit_bias, None, chunk_size)
    return {"loss": total / batch}


# ----------------------------------------------------------------------------------------------
# Focal contrastive loss
# ----------------------------------------------------------------------------------------------

FOCAL_FORMS = ("sigmoid", "softmax")


def focal_clip_loss(
    image_emb: torch.Tensor,  # [B, D] L2-normalised image embeddings of this rank
    text_emb: torch.Tensor,  # [B, D] L2-normalised text embeddings of this rank (row i pairs with image i)
    logit_scale: torch.Tensor,  # [] the multiplier 1 / tau, already exponentiated
    gamma: float = 2.0,
    gather: bool = True,
    form: str = "sigmoid",
    negative_emb: torch.Tensor | None = None,  # [B, K, D] hard negatives of each caption (optional)
    negative_valid: torch.Tensor | None = None,  # [B, K] bool
    logit_bias: torch.Tensor | None = None,  # [] sigmoid form only: SigLIP's bias b
) -> dict[str, torch.Tensor]:
    """Focal contrastive loss of RO-ViT (Kim, Angelova and Kuo, CVPR 2023), adopted by MaMMUT (Kuo et al., 2023).

    The focal loss of Lin et al. (2017), FL(p) = -(1 - p)^gamma * log p with p the probability of
    the true class, down-weights easy pairs so that training concentrates on hard ones.

    ``form="sigmoid"`` (default; the published definition as we read RO-ViT's "focal loss" section,
    which MaMMUT adopts): every image-text pair is a binary problem,

        L_I2T = -1/B * sum_i sum_j (1 - p_ij)^gamma * log p_ij,
        p_ij = sigmoid(s * v_i . l_j) if i == j else 1 - sigmoid(s * v_i . l_j),

    and L_T2I is the same with the roles of images and texts swapped. Over the global batch
    L_T2I == L_I2T exactly (the same pairs, transposed), so ``loss`` = (L_I2T + L_T2I) / 2 = L_I2T
    (the paper adds the two directions: twice this value, a constant factor). The paper has no bias;
    ``logit_bias`` b adds SigLIP's (p_ij from s * v_i . l_j + b). With gamma = 0 it is the SigLIP loss.

    ``form="softmax"``: the focal term on the softmax probability of the positive, symmetric as CLIP:
    L_I2T = -1/B sum_i (1 - p_i)^gamma log p_i, p_i = softmax_j(s v_i . l_j)[i], and L_T2I likewise
    over texts; ``loss`` = (L_I2T + L_T2I) / 2. With gamma = 0 it is exactly :func:`clip_loss`.

    In both forms the modulating factor is differentiated (not detached), as in Lin et al.
    Under DDP (``gather=True``) the local rows are scored against the global batch (features
    gathered with gradients); the DDP average of the returned local loss is the global-batch loss.

    Args:
        image_emb: this rank's image embeddings, [B, D], L2-normalised.
        text_emb: this rank's text embeddings, [B, D], L2-normalised; row i pairs with image i.
        logit_scale: the inverse temperature 1/tau, already exponentiated.
        gamma: the focusing parameter (>= 0); 0 turns the focal term off.
        gather: under DDP, score the local rows against the global batch; no-op in one process.
        form: "sigmoid" (pairwise, the RO-ViT/MaMMUT definition) or "softmax" (focal InfoNCE).
        negative_emb, negative_valid: hard negatives (:func:`hard_negative_columns`), extra columns
            of the image-to-text logits.
        logit_bias: sigmoid form only: a bias added to every logit (None: none, as published).

    Returns: {"loss", "loss_i2t", "loss_t2i"} (softmax form: the two directions' local means; sigmoid
    form: ``loss_i2t`` is the local images' rows, ``loss_t2i`` the local texts' rows, equal on average).
    """
    if form not in FOCAL_FORMS:
        raise UserError(f"focal_clip_loss: form must be one of {FOCAL_FORMS}, got {form!r}")
    if gamma < 0:
        raise UserError(f"focal_clip_loss: gamma must be >= 0, got {gamma!r}")
    if logit_bias is not None and form != "sigmoid":
        raise UserError("focal_clip_loss: logit_bias belongs to the sigmoid form (the softmax form is shift-invariant)")
    rank, world = rank_and_world() if gather else (0, 1)
    batch = image_emb.shape[0]
    all_image = gather_with_grad(image_emb) if world > 1 else image_emb  # [W*B, D]
    all_text = gather_with_grad(text_emb) if world > 1 else text_emb  # [W*B, D]
    logits_i2t = logit_scale * image_emb @ all_text.T  # [B, W*B]
    logits_t2i = logit_scale * text_emb @ all_image.T  # [B, W*B]
    negatives = hard_negative_columns(negative_emb, negative_valid, gather)  # [M, D] or None
    if negatives is not None:
        logits_i2t = torch.cat([logits_i2t, logit_scale * image_emb @ negatives.T], 1)  # [B, W*B + M]
    labels = torch.arange(batch, device=image_emb.device) + rank * batch  # [B] positives' columns

    if form == "softmax":

        def direction(logits: torch.Tensor) -> torch.Tensor:  # [B, W*B] -> []
            log_p = F.log_softmax(logits, dim=1).gather(1, labels[:, None]).squeeze(1)  # [B] log p_i
            if gamma == 0:
                return -log_p.mean()
            return -((-torch.expm1(log_p)).clamp_min(0) ** gamma * log_p).mean()  # (1 - p_i)^gamma

    else:

        def direction(logits: torch.Tensor) -> torch.Tensor:  # [B, W*B] -> []
            signs = torch.full_like(logits, -1.0)  # [B, W*B]
            signs[torch.arange(batch, device=logits.device), labels] = 1.0
            u = signs * (logits if logit_bias is None else logits + logit_bias)  # [B, W*B] log p_ij = log sigmoid(u)
            terms = -F.logsigmoid(u)  # [B, W*B]
            if gamma != 0:
                terms = terms * torch.exp(gamma * F.logsigmoid(-u))  # (1 - p_ij)^gamma, stable
            return terms.sum() / batch

    loss_i2t = direction(logits_i2t)
    loss_t2i = direction(logits_t2i)
    return {"loss": (loss_i2t + loss_t2i) / 2, "loss_i2t": loss_i2t, "loss_t2i": loss_t2i}


# ----------------------------------------------------------------------------------------------
# FILIP
# ----------------------------------------------------------------------------------------------


def _bool_mask(mask: torch.Tensor, shape: tuple[int, int], name: str) -> torch.Tensor:
    if tuple(mask.shape) != shape:
        raise ValueError(f"filip_similarity: {name} must have shape {list(shape)}, got {list(mask.shape)}")
    mask = mask.bool()
    empty = ~mask.any(dim=1)  # [N]
    if bool(empty.any()):
        raise ValueError(
            f"filip_similarity: {name} rows {empty.nonzero().flatten().tolist()[:8]} have no valid token; "
            "every item needs at least one"
        )
    return mask


def filip_similarity(
    image_tokens: torch.Tensor,  # [I, P, D] per-patch image features (L2-normalised)
    text_tokens: torch.Tensor,  # [T, L, D] per-token text features (L2-normalised)
    text_mask: torch.Tensor,  # [T, L] bool, True on real tokens (False: padding)
    image_mask: torch.Tensor | None = None,  # [I, P] bool, True on patches to use; None: all
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-wise late-interaction similarities of FILIP (Yao et al., 2021, "cross-modal late interaction").

    With a_kr = <patch k of image i, token r of text j>:

    * ``sim_i2t[i, j]`` = mean over valid patches k of image i of max over valid tokens r of text j of a_kr
      (FILIP's s^I_{i,j}: each patch finds its most similar word);
    * ``sim_t2i[i, j]`` = mean over valid tokens r of text j of max over valid patches k of image i of a_kr
      (FILIP's s^T_{i,j}: each word finds its most similar patch).

    Padding never takes part: text positions with ``text_mask`` False are neither a max candidate
    nor averaged (the mean divides by the number of real tokens); likewise patches with
    ``image_mask`` False. Which tokens count is the caller's choice through the masks: the text mask
    of the batch marks BOS/EOS and words as valid and only padding as invalid; the image tokens are
    whatever the vision tower outputs (e.g. patch tokens without a CLS token).

    Memory: the [I, c, P, L] token-pair scores of a chunk of ``chunk_size`` texts exist at a time
    (``None``: all T texts at once). Autograd keeps only the argmax indices of the two max reductions.

    Args:
        image_tokens: per-patch features of I images, [I, P, D].
        text_tokens: per-token features of T texts, [T, L, D].
        text_mask: [T, L] boolean, True on real (non-padding) tokens; every text needs at least one.
        image_mask: optional [I, P] boolean, True on patches to use (e.g. ones kept by patch dropout).
        chunk_size: texts per chunk; ``None`` for all at once.

    Returns: (sim_i2t [I, T], sim_t2i [I, T]).
    """
    if image_tokens.dim() != 3 or text_tokens.dim() != 3 or image_tokens.shape[2] != text_tokens.shape[2]:
        raise ValueError(
            f"filip_similarity: image_tokens {list(image_tokens.shape)} must be [I, P, D] and text_tokens "
            f"{list(text_tokens.shape)} [T, L, D] with the same D"
        )
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise UserError(f"filip_similarity: chunk_size must be a positive int or None, got {chunk_size!r}")
    n_img, n_patch, _ = image_tokens.shape
    n_txt, n_tok, _ = text_tokens.shape
    text_mask = _bool_mask(text_mask, (n_txt, n_tok), "text_mask")  # [T, L]
    if image_mask is not None:
        image_mask = _bool_mask(image_mask, (n_img, n_patch), "image_mask")  # [I, P]
        n_valid_patches = image_mask.sum(dim=1).to(image_tokens.dtype)  # [I]
    n_valid_tokens = text_mask.sum(dim=1).to(text_tokens.dtype)  # [T]
    chunk = chunk_size or max(n_txt, 1)
    i2t_parts, t2i_parts = [], []
    for start in range(0, n_txt, chunk):
        stop = min(start + chunk, n_txt)
        scores = torch.einsum("ipd,tld->itpl", image_tokens, text_tokens[start:stop])  # [I, c, P, L]
        tmask = text_mask[start:stop]  # [c, L]
        # image -> text: each patch's best valid token, averaged over (valid) patches
        best_token = scores.masked_fill(~tmask[None, :, None, :], float("-inf")).max(dim=3).values  # [I, c, P]
        if image_mask is None:
            i2t_parts.append(best_token.mean(dim=2))  # [I, c]
        else:
            kept = torch.where(image_mask[:, None, :], best_token, torch.zeros_like(best_token))  # [I, c, P]
            i2t_parts.append(kept.sum(dim=2) / n_valid_patches[:, None])  # [I, c]
        # text -> image: each token's best (valid) patch, averaged over valid tokens
        if image_mask is not None:
            scores = scores.masked_fill(~image_mask[:, None, :, None], float("-inf"))  # [I, c, P, L]
        best_patch = scores.max(dim=2).values  # [I, c, L]
        kept = torch.where(tmask[None], best_patch, torch.zeros_like(best_patch))  # [I, c, L]
        t2i_parts.append(kept.sum(dim=2) / n_valid_tokens[None, start:stop])  # [I, c]
        del scores
    return torch.cat(i2t_parts, dim=1), torch.cat(t2i_parts, dim=1)  # [I, T], [I, T]


def filip_loss(
    image_tokens: torch.Tensor,  # [B, P, D] per-patch image features of this rank (L2-normalised)
    text_tokens: torch.Tensor,  # [B, L, D] per-token text features of this rank (L2-normalised)
    text_mask: torch.Tensor,  # [B, L] bool, True on real tokens
    logit_scale: torch.Tensor,  # [] the multiplier 1 / tau, already exponentiated
    gather: bool = True,
    image_mask: torch.Tensor | None = None,  # [B, P] bool or None
    chunk_size: int | None = None,
    negative_tokens: torch.Tensor | None = None,  # [B, K, L, D] token features of each caption's hard negatives
    negative_mask: torch.Tensor | None = None,  # [B, K, L] bool, real tokens
    negative_valid: torch.Tensor | None = None,  # [B, K] bool, rows that hold a negative
) -> dict[str, torch.Tensor]:
    """FILIP contrastive loss (Yao et al., 2021): InfoNCE over token-wise late-interaction similarities.

    L_I = -1/B sum_i log softmax_j(s * sim_i2t[i, j])[i]   (image i against all texts, FILIP's s^I)
    L_T = -1/B sum_j log softmax_i(s * sim_t2i[i, j])[j]   (text j against all images, FILIP's s^T)
    loss = (L_I + L_T) / 2, with the similarities of :func:`filip_similarity` (padding excluded).

    Under DDP (``gather=True``) the token features of all ranks are gathered with gradients (and the
    masks without), the local images are scored against all texts and the local texts against all
    images; the DDP average of the returned local loss is the global-batch loss, and the gradients
    equal those of one process holding the global batch. Every rank must pass the same B, P and L
    (pad texts to a fixed context length).

    Args:
        image_tokens: this rank's per-patch image features, [B, P, D].
        text_tokens: this rank's per-token text features, [B, L, D]; text i pairs with image i.
        text_mask: [B, L] boolean, True on real tokens, False on padding.
        logit_scale: the inverse temperature 1/tau, already exponentiated.
        gather: under DDP, score the local rows against the global batch; no-op in one process.
        image_mask: optional [B, P] boolean, True on patches to use.
        chunk_size: texts per chunk in :func:`filip_similarity` (bounds its [I, c, P, L] scores).
        negative_tokens, negative_mask, negative_valid: hard negatives, scored token-wise as extra
            image-to-text columns (gathered from every rank like the texts; see :func:`hard_negative_columns`).

    Returns: {"loss", "loss_i2t", "loss_t2i", "acc_i2t", "acc_t2i"} (accuracies of this rank's rows).
    """
    rank, world = rank_and_world() if gather else (0, 1)
    batch = image_tokens.shape[0]
    labels = torch.arange(batch, device=image_tokens.device) + rank * batch  # [B] positives' columns
    if world == 1:
        sim_i2t, sim_t2i = filip_similarity(image_tokens, text_tokens, text_mask, image_mask, chunk_size)  # [B, B] x2
        logits_i2t = logit_scale * sim_i2t  # [B, B] image rows
        logits_t2i = logit_scale * sim_t2i.T  # [B, B] text rows
    else:
        all_image = gather_with_grad(image_tokens)  # [W*B, P, D]
        all_text = gather_with_grad(text_tokens)  # [W*B, L, D]
        all_text_mask = gather_no_grad(text_mask)  # [W*B, L]
        all_image_mask = gather_no_grad(image_mask) if image_mask is not None else None  # [W*B, P]
        sim_i2t, _ = filip_similarity(image_tokens, all_text, all_text_mask, image_mask, chunk_size)  # [B, W*B]
        _, sim_t2i = filip_similarity(all_image, text_tokens, text_mask, all_image_mask, chunk_size)  # [W*B, B]
        logits_i2t = logit_scale * sim_i2t  # [B, W*B] local images against all texts
        logits_t2i = logit_scale * sim_t2i.T  # [B, W*B] local texts against all images
    if negative_tokens is not None:
        b, k, length, dim = negative_tokens.shape
        tokens = negative_tokens.reshape(b * k, length, dim)  # [B*K, L, D]
        mask = negative_mask.reshape(b * k, length).bool()  # [B*K, L]
        valid = torch.ones(b * k, dtype=torch.bool, device=tokens.device) if negative_valid is None else negative_valid.flatten().bool()
        if world > 1:
            tokens, mask, valid = gather_with_grad(tokens), gather_no_grad(mask), gather_no_grad(valid)  # [W*B*K, ...]
        if valid.any():
            sim_neg, _ = filip_similarity(image_tokens, tokens[valid], mask[valid], image_mask, chunk_size)  # [B, M]
            logits_i2t = torch.cat([logits_i2t, logit_scale * sim_neg], 1)  # [B, W*B + M]
    return _symmetric_infonce(logits_i2t, logits_t2i, labels)


# ----------------------------------------------------------------------------------------------
# Language modelling (captioning)
# ----------------------------------------------------------------------------------------------


def token_cross_entropy(
    logits: torch.Tensor,  # [B, L, V] next-token logits at every position
    targets: torch.Tensor,  # [B, L] the token each position must predict
    weights: torch.Tensor,  # [B, L] bool or float, which targets count
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample sums of the token cross-entropy and the number of counted targets.

    Returns ``(sums [B], counts [B])``. The batch loss is ``sums.sum() / counts.sum()``: the mean
    over every counted token of the batch, as ``CrossEntropyLoss(ignore_index=pad)`` computes it
    (open_clip's CoCa caption loss, BLIP's LM loss). Keeping sums and counts apart lets exact
    gradient accumulation and DDP recombine micro-batches into that same global mean.
    """
    B, L, V = logits.shape
    ce = F.cross_entropy(
        logits.reshape(B * L, V).float(), targets.reshape(B * L), reduction="none", label_smoothing=label_smoothing
    ).view(B, L)  # [B, L]
    w = weights.to(ce.dtype)  # [B, L]
    return (ce * w).sum(1), w.sum(1)  # [B], [B]


def caption_loss(
    logits: torch.Tensor,  # [B, L, V] decoder logits over the caption [bos, w1, ..., eos, pad...]
    ids: torch.Tensor,  # [B, L] the caption's token ids
    mask: torch.Tensor,  # [B, L] bool, real tokens
    label_smoothing: float = 0.0,
    loss_mask: torch.Tensor | None = None,  # [B, L] bool: which tokens are targets (default: all real)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced captioning loss: position t predicts token t + 1, for every real token after
    the first (the start token is never a target; the end token is). ``loss_mask`` restricts the
    targets further (e.g. PrefixLM's suffix, a VQA answer). Returns ``(sums [B], counts [B])``
    as :func:`token_cross_entropy`."""
    targets = ids[:, 1:]  # [B, L-1]
    weights = mask[:, 1:].bool()  # [B, L-1]
    if loss_mask is not None:
        weights = weights & loss_mask[:, 1:].bool()
    return token_cross_entropy(logits[:, :-1], targets, weights, label_smoothing)


def global_token_mean(sums: torch.Tensor, counts: torch.Tensor, gather: bool = True) -> torch.Tensor:
    """``sums.sum() / counts.sum()`` over this rank's samples, rescaled under DDP so that the
    DDP average of the ranks' values is the mean over every token of the global batch (each rank
    divides its sum by the global count, times the world size). Exact whatever the ranks' token
    counts; the count is all-reduced without gradient."""
    total = counts.sum()
    _, world = rank_and_world() if gather else (0, 1)
    if world > 1:
        total = gather_no_grad(total.reshape(1)).sum() / world
    return sums.sum() / total.clamp_min(1.0)


# ----------------------------------------------------------------------------------------------
# Lookup by name
# ----------------------------------------------------------------------------------------------

LOSS_NAMES = ("clip", "siglip", "focal")


# --------------------------------------------------------------------------------------------
# BLIP: momentum-distilled ITC and hard negatives for ITM
# --------------------------------------------------------------------------------------------


def momentum_itc_loss(
    image_feat: torch.Tensor,  # [B, E] normalised image features (with gradients)
    text_feat: torch.Tensor,  # [B, E] normalised text features
    image_all: torch.Tensor,  # [B+Q, E] momentum image features of the batch, then the queue
    text_all: torch.Tensor,  # [B+Q, E] momentum text features, then the queue
    target_i2t: torch.Tensor,  # [B, B+Q] soft targets (momentum distillation mixed with the one-hot)
    target_t2i: torch.Tensor,  # [B, B+Q]
    temp: torch.Tensor | float,  # temperature
) -> dict[str, torch.Tensor]:
    """BLIP / ALBEF's image-text contrastive loss: cross-entropy of each side against the other
    side's momentum features and queue, with soft targets; plus in-batch top-1 accuracies."""
    sim_i2t = image_feat @ text_all.T / temp  # [B, B+Q]
    sim_t2i = text_feat @ image_all.T / temp
    loss = (-(sim_i2t.log_softmax(1) * target_i2t).sum(1).mean() - (sim_t2i.log_softmax(1) * target_t2i).sum(1).mean()) / 2
    labels = torch.arange(image_feat.shape[0], device=image_feat.device)  # [B]
    return {
        "itc_loss": loss,
        "acc_i2t": (sim_i2t.argmax(1) == labels).float().mean().detach(),
        "acc_t2i": (sim_t2i.argmax(1) == labels).float().mean().detach(),
    }


def blip2_itc_loss(
    query_feat: torch.Tensor,  # [B, Q, E] normalised query outputs of this rank's images
    text_feat: torch.Tensor,  # [B, E] normalised [CLS] outputs of this rank's texts
    temp: torch.Tensor | float,  # temperature
    gather: bool = True,
) -> dict[str, torch.Tensor]:
    """BLIP-2's image-text contrastive loss: an image-text similarity is the highest of its Q
    queries' similarities to the text, in-batch negatives over every rank (gathered with
    gradients); the mean of both directions' cross-entropies. Also returns the similarities
    ``sim_i2t``, ``sim_t2i`` [B, W*B] (divided by ``temp``) for ITM's hard-negative sampling."""
    rank, world = rank_and_world() if gather else (0, 1)
    queries_all = gather_with_grad(query_feat) if world > 1 else query_feat  # [W*B, Q, E]
    texts_all = gather_with_grad(text_feat) if world > 1 else text_feat  # [W*B, E]
    sim_i2t = torch.einsum("bqe,ne->bqn", query_feat, texts_all).amax(1) / temp  # [B, W*B]
    sim_t2i = torch.einsum("be,nqe->bnq", text_feat, queries_all).amax(2) / temp  # [B, W*B]
    labels = torch.arange(query_feat.shape[0], device=query_feat.device) + rank * query_feat.shape[0]  # [B]
    terms = _symmetric_infonce(sim_i2t, sim_t2i, labels)
    return {"itc_loss": terms["loss"], "acc_i2t": terms["acc_i2t"], "acc_t2i": terms["acc_t2i"],
            "sim_i2t": sim_i2t, "sim_t2i": sim_t2i}


@torch.no_grad()
def itm_hard_negatives(
    image_feat: torch.Tensor | None,  # [B, E] normalised (None with ``similarities``)
    text_feat: torch.Tensor | None,  # [B, E] normalised
    ids: torch.Tensor,  # [B, L] the texts
    mask: torch.Tensor,  # [B, L]
    temp: torch.Tensor | float,
    gather: bool = True,
    similarities: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One hard negative image per text and text per image, drawn over the global batch in
    proportion to softmax(similarity / temp), never the pair itself nor a caption identical to the
    positive (BLIP's ITM sampling). Returns (negative image index [B], negative text index [B],
    ids [W*B, L], mask [W*B, L] of the global batch) with indices into the global batch.
    ``similarities``: (sim_i2t, sim_t2i) [B, W*B], already divided by the temperature, to use
    instead of the features' dot products (BLIP-2's max over queries)."""
    B = ids.shape[0]
    rank, world = rank_and_world() if gather else (0, 1)
    ids_world = gather_no_grad(ids) if world > 1 else ids  # [W*B, L]
    mask_world = gather_no_grad(mask) if world > 1 else mask
    same = (ids[:, None, :] == ids_world[None, :, :]).all(-1) & (mask[:, None, :] == mask_world[None, :, :]).all(-1)
    own = torch.arange(B, device=ids.device) + rank * B  # [B] own column
    same[torch.arange(B), own] = True  # [B, W*B]
    if similarities is None:
        image_world = gather_no_grad(image_feat) if world > 1 else image_feat  # [W*B, E]
        text_world = gather_no_grad(text_feat) if world > 1 else text_feat
        similarities = (image_feat @ text_world.T / temp, text_feat @ image_world.T / temp)
    w_i2t = similarities[0].detach().float().softmax(1) + 1e-4  # [B, W*B]
    w_t2i = similarities[1].detach().float().softmax(1) + 1e-4
    w_t2i = w_t2i.masked_fill(same, 0.0)
    w_i2t = w_i2t.masked_fill(same, 0.0)
    # a batch where every caption is the same leaves nothing to draw: fall back to any other row
    empty = w_t2i.sum(1) == 0
    if empty.any():
        other = torch.ones_like(w_t2i)
        other[torch.arange(B), own] = 0
        w_t2i[empty] = other[empty]
        w_i2t[empty] = other[empty]
    neg_image_idx = torch.multinomial(w_t2i, 1).squeeze(1)  # [B] a negative image per text
    neg_text_idx = torch.multinomial(w_i2t, 1).squeeze(1)  # [B] a negative text per image
    return neg_image_idx, neg_text_idx, ids_world, mask_world


# --------------------------------------------------------------------------------------------
# Masked modelling: MAE's reconstruction loss, BERT's masking
# --------------------------------------------------------------------------------------------


def mae_loss(
    pred: torch.Tensor,  # [B, N, P] predicted patches
    target: torch.Tensor,  # [B, N, P] true patches
    mask: torch.Tensor,  # [B, N] 1 = masked (counted), 0 = visible
    norm_pix_loss: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Mean over masked patches of the per-patch mean squared error; with ``norm_pix_loss`` the
    target patch is normalised by its own mean and variance (+eps) first, as in the paper."""
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as the reference implementation
        target = (target - mean) / (var + eps) ** 0.5
    per_patch = ((pred.float() - target.float()) ** 2).mean(dim=-1)  # [B, N]
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)


def bert_mask(
    ids: torch.Tensor,  # [B, L]
    mask: torch.Tensor,  # [B, L] bool real tokens
    mask_id: int,
    vocab_size: int,
    probability: float = 0.15,
    special_ids: tuple[int, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: every real, non-special token is selected with ``probability``; a selected
    token becomes ``mask_id`` (80%), a random token (10%) or stays (10%). Returns (masked ids
    [B, L], selected [B, L] bool). A row with a candidate token always gets at least one selected."""
    candidates = mask.bool().clone()
    for s in special_ids:
        candidates &= ids != s
    selected = (torch.rand(ids.shape, device=ids.device) < probability) & candidates
    none = ~selected.any(1) & candidates.any(1)
    if none.any():  # one forced pick in rows that drew nothing
        pick = torch.where(candidates, torch.rand(ids.shape, device=ids.device), torch.full(ids.shape, -1.0, device=ids.device)).argmax(1)
        selected[none, pick[none]] = True
    roll = torch.rand(ids.shape, device=ids.device)
    out = torch.where(selected & (roll < 0.8), torch.full_like(ids, mask_id), ids)
    random_tok = torch.randint(vocab_size, ids.shape, device=ids.device)
    out = torch.where(selected & (roll >= 0.8) & (roll < 0.9), random_tok, out)
    return out, selected


def get_loss(name: str) -> Callable[..., dict[str, torch.Tensor]]:
    """The pooled-embedding contrastive loss called ``name``, so that a YAML string selects it.

    ``"clip"`` -> :func:`clip_loss`, ``"siglip"`` -> :func:`siglip_loss`, ``"focal"`` ->
    :func:`focal_clip_loss`. (FILIP's :func:`filip_loss` takes token features, not pooled embeddings,
    so it is not interchangeable with these and is called directly.)

    Args:
        name: one of "clip", "siglip", "focal".
    """
    if name == "clip":
        return clip_loss
    if name == "siglip":
        return siglip_loss
    if name == "focal":
        return focal_clip_loss
    raise UserError(f"unknown loss {name!r}; valid choices: {', '.join(LOSS_NAMES)}")
