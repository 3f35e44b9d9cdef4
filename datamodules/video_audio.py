"""Clips with sound (video2dataset's layout) read as webdataset samples, for binding and video chat.

A clip sample holds, read unchanged from the way video2dataset writes clips:

* the video: ``KEY.mp4`` (or ``webm``, ``mkv``, ``mov``, ``avi``), or pre-extracted frames
  ``KEY.000.jpg``, ``KEY.001.jpg``, ... (their JSON ``fps`` gives the rate, else 1);
* the audio: ``KEY.m4a``, ``KEY.flac``, ``KEY.wav``, ``KEY.mp3`` or ``KEY.ogg``, else the video
  container's own audio stream;
* the text: ``KEY.txt`` and/or ``KEY.json`` (``captions`` or ``caption``; also ``audio_captions``,
  ``label``, ``audio_label``, ``questions`` in VQAv2's fields, ``clip_id``/``image_id``).

Frames are sampled by :class:`~lit_vlm.datamodules.media.FrameSampling` and go through the image
transform (the same crop for every frame of a clip); audio goes through
:class:`~lit_vlm.datamodules.media.AudioFrontEnd`. ``decode`` names what a sample must have;
a sample without it, or whose stream does not decode, is skipped and counted by reason
(:data:`CLIP_SKIP_REASONS`), never fatal.
"""

from __future__ import annotations

import dataclasses
import io
import logging
from typing import Any

import numpy as np
import torch
from PIL import Image

from lit_vlm.datamodules import manifests, media, world_clips
from lit_vlm.datamodules.conversations import CONVERSATION_SKIP_REASONS, pad_chats
from lit_vlm.datamodules.corpus import Corpus, Split, is_empty
from lit_vlm.datamodules.image_text import ImageTextCollator, ImageTextDecoder
from lit_vlm.datamodules.shards import ShardDataModule, TextFacts
from lit_vlm.datamodules.templates import IMAGE, ConversationError, encode_conversation, get_template
from lit_vlm.datamodules.tokenizer import Tokenizer
from lit_vlm.datamodules.transforms import CLIP_MEAN, CLIP_STD, BadSample, Compose, eval_transform, train_transform
from lit_vlm.errors import UserError

logger = logging.getLogger("lit_vlm.data")

__all__ = ["AUDIO_KEYS", "CLIP_SKIP_REASONS", "MODALITIES", "VIDEO_KEYS", "VideoAudioCollator", "VideoAudioCorpus",
           "VideoAudioDataModule", "VideoAudioDecoder"]

VIDEO_KEYS = ("mp4", "webm", "mkv", "mov", "avi")
AUDIO_KEYS = ("m4a", "flac", "wav", "mp3", "ogg")
MODALITIES = ("video", "audio")
#: Why a clip is skipped (beside the stream's own reasons and the text's, as for image-text).
CLIP_SKIP_REASONS = ("bad_json", "missing_caption", "empty_caption", "bad_text", "missing_video", "no_video_stream",
                     "video_decode", "zero_frames", "missing_audio", "no_audio_stream", "audio_decode", "silent_audio",
                     "too_short")


class VideoAudioDecoder(ImageTextDecoder):
    """Raw clip sample -> ``{"video" [C, T, 3, H, W], "video_mask" [C, T], "audio" [A, 1, M, F],
    text fields}``; the text is read as for image-text samples (training: one caption; evaluation:
    all captions, the clip id and the questions), plus ``audio_captions`` and ``audio_label``.

    Cheap checks first: the JSON and the text, then which members are there, then the audio
    (``missing_audio``, ``no_audio_stream``, ``audio_decode``, ``too_short``, ``silent_audio``),
    then the video (``missing_video``, ``no_video_stream``, ``video_decode``, ``zero_frames``).
    """

    def __init__(self, transform: Compose, *, train: bool, modalities: tuple[str, ...], sampling: media.FrameSampling,
                 audio: media.AudioFrontEnd, min_audio_seconds: float, silence: float, require_caption: bool,
                 chat: tuple[Any, str, str, int] | None = None) -> None:
        super().__init__(transform, train=train, require_caption=require_caption)
        self.modalities, self.sampling, self.audio = modalities, sampling, audio
        self.min_audio_seconds, self.silence = min_audio_seconds, silence
        self.chat = chat  # (tokenizer, template, JSON key, max length) of training conversations

    def _conversation(self, meta: dict[str, Any]) -> dict[str, Any]:
        """The JSON's conversation as ``chat_ids``/``chat_labels`` (``<video>`` read as ``<image>``)."""
        tokenizer, template, key, max_length = self.chat
        turns = meta.get(key)
        if not isinstance(turns, list) or not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns):
            raise BadSample("bad_json", f"json {key!r} is not a list of turns")
        turns = [{**t, "value": t["value"].replace("<video>", IMAGE)} for t in turns]
        try:
            ids, labels = encode_conversation(turns, tokenizer, template, 1, max_length)
        except ConversationError as exc:
            raise BadSample(f"conversation_{exc.reason}", str(exc)) from exc
        return {"chat_ids": ids, "chat_labels": labels, "has_image": True}

    def __call__(self, raw: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        meta = self._metadata(raw)
        if self.train:
            sample: dict[str, Any] = {"caption": self._pick(self._captions(raw, meta, self.require_caption), generator)}
            listed = self._text_list(meta, "audio_captions")
            sample["audio_caption"] = self._pick(listed, generator) if listed else ""
            if self.chat is not None:
                sample.update(self._conversation(meta))
        else:
            questions = self._questions(meta)
            sample = {"captions": self._captions(raw, meta, self.require_caption and not questions), "questions": questions,
                      "image_id": self._image_id({"image_id": meta.get("clip_id", meta.get("image_id"))}),
                      "audio_captions": self._text_list(meta, "audio_captions")}
        for key in ("label", "audio_label"):
            value = meta.get(key, -1)
            if isinstance(value, bool) or not isinstance(value, int):
                raise BadSample("bad_json", f"json {key!r} is {value!r}, not an integer class index")
            sample[key] = value
        video_data = next((raw[k] for k in VIDEO_KEYS if k in raw), None)
        frame_keys = sorted((k for k in raw if k.endswith((".jpg", ".jpeg", ".png")) and k.split(".", 1)[0].isdigit()),
                            key=lambda k: int(k.split(".", 1)[0]))  # KEY.000.jpg, KEY.001.jpg, ... in frame order
        if "audio" in self.modalities:
            sample["audio"] = self._audio(raw, video_data)
        if "video" in self.modalities:
            if video_data is None and not frame_keys:
                raise BadSample("missing_video", f"no member with extension {'/'.join(VIDEO_KEYS)} and no KEY.NNN.jpg frames")
            frames = (self._video(video_data, generator) if video_data is not None
                      else self._frames(raw, frame_keys, float(meta.get("fps") or 1.0), generator))
            sample["video"], sample["video_mask"] = self._stack(frames, generator)
        return sample

    @staticmethod
    def _pick(items: list[str], generator: torch.Generator) -> str:
        return items[int(torch.randint(len(items), (1,), generator=generator))] if len(items) > 1 else items[0] if items else ""

    @staticmethod
    def _text_list(meta: dict[str, Any], key: str) -> list[str]:
        listed = meta.get(key)
        if listed is None:
            return []
        if not isinstance(listed, list) or not all(isinstance(c, str) for c in listed):
            raise BadSample("bad_json", f"json {key!r} is not a list of strings")
        return [c.strip() for c in listed if c.strip()]

    def _audio(self, raw: dict[str, Any], video_data: bytes | None) -> torch.Tensor:
        data = next((raw[k] for k in AUDIO_KEYS if k in raw), None)
        if data is None and video_data is None:
            raise BadSample("missing_audio", f"no member with extension {'/'.join(AUDIO_KEYS)} and no video to take it from")
        try:
            wave = media.decode_audio(data if data is not None else video_data, self.audio.sample_rate)  # [N]
        except media.DecodeError as err:
            reason = err.reason if data is not None or err.reason != "no_audio_stream" else "missing_audio"
            raise BadSample(reason, str(err)) from err
        if len(wave) < self.min_audio_seconds * self.audio.sample_rate:
            raise BadSample("too_short", f"{len(wave) / self.audio.sample_rate:.3f} s of audio, min_audio_seconds "
                            f"{self.min_audio_seconds}")
        peak = float(np.abs(wave).max())
        if peak <= self.silence:
            raise BadSample("silent_audio", f"the audio's peak is {peak:.2g}, at most silence={self.silence}")
        return self.audio.clips(wave)  # [A, 1, M, F]

    def _video(self, data: bytes, generator: torch.Generator) -> list[list[np.ndarray]]:
        try:
            count, fps = media.probe_video(data)
            if count <= 0:
                _, count = media.decode_video_frames(data, wanted=set())  # the container does not say: count them
            clips = media.frame_indices(count, fps, self.sampling, self.train, generator)
            wanted = {i for clip in clips for i in clip}
            kept, decoded = media.decode_video_frames(data, wanted)
            if wanted - set(kept) and decoded:  # fewer frames than stated (a truncated file): sample what is there
                clips = media.frame_indices(decoded, fps, self.sampling, self.train, generator)
                kept, decoded = media.decode_video_frames(data, {i for clip in clips for i in clip})
        except media.DecodeError as err:
            raise BadSample(err.reason, str(err)) from err
        if decoded == 0:
            raise BadSample("zero_frames", "the video stream holds no frames")
        return [[kept[i] for i in clip if i in kept] for clip in clips]

    def _frames(self, raw: dict[str, Any], keys: list[str], fps: float, generator: torch.Generator) -> list[list[np.ndarray]]:
        clips = media.frame_indices(len(keys), fps, self.sampling, self.train, generator)
        out = []
        for clip in clips:
            frames = []
            for i in clip:
                try:
                    with Image.open(io.BytesIO(raw[keys[i]])) as img:
                        frames.append(np.asarray(img.convert("RGB")))
                except (OSError, ValueError, Image.DecompressionBombError) as exc:
                    raise BadSample("video_decode", f"frame {keys[i]} does not decode: {exc}") from exc
            out.append(frames)
        return out

    def _stack(self, clips: list[list[np.ndarray]], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Frames -> ``[C, T, 3, H, W]`` and the mask of real frames ``[C, T]`` (one crop per clip)."""
        t = self.sampling.num_frames
        seed = int(torch.randint(2**62, (1,), generator=generator))
        video, mask = None, torch.zeros(len(clips), t, dtype=torch.bool)
        for c, frames in enumerate(clips):
            for k, frame in enumerate(frames[:t]):
                pixels = self.transform(Image.fromarray(frame), torch.Generator().manual_seed(seed + c))  # [3, H, W]
                if video is None:
                    video = pixels.new_zeros(len(clips), t, *pixels.shape)
                video[c, k], mask[c, k] = pixels, True
        if video is None:
            raise BadSample("zero_frames", "no frame was sampled")
        return video, mask


class VideoAudioCollator(ImageTextCollator):
    """Clips -> a batch: ``video`` [B, C, T, 3, H, W] and ``video_mask`` [B, C, T], ``audio``
    [B, A, 1, M, F], ``audio_label`` [B], the image-text batch's text fields, and the audio
    captions: ``audio_text_ids``/``audio_text_mask`` (one per clip; the first in evaluation), and in
    evaluation every one (``audio_caption_ids``, ``audio_caption_mask``, ``audio_caption_owner``,
    ``audio_captions``) and ``image`` [B, 3, H, W], a still of each clip (the middle frame)."""

    def media(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if "video" in samples[0]:
            out["video"] = torch.stack([s["video"] for s in samples])  # [B, C, T, 3, H, W]
            out["video_mask"] = torch.stack([s["video_mask"] for s in samples])  # [B, C, T]
        if "audio" in samples[0]:
            out["audio"] = torch.stack([s["audio"] for s in samples])  # [B, A, 1, M, F]
        out["audio_label"] = torch.tensor([s["audio_label"] for s in samples], dtype=torch.long)  # [B]
        if "chat_ids" in samples[0]:
            out.update(pad_chats(samples, self.tokenizer.pad_id))  # chat_ids, chat_labels, chat_mask [B, L], has_image [B]
        if self.train:
            out["audio_text_ids"], out["audio_text_mask"] = self.tokenizer.encode(
                [s["audio_caption"] for s in samples], self.context_length)  # [B, L]
        else:
            out["audio_text_ids"], out["audio_text_mask"] = self.tokenizer.encode(
                [s["audio_captions"][0] if s["audio_captions"] else "" for s in samples], self.context_length)  # [B, L]
            if "video" in out:  # a still of each clip (its first clip's middle real frame): image-side evaluations
                middle = (out["video_mask"][:, 0].sum(1) - 1).clamp_min(0) // 2  # [B]
                out["image"] = out["video"][torch.arange(len(samples)), 0, middle]  # [B, 3, H, W]
            every = [c for s in samples for c in s["audio_captions"]]
            out["audio_caption_ids"], out["audio_caption_mask"] = self.tokenizer.encode(every, self.context_length)  # [N, L]
            out["audio_caption_owner"] = torch.tensor([r for r, s in enumerate(samples) for _ in s["audio_captions"]],
                                                      dtype=torch.long)  # [N]
            out["audio_captions"] = [list(s["audio_captions"]) for s in samples]
        return out


class VideoAudioCorpus(Corpus):
    """Clips with sound from webdataset shards; the arguments are :class:`VideoAudioDataModule`'s."""

    skip_reasons = CLIP_SKIP_REASONS
    annotation_kinds = {"vqa_questions": "vqa_{split}_questions", "vqa_annotations": "vqa_{split}_annotations"}

    def __init__(self, tokenizer: str | Tokenizer, context_length: int, image_size: int = 64,
                 mean: tuple[float, float, float] = CLIP_MEAN, std: tuple[float, float, float] = CLIP_STD,
                 train_crop_scale: tuple[float, float] = (0.9, 1.0), modalities: tuple[str, ...] = MODALITIES,
                 sampling: media.FrameSampling | None = None, audio: media.AudioFrontEnd | None = None,
                 min_audio_seconds: float = 0.25, silence: float = 1e-4, clips_config: dict[str, Any] | None = None,
                 conversations: str | None = None, template: str = "chat", max_chat_length: int = 512) -> None:
        self.conversations, self.template, self.max_chat_length = conversations, template, int(max_chat_length)
        get_template(template)
        self.skip_reasons = CLIP_SKIP_REASONS + (CONVERSATION_SKIP_REASONS if conversations else ())
        self.modalities = tuple(modalities)
        if not self.modalities or set(self.modalities) - set(MODALITIES):
            raise UserError(f"modalities must be among {MODALITIES}, got {list(modalities)}")
        self.sampling, self.audio = sampling or media.FrameSampling(), audio or media.AudioFrontEnd()
        self.sampling.check()
        self.audio.check()
        self.image_size, self.context_length = int(image_size), int(context_length)
        self.mean, self.std, self.train_crop_scale = tuple(mean), tuple(std), tuple(train_crop_scale)
        self.min_audio_seconds, self.silence = float(min_audio_seconds), float(silence)
        self.clips_config = dict(clips_config or {})
        fields = [f.name for f in dataclasses.fields(world_clips.ClipsConfig)]
        if set(self.clips_config) - set(fields):
            raise UserError(f"clips_config: unknown key(s) {sorted(set(self.clips_config) - set(fields))}; the keys are {fields}")
        if not isinstance(tokenizer, Tokenizer):
            try:
                tokenizer = Tokenizer.load(tokenizer)
            except (OSError, ValueError) as exc:
                raise UserError(f"tokenizer={tokenizer!r}: {exc}") from exc
        self.tokenizer = tokenizer

    def prepare(self, root: str) -> None:
        """Write the synthetic world's clips (``clips_config``) in ``root`` when it is missing or empty."""
        if is_empty(root):
            logger.info("writing the synthetic world's clips in %s", root)
            world_clips.generate(root, world_clips.ClipsConfig(**self.clips_config), progress=False)
        manifest = manifests.read_manifest(root)
        if manifest.get("format") == world_clips.FORMAT and manifest.get("version") != world_clips.VERSION:
            raise UserError(f"root={root!r} holds the world's clips of version {manifest.get('version')}; this lit-vlm "
                            f"writes version {world_clips.VERSION}: remove the folder (it is rewritten on first use) or "
                            f"run lit-vlm data clips --out {root}")
        super().prepare(root)

    def decoder(self, split: Split) -> VideoAudioDecoder:
        transform = (train_transform(self.image_size, self.mean, self.std, self.train_crop_scale) if split.train
                     else eval_transform(self.image_size, self.mean, self.std))
        return VideoAudioDecoder(transform, train=split.train, modalities=self.modalities, sampling=self.sampling,
                                 audio=self.audio, min_audio_seconds=self.min_audio_seconds, silence=self.silence,
                                 require_caption=split.name != "predict",
                                 chat=(self.tokenizer, self.template, self.conversations, self.max_chat_length)
                                 if self.conversations and split.train else None)

    def collator(self, split: Split) -> VideoAudioCollator:
        return VideoAudioCollator(self.tokenizer, self.context_length, train=split.train)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "modalities": list(self.modalities), "conversations": self.conversations,
                "template": self.template, "sampling": dataclasses.asdict(self.sampling),
                "audio": dataclasses.asdict(self.audio), "decoders": media.versions()}


class VideoAudioDataModule(TextFacts, ShardDataModule):
    """Clips with sound streamed from webdataset shards (see the module docstring).

    Args:
        tokenizer: The text tower's tokenizer: ``synth`` (the synthetic world's words; the
            default), a ``tokenizer.json`` or a Hugging Face tokenizer folder (``lit-vlm`` fills it
            from the model's ``language_model`` when the model has one).
        context_length: Token rows are padded or cut to this length (default 32; filled from the
            model's language model as the tokenizer is).
        image_size: Square side frames are resized and cropped to.
        decode: What every sample must have and is decoded (``video``, ``audio``); the rest is left.
        sampling: Frame sampling (:class:`~lit_vlm.datamodules.media.FrameSampling` fields:
            ``method`` uniform/segment/fps, ``num_frames``, ``num_clips``, ``fps``).
        audio_front_end: The audio front end (:class:`~lit_vlm.datamodules.media.AudioFrontEnd`
            fields; ImageBind's by default).
        min_audio_seconds: Shorter audio is skipped (``too_short``).
        silence: Audio whose peak is at most this is skipped (``silent_audio``).
        clips_config: The synthetic world's clips written to a missing ``root``
            (:class:`~lit_vlm.datamodules.world_clips.ClipsConfig` fields, e.g. ``{num_train: 64}``).
        conversations: The JSON key of each clip's training conversation (video instruction data
            in LLaVA's format, ``<video>`` or ``<image>`` marking the clip), encoded as ``chat_ids``
            / ``chat_labels`` for video chat; None reads none.
        template: The conversation template (``plain``, ``chat``, ``chatml``); ``lit-vlm`` links it
            to the model's.
        max_chat_length: Tokens per conversation at most (the clip's place counts one).
        **kwargs: :class:`~lit_vlm.datamodules.shards.ShardDataModule`'s (root, shards, batch size, ...).
    """

    def __init__(self, tokenizer: str | None = None, context_length: int | None = None, image_size: int = 64,
                 decode: list[str] = list(MODALITIES), sampling: dict[str, Any] | None = None,
                 audio_front_end: dict[str, Any] | None = None, min_audio_seconds: float = 0.25, silence: float = 1e-4,
                 clips_config: dict[str, Any] | None = None, conversations: str | None = None, template: str = "chat",
                 max_chat_length: int = 512, **kwargs: Any) -> None:
        try:
            frame_sampling = media.FrameSampling(**(sampling or {}))
            front_end = media.AudioFrontEnd(**(audio_front_end or {}))
        except TypeError as exc:
            raise UserError(f"sampling / audio_front_end: {exc} (the keys are FrameSampling's and AudioFrontEnd's "
                            "fields)") from exc
        corpus = VideoAudioCorpus(tokenizer or "synth", context_length or 32, image_size, modalities=tuple(decode),
                                  sampling=frame_sampling, audio=front_end, min_audio_seconds=min_audio_seconds,
                                  silence=silence, clips_config=clips_config, conversations=conversations,
                                  template=template, max_chat_length=max_chat_length)
        super().__init__(corpus, **kwargs)
        self.save_hyperparameters()

    @property
    def template(self) -> str:
        return self.corpus.template

    @property
    def num_mel_bins(self) -> int | None:
        """Spectrogram height (``None`` when audio is not read)."""
        return self.corpus.audio.num_mel_bins if "audio" in self.corpus.modalities else None

    @property
    def target_frames(self) -> int | None:
        """Spectrogram width (``None`` when audio is not read)."""
        return self.corpus.audio.target_frames if "audio" in self.corpus.modalities else None

    def label_classes(self, label_key: str) -> dict[str, list[str]]:
        """``{"classnames": [...], "templates": [...]}`` of a label (``label``, ``audio_label``) from
        the dataset's manifest (``classes``); ``{}`` when it names none."""
        try:
            classes = self.manifest().get("classes") or {}
        except (UserError, OSError):
            return {}
        return dict(classes.get(label_key) or {})
