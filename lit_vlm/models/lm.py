"""Pre-training a causal language model of a standard ``transformers`` architecture from scratch.

No language model can be downloaded here, so the suite trains its own on the synthetic world's text
(:class:`~lit_vlm.datamodules.world_text.WorldTextDataModule`) and writes it as a Hugging Face model
folder (``config.json``, ``model.safetensors``, the tokenizer): the bridges (LLaVA, BLIP-2, ClipCap,
Frozen) then load it with ``AutoModelForCausalLM.from_pretrained`` exactly as they load Vicuna or OPT.

The architecture is any ``transformers`` model type with a causal-LM head (``llama``, ``gpt2``,
``qwen2``, ...), built from ``config`` (that model type's config arguments). The loss is the token
mean of next-token cross-entropy; val/test report the perplexity of the held-out documents, exp of
their token-mean loss, each document counted once under DDP.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lit_vlm.errors import UserError
from lit_vlm.losses import caption_loss, global_token_mean
from lit_vlm.models.base import VLMModule
from lit_vlm.modules import trim_padding


class LanguageModel(VLMModule):
    """A causal LM trained from scratch and exported as a Hugging Face model folder.

    Args:
        architecture: A ``transformers`` model type with a causal-LM head (``llama``, ``gpt2``, ...).
        config: That model type's config arguments (``hidden_size``, ``num_hidden_layers``, ...);
            the vocabulary, special-token ids and context length come from the data.
        vocab_size: Rows of the embedding table; filled from the data by ``lit-vlm``.
        pad_id: The padding token's id; filled from the data.
        tokenizer: The tokenizer folder, copied into the export; filled from the data.
        context_length: Longest sequence (the model's position limit); filled from the data.
        export_to: Folder the trained model is written to when ``fit`` ends (replaced atomically);
            None: ``<run directory>/hf``.

    This family's optimiser defaults: lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8.
    """

    optim_defaults = dict(lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)

    def __init__(
        self,
        architecture: str = "llama",
        config: dict[str, Any] | None = None,
        vocab_size: int | None = None,
        pad_id: int | None = None,
        tokenizer: str | None = None,
        context_length: int | None = None,
        export_to: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        from transformers import AutoConfig, AutoModelForCausalLM

        if vocab_size is None or tokenizer is None:
            raise UserError("LanguageModel needs vocab_size and tokenizer: set them, or let lit-vlm fill them from the data")
        special = self._special_ids(tokenizer, pad_id)
        try:
            hf_config = AutoConfig.for_model(architecture, vocab_size=vocab_size, **special, **(config or {}))
        except (ValueError, TypeError) as exc:
            raise UserError(f"model architecture={architecture!r} with config={config!r}: {exc}") from exc
        if context_length is not None:
            for key in ("max_position_embeddings", "n_positions"):
                if hasattr(hf_config, key) and key not in (config or {}):
                    setattr(hf_config, key, int(context_length))
        self.model = AutoModelForCausalLM.from_config(hf_config)
        self.tokenizer_spec = tokenizer
        self.export_to = export_to
        self._eval: dict[str, list[Tensor]] = {}

    @staticmethod
    def _special_ids(tokenizer: str, pad_id: int | None) -> dict[str, int]:
        from transformers import AutoTokenizer

        if not (Path(tokenizer) / "tokenizer_config.json").is_file() and not (Path(tokenizer) / "tokenizer.json").is_file():
            return {} if pad_id is None else {"pad_token_id": pad_id}
        tok = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
        ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
        if pad_id is not None and ids["pad_token_id"] not in (None, pad_id):
            raise UserError(f"model pad_id={pad_id} disagrees with the tokenizer {tokenizer!r} (pad id {ids['pad_token_id']})")
        return {k: v for k, v in ids.items() if v is not None}

    # ---- steps ---------------------------------------------------------------------------------
    def token_losses(self, batch: dict) -> tuple[Tensor, Tensor]:
        """Per-document summed next-token loss and target count, ([B], [B])."""
        ids, mask = trim_padding(batch["text_ids"], batch["text_mask"])  # [B, L]
        logits = self.model(input_ids=ids, attention_mask=mask.long()).logits  # [B, L, V]
        return caption_loss(logits, ids, mask)

    def forward(self, batch: dict) -> dict[str, Tensor]:
        sums, counts = self.token_losses(batch)
        return {"loss": global_token_mean(sums, counts, gather=self.training)}

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        terms = self(batch)
        self.log_terms("train", terms, batch_size=batch["text_ids"].shape[0])
        return terms["loss"]

    def _eval_step(self, stage: str, batch: dict) -> None:
        sums, counts = self.token_losses(batch)
        self._eval.setdefault(stage, []).append(torch.stack([batch["sample_id"].to(sums), sums.detach(), counts.to(sums)], 1))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step("test", batch)

    def _eval_end(self, stage: str) -> None:
        rows = self._eval.pop(stage, [])
        if not rows:
            return
        table = torch.cat(rows)  # [n, 3]: sample id, summed loss, tokens
        if self.trainer.world_size > 1:
            table = self.all_gather(table).reshape(-1, 3)
        ids, first = torch.unique(table[:, 0], return_inverse=True)  # DDP pads with repeated documents: count each once
        keep = torch.zeros(len(ids), dtype=torch.long, device=table.device).scatter_(0, first, torch.arange(len(first), device=table.device))
        loss = table[keep, 1].sum() / table[keep, 2].sum()
        self.log(f"{stage}/loss", loss, rank_zero_only=False)
        self.log(f"{stage}/perplexity", loss.exp(), rank_zero_only=False)

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    # ---- the Hugging Face folder ---------------------------------------------------------------
    def export(self, folder: str | os.PathLike) -> Path:
        """Write the model and its tokenizer as a Hugging Face folder (a temporary folder beside it,
        renamed over it when complete). Returns the folder."""
        from transformers import AutoTokenizer

        out = Path(folder)
        tmp = out.with_name(f".{out.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(str(tmp), safe_serialization=True)
        if self.tokenizer_spec is not None:
            AutoTokenizer.from_pretrained(self.tokenizer_spec, local_files_only=True).save_pretrained(str(tmp))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        return out

    def on_fit_end(self) -> None:
        if not self.trainer.is_global_zero:
            return
        folder = self.export_to or os.path.join(self.trainer.log_dir or ".", "hf")
        val = self.trainer.callback_metrics.get("val/perplexity")
        out = self.export(folder)
        note = "" if val is None or not math.isfinite(float(val)) else f" (last validation perplexity {float(val):.3f})"
        rank_zero_info(f"Language model: {out}{note}")


__all__ = ["LanguageModel"]
