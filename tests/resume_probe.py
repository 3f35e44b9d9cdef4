"""A callback for tests/test_resume.py: records each training step's loss and sample ids in its
own (checkpointed) state, can SIGKILL its process at a given step, and writes the record at the
end of the fit. Imported by ``lit-vlm fit`` through ``--trainer.callbacks+=resume_probe.Probe``
with tests/ on PYTHONPATH."""

from __future__ import annotations

import json
import os
import signal

import lightning.pytorch as pl


class Probe(pl.Callback):
    def __init__(self, out: str, kill_at_step: int = -1) -> None:
        self.out = out
        self.kill_at_step = kill_at_step
        self.steps: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)  # as a crash would: no cleanup, no final checkpoint

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.steps.append(
            {
                "step": trainer.global_step,
                "epoch": trainer.current_epoch,
                "loss": float(loss),
                "samples": list(batch["sample_id"]),
            }
        )

    def state_dict(self) -> dict:  # a checkpoint is written by rank 0: gather every rank's record
        from lit_vlm.distributed import all_gather_objects

        return {"ranks": all_gather_objects(list(self.steps))}

    def load_state_dict(self, state_dict: dict) -> None:
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.steps = list(state_dict["ranks"][rank])

    def on_train_end(self, trainer, pl_module):
        out = self.out if trainer.global_rank == 0 else f"{self.out}.rank{trainer.global_rank}"
        with open(out, "w") as fh:
            json.dump(self.steps, fh)
