"""One rank of a 2-process gloo check, generic: run ``FUNCTION(rank, world)`` from a module of tests/ and save it.

usage: python tests/ddp_loss_worker.py MODULE:FUNCTION RANK WORLD PORT OUT_DIR

Initialises a gloo process group over loopback (tcp://127.0.0.1:PORT), imports MODULE from this
folder, calls FUNCTION(rank, world) and saves what it returns (anything ``torch.save`` takes) to
OUT_DIR/rank{RANK}.pt. Started as one plain subprocess per rank by the tests (see
tests/test_ddp_contrastive.py), never through torch.multiprocessing.spawn.
"""

import datetime
import importlib
import os
import sys

import torch
import torch.distributed as dist


def main(target: str, rank: int, world: int, port: int, out_dir: str) -> None:
    module_name, _, function_name = target.partition(":")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    function = getattr(importlib.import_module(module_name), function_name)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        result = function(rank, world)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
