"""What a family offers the evaluation callbacks, written down once as Protocols.

Callbacks never know families: they ask for a capability with :func:`require`, which checks the
methods are there and names what is missing. A family implements the methods; it need not
inherit from anything here. Modalities are open: ``encode_<modality>`` (``encode_image``,
``encode_text``, ``encode_audio``, ``encode_video``, ...) is what retrieval and zero-shot
classification call, so a new modality needs a family method, not a callback change.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from lit_vlm.errors import UserError


@runtime_checkable
class EncodesImage(Protocol):
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> L2-normalised embeddings [B, E]."""


@runtime_checkable
class EncodesText(Protocol):
    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """ids, mask [N, L] -> L2-normalised embeddings [N, E]."""


@runtime_checkable
class TokenSimilarity(Protocol):
    """Retrieval scored by the family's own similarity over token features (FILIP)."""

    def encode_image_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """images [B, 3, H, W] -> (tokens [B, P, E], mask [B, P] or None)."""

    def encode_text_tokens(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids, mask [N, L] -> (tokens [N, L', E], mask [N, L'])."""

    def similarity(self, image_tokens, image_mask, text_tokens, text_mask) -> Any:
        """-> [I, T] scores, or (image->text [I, T], text->image [I, T])."""


@runtime_checkable
class ScoresPairs(Protocol):
    """Image-text matching (BLIP's and FLAVA's ITM head): re-ranks retrieval candidates."""

    def pair_features(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> per-image features [B, ...] that ``score_pairs`` reads."""

    def score_pairs(self, image_features: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """features [N, ...], ids and mask [N, L] -> match scores [N] (higher: better match)."""


@runtime_checkable
class Generates(Protocol):
    """Text generation from images (captioning, VQA)."""

    def generate(self, images: torch.Tensor, prompts: list[str] | None = None, **options: Any) -> list[str]:
        """images [B, 3, H, W] (+ a prompt per image) -> one generated text per image."""


@runtime_checkable
class ScoresAnswers(Protocol):
    """VQA by ranking a list of candidate answers."""

    def score_answers(self, images: torch.Tensor, prompts: list[str], candidates: list[str]) -> torch.Tensor:
        """images [Q, 3, H, W], Q prompts, C candidates -> log-likelihood of each candidate [Q, C]."""


@runtime_checkable
class GeneratesInterleaved(Protocol):
    """Text after interleaved images and text (few-shot in-context evaluation)."""

    def generate_interleaved(self, images: torch.Tensor, media_mask: torch.Tensor, prompts: list[str], **options: Any) -> list[str]:
        """images [B, N, 3, H, W], media_mask [B, N], B prompts with ``<image>`` where each goes ->
        B continuations, each up to the end of its chunk."""

    def continuation_log_likelihood(self, images: torch.Tensor, media_mask: torch.Tensor, context: str,
                                    continuations: list[str]) -> torch.Tensor:
        """One interleaved context (images [1, N, 3, H, W]) and C continuations -> the mean
        log-likelihood of each continuation's tokens [C]."""


CAPABILITIES: dict[str, tuple[str, ...]] = {
    "EncodesImage": ("encode_image",),
    "EncodesText": ("encode_text",),
    "TokenSimilarity": ("encode_image_tokens", "encode_text_tokens", "similarity"),
    "ScoresPairs": ("pair_features", "score_pairs"),
    "Generates": ("generate",),
    "ScoresAnswers": ("score_answers",),
    "GeneratesInterleaved": ("generate_interleaved", "continuation_log_likelihood"),
}


def encoder_name(modality: str) -> str:
    """The method that embeds ``modality``: ``encode_<modality>``."""
    return f"encode_{modality}"


def require(module: Any, *methods: str, by: str) -> None:
    """Raise one paragraph if ``module`` lacks any of ``methods`` (naming them, the Protocol they
    belong to, and ``by``: the evaluation that needs them)."""
    missing = [m for m in methods if not callable(getattr(module, m, None))]
    if not missing:
        return
    protocols = sorted({name for name, needs in CAPABILITIES.items() if set(needs) & set(missing)})
    where = f" (lit_vlm.capabilities.{', '.join(protocols)})" if protocols else ""
    raise UserError(
        f"{by} needs {type(module).__name__} to implement {', '.join(missing)}{where}; this family does not. "
        "Remove the callback from the config, or evaluate a family that has the capability"
    )


__all__ = [
    "CAPABILITIES", "EncodesImage", "EncodesText", "Generates", "GeneratesInterleaved", "ScoresAnswers", "ScoresPairs", "TokenSimilarity",
    "encoder_name", "require",
]
