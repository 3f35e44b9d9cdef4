"""Print a run's few-shot results (``FewShotEvaluation``'s ``fewshot_<stage>.json``) as a table:
mean and standard deviation over seeds per task, demonstrations and shots, and whether k shots
beat zero-shot by more than the spread over seeds (the larger of the two standard deviations).

    python benchmarks/fewshot_table.py runs/flamingo-quickstart/version_1 [--stage test]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a run folder (runs/<name>/version_N) holding fewshot_<stage>.json")
    parser.add_argument("--stage", default="test")
    parser.add_argument("--prefix", default="fewshot")
    args = parser.parse_args(argv)
    path = Path(args.run) / f"{args.prefix}_{args.stage}.json"
    if not path.is_file():
        print(f"error: {path} does not exist (run lit-vlm test with FewShotEvaluation first)", file=sys.stderr)
        return 1
    values = json.loads(path.read_text())["values"]
    table: dict[tuple[str, str, str], dict[int, list[float]]] = {}
    for name, vals in values.items():
        task, demos, shots, metric = name.split("/")
        table.setdefault((task, demos, metric), {})[int(shots.removesuffix("shot"))] = vals
    print("| task | demonstrations | shots | mean | std over seeds | per seed | k-shot minus 0-shot (per seed) | above 0-shot by more than the spread |")
    print("|---|---|---|---|---|---|---|---|")
    for (task, demos, metric), by_shots in sorted(table.items()):
        zero = by_shots.get(0)
        for k, vals in sorted(by_shots.items()):
            mean, std = statistics.fmean(vals), statistics.pstdev(vals)
            diff, verdict = "", ""
            if zero is not None and k > 0:
                deltas = [a - b for a, b in zip(vals, zero)]
                spread = max(std, statistics.pstdev(zero))
                diff = ", ".join(f"{d:+.3f}" for d in deltas)
                verdict = "yes" if mean - statistics.fmean(zero) > spread else "no"
            print(f"| {task} {metric} | {demos} | {k} | {mean:.3f} | {std:.3f} | {', '.join(f'{v:.3f}' for v in vals)} | {diff} | {verdict} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
