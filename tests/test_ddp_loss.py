"""CLIP under 2-process CPU DDP (gloo): loss and gradients equal one process holding the global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_vlm.models import CLIP
from lit_vlm.modules import TextTransformer, VisionTransformer

pytestmark = pytest.mark.ddp

GLOBAL_BATCH = 8


def make_model() -> CLIP:
    torch.manual_seed(0)
    return CLIP(VisionTransformer("tiny"), TextTransformer("tiny", vocab_size=50, context_length=8), embed_dim=16)


def make_batch() -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 50, (GLOBAL_BATCH, 8), generator=g)
    mask = torch.ones(GLOBAL_BATCH, 8, dtype=torch.bool)
    mask[::2, 6:] = False  # some padding
    ids[~mask] = 0
    return {"image": torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g), "text_ids": ids, "text_mask": mask}


def test_clip_ddp_loss_and_grads_equal_global_batch(tmp_path):
    # Two plain processes, one per rank (tests/ddp_worker.py), gloo over loopback; never hang the suite.
    worker = Path(__file__).with_name("ddp_worker.py")  # ranks meet through a file store in tmp_path
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, str(worker), str(rank), "2", str(tmp_path)], env=env, stderr=subprocess.PIPE, text=True)
        for rank in range(2)
    ]
    try:
        errors = [p.communicate(timeout=180)[1] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("2-process gloo workers did not finish within 180 s")
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-2000:] for e in errors)
    got = torch.load(tmp_path / "ddp.pt")

    model = make_model().train()
    loss = model(make_batch())["loss"]
    loss.backward()
    assert got["loss"].item() == pytest.approx(loss.item(), abs=1e-5)
    ref = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(ref) == set(got["grads"])
    for name, g in ref.items():
        assert torch.allclose(got["grads"][name], g, atol=1e-5, rtol=0), name
    # the test is meaningful: the global batch differs from what one rank sees alone
    model.zero_grad()
    half = {k: v[: GLOBAL_BATCH // 2] for k, v in make_batch().items()}
    assert abs(model(half)["loss"].item() - loss.item()) > 1e-3
