"""Test doubles: a tiny LightningModule with the ``generate`` capability, so the captioning and VQA
callbacks can be exercised (also through the CLI and under DDP) before generative families exist.

``generate`` is deterministic and depends only on each image's pixels and its prompt, so any number of
processes produce the same text for the same sample. Importable by the CLI as
``doubles.GeneratingDouble`` when ``tests/`` is on ``PYTHONPATH``.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch

COLOURS = ("red", "green", "blue")
WORDS = ("circle", "square", "star", "two", "yes", "no", "a", "the", "large", "small")


class GeneratingDouble(pl.LightningModule):
    """Answers and captions from the image's dominant channel and brightness; embeddings from
    fixed random projections (pixels for images, a bag of token ids for texts), so retrieval and
    zero-shot callbacks run on it too.

    Args:
        vocab_size: Unused by ``generate``; accepted so CLI soft links can fill it.
        context_length: Unused; accepted so CLI soft links can fill it.
        image_size: Unused; accepted so CLI soft links can fill it.
    """

    def __init__(self, vocab_size: int | None = None, context_length: int | None = None, image_size: int | None = None) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))  # Lightning wants a parameter
        self.embed_dim = 8

    def _projection(self, rows: int, seed: int) -> torch.Tensor:
        return torch.randn(rows, self.embed_dim, generator=torch.Generator().manual_seed(seed))  # [rows, E]

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """images [B, 3, H, W] -> [B, E]: colour means and a pixel projection, mixed."""
        flat = images.float().flatten(1)  # [B, 3HW]
        emb = flat @ self._projection(flat.shape[1], 1) / flat.shape[1] ** 0.5  # [B, E]
        emb[:, :3] += 4 * images.float().mean(dim=(2, 3))  # colour channels dominate
        return torch.nn.functional.normalize(emb, dim=-1) if normalize else emb

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor | None = None, normalize: bool = True) -> torch.Tensor:
        """ids [N, L] -> [N, E]: a projection of the bag of (unmasked) token ids."""
        weights = mask.float() if mask is not None else torch.ones_like(ids, dtype=torch.float)  # [N, L]
        table = self._projection(4096, 2)  # [V, E], a fixed size so every call draws the same table
        emb = (table[ids % 4096] * weights[..., None]).sum(1)  # [N, E]
        return torch.nn.functional.normalize(emb, dim=-1) if normalize else emb

    def generate(self, images: torch.Tensor, prompts: list[str] | None = None, max_new_tokens: int = 20) -> list[str]:
        """images [B, 3, H, W], prompts: B strings or None -> B generated strings."""
        means = images.float().mean(dim=(2, 3))  # [B, 3]
        out = []
        for i in range(images.shape[0]):
            colour = COLOURS[int(means[i].argmax())]
            k = int((means[i].sum() * 1000).round().abs()) % len(WORDS)
            if prompts is None:
                out.append(f"a {colour} {WORDS[k]} and a {WORDS[(k + 3) % len(WORDS)]} shape")
            else:
                salt = sum(map(ord, prompts[i])) % len(WORDS)
                out.append(WORDS[(k + salt) % len(WORDS)] if salt % 3 else colour)
        return out

    def test_step(self, batch, batch_idx):
        pass

    def predict_step(self, batch, batch_idx):
        """What ``lit-vlm predict`` writes: an embedding and a caption per sample."""
        return {"sample_id": batch["sample_id"], "image_emb": self.encode_image(batch["image"]),
                "caption": self.generate(batch["image"])}

    def validation_step(self, batch, batch_idx):
        pass

    def training_step(self, batch, batch_idx):
        return self.weight * 0.0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class InterleavedDouble(GeneratingDouble):
    """``GeneratingDouble`` with the ``GeneratesInterleaved`` capability, for few-shot evaluation:
    each continuation depends on every given image and on the whole prompt (demonstrations
    included), and on nothing else, so batches and ranks cannot change it."""

    def _salt(self, images: torch.Tensor, media_mask: torch.Tensor, text: str) -> int:
        """images [N, 3, H, W], media_mask [N] -> an integer of the given images' pixels and the text."""
        pixels = images[media_mask].float().mean(dim=(1, 2, 3))  # [n]
        return int((pixels * 1000).round().abs().sum()) + sum(map(ord, text))

    def generate_interleaved(self, images: torch.Tensor, media_mask: torch.Tensor, prompts: list[str], **options) -> list[str]:
        """images [B, N, 3, H, W], media_mask [B, N] -> B short texts (a colour and a word)."""
        out = []
        for b, prompt in enumerate(prompts):
            salt = self._salt(images[b], media_mask[b], prompt)
            out.append(f"{COLOURS[salt % 3]} {WORDS[salt % len(WORDS)]}")
        return out

    def continuation_log_likelihood(self, images: torch.Tensor, media_mask: torch.Tensor, context: str,
                                    continuations: list[str]) -> torch.Tensor:
        """images [1, N, 3, H, W] -> [C] scores from the context's salt and each continuation."""
        salt = self._salt(images[0], media_mask[0], context)
        return torch.tensor([float((salt * 31 + sum(map(ord, c))) % 97) for c in continuations])  # [C]
