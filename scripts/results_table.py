#!/usr/bin/env python3
"""Turns the eval JSON files of scripts/train-mini.sh into the README's results table (markdown).

Usage: python3 scripts/results_table.py RUNS_DIR
"""

import json
import statistics
import sys
from pathlib import Path


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def pct(values: list[float]) -> str:
    mean = 100 * statistics.mean(values)
    if len(values) < 2:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}"


def main() -> None:
    runs = Path(sys.argv[1])
    base = load(runs / "eval-mini-base.json")
    rows = [("mini-base (pretrained)", [base])]
    for name, label in [("mini-r1", "GRPO, accuracy + format reward"), ("accuracy-only", "GRPO, accuracy reward only")]:
        files = sorted(runs.glob(f"eval-{name}-seed*.json"))
        if files:
            rows.append((f"{label} ({len(files)} seeds)", [load(f) for f in files]))
    k = base["k"]
    print(f"| model | greedy accuracy | pass@1 (k={k}) | pass@{k} | maj@{k} | thinks | mean length |")
    print("|---|---|---|---|---|---|---|")
    for label, reports in rows:
        def col(key):
            return pct([r[key] for r in reports])
        length = statistics.mean(r["mean_completion_tokens"] for r in reports)
        print(f"| {label} | {col('accuracy')} | {col('pass_at_1')} | {col('pass_at_k')} | {col('maj_at_k')} | {col('thinking')} | {length:.0f} |")
    gains = [r["accuracy"] - base["accuracy"] for r in rows[1][1]] if len(rows) > 1 else []
    if gains:
        print()
        print(f"Greedy held-out accuracy gain from GRPO: {pct(gains)} points (mean ± std over seeds).")
    print()
    print("Greedy accuracy by difficulty (digits of the larger operand):")
    print()
    levels = [lvl["digits"] for lvl in base["by_difficulty"]]
    print("| model | " + " | ".join(f"{d} digits" for d in levels) + " |")
    print("|---|" + "---|" * len(levels))
    for label, reports in rows:
        cells = []
        for d in levels:
            cells.append(pct([next(l["accuracy"] for l in r["by_difficulty"] if l["digits"] == d) for r in reports]))
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
