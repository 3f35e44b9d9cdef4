"""Load and export CLIP weights: OpenAI, open_clip and Hugging Face ``CLIPModel`` checkpoints.

The shared towers (:class:`~lit_vlm.modules.VisionTransformer`,
:class:`~lit_vlm.modules.TextTransformer`) hold these ViT CLIP weights exactly; this module
maps the key names and infers the architecture. Converted state dicts use the names of the CLIP
family (:class:`lit_vlm.models.clip.CLIP`)::

    vision.*                 the image tower        (OpenAI ``visual.*``, HF ``vision_model.*``)
    text.*                   the text tower         (OpenAI top-level keys, HF ``text_model.*``)
    image_projection.weight  [E, Wv]                (OpenAI ``visual.proj`` [Wv, E] transposed,
                                                     HF ``visual_projection.weight``)
    text_projection.weight   [E, Wt]                (OpenAI ``text_projection`` [Wt, E] transposed,
                                                     HF ``text_projection.weight``)
    logit_scale              []  log temperature    (the same in all three)

so ``load_into(clip_model, state_dict)`` fills a whole CLIP module and
``load_into(tower, state_dict, prefix="vision.")`` a single tower (LiT, FLIP, ...).

Block keys (per layer ``i``; lit-vlm ``transformer.blocks.i.`` first):

=================  ==============================  ===================================
lit-vlm            OpenAI / open_clip              Hugging Face
=================  ==============================  ===================================
``ln_1``           ``ln_1``                        ``layer_norm1``
``attn.qkv``       ``attn.in_proj_{weight,bias}``  ``self_attn.{q,k,v}_proj`` (concat)
``attn.proj``      ``attn.out_proj``               ``self_attn.out_proj``
``ln_2``           ``ln_2``                        ``layer_norm2``
``mlp.fc1``        ``mlp.c_fc``                    ``mlp.fc1``
``mlp.fc2``        ``mlp.c_proj``                  ``mlp.fc2``
``ls_1/2.gamma``   ``ls_1/2.gamma`` (open_clip)    (none)
=================  ==============================  ===================================

What a checkpoint does not record and must be known: the MLP activation (OpenAI weights use
QuickGELU, open_clip models trained from scratch usually exact GELU; Hugging Face says it in
``hidden_act``) and, for OpenAI / open_clip files, the number of attention heads (OpenAI's rule
``width // 64`` is the default; pass ``vision_heads`` / ``text_heads`` or a ``preset`` otherwise).

Safety: nothing here unpickles arbitrary objects. ``.pt`` / ``.bin`` files are read with
``torch.load(weights_only=True)``, ``.safetensors`` with safetensors, and the TorchScript
archives OpenAI distributes (``ViT-B-32.pt`` ...) with a restricted unpickler that only rebuilds
tensors and never compiles or runs the archive's code.

Only ViT towers are supported: ModifiedResNet image towers (RN50, ...), attention-pooled or
timm-based open_clip towers and SigLIP checkpoints are refused with a message naming the keys.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import shutil
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lit_vlm.errors import MissingFileError, UserError
from lit_vlm.modules.presets import CLIP_PRESETS, TEXT_PRESETS, VISION_PRESETS
from lit_vlm.modules.text import TextTransformer
from lit_vlm.modules.vision import VisionTransformer

StateDict = dict[str, Tensor]

# Hugging Face ``hidden_act`` -> our ``act_layer``; and back (the first HF name wins on export).
HF_ACT_TO_LIT = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
LIT_ACT_TO_HF = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}

# Hugging Face CLIPVisionConfig / CLIPTextConfig defaults, for config.json files that omit values.
_HF_VISION_DEFAULTS: dict[str, Any] = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, num_channels=3,
    image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5,
)
_HF_TEXT_DEFAULTS: dict[str, Any] = dict(
    vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    pad_token_id=1, bos_token_id=49406, eos_token_id=49407,
)
# HF CLIPTextModel pools with argmax(input_ids) when eos_token_id == 2 (configs written before
# transformers PR #24773), else at the first eos_token_id.
_HF_LEGACY_EOS_ID = 2

# keys that carry no weights: OpenAI's scalar hyper-parameter buffers, non-persistent ids/masks
_OPENAI_IGNORED = re.compile(r"^(input_resolution|context_length|vocab_size)$|(^|\.)attn_mask$")
_HF_IGNORED = re.compile(r"(^|\.)position_ids$")

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


# --------------------------------------------------------------------------------- errors


class CheckpointMismatchError(UserError):
    """A checkpoint does not fit a module: raised by :func:`load_into` with one readable paragraph
    naming the missing keys, the unexpected keys and the shape mismatches."""


def _listing(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


# ------------------------------------------------------------------------------ reading files


class _ScriptObject:
    """Stand-in for a TorchScript module class while reading an archive: it only keeps the
    attribute dict (parameters, buffers, submodules) and never runs any of the archive's code."""

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_state"] = state


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


def _rebuild_tensor(storage: Tensor, offset: int, size: tuple, stride: tuple, *_: Any) -> Tensor:
    """Our own ``torch._utils._rebuild_tensor_v2``: view of a flat storage tensor, copied out."""
    return torch.as_strided(storage, tuple(size), tuple(stride), int(offset)).clone()


def _identity_first(value: Any, *_: Any) -> Any:
    return value


class _TorchScriptUnpickler(pickle.Unpickler):
    """Restricted unpickler for ``<archive>/data.pkl``: tensors, plain containers, and inert
    placeholders for ``__torch__`` classes; every other global is refused."""

    _ALLOWED = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("collections", "OrderedDict"): dict,
        ("torch.jit._pickle", "restore_type_tag"): _identity_first,
        ("torch.jit._pickle", "build_intlist"): list,
        ("torch.jit._pickle", "build_doublelist"): list,
        ("torch.jit._pickle", "build_boollist"): list,
        ("torch.jit._pickle", "build_tensorlist"): list,
    }

    def __init__(self, file: Any, archive: zipfile.ZipFile, root: str) -> None:
        super().__init__(file)
        self._archive = archive
        self._root = root
        self._storages: dict[str, Tensor] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            return type(name, (_ScriptObject,), {})
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a TorchScript archive")

    def persistent_load(self, pid: Any) -> Tensor:
        # ('storage', dtype, key, location, numel)
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r} in TorchScript archive")
        dtype, key = pid[1], str(pid[2])
        if key not in self._storages:
            raw = bytearray(self._archive.read(f"{self._root}/data/{key}"))
            self._storages[key] = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        return self._storages[key]


def _safetensors_torch() -> Any:
    try:
        import safetensors.torch as st
    except ImportError:
        raise ImportError("reading or writing .safetensors needs the safetensors package: pip install 'lit-vlm[hf]'") from None
    return st


def is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def _read_torchscript_state_dict(path: Path) -> StateDict:
    """Tensors of a TorchScript archive (e.g. OpenAI's ``ViT-B-32.pt``), named like ``state_dict()``
    keys, read without compiling or executing the archive (attribute tensors such as OpenAI's
    per-block ``attn_mask`` come along too and are dropped by the converters)."""
    with zipfile.ZipFile(path) as archive:
        data = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if not data:
            raise UserError(f"{path}: TorchScript archive without data.pkl")
        root = data[0].split("/")[0]
        byteorder = f"{root}/byteorder"
        if byteorder in archive.namelist() and archive.read(byteorder).decode().strip() != "little":
            raise UserError(f"{path}: big-endian TorchScript archives are not supported")
        with archive.open(data[0]) as f:
            try:
                obj = _TorchScriptUnpickler(f, archive, root).load()
            except pickle.UnpicklingError as e:
                raise UserError(
                    f"{path} is a TorchScript archive that lit-vlm cannot read safely ({e}). Convert it on a "
                    "machine you trust: `import torch; m = torch.jit.load(path, map_location='cpu'); "
                    "torch.save(m.state_dict(), 'weights.pt')` and load weights.pt instead."
                ) from None

    out: StateDict = {}

    def walk(node: Any, prefix: str) -> None:
        state = node.__dict__.get("_state", {}) if isinstance(node, _ScriptObject) else node
        if not isinstance(state, Mapping):
            return
        for name, value in state.items():
            if isinstance(value, Tensor):
                out[prefix + str(name)] = value
            elif isinstance(value, _ScriptObject):
                walk(value, f"{prefix}{name}.")

    walk(obj, "")
    return out


def _unwrap(obj: Any, source: str) -> StateDict:
    """Take the state dict out of a training checkpoint and strip DDP / compile prefixes."""
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise UserError(f"{source}: expected a state dict (a mapping of names to tensors), found {type(obj).__name__}")
    out: StateDict = {}
    for key, value in obj.items():
        if not isinstance(value, Tensor):
            continue
        key = str(key)
        stripped = True
        while stripped:
            stripped = False
            for p in _WRAPPER_PREFIXES:
                if key.startswith(p):
                    key, stripped = key[len(p):], True
        out[key] = value
    if not out:
        raise UserError(f"{source}: no tensors found (keys: {_listing([str(k) for k in obj])})")
    return out


def _hf_weight_files(model_dir: Path) -> list[Path]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (model_dir / index).is_file():
            shards = sorted(set(json.loads((model_dir / index).read_text())["weight_map"].values()))
            return [model_dir / s for s in shards]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (model_dir / name).is_file():
            return [model_dir / name]
    raise MissingFileError(
        f"{model_dir}: no model.safetensors, pytorch_model.bin or sharded index found in this Hugging Face model directory"
    )


def load_clip_state_dict(path: str | Path) -> StateDict:
    """Read CLIP weights from disk without executing code from the file.

    Args:
        path: One of
            - a ``.safetensors`` file;
            - a ``.pt`` / ``.bin`` / ``.ckpt`` file saved with ``torch.save`` (read with
              ``torch.load(weights_only=True)``), holding a state dict or a training checkpoint
              with a ``state_dict`` (or ``model``) entry, e.g. an open_clip ``epoch_N.pt``;
            - a TorchScript archive as OpenAI distributes (``ViT-B-32.pt``): ``torch.load``
              refuses these with ``weights_only=True`` and ``torch.jit.load`` would run the
              archive's code, so its tensors are read by a restricted unpickler instead;
            - a Hugging Face model directory (its ``model.safetensors`` / ``pytorch_model.bin``,
              sharded or not).
            ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) key prefixes are removed.

    Returns:
        A flat ``{name: tensor}`` dict on the CPU in the checkpoint's own key layout and dtype.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file holds something other than tensors (e.g. a pickled model object
            that ``weights_only`` loading refuses); the message says how to convert it.
    """
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"checkpoint not found: {path}")
    if path.is_dir():
        out: StateDict = {}
        for f in _hf_weight_files(path):
            out.update(load_clip_state_dict(f))
        return out
    if path.suffix == ".safetensors":
        return _unwrap(_safetensors_torch().load_file(str(path), device="cpu"), str(path))
    if is_torchscript_archive(path):
        return _unwrap(_read_torchscript_state_dict(path), str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile) as e:  # empty, truncated or not a torch file
        from lit_vlm.weights import checkpoint_problem

        reason = checkpoint_problem(path) or f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        raise UserError(f"{path} cannot be read as weights: {reason}") from None
    except pickle.UnpicklingError as e:
        with open(path, "rb") as fh:
            head = fh.read(2)
        if not zipfile.is_zipfile(path) and not head.startswith(b"\x80"):  # neither torch.save format
            raise UserError(
                f"{path} cannot be read as weights: it is not a torch.save file (neither a zip archive nor a pickle); "
                "a safetensors file needs the .safetensors suffix"
            ) from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"{path} holds Python objects besides tensors, which safe loading (torch.load with weights_only=True) "
            f"refuses ({first}). If you trust the file, convert it once: `sd = torch.load(path, weights_only=False)"
            f"; torch.save(sd['state_dict'] if 'state_dict' in sd else sd.state_dict(), 'weights.pt')` and load weights.pt."
        ) from None
    return _unwrap(obj, str(path))


# ------------------------------------------------------------------------- OpenAI / open_clip


def _layer_ids(keys: list[str], prefix: str) -> list[int]:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in keys if (m := pat.match(k))})


def _need(sd: Mapping[str, Tensor], key: str, what: str, layout: str) -> Tensor:
    if key not in sd:
        sample = _listing(sorted(sd)[:8], 8)
        raise UserError(
            f"not an {layout} CLIP state dict: {key!r} ({what}) is missing; the checkpoint's keys begin {sample}"
        )
    return sd[key]


def _default_heads(width: int, heads: int | None, which: str) -> int:
    if heads is not None:
        return int(heads)
    if width % 64 != 0:
        raise UserError(
            f"cannot infer the {which} tower's attention heads: OpenAI's rule heads = width // 64 needs a "
            f"width divisible by 64, got {width}; pass {which}_heads= (or a preset)"
        )
    return width // 64


def _ratio(hidden: int, width: int) -> float:
    return hidden / width


# lit block suffix <- OpenAI block suffix
_OPENAI_BLOCK = {
    "ln_1.weight": "ln_1.weight", "ln_1.bias": "ln_1.bias",
    "attn.qkv.weight": "attn.in_proj_weight", "attn.qkv.bias": "attn.in_proj_bias",
    "attn.proj.weight": "attn.out_proj.weight", "attn.proj.bias": "attn.out_proj.bias",
    "ln_2.weight": "ln_2.weight", "ln_2.bias": "ln_2.bias",
    "mlp.fc1.weight": "mlp.c_fc.weight", "mlp.fc1.bias": "mlp.c_fc.bias",
    "mlp.fc2.weight": "mlp.c_proj.weight", "mlp.fc2.bias": "mlp.c_proj.bias",
    "ls_1.gamma": "ls_1.gamma", "ls_2.gamma": "ls_2.gamma",
}
# lit key <- OpenAI key (outside the blocks); projections are transposed
_OPENAI_TOP = {
    "vision.conv1.weight": "visual.conv1.weight",
    "vision.class_embedding": "visual.class_embedding",
    "vision.positional_embedding": "visual.positional_embedding",
    "vision.ln_pre.weight": "visual.ln_pre.weight", "vision.ln_pre.bias": "visual.ln_pre.bias",
    "vision.ln_post.weight": "visual.ln_post.weight", "vision.ln_post.bias": "visual.ln_post.bias",
    "text.token_embedding.weight": "token_embedding.weight",
    "text.positional_embedding": "positional_embedding",
    "text.ln_final.weight": "ln_final.weight", "text.ln_final.bias": "ln_final.bias",
    "logit_scale": "logit_scale",
    "logit_bias": "logit_bias",
}
_OPENAI_TRANSPOSED = {"image_projection.weight": "visual.proj", "text_projection.weight": "text_projection"}


def _normalise_openai_keys(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Drop weight-less keys; map open_clip's CustomTextCLIP ``text.*`` layout onto OpenAI's."""
    sd = {k: v for k, v in state_dict.items() if not _OPENAI_IGNORED.search(k)}
    if "text.token_embedding.weight" in sd and "token_embedding.weight" not in sd:
        sd = {(k[len("text."):] if k.startswith("text.") else k): v for k, v in sd.items()}
    return sd


def convert_openai_to_lit(
    state_dict: Mapping[str, Tensor],
    act_layer: str = "quick_gelu",
    vision_heads: int | None = None,
    text_heads: int | None = None,
    norm_eps: float = 1e-5,
) -> tuple[dict[str, Any], dict[str, Any], int, StateDict]:
    """Convert an OpenAI CLIP / open_clip ``CLIP`` state dict (ViT image tower) to lit-vlm.

    The architecture is read from the tensor shapes, as open_clip's
    ``build_model_from_openai_state_dict`` does: image width and patch size from
    ``visual.conv1.weight``, image size from the positional-embedding length, layer counts from
    the ``resblocks`` indices, MLP ratio from ``c_fc``, context length / vocabulary / text width
    from the text embeddings, the joint width from ``text_projection``.

    Args:
        state_dict: Keys as in OpenAI's ``model.py`` (``visual.*``, ``token_embedding.weight``,
            ``transformer.resblocks.*``, ...), e.g. from :func:`load_clip_state_dict`.
        act_layer: The MLP activation the weights were trained with: "quick_gelu" for OpenAI's
            releases and open_clip ``*-quickgelu`` models, "gelu" for most open_clip models
            trained from scratch (e.g. LAION ``ViT-B-32``). A checkpoint does not record it.
        vision_heads: Image-tower attention heads; default ``width // 64`` (OpenAI's rule).
        text_heads: Text-tower attention heads; default ``width // 64``.
        norm_eps: LayerNorm epsilon of both towers (1e-5 for OpenAI and open_clip CLIP).

    Returns:
        ``(vision_kwargs, text_kwargs, embed_dim, lit_state_dict)``: constructor arguments for
        :class:`VisionTransformer` and :class:`TextTransformer` (``preset=None``, every size
        explicit; text pooled with ``pool="argmax"`` as OpenAI does), the joint embedding width,
        and the weights under the CLIP family's names (see the module docstring). Checkpoint
        keys this mapping does not know (attention poolers, extra heads, ...) are kept under
        their own names so that :func:`load_into` reports them as unexpected.

    Raises:
        ValueError: for ResNet image towers, a key the architecture cannot be inferred without,
            or heads that cannot be inferred.
    """
    sd = _normalise_openai_keys(state_dict)
    keys = list(sd)
    if any(k.startswith(("visual.layer1.", "visual.attnpool.")) for k in keys):
        raise UserError("this is a ResNet CLIP image tower (RN50, RN101, ...); lit-vlm's interop supports ViT towers only")
    if any(k.startswith("visual.trunk.") for k in keys):
        raise UserError("this open_clip model uses a timm image tower (visual.trunk.*); only CLIP ViT towers are supported")
    layout = "OpenAI/open_clip"

    conv = _need(sd, "visual.conv1.weight", "the patch embedding", layout)  # [Wv, 3, P, P]
    if conv.dim() != 4 or conv.shape[1] != 3 or conv.shape[2] != conv.shape[3]:
        raise UserError(f"visual.conv1.weight has shape {_shape(conv)}; expected [width, 3, patch, patch]")
    v_width, patch = int(conv.shape[0]), int(conv.shape[-1])
    pos = _need(sd, "visual.positional_embedding", "the image positional embedding", layout)  # [1+N, Wv]
    grid = round(math.sqrt(pos.shape[0] - 1))
    if grid * grid + 1 != pos.shape[0]:
        raise UserError(f"visual.positional_embedding has {pos.shape[0]} rows, not 1 + a square grid of patches")
    v_layers = _layer_ids(keys, "visual.transformer.resblocks.")
    if not v_layers:
        raise UserError("no visual.transformer.resblocks.* keys: not a ViT CLIP image tower")
    v_fc = _need(sd, "visual.transformer.resblocks.0.mlp.c_fc.weight", "the first image MLP", layout)

    tok = _need(sd, "token_embedding.weight", "the token embedding", layout)  # [V, Wt]
    t_pos = _need(sd, "positional_embedding", "the text positional embedding", layout)  # [ctx, Wt]
    t_layers = _layer_ids(keys, "transformer.resblocks.")
    t_width = int(tok.shape[1])
    t_fc = _need(sd, "transformer.resblocks.0.mlp.c_fc.weight", "the first text MLP", layout)
    if "text_projection" in sd:
        embed_dim = int(sd["text_projection"].shape[1])
    else:
        embed_dim = int(_need(sd, "visual.proj", "the image projection", layout).shape[1])

    ls = "visual.transformer.resblocks.0.ls_1.gamma" in sd
    vision_kwargs: dict[str, Any] = dict(
        preset=None, image_size=grid * patch, patch_size=patch, width=v_width, layers=len(v_layers),
        heads=_default_heads(v_width, vision_heads, "vision"), mlp_ratio=_ratio(int(v_fc.shape[0]), v_width),
        pool="cls", ln_pre="visual.ln_pre.weight" in sd, ln_post="visual.ln_post.weight" in sd,
        act_layer=act_layer, norm_eps=norm_eps,
    )
    if ls:
        vision_kwargs["ls_init"] = 1.0  # the checkpoint's values replace it
    text_kwargs: dict[str, Any] = dict(
        preset=None, vocab_size=int(tok.shape[0]), context_length=int(t_pos.shape[0]), width=t_width,
        layers=len(t_layers), heads=_default_heads(t_width, text_heads, "text"),
        mlp_ratio=_ratio(int(t_fc.shape[0]), t_width), causal=True, pool="argmax",
        act_layer=act_layer, norm_eps=norm_eps,
    )
    if "transformer.resblocks.0.ls_1.gamma" in sd:
        text_kwargs["ls_init"] = 1.0

    out: StateDict = {}
    used: set[str] = set()

    def take(dst: str, src: str, transpose: bool = False) -> None:
        if src in sd:
            out[dst] = sd[src].t() if transpose else sd[src]
            used.add(src)

    for dst, src in _OPENAI_TOP.items():
        take(dst, src)
    for dst, src in _OPENAI_TRANSPOSED.items():
        take(dst, src, transpose=True)
    for tower, src_prefix, ids in (("vision", "visual.transformer.resblocks.", v_layers), ("text", "transformer.resblocks.", t_layers)):
        for i in ids:
            for dst, src in _OPENAI_BLOCK.items():
                take(f"{tower}.transformer.blocks.{i}.{dst}", f"{src_prefix}{i}.{src}")
    out.update({k: v for k, v in sd.items() if k not in used})  # unknown keys: reported by load_into
    return vision_kwargs, text_kwargs, embed_dim, out


def convert_lit_to_openai(lit_state_dict: Mapping[str, Tensor]) -> StateDict:
    """The inverse of :func:`convert_openai_to_lit`: CLIP-family names -> OpenAI / open_clip names.

    The result loads into OpenAI's ``model.CLIP`` / open_clip's ``CLIP`` of the same shape
    (``strict=True``; remember QuickGELU vs GELU). Keys outside the mapping are kept as they are.

    Args:
        lit_state_dict: A CLIP-family state dict (``vision.*``, ``text.*``,
            ``image_projection.weight``, ``text_projection.weight``, ``logit_scale``).
    """
    pat = re.compile(r"^(vision|text)\.transformer\.blocks\.(\d+)\.(.+)$")
    lit_to_src = dict(_OPENAI_TOP)
    out: StateDict = {}
    for key, value in lit_state_dict.items():
        if key in lit_to_src:
            out[lit_to_src[key]] = value
        elif key in _OPENAI_TRANSPOSED:
            out[_OPENAI_TRANSPOSED[key]] = value.t()
        elif (m := pat.match(key)) and m.group(3) in _OPENAI_BLOCK:
            prefix = "visual.transformer.resblocks." if m.group(1) == "vision" else "transformer.resblocks."
            out[f"{prefix}{m.group(2)}.{_OPENAI_BLOCK[m.group(3)]}"] = value
        else:
            out[key] = value
    return out


# ------------------------------------------------------------------------------ Hugging Face

# lit block suffix <- HF encoder-layer suffix (q/k/v handled separately)
_HF_BLOCK = {
    "ln_1.weight": "layer_norm1.weight", "ln_1.bias": "layer_norm1.bias",
    "attn.proj.weight": "self_attn.out_proj.weight", "attn.proj.bias": "self_attn.out_proj.bias",
    "ln_2.weight": "layer_norm2.weight", "ln_2.bias": "layer_norm2.bias",
    "mlp.fc1.weight": "mlp.fc1.weight", "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight", "mlp.fc2.bias": "mlp.fc2.bias",
}
_HF_TOP = {
    "vision.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "vision.class_embedding": "vision_model.embeddings.class_embedding",
    "vision.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "vision.ln_pre.weight": "vision_model.pre_layrnorm.weight", "vision.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "vision.ln_post.weight": "vision_model.post_layernorm.weight", "vision.ln_post.bias": "vision_model.post_layernorm.bias",
    "text.token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "text.positional_embedding": "text_model.embeddings.position_embedding.weight",
    "text.ln_final.weight": "text_model.final_layer_norm.weight", "text.ln_final.bias": "text_model.final_layer_norm.bias",
    "image_projection.weight": "visual_projection.weight",
    "text_projection.weight": "text_projection.weight",
    "logit_scale": "logit_scale",
}
_HF_TOWERS = (("vision", "vision_model.encoder.layers."), ("text", "text_model.encoder.layers."))


def _hf_section(config: Mapping[str, Any], name: str, defaults: Mapping[str, Any]) -> dict[str, Any]:
    section = config.get(name) or config.get(f"{name}_dict") or {}
    return {**defaults, **{k: v for k, v in section.items() if v is not None}}


def _hf_act(value: str, where: str) -> str:
    if value not in HF_ACT_TO_LIT:
        raise UserError(f"{where}={value!r} is not supported; supported: {', '.join(HF_ACT_TO_LIT)}")
    return HF_ACT_TO_LIT[value]


def hf_config_to_kwargs(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any], int]:
    """Tower constructor arguments and joint width from a Hugging Face ``CLIPModel`` config dict.

    Args:
        config: The parsed ``config.json`` of a ``CLIPModel`` (values it omits take the
            ``CLIPVisionConfig`` / ``CLIPTextConfig`` defaults).

    Returns:
        ``(vision_kwargs, text_kwargs, embed_dim)``. Text pooling follows ``CLIPTextModel``:
        ``pool="argmax"`` when ``eos_token_id == 2`` (legacy configs), else ``pool="eos"`` with
        ``eos_id = eos_token_id``.

    Raises:
        ValueError: for a model type other than CLIP, an unsupported ``hidden_act`` or
            ``num_channels != 3`` (the message names the config key).
    """
    model_type = config.get("model_type", "clip")
    if model_type != "clip":
        raise UserError(f"config.json model_type={model_type!r}: only Hugging Face CLIPModel ('clip') checkpoints are supported")
    v = _hf_section(config, "vision_config", _HF_VISION_DEFAULTS)
    t = _hf_section(config, "text_config", _HF_TEXT_DEFAULTS)
    if int(v["num_channels"]) != 3:
        raise UserError(f"vision_config.num_channels={v['num_channels']}: only RGB (3) image towers are supported")
    vision_kwargs: dict[str, Any] = dict(
        preset=None, image_size=int(v["image_size"]), patch_size=int(v["patch_size"]), width=int(v["hidden_size"]),
        layers=int(v["num_hidden_layers"]), heads=int(v["num_attention_heads"]),
        mlp_ratio=_ratio(int(v["intermediate_size"]), int(v["hidden_size"])), pool="cls", ln_pre=True, ln_post=True,
        act_layer=_hf_act(v["hidden_act"], "vision_config.hidden_act"), norm_eps=float(v["layer_norm_eps"]),
    )
    eos = t.get("eos_token_id")
    legacy = eos is None or int(eos) == _HF_LEGACY_EOS_ID
    text_kwargs: dict[str, Any] = dict(
        preset=None, vocab_size=int(t["vocab_size"]), context_length=int(t["max_position_embeddings"]),
        width=int(t["hidden_size"]), layers=int(t["num_hidden_layers"]), heads=int(t["num_attention_heads"]),
        mlp_ratio=_ratio(int(t["intermediate_size"]), int(t["hidden_size"])), causal=True,
        pool="argmax" if legacy else "eos", eos_id=None if legacy else int(eos),
        pad_id=int(t["pad_token_id"]) if t.get("pad_token_id") is not None else 0,
        act_layer=_hf_act(t["hidden_act"], "text_config.hidden_act"), norm_eps=float(t["layer_norm_eps"]),
    )
    embed_dim = int(config.get("projection_dim", 512))
    return vision_kwargs, text_kwargs, embed_dim


def convert_hf_state_dict(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Rename a Hugging Face ``CLIPModel`` state dict to CLIP-family names.

    Each layer's separate ``q_proj`` / ``k_proj`` / ``v_proj`` are stacked (in that order) into
    the fused ``attn.qkv`` projection ([3W, W] weight, [3W] bias), which is exactly how our
    attention splits them again. ``position_ids`` buffers are dropped; unknown keys are kept
    under their own names (so :func:`load_into` reports them).

    Args:
        state_dict: Keys as in ``transformers``' ``CLIPModel`` (``vision_model.*``, ``text_model.*``,
            ``visual_projection.weight``, ``text_projection.weight``, ``logit_scale``).
    """
    sd = {k: v for k, v in state_dict.items() if not _HF_IGNORED.search(k)}
    keys = list(sd)
    out: StateDict = {}
    used: set[str] = set()

    def take(dst: str, src: str) -> None:
        if src in sd:
            out[dst] = sd[src]
            used.add(src)

    for dst, src in _HF_TOP.items():
        take(dst, src)
    for tower, prefix in _HF_TOWERS:
        for i in _layer_ids(keys, prefix):
            src = f"{prefix}{i}."
            dst = f"{tower}.transformer.blocks.{i}."
            for d, s in _HF_BLOCK.items():
                take(dst + d, src + s)
            for part in ("weight", "bias"):
                qkv = [f"{src}self_attn.{n}_proj.{part}" for n in ("q", "k", "v")]
                if all(k in sd for k in qkv):
                    out[f"{dst}attn.qkv.{part}"] = torch.cat([sd[k] for k in qkv], dim=0)  # [3W, W] / [3W]
                    used.update(qkv)
    out.update({k: v for k, v in sd.items() if k not in used})
    return out


def convert_lit_to_hf(lit_state_dict: Mapping[str, Tensor]) -> StateDict:
    """The inverse of :func:`convert_hf_state_dict`: CLIP-family names -> ``CLIPModel`` names.

    The fused ``attn.qkv`` projection is split into ``q_proj`` / ``k_proj`` / ``v_proj``; each
    returned tensor is a contiguous copy (safetensors refuses tensors sharing memory).

    Args:
        lit_state_dict: A CLIP-family state dict (``vision.*``, ``text.*``, projections,
            ``logit_scale``).
    """
    lit_to_src = dict(_HF_TOP)
    pat = re.compile(r"^(vision|text)\.transformer\.blocks\.(\d+)\.(.+)$")
    prefixes = dict(_HF_TOWERS)
    out: StateDict = {}
    for key, value in lit_state_dict.items():
        if key in lit_to_src:
            out[lit_to_src[key]] = value.detach().contiguous().clone()
            continue
        m = pat.match(key)
        if m is None:
            out[key] = value.detach().contiguous().clone()
            continue
        src = f"{prefixes[m.group(1)]}{m.group(2)}."
        rest = m.group(3)
        if rest in _HF_BLOCK:
            out[src + _HF_BLOCK[rest]] = value.detach().contiguous().clone()
        elif rest in ("attn.qkv.weight", "attn.qkv.bias"):
            part = rest.rsplit(".", 1)[1]
            for name, chunk in zip(("q", "k", "v"), value.detach().chunk(3, dim=0)):
                out[f"{src}self_attn.{name}_proj.{part}"] = chunk.contiguous().clone()  # [W, W] / [W]
        else:
            out[key] = value.detach().contiguous().clone()
    return out


def convert_hf_to_lit(
    model_dir: str | Path,
) -> tuple[dict[str, Any], dict[str, Any], int, StateDict, Path | None]:
    """Convert a Hugging Face ``CLIPModel`` directory to lit-vlm.

    Args:
        model_dir: A directory holding ``config.json`` and ``model.safetensors`` or
            ``pytorch_model.bin`` (sharded checkpoints with an index file work too), as written by
            ``CLIPModel.save_pretrained`` or downloaded from the Hub.

    Returns:
        ``(vision_kwargs, text_kwargs, embed_dim, lit_state_dict, tokenizer)``: the architecture
        from ``config.json`` (see :func:`hf_config_to_kwargs`), the weights under the CLIP
        family's names (see :func:`convert_hf_state_dict`), and the path of ``tokenizer.json``
        next to the weights (usable with ``Tokenizer.from_file``) or None if there is none.

    Raises:
        FileNotFoundError: if ``config.json`` or the weights are missing.
        ValueError: for a non-CLIP config (see :func:`hf_config_to_kwargs`).
    """
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise MissingFileError(f"{model_dir}: no config.json; expected a Hugging Face CLIPModel directory")
    config = json.loads(config_path.read_text())
    vision_kwargs, text_kwargs, embed_dim = hf_config_to_kwargs(config)
    state_dict = convert_hf_state_dict(load_clip_state_dict(model_dir))
    tokenizer = model_dir / "tokenizer.json"
    return vision_kwargs, text_kwargs, embed_dim, state_dict, tokenizer if tokenizer.is_file() else None


# ---------------------------------------------------------------------------------- loading


@dataclass
class LoadReport:
    """What :func:`load_into` loaded.

    Attributes:
        loaded: Module keys that received checkpoint values.
        missing: Module keys the checkpoint lacks (left as initialised; only when strict=False).
        unexpected: Checkpoint keys the module lacks (ignored; only when strict=False).
    """

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def load_into(module: nn.Module, lit_state_dict: Mapping[str, Tensor], strict: bool = True, prefix: str = "") -> LoadReport:
    """Copy converted weights into ``module``, or explain in one paragraph why they do not fit.

    Values are copied into the existing parameters (cast to their dtype and device).

    Args:
        module: The receiver: a whole CLIP-family module (keys ``vision.*``, ``text.*``,
            projections, ``logit_scale``) or, with ``prefix``, a single tower.
        lit_state_dict: Weights under lit-vlm names, e.g. from :func:`convert_openai_to_lit`.
        strict: Require the checkpoint and the module to have exactly the same keys. Shape
            mismatches are always an error.
        prefix: Only use checkpoint keys starting with this (e.g. ``"vision."``), stripped.

    Returns:
        A :class:`LoadReport` (with ``strict=False`` it lists what was skipped).

    Raises:
        CheckpointMismatchError: one paragraph listing the missing keys, the unexpected keys and
            every shape mismatch as ``key: checkpoint [..] vs model [..]``; nothing is copied.
    """
    sd = {k[len(prefix):]: v for k, v in lit_state_dict.items() if k.startswith(prefix)} if prefix else dict(lit_state_dict)
    own = module.state_dict()
    missing = sorted(k for k in own if k not in sd)
    unexpected = sorted(k for k in sd if k not in own)
    mismatched = [
        f"{k}: checkpoint {_shape(sd[k])} vs model {_shape(own[k])}" for k in own if k in sd and sd[k].shape != own[k].shape
    ]
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch{'es' if len(mismatched) > 1 else ''} ({_listing(mismatched)})")
    if strict and missing:
        problems.append(f"{len(missing)} key{'s' if len(missing) > 1 else ''} missing from the checkpoint ({_listing(missing)})")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected key{'s' if len(unexpected) > 1 else ''} in the checkpoint ({_listing(unexpected)})")
    if problems:
        where = f" (checkpoint keys under {prefix!r})" if prefix else ""
        hints = []
        if any("positional_embedding" in m for m in mismatched):
            hints.append(
                "a positional-embedding mismatch means another image size or context length: build the tower "
                "with the checkpoint's size or resize the tensor with lit_vlm.modules.interpolate_pos_embed"
            )
        if unexpected and not mismatched:
            hints.append("unexpected keys usually mean a tower variant lit-vlm does not build (or a wrong prefix)")
        hint = ("; " + "; ".join(hints)) if hints else ""
        raise CheckpointMismatchError(
            f"the checkpoint does not fit {type(module).__name__}{where}: " + "; ".join(problems) + hint + "."
        )
    to_load = {k: v for k, v in sd.items() if k in own}
    with torch.no_grad():
        module.load_state_dict(to_load, strict=False)
    return LoadReport(loaded=sorted(to_load), missing=missing, unexpected=unexpected)


def _is_hf_layout(sd: Mapping[str, Tensor]) -> bool:
    return any(k.startswith(("vision_model.", "text_model.")) for k in sd)


def _apply_preset(preset: str, vision_kwargs: dict[str, Any], text_kwargs: dict[str, Any], embed_dim: int) -> None:
    """Check the checkpoint's architecture against a CLIP preset; one paragraph of differences."""
    entry = CLIP_PRESETS[preset]
    diffs = []
    for which, table, name, kwargs in (("vision", VISION_PRESETS, entry["vision"], vision_kwargs), ("text", TEXT_PRESETS, entry["text"], text_kwargs)):
        for key, value in table[name].items():
            got = kwargs.get(key)
            if value is not None and (got is None or not math.isclose(float(got), float(value))):
                diffs.append(f"{which} {key}: checkpoint {got} vs preset {value}")
    if embed_dim != entry["embed_dim"]:
        diffs.append(f"embed_dim: checkpoint {embed_dim} vs preset {entry['embed_dim']}")
    if diffs:
        raise UserError(f"the checkpoint is not a {preset} CLIP: " + "; ".join(diffs) + ".")


class CLIPTowers(nn.Module):
    """Both towers under the CLIP family's attribute names, so one strict load checks them together."""

    def __init__(self, vision: VisionTransformer, text: TextTransformer) -> None:
        super().__init__()
        self.vision = vision
        self.text = text


def build_clip_towers(
    path_or_dir: str | Path,
    preset: str | None = None,
    act_layer: str | None = None,
    vision_heads: int | None = None,
    text_heads: int | None = None,
) -> tuple[VisionTransformer, TextTransformer, dict[str, Any]]:
    """Build both CLIP towers from a checkpoint and load its weights (exactly, strictly).

    Args:
        path_or_dir: A Hugging Face ``CLIPModel`` directory, or an OpenAI / open_clip weight file
            (``.pt``, ``.bin``, ``.safetensors``, OpenAI TorchScript archive; see
            :func:`load_clip_state_dict`).
        preset: Optional CLIP preset name (``CLIP_PRESETS``: "ViT-B/32", "ViT-B-16",
            "ViT-L/14@336px", ...). The checkpoint's architecture is checked against it (one
            paragraph of differences on mismatch); for OpenAI / open_clip files, which do not
            record them, the preset's head counts and activation are used unless
            ``vision_heads`` / ``text_heads`` / ``act_layer`` are given.
        act_layer: MLP activation for OpenAI / open_clip files ("quick_gelu", the default, for
            OpenAI weights; "gelu" for most open_clip models trained from scratch). Ignored for
            Hugging Face directories, whose ``config.json`` says it.
        vision_heads: Image-tower heads for OpenAI / open_clip files (default ``width // 64``).
        text_heads: Text-tower heads for OpenAI / open_clip files (default ``width // 64``).

    Returns:
        ``(vision, text, extras)``: the towers in eval mode with the checkpoint's weights, and
        a dict with ``image_projection`` [E, Wv] and ``text_projection`` [E, Wt] weights (for
        ``nn.Linear(.., bias=False)``), ``logit_scale`` (log temperature, scalar tensor),
        ``logit_bias`` (a tensor or None), ``embed_dim``, ``vision_kwargs`` / ``text_kwargs``
        (the constructor arguments used), ``tokenizer`` (path of ``tokenizer.json`` or None),
        ``format`` ("hf" or "openai") and ``state_dict`` (all converted weights under
        CLIP-family names, for :func:`load_into`).

    Raises:
        CheckpointMismatchError: if the weights do not fit the towers (one paragraph).
        ValueError: for unsupported architectures or a checkpoint that differs from ``preset``.
    """
    if preset is not None and preset not in CLIP_PRESETS:
        raise UserError(f"unknown CLIP preset {preset!r}; valid: {', '.join(repr(k) for k in CLIP_PRESETS)}")
    path = Path(path_or_dir)
    tokenizer: Path | None = None
    if path.is_dir() and (path / "config.json").is_file():
        vision_kwargs, text_kwargs, embed_dim, sd, tokenizer = convert_hf_to_lit(path)
        fmt = "hf"
    else:
        raw = load_clip_state_dict(path)
        if _is_hf_layout(raw):
            raise UserError(
                f"{path} holds Hugging Face CLIPModel weights; pass the model directory (with its config.json) instead"
            )
        act = act_layer or (CLIP_PRESETS[preset]["act_layer"] if preset in CLIP_PRESETS else "quick_gelu")
        if preset in CLIP_PRESETS:  # heads come from the preset below; skip the width // 64 rule
            vision_heads = vision_heads or VISION_PRESETS[CLIP_PRESETS[preset]["vision"]]["heads"]
            text_heads = text_heads or TEXT_PRESETS[CLIP_PRESETS[preset]["text"]]["heads"]
        vision_kwargs, text_kwargs, embed_dim, sd = convert_openai_to_lit(raw, act, vision_heads, text_heads)
        fmt = "openai"
    if preset is not None:
        _apply_preset(preset, vision_kwargs, text_kwargs, embed_dim)
    vision = VisionTransformer(**vision_kwargs)
    text = TextTransformer(**text_kwargs)
    towers = CLIPTowers(vision, text)
    tower_sd = {k: v for k, v in sd.items() if k.startswith(("vision.", "text."))}
    extra_keys = {"image_projection.weight", "text_projection.weight", "logit_scale", "logit_bias"}
    unknown = {k: v for k, v in sd.items() if not k.startswith(("vision.", "text.")) and k not in extra_keys}
    load_into(towers, {**tower_sd, **unknown})
    for key in ("image_projection.weight", "text_projection.weight", "logit_scale"):
        if key not in sd:
            raise CheckpointMismatchError(f"the checkpoint at {path} has no {key!r} ({'projection' if 'proj' in key else 'temperature'}).")
    extras: dict[str, Any] = dict(
        image_projection=sd["image_projection.weight"].float(),
        text_projection=sd["text_projection.weight"].float(),
        logit_scale=sd["logit_scale"].float().reshape(()),
        logit_bias=sd["logit_bias"].float().reshape(()) if "logit_bias" in sd else None,
        embed_dim=embed_dim,
        vision_kwargs=vision_kwargs,
        text_kwargs=text_kwargs,
        tokenizer=tokenizer,
        format=fmt,
        state_dict=sd,
    )
    return vision.eval(), text.eval(), extras


def _check_towers(model: nn.Module, vision_kwargs: Mapping[str, Any], text_kwargs: Mapping[str, Any], source: str) -> None:
    """Raise one paragraph if ``model``'s towers were built differently from what the checkpoint
    needs in ways its tensor shapes cannot reveal (activation, LayerNorm eps, heads, pooling)."""
    diffs = []
    for name, kwargs, keys in (
        ("vision", vision_kwargs, ("act_layer", "norm_eps", "heads", "pool")),
        ("text", text_kwargs, ("act_layer", "norm_eps", "heads", "pool", "eos_id", "causal")),
    ):
        tower = getattr(model, name, None)
        if not isinstance(tower, (VisionTransformer, TextTransformer)):
            continue
        for key in keys:
            if key in kwargs and hasattr(tower, key) and getattr(tower, key) != kwargs[key]:
                diffs.append(f"{name} {key}={getattr(tower, key)!r} but the checkpoint needs {kwargs[key]!r}")
    if diffs:
        raise UserError(
            f"{source}: the model's towers do not match the checkpoint: " + "; ".join(diffs)
            + " (set these in the tower's init_args; the weights would load but compute something else)."
        )


def read_state_dict(
    source: str | Path, model: nn.Module | None = None, act_layer: str | None = None
) -> tuple[StateDict, str]:
    """Foreign CLIP weights as a CLIP-family state dict, and the layout they were read as: the
    entry point of ``init_from``.

    Args:
        source: A Hugging Face ``CLIPModel`` directory, or an OpenAI / open_clip weight file
            (see :func:`load_clip_state_dict`: a plain ``state_dict()``, an ``epoch_N.pt``
            training checkpoint, ``.safetensors``, a TorchScript archive); a file already in
            lit-vlm names is returned as is. Nothing is downloaded: a model name that is not a
            path is refused.
        model: The module the weights are meant for. For Hugging Face checkpoints its towers are
            checked against ``config.json`` (activation, LayerNorm eps, heads, pooling: what a
            wrong build would silently get wrong); for OpenAI / open_clip files its head counts
            are used to interpret the checkpoint and its activation against ``act_layer``.
        act_layer: The activation the OpenAI / open_clip weights were trained with, if known
            ("quick_gelu" for OpenAI's releases); checked against ``model``'s towers.

    Returns:
        ``({name: tensor}, layout)``: the weights under CLIP-family names (``vision.*``,
        ``text.*``, ``image_projection.weight``, ``text_projection.weight``, ``logit_scale``), for
        ``model.load_state_dict`` or :func:`load_into`, and a phrase naming the layout the file
        was read as (for error messages).

    Raises:
        FileNotFoundError: if ``source`` does not exist.
        ValueError: for unsupported checkpoints or towers that do not match them.
    """
    path = Path(source)
    if not path.exists():
        raise MissingFileError(
            f"{source}: no such file or directory (lit-vlm never downloads weights: fetch the checkpoint first, e.g. "
            "`huggingface-cli download openai/clip-vit-base-patch32 --local-dir DIR`, and pass its path)"
        )
    if path.is_dir() and (path / "config.json").is_file():
        vision_kwargs, text_kwargs, _, sd, _ = convert_hf_to_lit(path)
        if model is not None:
            _check_towers(model, vision_kwargs, text_kwargs, str(source))
        return sd, f"a Hugging Face CLIPModel directory ({path})"
    raw = load_clip_state_dict(path)
    if _is_hf_layout(raw):
        raise UserError(f"{source} holds Hugging Face CLIPModel weights; pass the model directory (with its config.json)")
    if "visual.conv1.weight" not in raw and "token_embedding.weight" not in raw:
        # lit-vlm names already (they share text.token_embedding.weight with open_clip's CustomTextCLIP,
        # whose image tower is visual.*), or unknown: the caller's strict load will name the keys
        return raw, f"a state dict in lit-vlm names ({path})"
    vision, text = getattr(model, "vision", None), getattr(model, "text", None)
    vision_heads = vision.heads if isinstance(vision, VisionTransformer) else 1  # heads do not change the tensors
    text_heads = text.heads if isinstance(text, TextTransformer) else 1
    act = act_layer or "quick_gelu"
    _, _, _, sd = convert_openai_to_lit(raw, act, vision_heads, text_heads)
    if model is not None and act_layer is not None:
        _check_towers(model, {"act_layer": act}, {"act_layer": act}, str(source))
    return sd, f"an OpenAI / open_clip state dict, converted to lit-vlm names ({path})"


def load_state_dict(source: str | Path, model: nn.Module | None = None, act_layer: str | None = None) -> StateDict:
    """:func:`read_state_dict` without the layout."""
    return read_state_dict(source, model, act_layer)[0]


# -------------------------------------------------------------------------------- exporting


def _as_weight(x: nn.Module | Tensor, name: str) -> Tensor:
    if isinstance(x, nn.Linear):
        if x.bias is not None:
            raise UserError(f"{name} has a bias; Hugging Face CLIPModel projections have none")
        return x.weight.detach()
    if isinstance(x, Tensor):
        return x.detach()
    raise TypeError(f"{name} must be an nn.Linear or a weight tensor [E, W], got {type(x).__name__}")


def export_hf(
    vision: VisionTransformer,
    text: TextTransformer,
    image_projection: nn.Module | Tensor,
    text_projection: nn.Module | Tensor,
    logit_scale: Tensor | float,
    out_dir: str | Path,
    eos_token_id: int | None = None,
    bos_token_id: int | None = None,
    tokenizer: str | Path | None = None,
) -> Path:
    """Write a Hugging Face ``CLIPModel`` directory (``config.json`` + ``model.safetensors``).

    ``CLIPModel.from_pretrained(out_dir)`` then gives the same embeddings as the lit-vlm towers,
    and :func:`convert_hf_to_lit` reads the identical tensors back.

    Text pooling is carried over as ``CLIPTextModel`` defines it: ``pool="argmax"`` is written as
    ``eos_token_id = 2`` (Hugging Face's legacy switch to argmax pooling, as in the original
    OpenAI conversions); ``pool="eos"`` writes ``text.eos_id``; ``pool="eot"`` (last non-padding
    token) needs ``eos_token_id``: Hugging Face pools at its first occurrence, which is the same
    token when every sequence ends with it (as lit-vlm's tokenizer guarantees) and it does not
    occur earlier.

    Args:
        vision: Image tower; must be HF-representable: ``stem="patch"``, ``pool="cls"``,
            ``ln_pre`` and ``ln_post`` on, no LayerScale.
        text: Text tower; must be causal, without LayerScale, pooled by "argmax", "eos" or "eot".
        image_projection: ``nn.Linear(Wv, E, bias=False)`` or its weight [E, Wv].
        text_projection: ``nn.Linear(Wt, E, bias=False)`` or its weight [E, Wt].
        logit_scale: Log temperature (the CLIP family's ``logit_scale`` parameter).
        out_dir: Directory to write (created if needed; existing files are overwritten).
        eos_token_id: End-of-text id for ``pool="eot"`` (defaults to ``text.eos_id``); ignored
            for the other pools.
        bos_token_id: Start-of-text id written to the config (informational).
        tokenizer: Optional ``tokenizer.json`` to copy next to the weights.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        ValueError: listing in one paragraph every property of the towers that a
            ``CLIPModel`` cannot represent.
    """
    save_file = _safetensors_torch().save_file
    problems = []
    if vision.stem != "patch":
        problems.append(f"vision stem={vision.stem!r} (needs 'patch')")
    if vision.pool != "cls":
        problems.append(f"vision pool={vision.pool!r} (needs 'cls')")
    if not isinstance(vision.ln_pre, nn.LayerNorm):
        problems.append("vision ln_pre=False (CLIPModel always applies pre_layrnorm)")
    if not isinstance(vision.ln_post, nn.LayerNorm):
        problems.append("vision ln_post=False (CLIPModel always applies post_layernorm)")
    for name, tower in (("vision", vision), ("text", text)):
        if tower.act_layer not in LIT_ACT_TO_HF:
            problems.append(f"{name} act_layer={tower.act_layer!r}")
        if any(not isinstance(b.ls_1, nn.Identity) for b in tower.transformer.blocks):
            problems.append(f"{name} LayerScale (ls_init) is not part of CLIPModel")
    if not text.causal:
        problems.append("text causal=False (CLIPModel's text tower is causal)")
    if text.pool == "argmax":
        eos = _HF_LEGACY_EOS_ID
    elif text.pool == "eos":
        eos = text.eos_id
    elif text.pool == "eot":
        eos = eos_token_id if eos_token_id is not None else text.eos_id
        if eos is None:
            problems.append("text pool='eot' needs eos_token_id= (the tokenizer's end-of-text id) to be written as CLIPModel's eos pooling")
    else:
        eos = None
        problems.append(f"text pool={text.pool!r} (needs 'argmax', 'eos' or 'eot')")
    if text.pool in ("eos", "eot") and eos == _HF_LEGACY_EOS_ID:
        problems.append(
            f"end-of-text id {_HF_LEGACY_EOS_ID} cannot be exported: CLIPModel treats eos_token_id == 2 as the legacy "
            "argmax pooling"
        )
    if problems:
        raise UserError("these towers cannot be written as a Hugging Face CLIPModel: " + "; ".join(problems) + ".")

    img_w = _as_weight(image_projection, "image_projection")  # [E, Wv]
    txt_w = _as_weight(text_projection, "text_projection")  # [E, Wt]
    embed_dim = int(img_w.shape[0])
    if img_w.shape != (embed_dim, vision.width) or txt_w.shape != (embed_dim, text.width):
        raise UserError(
            f"projection shapes do not fit the towers: image_projection {_shape(img_w)} (expected [E, {vision.width}]), "
            f"text_projection {_shape(txt_w)} (expected [{embed_dim}, {text.width}])"
        )
    scale = logit_scale.detach().reshape(()) if isinstance(logit_scale, Tensor) else torch.tensor(float(logit_scale))

    lit_sd: StateDict = {f"vision.{k}": v for k, v in vision.state_dict().items()}
    lit_sd.update({f"text.{k}": v for k, v in text.state_dict().items()})
    lit_sd.update({"image_projection.weight": img_w, "text_projection.weight": txt_w, "logit_scale": scale.to(img_w.dtype)})
    hf_sd = convert_lit_to_hf(lit_sd)

    dtype = str(img_w.dtype).replace("torch.", "")
    config = {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": embed_dim,
        "logit_scale_init_value": float(scale),
        "initializer_factor": 1.0,
        "torch_dtype": dtype,
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": vision.width,
            "intermediate_size": vision.transformer.blocks[0].mlp.fc1.out_features if vision.layers else int(vision.width * vision.mlp_ratio),
            "projection_dim": embed_dim,
            "num_hidden_layers": vision.layers,
            "num_attention_heads": vision.heads,
            "num_channels": 3,
            "image_size": vision.image_size,
            "patch_size": vision.patch_size,
            "hidden_act": LIT_ACT_TO_HF[vision.act_layer],
            "layer_norm_eps": vision.norm_eps,
            "attention_dropout": 0.0,
        },
        "text_config": {
            "model_type": "clip_text_model",
            "vocab_size": text.vocab_size,
            "hidden_size": text.width,
            "intermediate_size": text.transformer.blocks[0].mlp.fc1.out_features if text.layers else int(text.width * text.mlp_ratio),
            "projection_dim": embed_dim,
            "num_hidden_layers": text.layers,
            "num_attention_heads": text.heads,
            "max_position_embeddings": text.context_length,
            "hidden_act": LIT_ACT_TO_HF[text.act_layer],
            "layer_norm_eps": text.norm_eps,
            "attention_dropout": 0.0,
            "pad_token_id": text.pad_id,
            "bos_token_id": bos_token_id,
            "eos_token_id": int(eos) if eos is not None else None,
        },
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.cpu() for k, v in hf_sd.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer is not None:
        shutil.copyfile(tokenizer, out / "tokenizer.json")
    return out


__all__ = [
    "CheckpointMismatchError",
    "LoadReport",
    "build_clip_towers",
    "convert_hf_state_dict",
    "convert_hf_to_lit",
    "convert_lit_to_hf",
    "convert_lit_to_openai",
    "convert_openai_to_lit",
    "export_hf",
    "hf_config_to_kwargs",
    "load_clip_state_dict",
    "load_into",
    "load_state_dict",
    "read_state_dict",
]
