"""Training-loop safety: the random state that makes a resumed run continue exactly, and the guard
against training on non-finite losses. Both are default callbacks of ``lit-vlm fit``.

Resuming exactly
----------------
A Lightning checkpoint holds the weights, the optimiser, the schedulers and the loops' counters;
with lit-vlm's resumable training loader (:class:`~lit_vlm.datamodules.stream.StreamLoader`) it
also holds where the data stream stands. What it lacks is the process's random state, which draws
every random choice made outside the data workers (patch dropout, dropout, stochastic depth).
:class:`RandomState` saves it with every checkpoint (Python's ``random``, NumPy, torch CPU and
every CUDA device, for each rank) and restores it on resume, so a run killed at step k and resumed
from its step-k checkpoint draws the same masks at step k + 1 as the run that never stopped. On
CPU the resumed losses are then identical to the uninterrupted run's (tests/test_resume.py). On GPU
they can differ in the last bits: cuDNN / cuBLAS kernels are not deterministic unless
``torch.use_deterministic_algorithms(True)`` (``--trainer.deterministic true``), and a changed
number of GPUs or workers changes the stream.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import lightning.pytorch as pl
import torch

from lit_vlm.distributed import all_gather_objects
from lit_vlm.errors import UserError

log = logging.getLogger("lit_vlm")


def rng_states() -> dict[str, Any]:
    """This process's random states, in types ``torch.load(weights_only=True)`` accepts."""
    version, state, gauss = random.getstate()
    states: dict[str, Any] = {"python": [version, list(state), gauss], "torch": torch.get_rng_state()}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        states["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)]
    except ImportError:  # pragma: no cover - numpy ships with torch's dependencies
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore :func:`rng_states`."""
    if "python" in states:
        version, state, gauss = states["python"]
        random.setstate((version, tuple(state), gauss))
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if "numpy" in states:
        import numpy as np

        kind, keys, pos, has_gauss, cached = states["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in states and torch.cuda.is_available():
        cuda = states["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


class RandomState(pl.Callback):
    """Saves every rank's random state in each checkpoint and restores it on resume (see the
    module docstring). A checkpoint from a run with another number of ranks restores rank r's state
    where it exists and leaves the others seeded as they are."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning restores a resumable loader's state only when it builds the loader after the
        # checkpoint was read; it builds the training loader earlier (to count the fit's steps), so
        # hand the restored state over now, before the first batch is drawn.
        fit_loop = trainer.fit_loop
        if fit_loop.restarting and getattr(fit_loop, "_combined_loader_states_to_load", None):
            fit_loop._load_combined_loader_states()

    def state_dict(self) -> dict[str, Any]:
        return {"ranks": all_gather_objects(rng_states())}  # every rank saves a checkpoint's state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        ranks = state_dict.get("ranks") or []
        rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
        if rank < len(ranks):
            set_rng_states(ranks[rank])


class NonFiniteLossError(UserError, RuntimeError):
    """Training stopped after too many consecutive non-finite losses."""


class NonFiniteLoss(pl.Callback):
    """Never train on a NaN or infinite loss: such a step is skipped (its gradients are dropped
    before the optimiser step, on every rank at once) and counted with a warning. Up to
    ``max_consecutive`` steps in a row are skipped; one more stops the run with
    :class:`NonFiniteLossError` (its checkpoints stay as they were).

    The decision is shared by all ranks (one all-reduce of a flag per optimiser step), so DDP never
    diverges. Works with Lightning's automatic optimisation and with lit-vlm's exact contrastive
    accumulation (``accum_freq``: a non-finite loss in any micro-batch skips the step). Under
    ``16-mixed`` precision the gradient scaler still handles overflowing *gradients* itself; this
    guard only looks at the loss. Counts are logged as ``train/nonfinite_skipped`` and kept in
    checkpoints.

    Args:
        max_consecutive: Non-finite steps in a row that are skipped (0: stop at the first one).
    """

    def __init__(self, max_consecutive: int = 5) -> None:
        if not isinstance(max_consecutive, int) or max_consecutive < 0:
            raise UserError(f"NonFiniteLoss max_consecutive must be an integer >= 0, got {max_consecutive!r}")
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive = 0
        self._bad: torch.Tensor | None = None

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        bad = (~torch.isfinite(loss.detach())).any()
        self._bad = bad if self._bad is None else self._bad | bad

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        flag = torch.zeros((), device=pl_module.device) if self._bad is None else self._bad.float()
        self._bad = None
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce(flag, reduce_op="sum")
        if flag.item() == 0:
            self.consecutive = 0
            return
        optimizer.zero_grad(set_to_none=True)  # the optimiser step then changes nothing
        self.skipped += 1
        self.consecutive += 1
        pl_module.log("train/nonfinite_skipped", float(self.skipped), on_step=True, on_epoch=False, rank_zero_only=True)
        if self.consecutive > self.max_consecutive:
            raise NonFiniteLossError(
                f"the training loss was NaN or infinite in {self.consecutive} steps in a row (step "
                f"{trainer.global_step}; {self.skipped} skipped in all): lower the learning rate, check the data, "
                "or try trainer.precision 32-true / bf16-mixed; NonFiniteLoss max_consecutive sets how many to skip"
            )
        log.warning(
            "step %d: non-finite training loss, step skipped (%d in a row, %d in all; the run stops after %d in a row)",
            trainer.global_step, self.consecutive, self.skipped, self.max_consecutive + 1,
        )

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))
