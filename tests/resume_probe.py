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

    def state_dict(self) -> dict:
        return {"steps": list(self.steps)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.steps = list(state_dict["steps"])

    def on_train_end(self, trainer, pl_module):
        with open(self.out, "w") as fh:
            json.dump(self.steps, fh)
