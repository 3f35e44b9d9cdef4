"""One rank of a 2-process gloo check, generic: run ``FUNCTION(rank, world)`` from a module of tests/ and save it.

usage: python tests/ddp_loss_worker.py MODULE:FUNCTION RANK WORLD OUT_DIR

Initialises a gloo process group through a file store in OUT_DIR (not a TCP port, which two
concurrent test runs could both pick), imports MODULE from this
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


def main(target: str, rank: int, world: int, out_dir: str) -> None:
    module_name, _, function_name = target.partition(":")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    function = getattr(importlib.import_module(module_name), function_name)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{os.path.abspath(out_dir)}/dist-store",
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
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
