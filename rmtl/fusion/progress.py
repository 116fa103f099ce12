"""Progress of `rmtl fusion`'s stages: a tqdm bar on a terminal, one line per stage otherwise.

    progress = StageProgress(enabled=verbose)
    with progress.stage("bcq", total=steps, unit="step") as advance:
        agent.fit(..., on_log=lambda step, logs: advance(to=step))

On a terminal (stderr is a TTY) each stage with a known total gets a bar that closes
when the stage ends; otherwise (a log file, CI) the stage's start is one line on stdout,
so a long stage is never silent and a log stays short. Durations go to ``timings``.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator


class StageProgress:
    def __init__(self, *, enabled: bool = True, terminal: bool | None = None, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str, total: int | None = None, unit: str = "it",
              detail: str = "") -> Iterator[Callable[..., None]]:
        """Yields ``advance(n=1, to=None)``: move the bar by n, or to an absolute position."""
        bar = None
        if self.enabled and self.terminal and total:
            from tqdm.auto import tqdm

            bar = tqdm(total=int(total), desc=name, unit=unit, leave=False, dynamic_ncols=True)
        elif self.enabled:
            what = f" ({total:,} {unit}s)" if total else ""
            print(f"stage {name}{what}{': ' + detail if detail else ''} ...", file=self.stream, flush=True)
        position = 0

        def advance(n: int = 1, to: int | None = None) -> None:
            nonlocal position
            step = (int(to) - position) if to is not None else int(n)
            position += step
            if bar is not None and step > 0:
                bar.update(step)

        start = time.perf_counter()
        try:
            yield advance
        finally:
            if bar is not None:
                bar.close()
            self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - start, 2)
