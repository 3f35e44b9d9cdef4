"""Image<->text retrieval evaluation with any number of captions per image.

Besides the metrics, the callback writes qualitative TensorBoard logs (rank zero, after the
metrics): for a few images, their first caption as a text query with the top-5 retrieved images
(an image grid, the ground truth framed in green) and the image as a query with its top-5
captions. A small thumbnail of every evaluated image is kept (48 px by default: about 7 KB an
image, 35 MB for COCO's 5k test images), so every retrieved image shows; ``thumbnails: N`` keeps
only the first N per rank and epoch, and the others show as a dark tile (their ids and scores are
always in the text log). The drawing helpers live in :mod:`lit_vlm.callbacks.visuals`.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from lit_vlm.callbacks.base import EvalCallback, _tensorboard_writer, md_code, md_escape, require_capability
from lit_vlm.callbacks.visuals import GREEN, GREY, image_grid, make_thumbnail, normalisation, ranked
from lit_vlm.capabilities import encoder_name
from lit_vlm.errors import UserError
from lit_vlm.metrics import (
    retrieval_metrics_from_ranks,
    retrieval_ranks,
    retrieval_ranks_from_similarity,
)

__all__ = ["RetrievalEvaluation"]

log = logging.getLogger("lit_vlm.eval")

TOP = 5  # retrieved items shown per query



# --------------------------------------------------------------------------------------------
# The callback
# --------------------------------------------------------------------------------------------


class RetrievalEvaluation(EvalCallback):
    """Recall@k in both directions, their mean and sum, and median/mean rank on the val/test split,
    between two modalities (image and text by default; audio->text, video->text, ... by name).

    Reads the batch keys ``image``, ``caption_ids``, ``caption_mask``, ``caption_owner``,
    ``sample_id`` and, for the qualitative logs only, ``captions`` (raw strings, optional); calls
    the family's ``encode_image`` and ``encode_text``, or, when the family has its own
    ``similarity`` (e.g. FILIP's token-wise late interaction), its ``encode_image_tokens`` and
    ``encode_text_tokens``: records then keep token features and the ``[I, T]`` scores are computed
    by the family in blocks of ``token_chunk_size`` images x captions (image->text ranks from its
    first matrix, text->image ranks from its second when it returns two). Exact under DDP: per-image records are
    gathered by sample id, duplicates dropped, metrics computed once on the id-sorted set.
    Logged as ``{stage}/retrieval/i2t_R@1`` ... ``t2i_R@10``, ``i2t_medr``, ``i2t_meanr``,
    ``t2i_medr``, ``t2i_meanr``, ``rmean``, ``rsum``, ``mean_R@1`` (fractions, not percent; see
    :mod:`lit_vlm.metrics`). With a TensorBoard logger it also logs example queries (images
    ``{stage}/retrieval/t2i_example_{n}`` and ``i2t_example_images``, texts ``t2i_examples`` and
    ``i2t_examples``).

    Other modality pairs (``modalities: [audio, text]``): the first modality is one item per
    sample, read from the batch key of its name (plus ``<name>_mask`` when the batch has it) and
    embedded by the family's ``encode_<name>``; the second is ``text`` (the batch's captions, as
    above) or another one-per-sample modality. Metrics are named by the modalities' initials
    (``a2t_R@1``, ``t2a_R@1``; full names when the initials clash); ``rmean``, ``rsum`` and
    ``mean_R@1`` keep their names. Re-ranking, token similarity and the example logs are
    image-text only.

    Args:
        splits: Stages to evaluate on, among "val" and "test".
        modalities: (query, gallery): the per-sample modality and the one it is matched with.
        ks: The k of recall@k.
        chunk_size: Rows of the similarity matrix processed at a time (bounds memory).
        num_examples: Example queries in each direction for the TensorBoard logs (0: none).
        thumbnails: Images per rank and epoch that keep a small thumbnail for the example logs
            (-1: every image, so every retrieved image shows).
        thumbnail_size: Longest side of a thumbnail in pixels.
        prefix: Metric namespace.
        token_chunk_size: Images and captions per block when the family scores with its own
            ``similarity`` (memory of a block ~ token_chunk_size^2 x tokens per image x tokens per
            caption x 4 bytes).
        rerank_k: Also re-rank the top ``rerank_k`` candidates of every query (the k captions
            most similar to an image, the k images most similar to a caption) with the family's
            pair scorer, as BLIP does with its ITM head (k = 256 on COCO there): the re-ranked
            score of a candidate is its ``score_pairs`` value plus its similarity, candidates
            outside the top k keep their similarity order behind them. Logged beside the plain
            metrics as ``{stage}/retrieval/rerank/i2t_R@1`` and so on. Needs the capabilities
            ``pair_features(images)`` and ``score_pairs(features, ids, mask)``. 0: off.
        rerank_batch_size: Pairs per ``score_pairs`` call.
        texts: Which texts the ``text`` side is: the batch's ``<texts>_ids``, ``<texts>_mask`` and
            ``<texts>_owner`` (``audio_caption``: a clip's captions of what is heard).
    """

    def __init__(
        self,
        splits: tuple[str, ...] | list[str] = ("val", "test"),
        modalities: tuple[str, str] | list[str] = ("image", "text"),
        ks: tuple[int, ...] | list[int] = (1, 5, 10),
        chunk_size: int = 1024,
        num_examples: int = 4,
        thumbnails: int = -1,
        thumbnail_size: int = 48,
        prefix: str = "retrieval",
        token_chunk_size: int = 32,
        rerank_k: int = 0,
        rerank_batch_size: int = 128,
        texts: str = "caption",
    ) -> None:
        super().__init__(splits, prefix)
        modalities = tuple(modalities)
        if len(modalities) != 2 or len(set(modalities)) != 2 or not all(isinstance(m, str) and m.isidentifier() for m in modalities):
            raise UserError(f"RetrievalEvaluation modalities must be two different names, e.g. [image, text], got {list(modalities)}")
        self.modalities = modalities
        self._image_text = modalities == ("image", "text")
        if rerank_k and not self._image_text:
            raise UserError(f"RetrievalEvaluation rerank_k re-ranks image-text pairs only; modalities are {list(modalities)}")
        if rerank_k < 0 or rerank_batch_size < 1:
            raise UserError(f"RetrievalEvaluation needs rerank_k >= 0 and rerank_batch_size >= 1, got {rerank_k}, {rerank_batch_size}")
        self.rerank_k = rerank_k
        if not (isinstance(texts, str) and texts.isidentifier()) or (texts != "caption" and rerank_k):
            raise UserError(f"RetrievalEvaluation texts must be a name (re-ranking reads the captions only), got {texts!r}")
        self.texts = texts
        self.rerank_batch_size = rerank_batch_size
        self._module: Any = None
        if num_examples < 0 or thumbnails < -1 or thumbnail_size < 1 or chunk_size < 1 or token_chunk_size < 1:
            raise UserError(
                "RetrievalEvaluation needs num_examples >= 0, thumbnails >= -1, thumbnail_size >= 1, chunk_size >= 1 "
                "and token_chunk_size >= 1"
            )
        self.ks = tuple(ks)
        if not self.ks or any(not isinstance(k, int) or k < 1 for k in self.ks) or len(set(self.ks)) != len(self.ks):
            raise UserError(f"RetrievalEvaluation ks must be distinct positive integers, got {list(ks)}")
        self.chunk_size = chunk_size
        self.token_chunk_size = token_chunk_size
        self.num_examples = num_examples
        self.thumbnails = thumbnails
        self.thumbnail_size = thumbnail_size
        self._examples = False
        self._thumbs_left = 0
        self._norm: tuple[torch.Tensor, torch.Tensor] | None = None
        self._warned_texts = False
        self._similarity: Any = None  # the family's own similarity, when it has one
        self._sims: tuple[torch.Tensor, torch.Tensor] | None = None  # (i2t, t2i) [I, T] of the last compute

    def setup_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> bool:
        if not self._image_text:
            require_capability(pl_module, *(encoder_name(m) for m in self.modalities), by="RetrievalEvaluation")
            self._similarity = self._module = None
            self._examples, self._thumbs_left = False, 0
            return True
        if callable(getattr(pl_module, "similarity", None)):
            require_capability(pl_module, "encode_image_tokens", "encode_text_tokens", by="RetrievalEvaluation")
            self._similarity = pl_module.similarity
        else:
            require_capability(pl_module, "encode_image", "encode_text", by="RetrievalEvaluation")
            self._similarity = None
        if self.rerank_k:
            require_capability(pl_module, "pair_features", "score_pairs", by="RetrievalEvaluation")
        self._module = pl_module if self.rerank_k else None
        self._examples = self.num_examples > 0 and _tensorboard_writer(trainer) is not None
        self._thumbs_left = (self.thumbnails if self.thumbnails >= 0 else float("inf")) if self._examples else 0
        self._norm = normalisation(trainer)
        return True

    def _encode(self, pl_module: pl.LightningModule, modality: str, batch: dict) -> torch.Tensor:
        """``encode_<modality>`` of the batch's items of that modality (with ``<modality>_mask``
        when the batch has it): [B, E] on the CPU."""
        encode = getattr(pl_module, encoder_name(modality))
        mask = batch.get(f"{modality}_mask")
        return (encode(batch[modality]) if mask is None else encode(batch[modality], mask)).float().cpu()

    def _gallery_keys(self) -> tuple[str, ...]:
        gallery = self.modalities[1]
        t = self.texts
        return (f"{t}_ids", f"{t}_mask", f"{t}_owner") if gallery == "text" else (gallery,)

    def collect(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: dict) -> dict[str, Any]:
        query = self.modalities[0]
        for key in (query, "sample_id", *self._gallery_keys()):
            if key not in batch:
                raise UserError(
                f"RetrievalEvaluation ({' -> '.join(self.modalities)}) needs batch key '{key}' "
                "(an evaluation split that has both modalities)"
            )
        ids = list(batch["sample_id"])
        if len(ids) != batch[query].shape[0]:
            raise UserError(
                f"RetrievalEvaluation: {len(ids)} sample ids for {batch[query].shape[0]} {query} items in a batch"
            )
        image_mask = caption_mask = None
        if self._similarity is not None:  # token features, scored by the family
            image_emb, image_mask = pl_module.encode_image_tokens(batch["image"])  # [B, P, E], [B, P] | None
            caption_emb, caption_mask = pl_module.encode_text_tokens(batch["caption_ids"], batch["caption_mask"])  # [N, L, E], [N, L]
            image_emb, caption_emb, caption_mask = image_emb.float().cpu(), caption_emb.float().cpu(), caption_mask.cpu()
            image_mask = image_mask.cpu() if image_mask is not None else None
        elif self.modalities[1] == "text":
            image_emb = self._encode(pl_module, query, batch)  # [B, E] (the query modality)
            caption_emb = pl_module.encode_text(batch[f"{self.texts}_ids"], batch[f"{self.texts}_mask"]).float().cpu()  # [N, E]
        else:  # one gallery item per sample
            image_emb = self._encode(pl_module, query, batch)  # [B, E]
            caption_emb = self._encode(pl_module, self.modalities[1], batch)  # [B, E]
        owned = f"{self.texts}_owner"
        owner = batch[owned].cpu() if owned in self._gallery_keys() else torch.arange(len(ids))  # [N]
        bad_owner = owner.shape != (caption_emb.shape[0],) or (
            owner.numel() > 0 and (int(owner.min()) < 0 or int(owner.max()) >= len(ids))
        )
        if bad_owner:
            raise UserError(
                f"RetrievalEvaluation: caption_owner has {owner.numel()} entries for "
                f"{caption_emb.shape[0]} caption rows (batch {ids[0]} .. {ids[-1]}) "
                f"or points outside the batch's {len(ids)} images"
            )
        texts = batch.get("captions") if self._examples else None
        pair = pl_module.pair_features(batch["image"]).float().cpu() if self.rerank_k else None  # [B, ...]
        records: dict[str, Any] = {}
        for i, sid in enumerate(ids):
            caps = caption_emb[owner == i]  # [n_i, E] (a copy)
            record: dict[str, Any] = {"id": sid, "image": image_emb[i].clone(), "captions": caps}  # clone: own storage
            if pair is not None:
                record["pair"] = pair[i].clone()
                record["caption_ids"] = batch["caption_ids"][owner.to(batch["caption_ids"].device) == i].cpu()  # [n_i, L]
                record["caption_mask_ids"] = batch["caption_mask"][owner.to(batch["caption_mask"].device) == i].cpu()
            if caption_mask is not None:
                record["caption_mask"] = caption_mask[owner == i]  # [n_i, L]
                record["image_mask"] = image_mask[i].clone() if image_mask is not None else None  # [P]
            if self._examples:
                record["texts"] = self._texts(texts, i, caps.shape[0], sid)
                if self._thumbs_left > 0:
                    record["thumb"] = make_thumbnail(batch["image"][i], self._norm, self.thumbnail_size)  # [3, h, w]
                    self._thumbs_left -= 1
            records[sid] = record
        return records

    def _texts(self, texts: Any, row: int, count: int, sid: str) -> list[str] | None:
        if texts is None or row >= len(texts):
            return None
        mine = [str(t) for t in texts[row]]
        if len(mine) != count:
            if not self._warned_texts:
                self._warned_texts = True
                log.warning(
                    "RetrievalEvaluation: sample %s has %d caption strings but %d caption rows; "
                    "example logs show no text",
                    sid,
                    len(mine),
                    count,
                )
            return None
        return mine

    @staticmethod
    def _stack(records: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        empty = [r["id"] for r in records if r["captions"].shape[0] == 0]
        if empty:
            raise UserError(
                f"RetrievalEvaluation: {len(empty)} image(s) without any caption, e.g. sample ids {empty[:5]}; "
                "image->text recall is undefined"
            )
        image_emb = torch.stack([r["image"] for r in records])  # [I, E] (token records: [I, P, E])
        caps = [r["captions"] for r in records]
        if caps[0].dim() == 3:  # token records: pad every caption to the longest length
            length = max(c.shape[1] for c in caps)
            caps = [F.pad(c, (0, 0, 0, length - c.shape[1])) for c in caps]  # [n_i, L, E]
        caption_emb = torch.cat(caps)  # [T, E] (token records: [T, L, E])
        counts = torch.tensor([r["captions"].shape[0] for r in records])  # [I]
        owner = torch.repeat_interleave(torch.arange(len(records)), counts)  # [T]
        return image_emb, caption_emb, owner

    def compute(self, records: list[dict[str, Any]]) -> dict[str, float]:
        metrics = self._compute(records)
        if self.rerank_k:
            metrics.update({f"rerank/{k}": v for k, v in self.reranked_metrics(records).items()})
        return metrics if self._image_text else self._named(metrics)

    def _named(self, metrics: dict[str, float]) -> dict[str, float]:
        """i2t / t2i metric names for this modality pair (initials, or full names if they clash)."""
        q, g = self.modalities
        if q[0] != g[0]:
            q, g = q[0], g[0]
        out = {}
        for key, value in metrics.items():
            if key.startswith("i2t_"):
                key = f"{q}2{g}_" + key[4:]
            elif key.startswith("t2i_"):
                key = f"{g}2{q}_" + key[4:]
            out[key] = value
        return out

    def reranked_metrics(self, records: list[dict[str, Any]]) -> dict[str, float]:
        """Metrics after re-ranking every query's top ``rerank_k`` candidates with ``score_pairs``
        (see the class docstring). The pairs are split over the ranks and the scores gathered,
        so every rank returns the same metrics."""
        from lit_vlm.distributed import all_gather_objects, rank_and_world

        if self._similarity is None:
            image_emb, caption_emb, owner = self._stack(records)
            sim = image_emb @ caption_emb.T  # [I, T]
            sim_i2t = sim_t2i = sim
        else:
            sim_i2t, sim_t2i, owner = self.token_similarities(records, self._similarity)
        n_img, n_txt = sim_i2t.shape
        pair = torch.stack([r["pair"] for r in records])  # [I, ...]
        length = max(r["caption_ids"].shape[1] for r in records)
        cap_ids = torch.cat([F.pad(r["caption_ids"], (0, length - r["caption_ids"].shape[1])) for r in records])  # [T, L]
        cap_mask = torch.cat([F.pad(r["caption_mask_ids"], (0, length - r["caption_mask_ids"].shape[1])) for r in records])
        k_t, k_i = min(self.rerank_k, n_txt), min(self.rerank_k, n_img)
        top_t = sim_i2t.topk(k_t, dim=1).indices  # [I, k] captions of each image
        top_i = sim_t2i.topk(k_i, dim=0).indices.T  # [T, k] images of each caption
        pairs = [(int(i), int(t)) for i in range(n_img) for t in top_t[i]]
        pairs += [(int(i), int(t)) for t in range(n_txt) for i in top_i[t]]
        unique = sorted(set(pairs))
        rank, world = rank_and_world()
        mine = unique[rank::world]
        module = self._module
        device = module.device
        scores: dict[tuple[int, int], float] = {}
        with torch.no_grad():
            for a in range(0, len(mine), self.rerank_batch_size):
                chunk = mine[a : a + self.rerank_batch_size]
                img = torch.tensor([i for i, _ in chunk])
                txt = torch.tensor([t for _, t in chunk])
                out = module.score_pairs(pair[img].to(device), cap_ids[txt].to(device), cap_mask[txt].to(device))  # [c]
                scores.update(zip(chunk, out.float().cpu().tolist()))
        if world > 1:
            for part in all_gather_objects(scores):
                scores.update(part)
        offset = 1e4  # candidates outside the top k keep their similarity order, behind every re-ranked one
        r_i2t = sim_i2t.float() - offset
        r_t2i = sim_t2i.float() - offset
        for i in range(n_img):
            for t in top_t[i].tolist():
                r_i2t[i, t] = float(sim_i2t[i, t]) + scores[(i, t)]
        for t in range(n_txt):
            for i in top_i[t].tolist():
                r_t2i[i, t] = float(sim_t2i[i, t]) + scores[(i, t)]
        i2t_ranks, _ = retrieval_ranks_from_similarity(r_i2t, owner, self.chunk_size)  # [I]
        _, t2i_ranks = retrieval_ranks_from_similarity(r_t2i, owner, self.chunk_size)  # [T]
        return retrieval_metrics_from_ranks(i2t_ranks, t2i_ranks, self.ks)

    def _compute(self, records: list[dict[str, Any]]) -> dict[str, float]:
        self._sims = None
        if self._similarity is None:
            image_emb, caption_emb, owner = self._stack(records)
            i2t_ranks, t2i_ranks = retrieval_ranks(image_emb, caption_emb, owner, self.chunk_size)  # [I], [T]
        else:
            sim_i2t, sim_t2i, owner = self.token_similarities(records, self._similarity)
            self._sims = (sim_i2t, sim_t2i)
            if sim_t2i is sim_i2t:
                i2t_ranks, t2i_ranks = retrieval_ranks_from_similarity(sim_i2t, owner, self.chunk_size)
            else:
                i2t_ranks, _ = retrieval_ranks_from_similarity(sim_i2t, owner, self.chunk_size)  # [I]
                _, t2i_ranks = retrieval_ranks_from_similarity(sim_t2i, owner, self.chunk_size)  # [T]
        self._ranks = (i2t_ranks, t2i_ranks, owner)
        return retrieval_metrics_from_ranks(i2t_ranks, t2i_ranks, self.ks)

    def sample_scores(self, records: list[dict[str, Any]]) -> dict[str, tuple[list[float], list[float]]]:
        """Per query item (an image): its i2t hit (num, 1) and its captions' t2i hits (num, captions)."""
        i2t_ranks, t2i_ranks, owner = self._ranks
        n = i2t_ranks.shape[0]
        captions = torch.bincount(owner, minlength=n).double()  # [I]
        out = {}
        for k in self.ks:
            out[f"i2t_R@{k}"] = ((i2t_ranks < k).double().tolist(), [1.0] * n)
            out[f"t2i_R@{k}"] = (torch.zeros(n, dtype=torch.double).index_add_(0, owner, (t2i_ranks < k).double()).tolist(),
                                 captions.tolist())
        return out if self._image_text else self._named(out)

    @property
    def mean_of(self) -> dict[str, tuple[str, ...]]:  # type: ignore[override]
        recalls = tuple(f"{d}_R@{k}" for d in ("i2t", "t2i") for k in self.ks)
        means = {"rmean": recalls, **({"mean_R@1": ("i2t_R@1", "t2i_R@1")} if 1 in self.ks else {})}
        if self._image_text:
            return means
        return {k: tuple(self._named(dict.fromkeys(v)).keys()) for k, v in means.items()}

    def protocol(self) -> dict[str, Any]:
        return {**super().protocol(), "modalities": list(self.modalities), "texts": self.texts, "ks": list(self.ks),
                "tie_rule": "pessimistic"}

    def token_similarities(
        self, records: list[dict[str, Any]], similarity: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sim_i2t [I, T], sim_t2i [I, T], owner [T]) from token records, scored by ``similarity``
        in blocks of ``token_chunk_size`` images x captions (``sim_t2i is sim_i2t`` when the family
        returns a single matrix). Captions are zero-padded (mask False) to the longest one."""
        image_tok, caption_tok, owner = self._stack(records)  # [I, P, E], [T, L, E], [T]
        length = max(r["caption_mask"].shape[1] for r in records)
        caption_mask = torch.cat(
            [F.pad(r["caption_mask"], (0, length - r["caption_mask"].shape[1])) for r in records]
        )  # [T, L]
        image_mask = None
        if any(r.get("image_mask") is not None for r in records):
            image_mask = torch.stack(
                [r["image_mask"] if r.get("image_mask") is not None else torch.ones(r["image"].shape[0], dtype=torch.bool) for r in records]
            )  # [I, P]
        n_img, n_txt, step = image_tok.shape[0], caption_tok.shape[0], self.token_chunk_size
        sim_i2t = torch.empty(n_img, n_txt)  # [I, T]
        sim_t2i: torch.Tensor | None = None
        for a in range(0, n_img, step):
            for b in range(0, n_txt, step):
                out = similarity(
                    image_tok[a : a + step],
                    image_mask[a : a + step] if image_mask is not None else None,
                    caption_tok[b : b + step],
                    caption_mask[b : b + step],
                )
                i2t, t2i = out if isinstance(out, tuple) else (out, None)
                sim_i2t[a : a + step, b : b + step] = i2t.float().cpu()  # [c_i, c_t]
                if t2i is not None:
                    if sim_t2i is None:
                        sim_t2i = torch.empty(n_img, n_txt)  # [I, T]
                    sim_t2i[a : a + step, b : b + step] = t2i.float().cpu()  # [c_i, c_t]
        return sim_i2t, (sim_t2i if sim_t2i is not None else sim_i2t), owner

    def log_examples(self, writer: Any, stage: str, step: int, ids: list[str], records: list[dict[str, Any]]) -> None:
        if self.num_examples <= 0:
            return
        if self._sims is not None:  # the family's own similarity, computed in compute()
            sim_i2t, sim_t2i = self._sims
            owner = torch.repeat_interleave(torch.arange(len(records)), torch.tensor([r["captions"].shape[0] for r in records]))

            def t2i_scores(q: int) -> torch.Tensor:
                return sim_t2i[:, q]  # [I]

            def i2t_scores(i: int) -> torch.Tensor:
                return sim_i2t[i]  # [T]

        else:
            image_emb, caption_emb, owner = self._stack(records)

            def t2i_scores(q: int) -> torch.Tensor:
                return image_emb @ caption_emb[q]  # [I]

            def i2t_scores(i: int) -> torch.Tensor:
                return caption_emb @ image_emb[i]  # [T]

        counts = torch.bincount(owner, minlength=len(records))  # [I]
        first = (torch.cumsum(counts, 0) - counts).tolist()  # first caption row of every image
        texts: list[str | None] = []
        for r in records:
            n = r["captions"].shape[0]
            texts.extend(r.get("texts") or [None] * n)

        def caption_text(t: int) -> str:
            img = int(owner[t])
            given = texts[t]
            if given is None:
                return f"caption {t - first[img]} of {md_code(ids[img])}"
            return f'"{md_escape(given)}"'

        with_thumb = [i for i, r in enumerate(records) if r.get("thumb") is not None]
        rest = [i for i in range(len(records)) if records[i].get("thumb") is None]
        picks = (with_thumb + rest)[: self.num_examples]
        tag = f"{stage}/{self.prefix}"

        # text -> image: the first caption of each picked image as query
        t2i_lines = [f"Top-{TOP} images for caption queries (ground truth in green; ties ranked pessimistically).", ""]
        for n, i in enumerate(picks):
            q = first[i]
            scores = t2i_scores(q)  # [I]
            order = ranked(scores, torch.arange(len(records)) == i)  # [I]
            gt_rank = int((order == i).nonzero()[0, 0]) + 1
            top = order[:TOP].tolist()
            grid = image_grid(
                [records[j].get("thumb") for j in top],
                [GREEN if j == i else GREY for j in top],
                self.thumbnail_size,
            )
            writer.add_image(f"{tag}/t2i_example_{n}", grid, step, dataformats="CHW")
            t2i_lines.append(
                f"**Query {n}** {caption_text(q)} (image {md_code(ids[i])}, ground truth at rank {gt_rank})"
            )
            t2i_lines.append("")
            for pos, j in enumerate(top, 1):
                mark = " **<- ground truth**" if j == i else ""
                t2i_lines.append(f"{pos}. {md_code(ids[j])} score {float(scores[j]):.4f}{mark}")
            t2i_lines.append("")
        writer.add_text(f"{tag}/t2i_examples", "\n".join(t2i_lines), step)

        # image -> text: the same images as queries
        i2t_lines = [f"Top-{TOP} captions for image queries (images in `i2t_example_images`, left to right).", ""]
        for n, i in enumerate(picks):
            scores = i2t_scores(i)  # [T]
            correct = owner == i  # [T]
            order = ranked(scores, correct)  # [T]
            gt_rank = int(correct[order].nonzero()[0, 0]) + 1
            i2t_lines.append(f"**Image {n}** {md_code(ids[i])} (best ground-truth caption at rank {gt_rank})")
            i2t_lines.append("")
            for pos, t in enumerate(order[:TOP].tolist(), 1):
                mark = " **<- ground truth**" if bool(correct[t]) else ""
                i2t_lines.append(f"{pos}. {caption_text(t)} score {float(scores[t]):.4f}{mark}")
            i2t_lines.append("")
        writer.add_text(f"{tag}/i2t_examples", "\n".join(i2t_lines), step)
        if any(records[i].get("thumb") is not None for i in picks):
            grid = image_grid([records[i].get("thumb") for i in picks], [GREY] * len(picks), self.thumbnail_size)
            writer.add_image(f"{tag}/i2t_example_images", grid, step, dataformats="CHW")
