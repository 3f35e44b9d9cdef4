"""One rank of the 2-process CLIP DDP check (run by tests/test_ddp_loss.py as a plain subprocess).

usage: python tests/ddp_worker.py RANK WORLD OUT_DIR [vit|convnet|binding]

The ranks meet through a file store in OUT_DIR (not a TCP port, which two concurrent test runs could
both pick).
"""

import datetime
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from test_ddp_loss import GLOBAL_BATCH, make_batch, make_model  # noqa: E402


def main(rank: int, world: int, out_dir: str, tower: str = "vit") -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{os.path.abspath(out_dir)}/dist-store", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    torch.set_num_threads(1)
    model = make_model(tower).train()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    per = GLOBAL_BATCH // world
    batch = {k: v[rank * per : (rank + 1) * per] for k, v in make_batch(tower).items()}
    loss = ddp(batch)["loss"]
    loss.backward()  # DDP averages gradients over ranks
    global_loss = loss.detach().clone()
    dist.all_reduce(global_loss)
    global_loss /= world
    if rank == 0:
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        buffers = {n: b.clone() for n, b in model.named_buffers() if b.is_floating_point()}
        torch.save({"loss": global_loss, "grads": grads, "buffers": buffers}, os.path.join(out_dir, "ddp.pt"))
    del ddp
    dist.barrier()  # leave together: a rank tearing down while the other is still in the group can hang
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:])
