"""What the families that feed images to a frozen Hugging Face language model share (LLaVA, BLIP-2
stage 2, ClipCap, Frozen): the LM loaded from a local folder in the dtype asked for (decoder-only or
encoder-decoder), how much of it trains (nothing, LoRA adapters through ``peft``, or all of it, each
with its own learning rate), checkpoints that hold only what trains, the adapters written in
``peft``'s own format, and ``generate`` over a prompt of embeddings, decoded by the suite or by the
LM's own ``generate`` (``generate_with``).

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

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lit_vlm import generation
from lit_vlm.errors import UserError
from lit_vlm.losses import caption_loss, global_token_mean
from lit_vlm.models.base import VLMModule
from lit_vlm.models.generating import GeneratingMixin, check_generation_options
from lit_vlm.modules import trim_padding
from lit_vlm.modules.freeze import LORA_KEYS, lock
from lit_vlm.modules.language_model import (
    GENERATE_WITH,
    CausalLM,
    Seq2SeqLM,
    add_lora,
    left_pad,
    load_language_model,
    weights_fingerprint,
)

TRAIN_LM = ("frozen", "lora", "full")


class Bridge(GeneratingMixin, VLMModule):
    """Base of the LM-bridge families (see the module docstring).

    Args:
        language_model: A local Hugging Face LM folder (``config.json``, weights, tokenizer): a causal
            LM, or an encoder-decoder one where the family supports it (BLIP-2); None for a stage
            without one (BLIP-2's stage 1).
        lm_dtype: The dtype the LM's frozen weights are held in: ``float32``, ``bfloat16`` or
            ``float16`` (what trains, adapters included, stays float32).
        train_lm: ``frozen`` (the default), ``lora`` (``peft`` adapters on the LM) or ``full``.
        lora: LoRA options: ``rank`` (8), ``alpha`` (16), ``dropout`` (0.05), ``target_modules``
            (``"all-linear"``: every linear layer but the output head, or a list of module names).
        lm_lr: Learning rate of what trains in the LM (adapters or all weights); None: ``lr``.
        tokenizer: The tokenizer the data was tokenised with (the LM's folder); filled by ``lit-vlm``.
        generation: Default decoding options of ``generate``.
        generate_with: ``suite`` (:func:`lit_vlm.generation.generate`) or ``transformers`` (the LM's
            own ``generate`` with the prompt as ``inputs_embeds``; same options, no ``generator``).
        prefix_after_bos: Prefix families with a decoder-only LM: put the soft prompt after the
            start token (``[bos, prefix, text]``) instead of before it (``[prefix, bos, text]``, OPT's
            BLIP-2 and ClipCap). An LM that only ever saw its start token at position 0 reads the
            first layout as a document it knows.
        end_text: Text (one token of the LM's vocabulary) that ends a prefix family's caption in
            place of the tokenizer's end token, in training and in generation: ``"\n"`` as LAVIS's
            BLIP-2 with OPT, for an LM whose documents never end a caption with its end token.
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
        generate_with: str = "suite",
        prefix_after_bos: bool = False,
        end_text: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if generate_with not in GENERATE_WITH:
            raise UserError(f"model generate_with must be one of {GENERATE_WITH}, got {generate_with!r}")
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
        self.generate_with = generate_with
        self.prefix_after_bos = bool(prefix_after_bos)
        self.end_text = end_text
        self.lm: CausalLM | Seq2SeqLM | None = None
        self.lm_fingerprint: str | None = None
        if self.language_model is not None:
            self.lm = load_language_model(self.language_model, dtype=lm_dtype)
            self.lm_fingerprint = weights_fingerprint(self.lm.model)
            if train_lm == "frozen":
                lock(self.lm)
            elif train_lm == "lora":
                self.lm.model = add_lora(self.lm.model, **(lora or {}), task_type="SEQ_2_SEQ_LM" if self.lm.is_encoder_decoder else "CAUSAL_LM")
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
        """Token-mean next-token loss of the text ``ids`` [B, L] (start token first) with the soft
        prompt [B, K, D] before it, or after its start token (``prefix_after_bos``); ``targets``
        [B, L] bool: which tokens count (default all after the start token). Exact under DDP."""
        ids, mask = trim_padding(ids, mask)  # [B, L]
        mask = mask.bool()
        tok = self.text_tokenizer
        if self.end_text is not None and tok.eos_id is not None:
            ids = ids.masked_fill((ids == tok.eos_id) & mask, self.end_id)  # the caption ends with end_text
        K = prefix.shape[1]
        prefix_mask = torch.ones(prefix.shape[:2], dtype=torch.bool, device=ids.device) if prefix_mask is None else prefix_mask.bool()
        text = self.lm.embed(ids).to(prefix.dtype)  # [B, L, D]
        if self.prefix_after_bos and tok.bos_id is not None:  # [bos, prefix, w_1 ..]
            embeds = torch.cat([text[:, :1], prefix, text[:, 1:]], dim=1)  # [B, 1 + K + L - 1, D]
            emask = torch.cat([mask[:, :1], prefix_mask, mask[:, 1:]], dim=1)
        else:  # [prefix, bos, w_1 ..]
            embeds, emask = torch.cat([prefix, text], dim=1), torch.cat([prefix_mask, mask], dim=1)
        logits = self.lm.forward_embeds(embeds, emask).logits[:, K:]  # [B, L, V]: position t predicts ids[:, t + 1]
        loss_mask = None if targets is None else targets[:, : ids.shape[1]]
        sums, counts = caption_loss(logits, ids, mask, loss_mask=loss_mask)
        return global_token_mean(sums, counts, gather=self.training)

    def forward(self, batch: dict) -> dict[str, Tensor]:
        """A prefix family's training step: the caption's loss after the image's soft prompt."""
        prefix, prefix_mask = self.prefix(batch["image"])
        return {"loss": self.prefix_caption_loss(prefix, prefix_mask, batch["text_ids"], batch["text_mask"])}

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        return {"sample_id": batch["sample_id"], "caption": self.generate(batch["image"])}

    # ---- generation: the prompt as embeddings, decoded by the suite or by transformers ----------
    caption_prompt = ""  # what ``generate`` asks when given no prompt (a prefix family: nothing)

    def generation_prompt(self, images: Tensor, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """The LM's prompt as embeddings [B, T, D], left-padded (mask [B, T]): a prefix family's soft
        prompt, then (decoder-only) the start token and each prompt's tokens, or (encoder-decoder)
        the encoder's input, the prompt's tokens."""
        prefix, prefix_mask = self.prefix(images)  # [B, K, D]
        tok = self.text_tokenizer
        start = [tok.bos_id] if tok.bos_id is not None and not self.lm.is_encoder_decoder else []
        rows = []
        for b, prompt in enumerate(prompts):
            ids = torch.tensor(start + tok.backend.encode(prompt, add_special_tokens=False).ids, dtype=torch.long, device=images.device)
            soft = prefix[b] if prefix_mask is None else prefix[b, prefix_mask[b].bool()]
            text = self.lm.embed(ids).to(soft.dtype)  # [L_b, D]
            cut = len(start) if self.prefix_after_bos else 0
            rows.append(torch.cat([text[:cut], soft, text[cut:]]))  # [K_b + L_b, D]
        return left_pad(rows)

    @torch.no_grad()
    def generate(self, images: Tensor, prompts: list[str] | None = None, max_new_tokens: int | None = None,
                 **options: Any) -> list[str]:
        """images [B, 3, H, W], B prompts (None: the family's default) -> B generated strings."""
        if self.lm is None:  # a stage without an LM (BLIP-2 stage 1) generates with its own decoder
            return super().generate(images, prompts, max_new_tokens, **options)
        merged = self.call_options(options, max_new_tokens, "generate")
        prompts = [self.caption_prompt] * images.shape[0] if prompts is None else list(prompts)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"generate: {len(prompts)} prompts for {images.shape[0]} images")
        tok = self.text_tokenizer
        was_training = self.training
        self.eval()
        try:
            embeds, mask = self.generation_prompt(images, prompts)
            new = self.lm.generate_from_embeds(embeds, mask, eos_id=self.end_id, pad_id=tok.pad_id,
                                               generate_with=self.generate_with, **merged)  # [B, <= max_new_tokens]
        finally:
            self.train(was_training)
        rows = generation.decode_tokens(new, self.end_id, tok.pad_id)
        return [tok.backend.decode(r, skip_special_tokens=True).strip() for r in rows]

    @property
    def end_id(self) -> int | None:
        """The token that ends generated text: ``end_text``'s, else the tokenizer's end token."""
        tok = self.text_tokenizer
        if self.end_text is None:
            return tok.eos_id
        ids = tok.backend.encode(self.end_text, add_special_tokens=False).ids
        if len(ids) != 1:
            raise UserError(f"model end_text={self.end_text!r} is {len(ids)} tokens of the language model's tokenizer; it must be one")
        return ids[0]

    def generation_context(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """The soft prompt before the start token: what answer ranking (``score_answers``) reads."""
        if self.prefix_after_bos or self.lm.is_encoder_decoder:
            raise UserError(f"{type(self).__name__}: answer ranking reads the soft prompt before the start token of a "
                            "decoder-only LM; generate answers instead (VQA mode: generate)")
        return self.prefix(images)

    def generation_decoder(self) -> CausalLM | Seq2SeqLM:
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
