"""MAE: Masked Autoencoders Are Scalable Vision Learners (He et al., 2022).

image -> patches -> keep a random 25% per sample (argsort of noise) -> ViT encoder on the visible
patches only -> linear to the decoder width -> append mask tokens, restore the patch order, add
the decoder's own positional embeddings -> light transformer decoder -> per-patch pixel prediction
loss = mean squared error on the **masked** patches only, against the pixels of each patch
(normalised per patch with ``norm_pix_loss``, the paper's better setting).

The encoder is the shared :class:`~lit_vlm.modules.VisionTransformer` (attribute ``vision``), so
the pretrained tower loads into any family: ``init_from: runs/mae-...`` (the run's best
checkpoint) with ``init_from_parts: [vision]`` on CLIP, CoCa, BLIP..., whose ``vision`` must have
the same shape. At the end of ``fit`` the tower is also written on its own, as a plain state dict
(``{"vision.<name>": tensor}``), to ``vision_encoder.pt`` in the run's directory.

Reconstructions of a few validation images (original | masked input | reconstruction with the
visible patches pasted back) are logged to TensorBoard as images at every validation.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lit_vlm.errors import UserError
from lit_vlm.losses import mae_loss
from lit_vlm.models.base import VLMModule
from lit_vlm.modules import Transformer, VisionTransformer

log = logging.getLogger("lit_vlm")


def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, N, p*p*C], patches in raster order, each (row, column, channel)."""
    B, C, H, W = images.shape
    if H % p or W % p:
        raise UserError(f"image size {H}x{W} must be divisible by the patch size {p}")
    x = images.reshape(B, C, H // p, p, W // p, p)  # [B, C, gh, p, gw, p]
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(patches: torch.Tensor, p: int, grid: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify`: [B, N, p*p*C] -> [B, C, gh*p, gw*p]."""
    B = patches.shape[0]
    gh, gw = grid
    x = patches.reshape(B, gh, gw, p, p, channels).permute(0, 5, 1, 3, 2, 4)  # [B, C, gh, p, gw, p]
    return x.reshape(B, channels, gh * p, gw * p)


class MAE(VLMModule):
    """Masked autoencoder pre-training of a ViT image tower (images only; captions are ignored).

    Args:
        vision: The encoder, a :class:`VisionTransformer` (``image_size`` from the data).
        mask_ratio: Fraction of patches removed per sample (0.75 in the paper).
        decoder_width: Width of the light decoder (512 in the paper).
        decoder_layers: Decoder blocks (8 in the paper).
        decoder_heads: Decoder attention heads.
        norm_pix_loss: Normalise every target patch by its mean and variance.
        num_reconstructions: Validation images whose reconstructions are logged (0: none).

    Optimiser, schedule, accumulation and ``init_from`` arguments are :class:`VLMModule`'s; this
    family's optimiser defaults: lr=1.5e-4, weight_decay=0.05, betas=(0.9, 0.95), eps=1e-8.
    """

    optim_defaults = dict(lr=1.5e-4, weight_decay=0.05, betas=(0.9, 0.95), eps=1e-8)

    def __init__(
        self,
        vision: VisionTransformer,
        mask_ratio: float = 0.75,
        decoder_width: int = 512,
        decoder_layers: int = 8,
        decoder_heads: int = 16,
        norm_pix_loss: bool = True,
        num_reconstructions: int = 8,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 < mask_ratio < 1.0:
            raise UserError(f"model mask_ratio must be in (0, 1), got {mask_ratio}")
        if num_reconstructions < 0:
            raise UserError(f"model num_reconstructions must be >= 0, got {num_reconstructions}")
        if vision.stem != "patch":
            log.info("MAE with a convolutional stem: the convolutions see whole images, masking acts on their patch tokens")
        self.vision = vision
        self.mask_ratio = float(mask_ratio)
        self.norm_pix_loss = norm_pix_loss
        self.num_reconstructions = num_reconstructions
        p = vision.patch_size
        self.decoder_embed = nn.Linear(vision.width, decoder_width)
        self.mask_token = nn.Parameter(torch.zeros(decoder_width))  # [Dd]
        self.decoder_pos_embed = nn.Parameter(torch.randn(1 + vision.num_patches, decoder_width) * 0.02)  # [1+N, Dd]
        self.decoder = Transformer(decoder_width, decoder_layers, decoder_heads)
        self.decoder_norm = nn.LayerNorm(decoder_width)
        self.decoder_pred = nn.Linear(decoder_width, p * p * 3)
        nn.init.normal_(self.mask_token, std=0.02)
        self._shown: torch.Tensor | None = None

    def reconstruct(self, images: torch.Tensor, noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """images [B, 3, H, W] -> {"pred" [B, N, P], "target" [B, N, P], "mask" [B, N]}."""
        tokens, mask, ids_restore = self.vision.forward_masked(images, self.mask_ratio, noise)  # [B, 1+N', D]
        x = self.decoder_embed(tokens)  # [B, 1+N', Dd]
        B, N = mask.shape
        fill = self.mask_token.to(x.dtype).expand(B, N + 1 - x.shape[1], -1)  # [B, N-N', Dd]
        patches = torch.cat([x[:, 1:], fill], dim=1)  # [B, N, Dd] in shuffled order
        patches = torch.gather(patches, 1, ids_restore[:, :, None].expand(-1, -1, x.shape[-1]))  # patch order
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed.to(x.dtype)  # [B, 1+N, Dd]
        x, _ = self.decoder(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]  # [B, N, P]
        return {"pred": pred, "target": patchify(images, self.vision.patch_size), "mask": mask}

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        out = self.reconstruct(batch["image"])
        loss = mae_loss(out["pred"], out["target"], out["mask"], self.norm_pix_loss)
        return {"loss": loss}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.evaluation_step("val", batch)
        if batch_idx == 0 and self.num_reconstructions:
            self._log_reconstructions(batch["image"][: self.num_reconstructions])

    # ---- reconstructions and export ---------------------------------------------------------------
    def reconstruction_grid(self, images: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Rows of (original | masked input | reconstruction, visible patches pasted back), in
        model-input units: [3, B*H, 3*W]."""
        p = self.vision.patch_size
        grid = (images.shape[-2] // p, images.shape[-1] // p)
        out = self.reconstruct(images, noise)
        pred = out["pred"].float()
        if self.norm_pix_loss:  # back to pixels with each patch's own statistics
            t = out["target"].float()
            pred = pred * (t.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + t.mean(dim=-1, keepdim=True)
        m = out["mask"][:, :, None]  # [B, N, 1]
        masked = unpatchify(out["target"] * (1 - m), p, grid)
        pasted = unpatchify(out["target"] * (1 - m) + pred * m, p, grid)
        rows = torch.cat([images.float(), masked, pasted], dim=3)  # [B, 3, H, 3W]
        return torch.cat(list(rows), dim=1)  # [3, B*H, 3W]

    def _log_reconstructions(self, images: torch.Tensor) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger

        logger = next((lg for lg in (self.loggers or []) if isinstance(lg, TensorBoardLogger)), None)
        if logger is None or self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        grid = self.reconstruction_grid(images, torch.rand(images.shape[0], self.vision.num_patches,
                                                           generator=torch.Generator().manual_seed(0)).to(images.device))
        dm = getattr(self.trainer, "datamodule", None)
        mean, std = getattr(dm, "mean", (0.5,) * 3), getattr(dm, "std", (0.5,) * 3)
        grid = grid.cpu() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
        logger.experiment.add_image("val/mae/reconstructions", grid.clamp(0, 1), self.global_step, dataformats="CHW")

    def export_vision(self, path: str | Path) -> Path:
        """Write the encoder as a plain state dict ``{"vision.<name>": tensor}`` (load it into any
        family with ``init_from: <path>`` and ``init_from_parts: [vision]``)."""
        from lit_vlm.io import atomic_output

        path = Path(path)
        state = {f"vision.{k}": v.detach().cpu().clone() for k, v in self.vision.state_dict().items()}
        with atomic_output(path) as tmp:
            torch.save(state, tmp)
        return path

    def on_fit_end(self) -> None:
        trainer = self.trainer
        log_dir = trainer.log_dir  # a collective under DDP: every rank reads it
        if trainer.is_global_zero and log_dir:
            path = self.export_vision(Path(log_dir) / "vision_encoder.pt")
            log.info("MAE: image tower written to %s (init_from it with init_from_parts: [vision])", path)


__all__ = ["MAE", "mae_loss", "patchify", "unpatchify"]
