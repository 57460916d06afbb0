"""The one timing loop every benchmark uses: candidates take turns, medians are reported.

Taking turns round-robin (instead of timing each candidate in one block) spreads the noise of a
shared machine evenly over the candidates, so their ratios stay meaningful even when the
absolute times drift. Both wall and process-CPU time are kept: on a busy machine the CPU time
is the steadier of the two (it excludes waiting for a core).
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass


def machine_info(**extra: object) -> dict[str, object]:
    """What every benchmark's JSON records about where it ran, plus its own ``extra`` keys."""
    import torch

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        **extra,
    }


@dataclass(frozen=True)
class Timings:
    wall: dict[str, float]  # median wall seconds per call
    cpu: dict[str, float]  # median process-CPU seconds per call
    results: dict[str, object]  # each candidate's last return value


def time_interleaved(
    turns: dict[str, Callable[[], object]],
    rounds: int,
    warmup: int = 1,
    sync: Callable[[], None] | None = None,
) -> Timings:
    """Call every turn `warmup` times untimed, then `rounds` times each, round-robin.

    `sync` (e.g. `torch.cuda.synchronize`) runs before and after every timed call so that
    asynchronous device work is counted in the call that queued it.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1; got {rounds}")
    results: dict[str, object] = {}
    for _ in range(warmup):
        for name, turn in turns.items():
            results[name] = turn()
    wall: dict[str, list[float]] = {name: [] for name in turns}
    cpu: dict[str, list[float]] = {name: [] for name in turns}
    for _ in range(rounds):
        for name, turn in turns.items():
            if sync is not None:
                sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            results[name] = turn()
            if sync is not None:
                sync()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return Timings(
        wall={name: statistics.median(v) for name, v in wall.items()},
        cpu={name: statistics.median(v) for name, v in cpu.items()},
        results=results,
    )
