"""Stage times of one batch, taken with a context manager around each stage (as Ultralytics' predictor profiles
preprocess, inference and postprocess), and what the metrics count per batch."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

STAGES = ("preprocess", "inference", "postprocess")


@dataclass
class Timings:
    """Milliseconds per stage, summed over the batch in this thread: inference is the time spent waiting for the
    runtime (starting images while its streams are busy, and their results), not its compute time, which overlaps
    the other stages where the runtime runs asynchronously."""

    ms: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    detections: list[int] = field(default_factory=list)  # per answered image
    tiles: list[int] = field(default_factory=list)  # per sliced request: the tiles its images were cut into

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Add the time of the ``with`` block to stage ``name``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.ms[name] += (time.perf_counter() - start) * 1000
