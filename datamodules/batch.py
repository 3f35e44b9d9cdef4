"""The batch contract: what the batches of lit-vlm's DataModules hold, by key.

Families and callbacks read batches **by key**, never by position, so a corpus can add keys
without breaking anyone.  Every corpus's batches have the keys of :class:`Batch`; the image-text
corpus adds :class:`ImageTextBatch` (training) and :class:`ImageTextEvalBatch` (validation, test,
predict).  ``B`` is the number of samples in the batch, ``L`` the context length,
``H = W = image_size``.

Image-text details:

* ``text_ids`` is ``[bos] tokens [eos] pad...``; in training one caption per image (a random one
  with ``caption_sampling="random"``, the first with ``"first"``), in evaluation the *first*
  caption (so a validation loss can be computed).
* With ``train_vqa`` (k questions per image), a training batch also holds up to k distinct
  questions of each image that has answered ones, with their ``multiple_choice_answer``:
  ``qa_ids`` is ``[bos] question answer [eos]`` and ``qa_answer_mask`` marks the answer and end.
* Evaluation batches hold *all* captions of the batch's images, image after image
  (``caption_owner`` gives each caption's image row), the VQA questions (empty when the shards
  hold none), the ``"label"`` of the sample's JSON (``-1`` when absent) and the ``image_id`` used by
  COCO / VQAv2 annotation files (the shard key when the JSON has none).  Images with questions
  need no caption; prediction accepts images without any (no ``caption_ids`` row, ``captions``
  entry ``[]``, ``text_ids`` row ``[bos, eos]``).

``data_stats`` is removed by the DataModule (``on_after_batch_transfer``) before a step sees the
batch; see :class:`DataStats`.
"""

from __future__ import annotations

from typing import Any, TypedDict

import torch

__all__ = ["Batch", "DataStats", "ImageTextBatch", "ImageTextEvalBatch", "InterleavedBatch", "VideoAudioBatch", "batch_size"]


class DataStats(TypedDict, total=False):
    """A loader worker's cumulative counts for the epoch (training) or pass (evaluation)."""

    split: str  # "train", "val", "test", "predict"
    worker: int  # global worker index: rank * workers_per_rank + worker id
    epoch: int
    samples: int  # samples this worker yielded so far
    skipped: dict[str, int]  # bad samples skipped, per reason (the stream's and the corpus's reasons)
    raw: int  # raw samples drawn from the stream, decoded or skipped (the resume position)
    batches: int  # batches yielded
    dropped: dict[str, int]  # parts of samples dropped, per reason (an interleaved document's images)


class Batch(TypedDict, total=False):
    """Keys every corpus's batches have."""

    sample_id: list[str]  # [B] webdataset keys (``__key__``)
    data_stats: DataStats  # removed before the step


class ImageTextBatch(Batch, total=False):
    """A training batch of the image-text corpus."""

    image: torch.Tensor  # [B, 3, H, W] float, normalised with the data's mean/std
    text_ids: torch.Tensor  # [B, L] long: [bos] tokens [eos] pad...
    text_mask: torch.Tensor  # [B, L] bool, True on real tokens (bos and eos included)
    # with train_vqa only:
    question: list[str]  # [Q]
    answer: list[str]  # [Q]
    qa_ids: torch.Tensor  # [Q, L] long: [bos] question answer [eos] pad...
    qa_mask: torch.Tensor  # [Q, L] bool, real tokens
    qa_answer_mask: torch.Tensor  # [Q, L] bool, the answer and end token
    qa_owner: torch.Tensor  # [Q] long, each question's image row
    # with hard_negatives = K only:
    negative_ids: torch.Tensor  # [B, K, L] long, hard negatives of each caption (padding rows empty)
    negative_mask: torch.Tensor  # [B, K, L] bool, real tokens
    negative_valid: torch.Tensor  # [B, K] bool, rows that hold a negative


class ImageTextEvalBatch(ImageTextBatch, total=False):
    """A validation / test / predict batch of the image-text corpus."""

    label: torch.Tensor  # [B] long, class index of the sample's JSON "label", -1 when absent
    caption_ids: torch.Tensor  # [N, L] long, every caption of the batch's images, image after image
    caption_mask: torch.Tensor  # [N, L] bool
    caption_owner: torch.Tensor  # [N] long, each caption's image row
    captions: list[list[str]]  # [B] raw caption strings of each image (what caption_ids encodes)
    image_id: list[int | str]  # [B] JSON "image_id" (COCO / VQAv2 id), else the shard key
    question_id: list[int]  # [Q] VQA question ids (question: [Q] their texts)
    question_owner: torch.Tensor  # [Q] long, each question's image row
    question_answer: list[str | None]  # [Q] the JSON's multiple_choice_answer (None when absent): few-shot demonstrations


class InterleavedBatch(Batch, total=False):
    """A batch of the interleaved-document corpus (:mod:`lit_vlm.datamodules.interleaved`);
    ``N`` the most images of a document in the batch, ``T`` its longest token row."""

    images: torch.Tensor  # [B, N, 3, H, W] float; zeros past a document's images
    media_mask: torch.Tensor  # [B, N] bool: which images are real
    input_ids: torch.Tensor  # [B, T] long: [bos] text <image>text<|endofchunk|>... [eos] pad...
    attention_mask: torch.Tensor  # [B, T] long: 1 on tokens, 0 on padding
    labels: torch.Tensor  # [B, T] long: next-token targets, -100 on padding, <image> and text outside chunks
    media_locations: torch.Tensor  # [B, T] bool: where the <image> tokens are


class VideoAudioBatch(ImageTextEvalBatch, total=False):
    """A batch of the video-audio corpus (:mod:`lit_vlm.datamodules.video_audio`): the image-text
    batch's text fields (training: ``text_ids``/``text_mask``; evaluation: every caption, ``label``,
    the questions) beside the clips; ``C`` clips of ``T`` frames, ``A`` audio clips of ``M`` mel
    bins by ``F`` frames. Only the decoded modalities are there."""

    video: torch.Tensor  # [B, C, T, 3, H, W] float, normalised as images; zeros on padding frames
    video_mask: torch.Tensor  # [B, C, T] bool: real frames
    audio: torch.Tensor  # [B, A, 1, M, F] float: normalised log-mel spectrograms
    audio_label: torch.Tensor  # [B] long, the JSON's "audio_label", -1 when absent
    audio_text_ids: torch.Tensor  # [B, L] long: one audio caption per clip (evaluation: the first)
    audio_text_mask: torch.Tensor  # [B, L] bool
    audio_caption_ids: torch.Tensor  # [N, L] long, evaluation: every audio caption, clip after clip
    audio_caption_mask: torch.Tensor  # [N, L] bool
    audio_caption_owner: torch.Tensor  # [N] long, each audio caption's clip row
    audio_captions: list[list[str]]  # [B] raw audio captions
    image: torch.Tensor  # [B, 3, H, W] evaluation only: the middle real frame of each clip's first clip


def batch_size(batch: Any) -> int:
    """Samples in a batch: its ``sample_id`` count, else the leading size of its first tensor
    (0 for anything else). Every corpus's batch has ``sample_id``; the fallback serves batches
    built by hand."""
    if not isinstance(batch, dict):
        return 0
    ids = batch.get("sample_id")
    if isinstance(ids, (list, tuple)):
        return len(ids)
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return 0
