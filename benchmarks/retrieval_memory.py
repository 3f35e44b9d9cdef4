"""Peak memory and wall time of the chunked retrieval metrics at COCO-5k scale.

    python benchmarks/retrieval_memory.py [--images 5000] [--captions-per-image 5] [--dim 512]
                                          [--chunk-sizes 1024] [--naive] [--threads N]

Builds random normalised embeddings (default 5,000 images x 25,000 captions, D = 512, float32) and
runs :func:`lit_vlm.metrics.retrieval_metrics` on them, each configuration in a fresh
subprocess so that nothing else lives in the heap. The peak is measured as the rise of the
process's resident set size over its value just before the call:

* Linux: the peak RSS counter ``VmHWM`` is reset (``/proc/self/clear_refs`` <- 5) and freed heap
  is returned to the OS (``malloc_trim``) right before the call, then ``VmHWM - VmRSS(before)``;
* elsewhere: ``ru_maxrss`` after minus RSS before (an upper bound: it includes any earlier peak).

It prints those figures next to what a naive implementation holds: the full ``[T, I]`` float32
similarity and a full int64 ``[T, I]`` rank/argsort matrix (and, with ``--naive``, runs such a
full-matrix argsort implementation to measure it). Prints the machine; record the figures in
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import resource
import subprocess
import sys
import time

MIB = 2**20


def _status_kib(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM), or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _maxrss_kib() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # macOS reports bytes


def _reset_peak() -> bool:
    """Give freed heap back to the OS and reset VmHWM; True when the reset worked (Linux)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _naive(image_emb, text_emb, owner):
    """Full-matrix reference: the whole similarity and full argsorts (what chunking avoids)."""
    import torch

    sim = image_emb @ text_emb.T  # [I, T] float32
    order = sim.argsort(dim=1, descending=True)  # [I, T] int64
    i2t = (owner[order] == torch.arange(sim.shape[0]).unsqueeze(1)).int().argmax(dim=1)  # [I]
    del order
    order = sim.T.argsort(dim=1, descending=True)  # [T, I] int64
    t2i = (order == owner.unsqueeze(1)).int().argmax(dim=1)  # [T]
    return {"i2t_R@1": (i2t < 1).float().mean().item(), "t2i_R@1": (t2i < 1).float().mean().item()}


def child(args: argparse.Namespace) -> None:
    """One measurement in this (fresh) process; prints one JSON line."""
    import torch

    from lit_vlm.metrics import retrieval_metrics

    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    n_img, n_cap = args.images, args.images * args.captions_per_image
    owner = torch.arange(n_img).repeat_interleave(args.captions_per_image)  # [T]
    image_emb = torch.randn(n_img, args.dim, generator=g)  # [I, D]
    image_emb /= image_emb.norm(dim=1, keepdim=True)
    noise = torch.randn(n_cap, args.dim, generator=g).mul_(6.0 / args.dim**0.5)  # [T, D]
    text_emb = noise.add_(image_emb[owner])  # [T, D] own image + noise: recall neither 0 nor 1
    text_emb /= text_emb.norm(dim=1, keepdim=True)
    # warm-up on a tiny problem: thread pools and kernels loaded outside the measured window
    retrieval_metrics(image_emb[:8], text_emb[:40], owner[:40], chunk_size=4)

    reset = _reset_peak()
    rss_before = _status_kib("VmRSS")
    maxrss_before = _maxrss_kib()
    start = time.perf_counter()
    if args.naive:
        metrics = _naive(image_emb, text_emb, owner)
    else:
        metrics = retrieval_metrics(image_emb, text_emb, owner, chunk_size=args.chunk_size)
    wall = time.perf_counter() - start
    hwm = _status_kib("VmHWM")
    if reset and hwm is not None and rss_before is not None:
        peak_kib, method = hwm - rss_before, "VmHWM (reset) - VmRSS before"
    else:
        base = rss_before if rss_before is not None else maxrss_before
        peak_kib, method = _maxrss_kib() - base, "ru_maxrss - RSS before (upper bound)"
    print(
        json.dumps(
            {
                "wall_s": wall,
                "peak_extra_mib": peak_kib / 1024,
                "method": method,
                "rss_before_mib": (rss_before or 0) / 1024,
                "threads": torch.get_num_threads(),
                "i2t_R@1": metrics["i2t_R@1"],
                "t2i_R@1": metrics["t2i_R@1"],
            }
        )
    )


def _machine(threads: int) -> str:
    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        total = float("nan")
    return (
        f"{cpu}; {os.cpu_count()} logical CPUs; {total:.1f} GiB RAM; {platform.platform()}; "
        f"python {platform.python_version()}; torch {torch.__version__}; torch threads {threads}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000, help="Number of images I.")
    parser.add_argument("--captions-per-image", type=int, default=5, help="Captions per image (T = I x this).")
    parser.add_argument("--dim", type=int, default=512, help="Embedding width D.")
    parser.add_argument(
        "--chunk-sizes", type=int, nargs="+", default=None,
        help="Chunk sizes to measure (default: the library default of retrieval_metrics).",
    )  # fmt: skip
    parser.add_argument("--naive", action="store_true", help="Also measure a full-matrix argsort implementation.")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default).")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--chunk-size", type=int, default=1024, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0

    import inspect

    import torch

    from lit_vlm.metrics import retrieval_metrics

    default_chunk = inspect.signature(retrieval_metrics).parameters["chunk_size"].default
    chunks = args.chunk_sizes or [default_chunk]
    n_img, n_cap = args.images, args.images * args.captions_per_image
    full_sim = n_cap * n_img * 4 / MIB
    full_rank = n_cap * n_img * 8 / MIB
    emb = (n_img + n_cap) * args.dim * 4 / MIB
    try:
        from lit_vlm.callbacks.results import machine_info

        machine = machine_info()
    except Exception:  # the benchmark must not depend on the callbacks importing
        machine = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__}
    print(f"machine: {_machine(torch.get_num_threads())}")
    print("         " + json.dumps(machine))
    print(f"problem: {n_img} images x {n_cap} captions ({args.captions_per_image} per image), D = {args.dim}, float32")
    print(f"  embeddings themselves (input, not counted below): {emb:8.1f} MiB")
    print(f"  naive: full [{n_cap}, {n_img}] float32 similarity:  {full_sim:8.1f} MiB")
    print(f"  naive: full [{n_cap}, {n_img}] int64 rank/argsort:  {full_rank:8.1f} MiB")
    runs = [("chunked", c) for c in chunks] + ([("naive", 0)] if args.naive else [])
    print(f"{'implementation':<28}{'peak extra RSS (MiB)':>22}{'wall (s)':>10}{'i2t R@1':>9}{'t2i R@1':>9}")
    for kind, chunk in runs:
        cmd = [
            sys.executable, os.path.abspath(__file__), "--child",
            "--images", str(args.images), "--captions-per-image", str(args.captions_per_image),
            "--dim", str(args.dim), "--chunk-size", str(chunk), "--threads", str(args.threads),
        ]  # fmt: skip
        if kind == "naive":
            cmd.append("--naive")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{kind} run failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            return 1
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        bound = f"chunk_size={chunk}" if kind == "chunked" else "full-matrix argsort"
        print(f"{bound:<28}{r['peak_extra_mib']:>22.1f}{r['wall_s']:>10.2f}{r['i2t_R@1']:>9.3f}{r['t2i_R@1']:>9.3f}")
        if kind == "chunked":
            predicted = chunk * max(n_img, n_cap) * 4 / MIB
            print(f"{'':<28}(one [{chunk}, {max(n_img, n_cap)}] float32 buffer = {predicted:.1f} MiB)")
    print(f"peak measured as: {r['method']}; threads in the measured process: {r['threads']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
