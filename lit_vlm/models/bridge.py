"""What the families that feed images to a frozen Hugging Face language model share (LLaVA, BLIP-2
stage 2, ClipCap, Frozen): the LM loaded from a local folder in the dtype asked for, how much of it
trains (nothing, LoRA adapters through ``peft``, or all of it, each with its own learning rate),
checkpoints that hold only what trains, and the adapters written in ``peft``'s own format.

A checkpoint records the LM's folder and :func:`~lit_vlm.modules.language_model.weights_fingerprint`
and leaves the LM's frozen weights out (they are the folder's); loading it onto another LM is
refused with a message that names both. With LoRA the adapters are also saved, when ``fit`` ends,
as ``<run>/adapter`` (``adapter_config.json`` + ``adapter_model.safetensors``), which ``peft`` loads
and ``lit-vlm lm merge`` folds into a full model folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lit_vlm.errors import UserError
from lit_vlm.losses import caption_loss, global_token_mean
from lit_vlm.models.base import VLMModule
from lit_vlm.models.generating import GeneratingMixin, check_generation_options
from lit_vlm.modules import trim_padding
from lit_vlm.modules.freeze import lock
from lit_vlm.modules.language_model import CausalLM, add_lora, weights_fingerprint

TRAIN_LM = ("frozen", "lora", "full")
LORA_KEYS = ("rank", "alpha", "dropout", "target_modules")


class Bridge(GeneratingMixin, VLMModule):
    """Base of the LM-bridge families (see the module docstring).

    Args:
        language_model: A local Hugging Face causal-LM folder (``config.json``, weights, tokenizer);
            None for a stage without one (BLIP-2's stage 1).
        lm_dtype: The dtype the LM's frozen weights are held in: ``float32``, ``bfloat16`` or
            ``float16`` (what trains, adapters included, stays float32).
        train_lm: ``frozen`` (the default), ``lora`` (``peft`` adapters on the LM) or ``full``.
        lora: LoRA options: ``rank`` (8), ``alpha`` (16), ``dropout`` (0.05), ``target_modules``
            (``"all-linear"``: every linear layer but the output head, or a list of module names).
        lm_lr: Learning rate of what trains in the LM (adapters or all weights); None: ``lr``.
        tokenizer: The tokenizer the data was tokenised with (the LM's folder); filled by ``lit-vlm``.
        generation: Default decoding options of ``generate``.
    """

    def __init__(
        self,
        language_model: str | None = None,
        lm_dtype: str = "float32",
        train_lm: str = "frozen",
        lora: dict[str, Any] | None = None,
        lm_lr: float | None = None,
        tokenizer: str | None = None,
        generation: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if train_lm not in TRAIN_LM:
            raise UserError(f"model train_lm must be one of {TRAIN_LM}, got {train_lm!r}")
        unknown = sorted(set(lora or {}) - set(LORA_KEYS))
        if unknown:
            raise UserError(f"model lora: unknown option(s) {unknown}; valid: {list(LORA_KEYS)}")
        if lora and train_lm != "lora":
            raise UserError(f"model lora options are set but train_lm={train_lm!r}: set train_lm: lora")
        if lm_dtype != "float32" and train_lm == "full":
            raise UserError(f"model train_lm=full trains the LM's own weights: keep lm_dtype float32 (got {lm_dtype!r})")
        if lm_lr is not None and lm_lr <= 0:
            raise UserError(f"model lm_lr must be > 0, got {lm_lr}")
        self.language_model = None if language_model is None else str(language_model)
        self.train_lm = train_lm
        self.lm_lr = lm_lr
        self.lm: CausalLM | None = None
        self.lm_fingerprint: str | None = None
        if self.language_model is not None:
            self.lm = CausalLM.from_pretrained(self.language_model, dtype=lm_dtype)
            self.lm_fingerprint = weights_fingerprint(self.lm.model)
            if train_lm == "frozen":
                lock(self.lm)
            elif train_lm == "lora":
                self.lm.model = add_lora(self.lm.model, **(lora or {}))  # freezes the base weights
                self.lm.model.peft_config["default"].base_model_name_or_path = self.language_model
        self.tokenizer_spec = tokenizer or self.language_model
        self.generation_options = check_generation_options(generation)

    # ---- prefix bridges (ClipCap, Frozen, BLIP-2): image embeddings before the text -------------
    # A family implements ``prefix``; ``forward``, ``predict_step`` and ``generate`` follow.
    def prefix(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """The family's soft prompt: embeddings [B, K, D_lm] (and a mask [B, K] or None) of images."""
        raise NotImplementedError

    def prefix_caption_loss(self, prefix: Tensor, prefix_mask: Tensor | None, ids: Tensor, mask: Tensor,
                            targets: Tensor | None = None) -> Tensor:
        """Token-mean next-token loss of the text ``ids`` [B, L] after the soft prompt (``targets``
        [B, L] bool: which tokens count; default all after the start token), exact under DDP."""
        ids, mask = trim_padding(ids, mask)  # [B, L]
        logits = self.lm(ids, mask.bool(), context=prefix, context_mask=prefix_mask).logits  # [B, L, V]
        loss_mask = None if targets is None else targets[:, : ids.shape[1]]
        sums, counts = caption_loss(logits, ids, mask.bool(), loss_mask=loss_mask)
        return global_token_mean(sums, counts, gather=self.training)

    def forward(self, batch: dict) -> dict[str, Tensor]:
        """A prefix family's training step: the caption's loss after the image's soft prompt."""
        prefix, prefix_mask = self.prefix(batch["image"])
        return {"loss": self.prefix_caption_loss(prefix, prefix_mask, batch["text_ids"], batch["text_mask"])}

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        return {"sample_id": batch["sample_id"], "caption": self.generate(batch["image"])}

    def generation_context(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        return self.prefix(images)

    def generation_decoder(self) -> CausalLM:
        return self.lm

    # ---- optimisation: the LM's trainables at their own learning rate --------------------------
    def group_lrs(self) -> dict[str, float]:
        if self.lm is None or self.lm_lr is None or self.train_lm == "frozen":
            return {}
        return {"lm.": self.lm_lr}

    def trainable_counts(self) -> dict[str, int]:
        """Trainable and total parameters, overall and in the LM."""
        def count(params, trainable: bool) -> int:
            return sum(p.numel() for p in params if p.requires_grad or not trainable)

        lm = [] if self.lm is None else list(self.lm.parameters())
        return {"trainable": count(self.parameters(), True), "total": count(self.parameters(), False),
                "lm_trainable": count(lm, True), "lm_total": count(lm, False)}

    def on_fit_start(self) -> None:
        counts = self.trainable_counts()
        rank_zero_info(f"{type(self).__name__}: {counts['trainable']:,} of {counts['total']:,} parameters train "
                       f"({counts['lm_trainable']:,} of the language model's {counts['lm_total']:,}; train_lm={self.train_lm})")
        if self.logger is not None:
            self.logger.log_metrics({f"params/{k}": float(v) for k, v in counts.items()}, step=0)

    # ---- checkpoints: what trains, and which LM ------------------------------------------------
    def _lm_keys_left_out(self) -> list[str]:
        """State-dict keys of the LM that are not trained (its folder provides them)."""
        if self.lm is None:
            return []
        trained = {f"lm.{n}" for n, p in self.lm.named_parameters() if p.requires_grad}
        return [k for k in self.state_dict() if k.startswith("lm.") and k not in trained]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.lm is None:
            return
        keys = self._lm_keys_left_out()
        for key in keys:
            checkpoint["state_dict"].pop(key, None)
        checkpoint["language_model"] = {"path": self.language_model, "fingerprint": self.lm_fingerprint, "left_out": len(keys)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("language_model")
        if saved is None or self.lm is None:
            return
        if saved["fingerprint"] != self.lm_fingerprint:
            raise UserError(
                f"this checkpoint was trained on the language model at {saved['path']!r} (weights fingerprint "
                f"{saved['fingerprint']}); the model's language_model={self.language_model!r} has other weights "
                f"(fingerprint {self.lm_fingerprint}). Point language_model at the LM the run was trained with"
            )
        own = self.state_dict()
        checkpoint["state_dict"].update({k: own[k] for k in self._lm_keys_left_out()})

    def on_fit_end(self) -> None:
        if self.lm is None or self.train_lm != "lora" or not self.trainer.is_global_zero:
            return
        folder = Path(self.trainer.log_dir or ".") / "adapter"
        self.lm.model.save_pretrained(str(folder))
        rank_zero_info(f"LoRA adapter (peft format): {folder}; merge it with `lit-vlm lm merge {folder} --out DIR`")


def merge_adapter(adapter: str | os.PathLike, out: str | os.PathLike, base: str | None = None) -> Path:
    """Fold a ``peft`` LoRA adapter into its base LM and write a full Hugging Face model folder
    (weights and tokenizer) that loads without ``peft``. ``base``: the LM folder (default: the
    adapter's ``base_model_name_or_path``)."""
    import json

    from peft import PeftModel
    from transformers import AutoTokenizer

    adapter = Path(adapter)
    config_file = adapter / "adapter_config.json"
    if not config_file.is_file():
        raise UserError(f"{adapter}: no adapter_config.json there (a peft adapter folder, e.g. runs/<name>/version_N/adapter)")
    base = base or json.loads(config_file.read_text()).get("base_model_name_or_path")
    if not base:
        raise UserError(f"{config_file} names no base model: give --base LM_FOLDER")
    lm = CausalLM.from_pretrained(base)
    merged = PeftModel.from_pretrained(lm.model, str(adapter)).merge_and_unload()
    out = Path(out)
    merged.save_pretrained(str(out), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(base), local_files_only=True).save_pretrained(str(out))
    return out


def merge_main(argv: list[str] | None = None) -> int:
    """``lit-vlm lm merge ADAPTER --out DIR [--base LM]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="lit-vlm lm merge", description=merge_adapter.__doc__.split("\n\n")[0])
    parser.add_argument("adapter", help="a peft adapter folder (a bridge run's <run>/adapter)")
    parser.add_argument("--out", required=True, help="folder for the merged model (written by save_pretrained)")
    parser.add_argument("--base", default=None, help="the base LM folder (default: the adapter's base_model_name_or_path)")
    args = parser.parse_args(argv)
    out = merge_adapter(args.adapter, args.out, args.base)
    print(f"merged model: {out}")
    return 0


__all__ = ["Bridge", "merge_adapter", "merge_main"]
