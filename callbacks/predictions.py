"""What ``lit-vlm predict`` computes, written to the run directory.

Layout of ``<run>/predictions/`` (row i of every file is the same sample):

    index.jsonl      one line per sample, sorted by sample id: {"index": i, "sample_id": ..., and every
                     text output of the family, e.g. "caption": ...}
    <name>.npy       one array per tensor output, rows in index order (e.g. image_emb.npy [N, E]):
                     numpy.load(path) reads it anywhere, no lit-vlm needed

A family's ``predict_step`` returns a dict with ``sample_id`` (the batch's ids) and, per sample,
tensors ``[B, ...]`` and/or lists of B strings; other entries are left out. Under DDP the rows of
every rank are gathered, a sample seen twice is kept once, and rank zero writes the files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from lit_vlm.distributed import all_gather_objects
from lit_vlm.io import atomic_output


class PredictionWriter(pl.Callback):
    """Writes the outputs of ``predict`` as ``.npy`` arrays plus a JSON-lines index (module docstring).

    Args:
        dirpath: Folder for ``predictions/``; default: the run's log directory.
    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath
        self._rows: dict[str, dict[str, Any]] = {}
        self.last_dir: Path | None = None

    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._rows = {}

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not isinstance(outputs, dict) or "sample_id" not in outputs:
            return
        ids = [str(i) for i in outputs["sample_id"]]
        for key, value in outputs.items():
            if key == "sample_id":
                continue
            if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == len(ids):
                cpu = value.detach().float().cpu() if value.is_floating_point() else value.detach().cpu()
                for i, sid in enumerate(ids):
                    self._rows.setdefault(sid, {})[key] = cpu[i].clone()  # [...]
            elif isinstance(value, (list, tuple)) and len(value) == len(ids) and all(isinstance(v, str) for v in value):
                for i, sid in enumerate(ids):
                    self._rows.setdefault(sid, {})[key] = value[i]

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run_dir = trainer.log_dir  # a collective under DDP: read it on every rank
        merged: dict[str, dict[str, Any]] = {}
        for part in all_gather_objects(self._rows):
            for sid, row in part.items():
                merged.setdefault(sid, row)
        self._rows = {}
        if not trainer.is_global_zero or not merged:
            return
        out = Path(self.dirpath or run_dir or trainer.default_root_dir) / "predictions"
        out.mkdir(parents=True, exist_ok=True)
        ids = sorted(merged)
        tensor_keys = sorted({k for row in merged.values() for k, v in row.items() if torch.is_tensor(v)})
        shapes = []
        for key in tensor_keys:
            array = torch.stack([merged[sid][key] for sid in ids]).numpy()  # [N, ...]
            with atomic_output(str(out / f"{key}.npy"), "wb") as fh:
                np.save(fh, array)
            shapes.append(f"{key}.npy {list(array.shape)}")
        with atomic_output(str(out / "index.jsonl"), "w") as fh:
            for i, sid in enumerate(ids):
                texts = {k: v for k, v in merged[sid].items() if isinstance(v, str)}
                fh.write(json.dumps({"index": i, "sample_id": sid, **texts}, ensure_ascii=False) + "\n")
        self.last_dir = out
        listed = "".join(f", {s}" for s in shapes)
        rank_zero_info(f"\nPredictions: {out.resolve()} ({len(ids)} samples; index.jsonl{listed})")


__all__ = ["PredictionWriter"]
