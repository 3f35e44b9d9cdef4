"""The training-loop guards: a non-finite loss skips its step (weights and optimiser untouched,
counted) and too many in a row stop the run with a clear message; the random state travels in
checkpoints."""

from __future__ import annotations

import random

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from lit_vlm.callbacks import NonFiniteLoss, NonFiniteLossError, RandomState
from lit_vlm.callbacks.training import rng_states, set_rng_states
from lit_vlm.models import CLIP
from lit_vlm.modules import TextTransformer, VisionTransformer

VOCAB, CTX = 50, 8


class Pairs(Dataset):
    """Image-text pairs; the images of the samples in ``poisoned`` are NaN (a NaN loss)."""

    def __init__(self, n: int, poisoned: set[int]) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, 32, 32, generator=g)
        for i in poisoned:
            self.images[i] = float("nan")
        self.ids = torch.randint(5, VOCAB, (n, CTX), generator=g)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "text_ids": self.ids[i], "text_mask": torch.ones(CTX, dtype=torch.bool)}


def make(**kwargs) -> CLIP:
    torch.manual_seed(0)
    vision = VisionTransformer("tiny", image_size=32)
    text = TextTransformer("tiny", vocab_size=VOCAB, context_length=CTX)
    return CLIP(vision, text, embed_dim=16, warmup_steps=0, **kwargs)


class Snapshots(pl.Callback):
    def __init__(self) -> None:
        self.weights: list[torch.Tensor] = []


    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append(torch.cat([p.detach().flatten() for p in pl_module.parameters()]).clone())



def fit(model, data, guard, max_steps: int, **kwargs) -> Snapshots:
    snaps = Snapshots()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, max_steps=max_steps, callbacks=[guard, snaps], **kwargs,
    )
    trainer.fit(model, DataLoader(data, batch_size=4))
    return snaps


@pytest.mark.parametrize("accum_freq", [1, 2])
def test_nonfinite_step_is_skipped_and_counted(accum_freq, caplog):
    # batch 1 (samples 4-7) has a NaN image: with accum_freq=2 it poisons the first optimiser step
    guard = NonFiniteLoss()
    model = make(accum_freq=accum_freq)
    start = torch.cat([p.detach().flatten() for p in model.parameters()]).clone()
    snaps = fit(model, Pairs(24, poisoned={5}), guard, max_steps=3, gradient_clip_val=None)
    step_ends = snaps.weights[accum_freq - 1 :: accum_freq]  # the weights after each optimiser step
    assert guard.skipped == 1 and guard.consecutive == 0
    skipped = 1 if accum_freq == 1 else 0  # the optimiser step that saw the NaN
    before = start if skipped == 0 else step_ends[skipped - 1]
    assert torch.equal(step_ends[skipped], before)  # nothing moved
    assert torch.isfinite(step_ends[-1]).all()
    assert not torch.equal(step_ends[-1], start)  # the finite steps trained
    assert "non-finite training loss, step skipped (1 in a row, 1 in all" in caplog.text


def test_too_many_nonfinite_steps_stop_the_run():
    guard = NonFiniteLoss(max_consecutive=2)
    with pytest.raises(NonFiniteLossError, match="NaN or infinite in 3 steps in a row"):
        fit(make(), Pairs(24, poisoned=set(range(24))), guard, max_steps=6)
    assert guard.skipped == 3
    with pytest.raises(ValueError, match="max_consecutive"):
        NonFiniteLoss(max_consecutive=-1)


def test_random_state_round_trip():
    random.seed(1)
    torch.manual_seed(1)
    saved = RandomState().state_dict()
    expected = (random.random(), torch.rand(3))
    random.seed(2)
    torch.manual_seed(2)
    RandomState().load_state_dict(saved)
    assert (random.random(), torch.rand(3))[0] == expected[0]
    set_rng_states(saved["ranks"][0])
    random.random()
    assert torch.equal(torch.rand(3), expected[1])
    # the states survive torch.save / torch.load(weights_only=True), as in a checkpoint
    import io

    buffer = io.BytesIO()
    torch.save(rng_states(), buffer)
    buffer.seek(0)
    set_rng_states(torch.load(buffer, weights_only=True))
