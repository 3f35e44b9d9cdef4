"""CLIP under 2-process CPU DDP (gloo): loss and gradients equal one process holding the global batch."""

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

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


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    model = make_model().train()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    per = GLOBAL_BATCH // world
    batch = {k: v[rank * per : (rank + 1) * per] for k, v in make_batch().items()}
    loss = ddp(batch)["loss"]
    loss.backward()  # DDP averages gradients over ranks
    global_loss = loss.detach().clone()
    dist.all_reduce(global_loss)
    global_loss /= world
    if rank == 0:
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        torch.save({"loss": global_loss, "grads": grads}, os.path.join(out_dir, "ddp.pt"))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_clip_ddp_loss_and_grads_equal_global_batch(tmp_path):
    ctx = mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 180  # never hang the suite: fail instead
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("2-process gloo workers did not finish within 180 s")
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
