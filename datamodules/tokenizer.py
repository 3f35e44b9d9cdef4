"""Text tokenisation for the image-text pipelines.

:class:`Tokenizer` wraps a Hugging Face :class:`tokenizers.Tokenizer` and produces fixed-length,
CLIP-style id tensors: ``[bos] + tokens + [eos]``, truncated so that the end token is always the
last real token, then right-padded with ``pad_id``; a boolean mask marks the real tokens.

* :meth:`Tokenizer.synthetic` builds the default tokenizer in memory, with no download: a
  word-level vocabulary made of every token of the synthetic world
  (:func:`lit_vlm.datamodules.synth.vocabulary`) plus the specials ``[PAD]`` = 0, ``[UNK]`` = 1,
  ``[SOS]`` = 2, ``[EOS]`` = 3, ``[MASK]`` = 4.  Text is lower-cased and split like
  ``re.findall(r"\\w+|[^\\w\\s]", text)``.
* :meth:`Tokenizer.from_file` loads any ``tokenizer.json`` (CLIP, BERT, GPT-2/BPE, ...).  Start,
  end, pad and mask tokens are recognised by their usual names; the file's own post-processor,
  padding and truncation are bypassed so that every tokenizer yields the same layout.
* :meth:`Tokenizer.from_pretrained` loads a Hugging Face model folder (its ``tokenizer.json``, with
  the special tokens its ``tokenizer_config.json`` names), so data and a language model share one
  vocabulary.

:class:`TextTokenizer` is the contract the rest of lit-vlm relies on; :class:`Tokenizer` satisfies
it for every source above.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from tokenizers import Regex, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from lit_vlm.errors import MissingFileError, UserError

__all__ = ["SYNTH_SPECIALS", "TextTokenizer", "Tokenizer"]

SYNTH_SPECIALS: tuple[str, ...] = ("[PAD]", "[UNK]", "[SOS]", "[EOS]", "[MASK]")
"""Special tokens of the synthetic word-level tokenizer, in id order (0..4)."""

# (start, end) pairs tried in order on foreign tokenizers.
_BOS_EOS_CANDIDATES: tuple[tuple[str, str], ...] = (
    ("[SOS]", "[EOS]"),
    ("<|startoftext|>", "<|endoftext|>"),  # OpenAI CLIP
    ("[CLS]", "[SEP]"),  # BERT family
    ("<s>", "</s>"),  # RoBERTa, T5-ish, LLaMA
    ("<bos>", "<eos>"),  # Gemma
    ("<|begin_of_text|>", "<|end_of_text|>"),  # LLaMA 3
)
_PAD_CANDIDATES: tuple[str, ...] = ("[PAD]", "<pad>", "<|pad|>", "<PAD>", "[pad]")
_MASK_CANDIDATES: tuple[str, ...] = ("[MASK]", "<mask>", "<|mask|>", "<MASK>")
_UNK_CANDIDATES: tuple[str, ...] = ("[UNK]", "<unk>", "<|unk|>", "<UNK>")


@runtime_checkable
class TextTokenizer(Protocol):
    """What data pipelines, families and generation need from a tokenizer."""

    vocab_size: int  # ids an embedding table needs rows for
    pad_id: int
    bos_id: int | None
    eos_id: int | None
    mask_id: int | None
    padding_side: str  # "right" or "left": where encode puts the padding

    def encode(self, texts: Sequence[str], context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """texts -> (ids [B, L] long, mask [B, L] bool): ``[bos] tokens [eos]`` padded to L."""

    def encode_pairs(self, prompts: Sequence[str], answers: Sequence[str], context_length: int) -> tuple[torch.Tensor, ...]:
        """-> (ids, mask, answer_mask) [B, L]: ``[bos] prompt answer [eos]``, the answer marked."""

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """One row of ids -> text, up to the end token, specials dropped."""

    def decode_batch(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> list[str]:
        """[B, L] ids -> B texts."""


class Tokenizer:
    """Fixed-length batch tokenizer around a :class:`tokenizers.Tokenizer`.

    Build it with :meth:`synthetic`, :meth:`from_file`, :meth:`from_words` or :meth:`load`
    rather than calling the constructor directly.

    Args:
        backend: The Hugging Face tokenizer; it is copied, and the copy's padding, truncation and
            post-processor are disabled.
        name: Where it came from (``"synth"`` or a path), for messages and ``repr``.
        bos_token: Start token prepended to every text (``None``: nothing is prepended).
        eos_token: End token appended to every text (``None``: nothing is appended).
        pad_token: Token whose id fills the padding; when ``None`` the padding config of
            ``backend``, then ``eos_token``, then id 0 is used.
        mask_token: Mask token for masked-language objectives (``None`` if there is none).
        padding_side: ``"right"`` (lit-vlm's batches) or ``"left"``: where :meth:`encode` pads.
            Generation left-aligns prompts itself, so either side gives the same tokens.
    """

    def __init__(
        self,
        backend: HFTokenizer,
        *,
        name: str = "custom",
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        mask_token: str | None = None,
        padding_side: str = "right",
    ) -> None:
        if padding_side not in ("right", "left"):
            raise UserError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        self.padding_side = padding_side
        padding = backend.padding
        self._tok = HFTokenizer.from_str(backend.to_str())
        self._tok.no_padding()
        self._tok.no_truncation()
        self._tok.post_processor = None
        self.name = name
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.mask_token = mask_token
        self._bos_id = self._require_id(bos_token)
        self._eos_id = self._require_id(eos_token)
        self._mask_id = self._require_id(mask_token)
        if pad_token is not None:
            self._pad_id = self._require_id(pad_token)
        elif padding is not None and padding.get("pad_id") is not None:
            self._pad_id = int(padding["pad_id"])
        elif self._eos_id is not None:
            self._pad_id = self._eos_id
        else:
            self._pad_id = 0
        self._unk_id = next((i for i in map(self._tok.token_to_id, _UNK_CANDIDATES) if i is not None), None)
        self._special_ids = {i for i in (self._bos_id, self._eos_id, self._mask_id) if i is not None}

    def _require_id(self, token: str | None) -> int | None:
        if token is None:
            return None
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise UserError(f"tokenizer {self.name!r} has no token {token!r}")
        return token_id

    # ---------------------------------------------------------------------------- constructors

    @classmethod
    def from_words(cls, words: Iterable[str], name: str = "words") -> Tokenizer:
        """Word-level tokenizer over ``words`` (lower-cased, deduplicated, order kept).

        The specials ``[PAD]``, ``[UNK]``, ``[SOS]``, ``[EOS]``, ``[MASK]`` take ids 0..4; text is
        lower-cased and split on whitespace with every punctuation/symbol character isolated,
        the same as ``re.findall(r"\\w+|[^\\w\\s]", text.lower())``.
        """
        vocab: dict[str, int] = {token: i for i, token in enumerate(SYNTH_SPECIALS)}
        for word in words:
            word = word.lower()
            if word and word not in vocab:
                vocab[word] = len(vocab)
        backend = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        backend.normalizer = normalizers.Lowercase()
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"[^\w\s]"), behavior="isolated")]
        )
        backend.add_special_tokens(list(SYNTH_SPECIALS))
        return cls(backend, name=name, bos_token="[SOS]", eos_token="[EOS]", pad_token="[PAD]", mask_token="[MASK]")

    @classmethod
    def synthetic(cls) -> Tokenizer:
        """The default tokenizer: word level over :func:`lit_vlm.datamodules.synth.vocabulary`."""
        from lit_vlm.datamodules import synth  # local import: synth is heavier and optional here

        return cls.from_words(synth.vocabulary(), name="synth")

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a Hugging Face ``tokenizer.json`` and detect its special tokens by name.

        Raises:
            FileNotFoundError: If ``path`` does not exist.
            ValueError: If the file is not a valid ``tokenizer.json``.
        """
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"tokenizer file not found: {str(path)!r} (expected a Hugging Face tokenizer.json)")
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as exc:
            raise UserError(
                f"cannot load tokenizer {str(path)!r}: not a valid Hugging Face tokenizer.json ({exc})"
            ) from exc
        vocab = backend.get_vocab(with_added_tokens=True)
        bos = eos = None
        for start, end in _BOS_EOS_CANDIDATES:
            if start in vocab or end in vocab:
                bos = start if start in vocab else None
                eos = end if end in vocab else None
                break
        padding = backend.padding
        if padding is not None and padding.get("pad_id") is not None:
            pad = None  # __init__ takes the id from the padding config
        else:
            pad = next((t for t in _PAD_CANDIDATES if t in vocab), None)
        mask = next((t for t in _MASK_CANDIDATES if t in vocab), None)
        return cls(backend, name=str(path), bos_token=bos, eos_token=eos, pad_token=pad, mask_token=mask)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike[str]) -> Tokenizer:
        """Load the tokenizer of a local Hugging Face model folder: its ``tokenizer.json`` (else
        whatever ``transformers.AutoTokenizer`` reads there, e.g. a SentencePiece model), with the
        start, end, pad, mask and unknown tokens its ``tokenizer_config.json`` names (the usual
        names otherwise). Nothing is downloaded."""
        folder = Path(folder)
        config = {}
        if (folder / "tokenizer_config.json").is_file():
            try:
                config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise UserError(f"cannot read {str(folder / 'tokenizer_config.json')!r}: {exc}") from exc
        if (folder / "tokenizer.json").is_file():
            found = cls.from_file(folder / "tokenizer.json")
            backend = found.backend
            names = {"bos": found.bos_token, "eos": found.eos_token, "pad": backend.id_to_token(found.pad_id),
                     "mask": found.mask_token}
        else:
            try:
                from transformers import AutoTokenizer

                hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
                backend = hf.backend_tokenizer
            except Exception as exc:  # noqa: BLE001 - transformers raises many kinds; reported with the folder
                raise MissingFileError(
                    f"tokenizer folder {str(folder)!r}: no tokenizer.json and transformers cannot read one there ({exc})"
                ) from exc
            names = {"bos": None, "eos": None, "pad": None, "mask": None}
        content = lambda v: v.get("content") if isinstance(v, dict) else v  # noqa: E731 - AddedToken as a dict
        for key in names:
            named = content(config.get(f"{key}_token"))
            if isinstance(named, str) and backend.token_to_id(named) is not None:
                names[key] = named
        return cls(backend, name=str(folder), bos_token=names["bos"], eos_token=names["eos"], pad_token=names["pad"],
                   mask_token=names["mask"])

    @classmethod
    def load(cls, spec: str | None) -> Tokenizer:
        """``"synth"`` (or ``None``) → :meth:`synthetic`; a folder → :meth:`from_pretrained`; any
        other path → :meth:`from_file`."""
        if spec is None or spec == "synth":
            return cls.synthetic()
        if Path(spec).is_dir():
            return cls.from_pretrained(spec)
        return cls.from_file(spec)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the (special-token-free) backend as a ``tokenizer.json``."""
        self._tok.save(str(path))

    # ---------------------------------------------------------------------------- properties

    @property
    def backend(self) -> HFTokenizer:
        """The wrapped Hugging Face tokenizer (post-processor, padding, truncation disabled)."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (an embedding table needs this many rows)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        """Id used for right padding."""
        return self._pad_id

    @property
    def bos_id(self) -> int | None:
        """Id of the start token, or ``None`` when the tokenizer has none."""
        return self._bos_id

    @property
    def eos_id(self) -> int | None:
        """Id of the end token, or ``None`` when the tokenizer has none."""
        return self._eos_id

    @property
    def mask_id(self) -> int | None:
        """Id of the mask token, or ``None`` when the tokenizer has none."""
        return self._mask_id

    @property
    def unk_id(self) -> int | None:
        """Id of the unknown token, or ``None`` when the tokenizer has none."""
        return self._unk_id

    def token_to_id(self, token: str) -> int | None:
        """Id of ``token`` or ``None``."""
        return self._tok.token_to_id(token)

    def tokenize(self, text: str) -> list[str]:
        """The tokens of ``text`` without any special token."""
        return self._tok.encode(text, add_special_tokens=False).tokens

    # ---------------------------------------------------------------------------- encode / decode

    def encode(self, texts: Sequence[str], context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenise a batch into fixed-length ids and a mask.

        Args:
            texts: The strings to encode.
            context_length: Length ``L`` of every row.

        Returns:
            ``(ids, mask)``: ``ids`` is a long tensor ``[B, L]`` holding ``[bos] + tokens + [eos]``
            (text tokens truncated so that ``eos`` is always kept as the last real token) followed
            by ``pad_id``; ``mask`` is a bool tensor ``[B, L]``, True on real tokens.
        """
        if isinstance(texts, str):
            raise TypeError("encode expects a list of strings, not a single string")
        n_special = (self._bos_id is not None) + (self._eos_id is not None)
        room = context_length - n_special
        if room < 0 or context_length < 1:
            raise UserError(f"context_length={context_length} leaves no room for the start/end tokens")
        ids = torch.full((len(texts), context_length), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(texts), context_length), dtype=torch.bool)
        prefix = [] if self._bos_id is None else [self._bos_id]
        suffix = [] if self._eos_id is None else [self._eos_id]
        for row, text in enumerate(texts):
            # A plain loop of `encode` (not `encode_batch`) keeps the Rust thread pool unused, so
            # forking DataLoader workers afterwards is safe and silent.
            tokens = self._tok.encode(text, add_special_tokens=False).ids[:room]
            seq = prefix + tokens + suffix
            span = self._span(len(seq), context_length)
            ids[row, span] = torch.tensor(seq, dtype=torch.long)
            mask[row, span] = True
        return ids, mask

    def _span(self, n: int, length: int) -> slice:
        """Where a row's ``n`` real tokens go: the start (right padding) or the end (left)."""
        return slice(0, n) if self.padding_side == "right" else slice(length - n, length)

    def encode_pairs(
        self, prompts: Sequence[str], answers: Sequence[str], context_length: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokenise prompt-answer pairs as one sequence each, ``[bos] prompt answer [eos]``, for a
        language-modelling loss on the answer only (VQA as generation).

        Returns ``(ids, mask, answer_mask)``, each ``[B, L]``: ``answer_mask`` is True on the
        answer's tokens and the end token. Too long a pair loses the end of its prompt first, then
        the end of its answer; the end token is always kept.
        """
        if len(prompts) != len(answers):
            raise UserError(f"encode_pairs: {len(prompts)} prompts but {len(answers)} answers")
        n_special = (self._bos_id is not None) + (self._eos_id is not None)
        room = context_length - n_special
        if room < 1:
            raise UserError(f"context_length={context_length} leaves no room for a prompt and an answer")
        ids = torch.full((len(prompts), context_length), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), context_length), dtype=torch.bool)
        answer_mask = torch.zeros((len(prompts), context_length), dtype=torch.bool)
        prefix = [] if self._bos_id is None else [self._bos_id]
        suffix = [] if self._eos_id is None else [self._eos_id]
        for row, (prompt, answer) in enumerate(zip(prompts, answers)):
            a = self._tok.encode(answer, add_special_tokens=False).ids[:room]
            q = self._tok.encode(prompt, add_special_tokens=False).ids[: room - len(a)]
            seq = prefix + q + a + suffix
            span = self._span(len(seq), context_length)
            ids[row, span] = torch.tensor(seq, dtype=torch.long)
            mask[row, span] = True
            answer_mask[row, span.start + len(prefix) + len(q) : span.stop] = True
        return ids, mask, answer_mask

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Decode one row of ids back to text.

        Reading stops at the first end token; start, end, mask, padding and other special tokens
        are dropped.
        """
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise UserError(f"decode expects a 1-D sequence, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        if self.padding_side == "left":
            while ids and ids[0] == self._pad_id and self._pad_id not in (self._bos_id, self._eos_id):
                ids.pop(0)
        if ids and self._bos_id is not None and ids[0] == self._bos_id:
            ids = ids[1:]  # (a start token that is also the end token, as GPT-2's, must not end the text)
        if self._eos_id is not None and self._eos_id in ids:
            ids = ids[: ids.index(self._eos_id)]
        elif self._pad_id not in self._special_ids and self._pad_id != self._unk_id:
            while ids and ids[-1] == self._pad_id:  # no end token: strip trailing padding
                ids.pop()
        ids = [i for i in ids if i not in self._special_ids]
        return self._tok.decode(ids, skip_special_tokens=True)

    def decode_batch(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> list[str]:
        """Decode a ``[B, L]`` tensor (optionally restricted to ``mask``) into ``B`` strings."""
        rows = []
        for row in range(ids.shape[0]):
            seq = ids[row] if mask is None else ids[row][mask[row]]
            rows.append(self.decode(seq))
        return rows

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
            f"eos={self.eos_token!r}, pad_id={self.pad_id}, mask={self.mask_token!r})"
        )
