"""Where a run's weights come from: checkpoint files, run directories and foreign state dicts.

- :func:`check_checkpoint` refuses an empty, truncated or corrupt checkpoint with one paragraph,
  before Lightning or ``torch.load`` would end in a traceback;
- :func:`run_checkpoint` finds the ``best`` or ``last`` checkpoint of a run directory through its
  ``checkpoints/index.json``;
- :func:`read_weights` reads what ``init_from`` names and says which layout it was read as: a
  lit-vlm checkpoint here, anything else (OpenAI / open_clip files, Hugging Face directories, state
  dicts in lit-vlm names) through :func:`lit_vlm.interop.read_state_dict`;
- :func:`load_init_from` / :func:`load_parts` put those weights into a family (all of it, or some
  parts), or explain in one paragraph why they do not fit; plain weights go into a LoRA-adapted
  tower's base layers, its adapters starting fresh.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import torch
from torch import nn

from lit_vlm.errors import MissingFileError, UserError

#: The file :class:`lit_vlm.callbacks.Checkpoint` keeps beside a run's checkpoints.
INDEX_FILE = "index.json"
LIGHTNING_LAYOUT = "a lit-vlm (Lightning) checkpoint"


def checkpoint_problem(file: str | Path) -> str | None:
    """Why ``file`` is not a readable ``torch.save`` archive (empty, truncated, damaged), or None.

    Reads the zip directory at the end of the file (a copy or save cut short has none) and checks
    that every member lies within the file, so the problem is caught here rather than deep inside
    ``torch.load``; cheap for any size (the members' bytes are not read)."""
    file = Path(file)
    size = file.stat().st_size
    if size == 0:
        return "the file is empty (0 bytes)"
    if not zipfile.is_zipfile(file):
        return f"the file ({size} bytes) is not a torch.save archive: truncated (a save or copy cut short) or another format"
    try:
        with zipfile.ZipFile(file) as archive:
            if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in archive.namelist()):
                return "the zip archive holds no data.pkl: not a torch.save checkpoint"
            end = max((i.header_offset + i.compress_size for i in archive.infolist()), default=0)
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        return f"the archive is damaged ({err})"
    return f"the archive's members end past the file's {size} bytes (truncated)" if end > size else None


def check_checkpoint(file: str | Path, option: str) -> Path:
    """``file`` if it is an existing, readable checkpoint; else one paragraph naming ``option``."""
    file = Path(file)
    if not file.is_file():
        raise MissingFileError(f"{option}: {file} does not exist or is not a file")
    problem = checkpoint_problem(file)
    if problem:
        raise UserError(
            f"{option}: {file} cannot be read: {problem}. Give another checkpoint (a run's `last` or `best`, "
            "listed in its checkpoints/index.json) or copy the file again"
        )
    return file


def _index_entry(index: Path, which: str) -> Path | None:
    try:
        entry = json.loads(index.read_text()).get(which)
    except (OSError, ValueError, AttributeError) as err:
        raise UserError(f"{index} is not a readable checkpoint index ({err}); pass a checkpoint file instead") from err
    return Path(entry) if entry and Path(entry).is_file() else None


def run_checkpoint(path: str | Path, which: tuple[str, ...], option: str) -> Path:
    """The checkpoint a run directory names: the first of ``which`` ("best", "last") found in the
    ``checkpoints/index.json`` of ``path`` (``runs/<name>``, ``runs/<name>/version_N`` or its
    ``checkpoints/``; the newest version when several)."""
    p = Path(path)
    candidates = [p / INDEX_FILE, p / "checkpoints" / INDEX_FILE]
    candidates += sorted(p.glob(f"version_*/checkpoints/{INDEX_FILE}"), key=lambda f: f.stat().st_mtime, reverse=True)
    for index in (c for c in candidates if c.is_file()):
        for name in which:
            entry = _index_entry(index, name)
            if entry is not None:
                return entry
    raise MissingFileError(
        f"{option}={path}: no checkpoints/index.json naming an existing {' or '.join(which)} checkpoint under this "
        "directory (train that run first, or give a .ckpt path)"
    )


def resolve_init_from(path: str | Path) -> Path:
    """The checkpoint file ``init_from`` names: the file itself, or a run directory's ``best``
    (``last`` when it has none)."""
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        return run_checkpoint(p, ("best", "last"), "model init_from")
    raise MissingFileError(f"model init_from={path}: no such file or directory (train that run first, or fix the path)")


def _lightning_state_dict(file: Path) -> dict[str, torch.Tensor] | None:
    """The ``state_dict`` of a Lightning checkpoint, or None for any other file (read lazily with
    ``mmap``: a foreign file costs no second full read). TorchScript archives are never handed to
    ``torch.load``, which would pass them to ``torch.jit.load`` and run their code."""
    from lit_vlm.interop import is_torchscript_archive

    if file.suffix == ".safetensors" or is_torchscript_archive(file):
        return None
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - not a (readable) torch zip archive: interop decides
        return None
    if isinstance(obj, dict) and "pytorch-lightning_version" in obj and isinstance(obj.get("state_dict"), dict):
        return obj["state_dict"]
    return None


def read_weights(path: str | Path, model: nn.Module | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict ``init_from`` names, on the CPU, in lit-vlm names, and the layout it was read as.

    A lit-vlm checkpoint or run directory is read here (``weights_only``: no code runs); OpenAI /
    open_clip files (``.pt``, ``.bin``, ``.safetensors``, TorchScript, with or without a
    ``state_dict`` wrapper or ``module.`` prefix), Hugging Face ``CLIPModel`` directories and
    plain state dicts go through :func:`lit_vlm.interop.read_state_dict`, which tells them apart
    by their keys."""
    from lit_vlm import interop

    file = Path(path)
    if not file.exists():
        raise MissingFileError(
            f"model init_from={path}: no such file or directory (a lit-vlm run directory or checkpoint: train that "
            "run first; foreign weights: fetch them first, lit-vlm never downloads; or fix the path)"
        )
    if file.is_dir():
        if not any(file.glob(f"**/{INDEX_FILE}")) and (file / "config.json").is_file():
            state_dict, layout = interop.read_state_dict(file, model)  # a Hugging Face model directory
            return adapted_names(state_dict, model), layout
        file = resolve_init_from(file)
    if file.suffix == ".ckpt":
        check_checkpoint(file, f"model init_from={path}")
    state_dict = _lightning_state_dict(file)
    if state_dict is not None:
        state_dict = rename_keys(state_dict, getattr(model, "renamed_keys", {}))
        return adapted_names(state_dict, model), f"{LIGHTNING_LAYOUT} ({file})"
    state_dict, layout = interop.read_state_dict(file, model)
    return adapted_names(state_dict, model), layout


def adapted_names(state_dict: dict[str, torch.Tensor], model: nn.Module | None) -> dict[str, torch.Tensor]:
    """``state_dict`` with each ``x.weight`` (``.bias``) that ``model`` holds as a LoRA-adapted
    ``x.base_layer.weight`` (``peft``'s layers keep the layer they adapt so) under that name."""
    if model is None:
        return state_dict
    own = set(model.state_dict())
    bases = {k.replace(".base_layer.", "."): k for k in own if ".base_layer." in k}
    if not bases:
        return state_dict
    return {(bases.get(k, k) if k not in own else k): v for k, v in state_dict.items()}


def rename_keys(state_dict: dict[str, torch.Tensor], renamed: dict[str, str]) -> dict[str, torch.Tensor]:
    """``state_dict`` with every key that starts with an old prefix of ``renamed`` given the new one."""
    if not renamed:
        return state_dict
    out = {}
    for key, value in state_dict.items():
        old = next((o for o in renamed if key.startswith(o)), None)
        out[key if old is None else renamed[old] + key[len(old):]] = value
    return out


def load_parts(
    module: nn.Module, source: dict[str, torch.Tensor], layout: str, parts: list[str] | None, option: str
) -> list[str]:
    """Copy ``source`` into ``module`` (all of it, or the attributes named in ``parts``, whose every
    tensor must be there), or raise one paragraph naming the layout it was read as and every key
    and shape that disagrees. A ViT's learned positions are resized to the module's grid. Returns
    the names of the loaded tensors."""
    own = module.state_dict()
    if parts is None:
        wanted = list(own)
        unexpected = sorted(set(source) - set(own))
    else:
        for part in parts:
            if not any(k == part or k.startswith(part + ".") for k in own):
                raise UserError(f"model init_from_parts: {type(module).__name__} has no part named {part!r}")
        wanted = [k for k in own if any(k == p or k.startswith(p + ".") for p in parts)]
        unexpected = []
    fresh_adapters = not any(is_adapter_key(k) for k in source)  # plain weights into a LoRA-adapted tower
    missing = [k for k in wanted if k not in source and not (fresh_adapters and is_adapter_key(k))]
    update, mismatched = {}, []
    for key in (k for k in wanted if k in source):
        value = source[key]
        if value.shape != own[key].shape:
            value = _resize_positions(module, key, value, own[key])
        if value.shape != own[key].shape:
            mismatched.append(f"{key}: checkpoint {list(value.shape)} vs model {list(own[key].shape)}")
        update[key] = value
    problems = [
        f"{len(items)} {what} ({', '.join(items[:8])}{f' and {len(items) - 8} more' if len(items) > 8 else ''})"
        for what, items in (("key(s) missing from the checkpoint", missing),
                            ("unexpected key(s) in the checkpoint", unexpected), ("shape mismatch(es)", mismatched))
        if items
    ]
    if problems:
        hint = " Set init_from_parts to load only some parts (e.g. [vision])." if unexpected and not missing and not mismatched else ""
        raise UserError(f"{option}: read as {layout}, it does not fit {type(module).__name__}: " + "; ".join(problems) + "." + hint)
    with torch.no_grad():
        for key, value in update.items():
            own[key].copy_(value)
    return list(update)


def is_adapter_key(key: str) -> bool:
    """A ``peft`` LoRA adapter's tensor (``...lora_A.default.weight``, ``...lora_B...``)."""
    return ".lora_" in key


def _resize_positions(module: nn.Module, key: str, value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A ViT's learned positions [1 + N, D] resized to ``module``'s grid (another image size)."""
    from lit_vlm.modules.vision import VisionTransformer, interpolate_pos_embed

    owner_name, _, attr = key.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if isinstance(owner, VisionTransformer) and attr == "positional_embedding" and value.dim() == 2:
        if value.shape[1] == target.shape[1]:
            try:
                return interpolate_pos_embed(value, owner.grid_size)  # [1 + N', D]
            except ValueError:
                return value
    return value


def load_init_from(module: nn.Module, init_from: str | Path, parts: list[str] | None = None) -> list[str]:
    """``init_from`` (restricted to ``parts``) read and loaded into ``module``; the loaded names."""
    source, layout = read_weights(init_from, model=module)
    return load_parts(module, source, layout, parts, f"model init_from={init_from}")


def load_state_dict(path: str | Path, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """:func:`read_weights` without the layout."""
    return read_weights(path, model)[0]


__all__ = [
    "INDEX_FILE", "check_checkpoint", "checkpoint_problem", "load_init_from", "load_parts", "load_state_dict", "read_weights",
    "adapted_names", "is_adapter_key", "rename_keys", "resolve_init_from", "run_checkpoint",
]
