"""Tracking speed (``scripts/bench.py --tracking``): frames per second of a tracking archive through TorchServe
against plain detection with the same archive settings, on the same frames, streamed the same way.

The fair baseline is a ``--sequence-batching`` archive without a tracker and with single-label NMS (what a tracking
archive runs, so both detect the same boxes): the only difference left is the tracker in the worker and the track ids
in the answers. Both are registered on one TorchServe and driven by the tracking client (``serve/track.py``: gRPC
StreamPredictions2 in lock-step, each stream one sequence) with 1 and then 4 concurrent streams, in windows that
alternate between the two archives round after round, so that the load of other processes falls on both alike;
each stream keeps its sequence across its windows. Frames are a synthetic shapes sequence played forwards and
backwards (continuous motion, the tracks stay alive), encoded once. Reported: the median frames per second of each,
their ratio (the target is at least 0.9), the mean detections per frame (the tracker's cost grows with it), the CPU.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2

from yolonas import read_checkpoint
from yolonas_tools.cli import run_command
from yolonas_tools.data.frames import Frame
from yolonas_tools.data.sequences import shapes_sequence
from yolonas_tools.measure.bench import BenchError, cpu_description, emit, load
from yolonas_tools.serve import server
from yolonas_tools.serve.clients import Endpoints
from yolonas_tools.serve.track import track

#  Archive name -> scripts/archive.py flags: the same detection settings, with and without the tracker.
ARCHIVES = {
    "bench_plain": ["--sequence-batching", "--set", "multi_label=false"],
    "bench_tracked": ["--tracker", "bytetrack"],
}
TARGET = 0.9
FRAMES = 120
OBJECTS = 6


@dataclass(frozen=True)
class TrackingBenchOptions:
    weights: Path | None  # a checkpoint that detects the synthetic shapes (the shapes reference model)
    store: Path | None = None  # keep the archives here and reuse those already there
    duration: float = 20.0  # seconds per archive and stream count, split into ``rounds`` windows
    rounds: int = 4
    streams: tuple[int, ...] = (1, 4)


def encoded_frames(count: int = FRAMES, objects: int = OBJECTS) -> list[bytes]:
    """A synthetic shapes sequence as PNG, encoded once (the client's cost stays out of the comparison)."""
    return [
        cv2.imencode(".png", cv2.cvtColor(frame.image, cv2.COLOR_RGB2BGR))[1].tobytes()
        for frame in shapes_sequence(seed=0, frames=count, objects=objects)
    ]


def played(frames: list[bytes], until: float) -> Iterator[Frame]:
    """The frames forwards, backwards, forwards... until the monotonic time ``until``."""
    order = list(range(len(frames))) + list(range(len(frames) - 2, 0, -1))
    number = 0
    while time.monotonic() < until:
        index = order[number % len(order)]
        number += 1
        yield Frame(number, f"frame {index + 1}", frames[index])


@dataclass
class Window:
    frames: int
    seconds: float
    detections: int

    @property
    def fps(self) -> float:
        return self.frames / self.seconds


def window(endpoints: Endpoints, model: str, frames: list[bytes], streams: int, seconds: float) -> Window:
    """``streams`` concurrent sequences (``<model>-<i>``, the same in every window) for ``seconds``: frames
    answered per second by all together, and the detections they held."""
    counts = [0] * streams
    detections = [0] * streams
    until = time.monotonic() + seconds

    def stream(i: int) -> None:
        for result in track(endpoints, model, played(frames, until), sequence_id=f"{model}-{i}", end=False):
            if result.error:
                raise BenchError(f"{model}: frame {result.frame.name}: {result.error}")
            counts[i] += 1
            detections[i] += len(result.detections)

    start = time.monotonic()
    with ThreadPoolExecutor(streams) as pool:
        list(pool.map(stream, range(streams)))
    return Window(sum(counts), time.monotonic() - start, sum(detections))


def build(options: TrackingBenchOptions, store: Path) -> None:
    """Both archives from ``options.weights``: reused from the store when present, else built there."""
    variant = read_checkpoint(options.weights).variant
    for name, flags in ARCHIVES.items():
        if (store / f"{name}.mar").is_file():
            print(f"reusing {store / name}.mar", file=sys.stderr)
            continue
        argv = ["--variant", variant, "--weights", str(options.weights), "--model-name", name,
                "--export-path", str(store), *flags]  # fmt: skip
        if run_command("archive", argv) != 0:
            raise BenchError(f"could not build {name} (the archive command's error is above)")


def measure(endpoints: Endpoints, options: TrackingBenchOptions, frames: list[bytes]) -> list[dict[str, Any]]:
    """Per stream count: ``rounds`` windows of each archive in turn (the first of each round alternating); one row
    per archive with its median frames per second."""
    rows: list[dict[str, Any]] = []
    for model in ARCHIVES:  # warm-up: every batch size the worker will see, and the sequences opened
        window(endpoints, model, frames, max(options.streams), 2.0)
    for streams in options.streams:
        windows: dict[str, list[Window]] = {model: [] for model in ARCHIVES}
        for round_ in range(options.rounds):
            order = list(ARCHIVES) if round_ % 2 == 0 else list(reversed(ARCHIVES))
            for model in order:
                measured = window(endpoints, model, frames, streams, options.duration / options.rounds)
                windows[model].append(measured)
                print(f"{model}, {streams} stream(s): {measured.fps:.1f} frames/s", file=sys.stderr, flush=True)
        for model, measured in windows.items():
            emit(rows, {
                "kind": "tracking", "archive": model, "streams": streams, "windows": len(measured),
                "frames": sum(w.frames for w in measured),
                "frames_per_s": statistics.median(w.fps for w in measured),
                "detections_per_frame": sum(w.detections for w in measured) / sum(w.frames for w in measured),
            })  # fmt: skip
    return rows


def print_table(rows: list[dict[str, Any]], header: str) -> None:
    by = {(row["archive"], row["streams"]): row for row in rows}
    print(header)
    print("| streams | plain frames/s | tracked frames/s | tracked / plain | detections per frame |")
    print("|---|---|---|---|---|")
    for streams in sorted({row["streams"] for row in rows}):
        plain, tracked = by["bench_plain", streams], by["bench_tracked", streams]
        ratio = tracked["frames_per_s"] / plain["frames_per_s"]
        verdict = "" if ratio >= TARGET else f" (below the {TARGET}x target)"
        print(f"| {streams} | {plain['frames_per_s']:.1f} | {tracked['frames_per_s']:.1f} | {ratio:.2f}x{verdict} | "
              f"{tracked['detections_per_frame']:.1f} |")  # fmt: skip


def run_tracking(options: TrackingBenchOptions) -> None:
    """Build (or reuse) both archives, serve them, measure, print the JSON rows and the table."""
    if options.weights is None or not Path(options.weights).is_file():
        raise BenchError(
            f"--tracking needs --weights, a checkpoint that detects the synthetic shapes such as the shapes reference "
            f"model (../shared/reference/shapes/checkpoint.pth); got {options.weights}"
        )
    frames = encoded_frames()
    with tempfile.TemporaryDirectory() as tmp:
        store = options.store or Path(tmp) / "store"
        store.mkdir(parents=True, exist_ok=True)
        build(options, store)
        run_dir = Path(tmp) / "run"
        endpoints = server.start(run_dir, store, models=list(ARCHIVES), ports=server.free_ports())
        try:
            rows = measure(endpoints, options, frames)
        finally:
            server.stop(run_dir)
    for row in rows:
        print(json.dumps(row))
    seconds = options.duration / options.rounds
    header = (
        f"# tracking (ByteTrack) against plain detection, {options.weights.name}: {len(frames)} frames "
        f"320x320 played back and forth, {options.rounds} windows of {seconds:g} s each per archive and stream "
        f"count, medians; load {load()}\n# CPU: {cpu_description()}"
    )
    print_table(rows, header)
