"""Freezing a tower, or any ``nn.Module`` (a Hugging Face model included): open_clip's ``lock()``
as a building block, and LoRA on a frozen tower.

:func:`lock` sets ``requires_grad=False`` on the module's parameters (so :func:`lit_vlm.optim.param_groups`
leaves them out of the optimiser: no AdamW state), unlocks the last ``unlocked_groups`` layer groups
and, optionally, every normalisation layer, and keeps the fully frozen submodules in eval mode even
when their owner is switched to training (dropout off, batch-norm statistics fixed).
:func:`vit_groups` gives a lit-vlm ViT's layer groups as open_clip counts them.
:func:`add_tower_lora` puts ``peft`` LoRA adapters on a lit-vlm tower (LanguageBind tunes its
modality towers so); :func:`adapters_off` runs a tower as it was before them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import nn

from lit_vlm.errors import UserError

NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)

Group = Sequence[nn.Module | nn.Parameter]


class _EvalOnly:
    """``train`` of a frozen module: eval mode whatever is asked, but for the ``keep`` submodules
    (a LoRA adapter's dropout), which follow the mode. An instance attribute of that module only;
    picklable, and ``copy.deepcopy`` points the copy's at the copy."""

    def __init__(self, module: nn.Module, keep: Sequence[nn.Module] = ()) -> None:
        self.module, self.keep = module, list(keep)

    def __call__(self, mode: bool = True) -> nn.Module:
        nn.Module.train(self.module, False)
        for sub in self.keep:
            sub.train(mode)
        return self.module


def _stay_in_eval(module: nn.Module, keep: Sequence[nn.Module] = ()) -> None:
    module.train = _EvalOnly(module, keep)  # type: ignore[method-assign]
    module.eval()


def lock(
    module: nn.Module | Sequence[nn.Module],
    groups: Sequence[Group] | None = None,
    unlocked_groups: int = 0,
    unlock_norms: bool = False,
    what: str = "module",
) -> list[nn.Module]:
    """Freeze ``module`` except its last ``unlocked_groups`` of ``groups`` (input first; needed
    when ``unlocked_groups > 0``) and, with ``unlock_norms``, its normalisation layers. The
    submodules left fully frozen stay in eval mode. Returns them.

    Args:
        module: What to freeze (a tower, a projection, a Hugging Face model, ...), or several.
        groups: The layer groups of ``module``, input first (e.g. :func:`vit_groups`).
        unlocked_groups: How many of the last groups stay trainable (0: none).
        unlock_norms: Keep every normalisation layer trainable (their statistics stay fixed).
        what: The option's name, for error messages.
    """
    modules = [module] if isinstance(module, nn.Module) else list(module)
    for m in modules:
        m.requires_grad_(False)
    frozen: list[nn.Module] = modules
    if unlocked_groups:
        if groups is None or not 0 <= unlocked_groups <= len(groups):
            limit = "no layer groups given" if groups is None else f"[0, {len(groups)}] for this tower"
            raise UserError(f"{what}_unlocked_groups must be in {limit}, got {unlocked_groups}")
        cut = len(groups) - unlocked_groups
        for group in groups[cut:]:
            for item in group:
                item.requires_grad_(True)
        frozen = [m for g in groups[:cut] for m in g if isinstance(m, nn.Module)]
    if unlock_norms:
        for sub in (s for m in modules for s in m.modules()):
            if isinstance(sub, NORM_LAYERS):
                sub.requires_grad_(True)
    for sub in frozen:
        _stay_in_eval(sub)
    return frozen


def vit_groups(vision: Any) -> list[list[nn.Module | nn.Parameter]]:
    """A lit-vlm ViT's layer groups, input first, as open_clip's ``lock_image_tower`` counts them:
    [stem: patch embedding, class and positional embeddings, ln_pre], one per block but the last,
    [last block, attention pooler, ln_post]."""
    from lit_vlm.modules.vision import VisionTransformer

    if not isinstance(vision, VisionTransformer):
        raise UserError(f"unlocking layer groups needs a lit_vlm VisionTransformer, got {type(vision).__name__}")
    blocks = list(vision.transformer.blocks)
    stem = [vision.conv1, vision.class_embedding, vision.positional_embedding, vision.ln_pre]
    head = [*blocks[-1:], *([vision.attn_pool] if vision.attn_pool is not None else []), vision.ln_post]
    return [stem, *[[b] for b in blocks[:-1]], head]


#: LoRA options of a tower (``peft``'s ``LoraConfig`` under the names the bridges use).
LORA_KEYS = ("rank", "alpha", "dropout", "target_modules")


def add_tower_lora(tower: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                   target_modules: list[str] | None = None, what: str = "model lora") -> list[str]:
    """Put ``peft`` LoRA adapters on ``tower`` in place and freeze everything else in it. B starts
    at zero, so the tower computes what it did; its frozen layers stay in eval mode (batch-norm
    statistics fixed), the adapters' dropout follows training. A loaded checkpoint's ``x.weight``
    is the adapted layer's ``x.base_layer.weight`` (:func:`lit_vlm.weights.read_weights`).

    Args:
        tower: A lit-vlm tower (or any ``nn.Module`` with linear or convolution layers).
        rank, alpha, dropout: LoRA's r, alpha (the update is scaled by alpha / r) and dropout.
        target_modules: Layer names as ``peft`` matches them (a name or a dotted suffix, e.g.
            ``[qkv, proj]``); None: every linear and 2-D convolution layer.
        what: The option's name, for error messages.
    Returns the adapted layers' names.
    """
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    if rank < 1:
        raise UserError(f"{what} rank must be >= 1, got {rank}")
    names = list(target_modules) if target_modules is not None else [
        n for n, m in tower.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=names, bias="none")
    try:
        inject_adapter_in_model(config, tower)
    except ValueError as exc:
        layers = [n for n, m in tower.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        raise UserError(f"{what} target_modules={target_modules!r} on {type(tower).__name__}: {exc} Its linear and "
                        f"convolution layers: {', '.join(layers[:12])}{' ...' if len(layers) > 12 else ''}") from exc
    adapted = [n for n, m in tower.named_modules() if isinstance(m, BaseTunerLayer)]
    _stay_in_eval(tower, keep=[d for n in adapted for d in tower.get_submodule(n).lora_dropout.values()])
    return adapted


@contextmanager
def adapters_off(tower: nn.Module) -> Iterator[nn.Module]:
    """Run ``tower`` without its LoRA adapters (as it was before :func:`add_tower_lora`)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in tower.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield tower
    finally:
        for layer in layers:
            layer.enable_adapters(True)


__all__ = ["LORA_KEYS", "NORM_LAYERS", "adapters_off", "add_tower_lora", "lock", "vit_groups"]
