"""Run one plain subprocess per rank and wait for them all, failing fast and informatively.

A rank that dies leaves the others blocked in a collective; waiting on them one by one would only
report a timeout of a surviving rank. Instead, poll all ranks: the first one to exit with an error
ends the others at once, and the failure shows every rank's stderr.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import pytest


def run_ranks(commands: list[list[str]], timeout: float = 180) -> None:
    """Start ``commands`` (one per rank, argv lists for ``sys.executable``) and wait for all of them."""
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    logs = [tempfile.TemporaryFile(mode="w+") for _ in commands]  # files, not pipes: no pipe can fill up
    procs = [subprocess.Popen([sys.executable, *cmd], env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
             for cmd, log in zip(commands, logs)]

    def report(what: str) -> str:
        out = []
        for rank, (proc, log) in enumerate(zip(procs, logs)):
            log.seek(0)
            out.append(f"--- rank {rank} (exit {proc.returncode}) ---\n{log.read()[-3000:]}")
        return what + "\n" + "\n".join(out)

    deadline = time.monotonic() + timeout
    try:
        while True:
            codes = [p.poll() for p in procs]
            if any(c not in (None, 0) for c in codes):
                pytest.fail(report("a rank failed"))
            if all(c == 0 for c in codes):
                return
            if time.monotonic() > deadline:
                pytest.fail(report(f"{len(procs)}-process gloo workers did not finish within {timeout:.0f} s"))
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
