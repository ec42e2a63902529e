"""Benchmarks: `python -m bench COMMAND --help`.

Each benchmark is a module in this package with `add_arguments(parser)` and
`run(args) -> int`, listed in `BENCHMARKS` in `__main__.py`.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


def best_time(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Run `fn` once to warm up, then `repeats` times: (best, median) seconds."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def load_note() -> str:
    """Load average and core count, to read timings against."""
    try:
        one, five, _ = os.getloadavg()
        return f"load average {one:.2f} (1 min) / {five:.2f} (5 min) on {os.cpu_count()} cores"
    except OSError:
        return f"{os.cpu_count()} cores"


@dataclass
class Row:
    case: str
    impl: str
    best_s: float
    median_s: float
    bytes_moved: int


def print_table(rows: list[Row], floor: str = "memcpy", baseline: str = "torch") -> None:
    """Seconds, GB/s (bytes read + written), and time ratios vs the memcpy
    floor and the torch baseline of the same case."""
    header = f"{'case':<12} {'impl':<22} {'best s':>8} {'median s':>9} {'GB/s':>7} {'x memcpy':>9} {'x torch':>8}"
    print(header)
    print("-" * len(header))
    by_case: dict[str, dict[str, Row]] = {}
    for row in rows:
        by_case.setdefault(row.case, {})[row.impl] = row
    for row in rows:
        same_case = by_case[row.case]
        vs_floor = row.best_s / same_case[floor].best_s if floor in same_case else float("nan")
        vs_base = row.best_s / same_case[baseline].best_s if baseline in same_case else float("nan")
        gbps = row.bytes_moved / row.best_s / 1e9
        print(
            f"{row.case:<12} {row.impl:<22} {row.best_s:>8.4f} {row.median_s:>9.4f} "
            f"{gbps:>7.2f} {vs_floor:>9.2f} {vs_base:>8.2f}"
        )
