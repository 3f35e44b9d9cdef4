"""Peak memory and wall time of one SigLIP loss forward + backward under CPU DDP, chunked or not.

    python benchmarks/siglip_memory.py [--global-batch 4096] [--world 2] [--dim 512]
                                       [--modes gather ring] [--chunk-sizes 512] [--threads 1]

Each configuration (mode x chunk size, plus the unchunked ``chunk_size=None``) runs in a fresh set
of ``--world`` CPU processes joined by a gloo process group over loopback, each holding
``global_batch / world`` random L2-normalised image and text embeddings (float32, leaves that need
gradients) and a learnable scale and bias. Every rank computes
:func:`lit_vlm.losses.siglip_loss` (``gather=True``) and ``backward()`` once; measured per rank:

* peak memory: the rise of the resident set size during that call, measured as in
  benchmarks/retrieval_memory.py — on Linux ``VmHWM`` is reset (``/proc/self/clear_refs`` <- 5)
  after ``malloc_trim`` right before the call and ``VmHWM - VmRSS(before)`` is reported; elsewhere
  ``ru_maxrss`` minus RSS before (an upper bound);
* wall time of the forward + backward (the ranks start together after a barrier).

A tiny warm-up run of the same configuration (same collectives, thread pools) precedes the
measured one. The table shows each rank's peak, the slowest rank's wall time, the global-batch loss
(the DDP average; identical for every configuration up to float rounding) and, for reference, the
size of the float32 logit block one step works on: [B, W*B] (gather), [B, B] (ring, per ring step)
or [B, chunk] (chunked). Prints the machine; record the figures in benchmarks/README.md.

What the chunked figure still contains: the O(W*B*D) feature terms that chunking does not bound
(the gathered [W*B, D] texts and their gradient, the all_gather backward's buffers, the gradients
of the inputs; in ring mode the received [B, D] blocks). glibc may also keep freed heap pages
resident and reuse them, which adds noise of a few blocks; running with a fixed mmap threshold
(``MALLOC_MMAP_THRESHOLD_=131072 python benchmarks/siglip_memory.py``) returns every large block to
the OS on free, so the figure is then the live set alone.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from retrieval_memory import _machine, _maxrss_kib, _reset_peak, _status_kib  # noqa: E402  (same measurement)

MIB = 2**20


def child(args: argparse.Namespace) -> None:
    """One rank of one measurement; rank 0 prints one JSON line with every rank's figures."""
    import torch
    import torch.distributed as dist

    from lit_vlm.losses import siglip_loss

    torch.set_num_threads(args.threads)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank, world_size=args.world,
        timeout=datetime.timedelta(seconds=300),
    )  # fmt: skip
    chunk = args.chunk_size or None
    per_rank = args.global_batch // args.world
    g = torch.Generator().manual_seed(1000 + args.rank)
    image = torch.nn.functional.normalize(torch.randn(per_rank, args.dim, generator=g), dim=-1)  # [B, D]
    text = torch.nn.functional.normalize(image + torch.randn(per_rank, args.dim, generator=g), dim=-1)  # [B, D]
    image.requires_grad_(True)
    text.requires_grad_(True)
    log_scale = torch.tensor(2.3, requires_grad=True)  # t' ~ log 10 as in the paper's init
    bias = torch.tensor(-10.0, requires_grad=True)

    def step(img: torch.Tensor, txt: torch.Tensor, warm_chunk: int | None) -> torch.Tensor:
        loss = siglip_loss(img, txt, log_scale.exp(), bias, mode=args.mode, chunk_size=warm_chunk)["loss"]
        loss.backward()
        return loss.detach()

    step(image[:8].detach().requires_grad_(True), text[:8].detach().requires_grad_(True), 3 if chunk else None)
    log_scale.grad = bias.grad = None

    dist.barrier()
    reset = _reset_peak()
    rss_before = _status_kib("VmRSS")
    maxrss_before = _maxrss_kib()
    dist.barrier()
    start = time.perf_counter()
    loss = step(image, text, chunk)
    wall = time.perf_counter() - start
    hwm = _status_kib("VmHWM")
    if reset and hwm is not None and rss_before is not None:
        peak_kib, method = hwm - rss_before, "VmHWM (reset) - VmRSS before"
    else:
        base = rss_before if rss_before is not None else maxrss_before
        peak_kib, method = _maxrss_kib() - base, "ru_maxrss - RSS before (upper bound)"
    mine = {"rank": args.rank, "peak_extra_mib": peak_kib / 1024, "wall_s": wall, "loss": loss.item()}
    everyone: list = [None] * args.world
    dist.all_gather_object(everyone, mine)
    if args.rank == 0:
        print(json.dumps({"ranks": everyone, "method": method, "threads": torch.get_num_threads()}))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(args: argparse.Namespace, mode: str, chunk: int) -> dict:
    """Run one configuration in ``--world`` fresh processes; rank 0's JSON."""
    port = _free_port()
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": str(args.threads)}
    procs = [
        subprocess.Popen(
            [
                sys.executable, os.path.abspath(__file__), "--child", "--rank", str(rank), "--port", str(port),
                "--world", str(args.world), "--global-batch", str(args.global_batch), "--dim", str(args.dim),
                "--mode", mode, "--chunk-size", str(chunk), "--threads", str(args.threads),
            ],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        for rank in range(args.world)
    ]
    outs = [p.communicate(timeout=900) for p in procs]
    if any(p.returncode != 0 for p in procs):
        raise RuntimeError("a rank failed:\n" + "\n".join(err[-3000:] for _, err in outs))
    return json.loads(outs[0][0].strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--global-batch", type=int, default=4096, help="Global batch size |B| (split over the ranks).")
    parser.add_argument("--world", type=int, default=2, help="Number of CPU processes (ranks).")
    parser.add_argument("--dim", type=int, default=512, help="Embedding width D.")
    parser.add_argument(
        "--modes", nargs="+", default=["gather", "ring"], choices=["gather", "ring"], help="siglip_loss modes."
    )
    parser.add_argument(
        "--chunk-sizes", type=int, nargs="+", default=[512], help="Chunk sizes to measure besides None."
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank.")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="gather", help=argparse.SUPPRESS)
    parser.add_argument("--chunk-size", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0
    if args.global_batch % args.world:
        parser.error(f"--global-batch {args.global_batch} must be divisible by --world {args.world}")

    per_rank = args.global_batch // args.world
    print(f"machine: {_machine(args.threads)}")
    print(
        f"problem: global batch {args.global_batch} = {args.world} ranks x {per_rank}, D = {args.dim}, float32, "
        "one siglip_loss forward + backward per rank (gloo, CPU)"
    )
    logits_mib = per_rank * args.global_batch * 4 / MIB
    emb_mib = 2 * per_rank * args.dim * 4 / MIB
    print(f"  one [B, W*B] = [{per_rank}, {args.global_batch}] float32 logit matrix: {logits_mib:.1f} MiB")
    print(f"  embeddings of one rank (inputs, not counted): 2 x [{per_rank}, {args.dim}] = {emb_mib:.1f} MiB")
    header = f"{'mode':<8}{'chunk_size':>11}" + "".join(f"{f'rank {r} peak MiB':>16}" for r in range(args.world))
    print(header + f"{'wall s':>9}{'loss':>12}{'block MiB':>12}")
    method = threads = None
    for mode in args.modes:
        for chunk in [0, *args.chunk_sizes]:
            r = measure(args, mode, chunk)
            method, threads = r["method"], r["threads"]
            ranks = sorted(r["ranks"], key=lambda x: x["rank"])
            loss = sum(x["loss"] for x in ranks) / len(ranks)
            columns = chunk or (args.global_batch if mode == "gather" else per_rank)  # one step's block
            block = per_rank * columns * 4 / MIB
            print(
                f"{mode:<8}{chunk or 'None':>11}" + "".join(f"{x['peak_extra_mib']:>16.1f}" for x in ranks)
                + f"{max(x['wall_s'] for x in ranks):>9.2f}{loss:>12.6f}{block:>12.1f}"
            )  # fmt: skip
    print(f"peak measured as: {method}; torch threads in each measured rank: {threads}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
