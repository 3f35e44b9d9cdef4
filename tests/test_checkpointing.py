"""The Checkpoint callback with a monitor: step checkpoints write `last` from the first steps,
the best are ranked on fresh metrics only, `last` always ends at the final step (also under
save_last="link"), and a monitor on a training metric ranks at the epochs' ends."""

import json

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lit_vlm.callbacks import Checkpoint


class Toy(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        loss = self.w(batch).pow(2).mean()
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_metric", self.w(batch).pow(2).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(tmp_path, steps_per_epoch: int, epochs: int, validate: bool, **checkpoint) -> Checkpoint:
    data = DataLoader(torch.randn(steps_per_epoch * 2, 4), batch_size=2)
    callback = Checkpoint(dirpath=str(tmp_path / "ckpts"), **checkpoint)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=epochs, logger=False, callbacks=[callback], enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=1.0 if validate else 0, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(Toy(), data, data if validate else None)
    return callback


def step_of(path) -> int:
    return torch.load(path, weights_only=True)["global_step"]


@pytest.mark.parametrize("save_last", [True, "link"])
def test_last_ends_at_the_final_step_and_best_is_validated(tmp_path, save_last):
    callback = fit(tmp_path, steps_per_epoch=5, epochs=2, validate=True, monitor="val_metric", every_n_train_steps=2,
                   save_last=save_last, save_top_k=1)
    index = json.loads((tmp_path / "ckpts" / "index.json").read_text())
    assert step_of(tmp_path / "ckpts" / "last.ckpt") == 10
    assert step_of(index["best"]) in (5, 10)  # an epoch end: where validation ran
    assert callback.best_model_score is not None


def test_a_training_metric_monitor_ranks_at_the_epochs_end(tmp_path):
    fit(tmp_path, steps_per_epoch=3, epochs=3, validate=False, monitor="train_loss", mode="min", every_n_train_steps=2,
        save_top_k=1, save_last=True)
    index = json.loads((tmp_path / "ckpts" / "index.json").read_text())
    assert index["best"] is not None and step_of(index["best"]) in (3, 6, 9)
    assert step_of(tmp_path / "ckpts" / "last.ckpt") == 9
