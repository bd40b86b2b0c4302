"""Tracking through the server (``scripts/track.py``): the frames of a video or a folder streamed over gRPC
StreamPredictions2 as one sequence to an archive that tracks, their detections with track ids written as
MOTChallenge rows and, when asked, as an annotated video.

TorchServe 0.12 shapes this client (docs/tracking.md). Its replies carry no frame number, so frames go in lock-step,
one in flight (``GrpcClient.stream``), while a background thread reads and encodes the next ones. A sequence-batching
worker that dies is never restarted and its streams get no answer at all, so every frame has a deadline. A sequence
over the model's limit is refused with TorchServe's message about workers and queues, translated here. A frame the
handler refuses (a corrupt image) is reported and the sequence goes on.
"""

from __future__ import annotations

import colorsys
import json
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import grpc
import numpy as np
from tqdm import tqdm

from yolonas_tools.data.frames import Frame, Prefetch, read_frames, source_info
from yolonas_tools.data.sequences import mot_row
from yolonas_tools.serve.clients import Endpoints
from yolonas_tools.serve.grpc_client import GrpcClient, PredictionError

#  A frame without an answer this long means a dead worker: no frame legitimately waits longer than a batch, and an
#  archive's responseTimeout (60 s for S) would have killed the worker before.
FRAME_TIMEOUT_S = 30.0
#  In TorchServe 0.12's refusal of a sequence beyond maxNumSequence (and of a frame beyond maxSequenceJobQueueSize).
LIMIT_REFUSAL = "maxSequenceJobQueueSize"
#  Centres of each track drawn behind it in the annotated video.
TRAIL_FRAMES = 20


class TrackingError(RuntimeError):
    """The sequence could not go on; the message says why and what to do."""


class SequenceLimitError(TrackingError):
    """TorchServe refused a new sequence: the model already serves as many as its maxNumSequence."""

    def __init__(self, model: str, refusal: str):
        super().__init__(
            f"{model} already serves as many sequences as it may (maxNumSequence in its model-config.yaml): TorchServe "
            f"frees a sequence's place only after sequenceMaxIdleMSec without frames, however it ended. Retry "
            f"later, or build the archive with a larger limit (--batch-size N --set maxNumSequence=N). TorchServe "
            f"said: {refusal}"
        )


class FrameTimeout(TrackingError):
    """A frame got no answer in time: the model's worker is most likely dead."""

    def __init__(self, model: str, frame: int, seconds: float):
        super().__init__(
            f"frame {frame} got no answer from {model} within {seconds:g} s: its worker has most likely died. "
            f"TorchServe 0.12 never restarts the worker of a sequence-batching model (it keeps describing it as "
            f"READY) and leaves its streams without an answer. Unregister the model and register it again: "
            f"python scripts/grpc_client.py unregister {model}; python scripts/grpc_client.py register {model}.mar"
        )


# --- the stream ----------------------------------------------------------------------------------------------------


@dataclass
class FrameResult:
    """A frame's answer: its detections as the server sends them (``box``, ``score``, ``class_name``, ``track_id``
    ...), or the handler's error for that frame."""

    frame: Frame
    detections: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


class _Deadline:
    """Watches the frames in flight (from sending until the caller takes the answer); once the oldest has waited
    ``seconds``, records its number and calls ``expire`` (which closes the channel, so the stream's blocked read
    fails instead of waiting for ever)."""

    def __init__(self, in_flight: deque[tuple[Frame, float]], seconds: float, expire: Callable[[], None]):
        self.in_flight, self.seconds, self._expire = in_flight, seconds, expire
        self.expired_frame: int | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="frame-deadline")
        self._thread.start()

    def _watch(self) -> None:
        while not self._done.wait(min(0.25, self.seconds / 4)):
            oldest = self.in_flight[0] if self.in_flight else None
            if oldest is not None and time.monotonic() - oldest[1] > self.seconds:
                self.expired_frame = oldest[0].number
                self._expire()
                return

    def close(self) -> None:
        self._done.set()
        self._thread.join()


def track(
    endpoints: Endpoints,
    model: str,
    frames: Iterable[Frame],
    options: Mapping[str, Any] | None = None,
    sequence_id: str | None = None,
    frame_timeout: float = FRAME_TIMEOUT_S,
    end: bool = True,
) -> Iterator[FrameResult]:
    """Stream ``frames`` as one sequence and yield each frame's result in order. With ``end`` the last frame carries
    ``sequence_end``, freeing the sequence's tracker in the worker at once. Raises SequenceLimitError when TorchServe
    refuses the sequence, FrameTimeout when a frame goes unanswered for ``frame_timeout`` seconds."""
    sequence_id = sequence_id or f"track-{uuid.uuid4()}"
    in_flight: deque[tuple[Frame, float]] = deque()  # sent, unanswered: one at a time in lock-step
    failed: list[Exception] = []  # the source's error, raised once the frames before it are answered

    def outgoing() -> Iterator[tuple[bytes, dict[str, str]]]:
        """Runs on gRPC's sending thread: an error raised here would only cancel the call, so it ends the frames
        (half-closing with nothing in flight) and is raised after the last answer."""
        try:
            for frame in frames:
                in_flight.append((frame, time.monotonic()))
                yield frame.data, ({"sequence_end": "true"} if end and frame.last else {})
        except Exception as exc:
            failed.append(exc)

    client = GrpcClient(endpoints)
    deadline = _Deadline(in_flight, frame_timeout, client.close)
    try:
        for body in client.stream(model, outgoing(), options, sequence_id, check=False):
            yield _result(in_flight.popleft()[0], body)
        if failed:
            raise failed[0]
    except PredictionError as exc:
        if LIMIT_REFUSAL in str(exc):
            raise SequenceLimitError(model, str(exc)) from None
        raise
    except (grpc.RpcError, ValueError):  # ValueError: a call opened on the channel the deadline closed
        if deadline.expired_frame is not None:
            raise FrameTimeout(model, deadline.expired_frame, frame_timeout) from None
        raise
    finally:
        deadline.close()
        client.close()


def _result(frame: Frame, body: bytes) -> FrameResult:
    answer = json.loads(body)
    if "error" in answer:
        return FrameResult(frame, error=answer["error"])
    return FrameResult(frame, answer["detections"])


def mot_rows(result: FrameResult) -> list[str]:
    """MOTChallenge rows of a frame's tracked detections (those without a track id, -1, are left out)."""
    return [
        mot_row(result.frame.number, d["track_id"], tuple(d["box"]), d["score"])
        for d in result.detections
        if d.get("track_id", -1) >= 0
    ]


# --- the annotated video -------------------------------------------------------------------------------------------


def track_colour(track_id: int) -> tuple[int, int, int]:
    """A bright BGR colour per id; consecutive ids far apart in hue."""
    red, green, blue = colorsys.hsv_to_rgb((track_id * 0.618034) % 1.0, 0.85, 1.0)
    return int(blue * 255), int(green * 255), int(red * 255)


class AnnotatedVideo:
    """Each frame with its tracked boxes, ``#id class`` labels and a short trail of each track's centres; boxes
    without an id thin and grey. mp4v at ``fps``, the size of the first frame."""

    def __init__(self, path: Path, fps: float):
        self.path, self.fps = Path(path), fps
        self._writer: cv2.VideoWriter | None = None
        self._size: tuple[int, int] | None = None
        self._trails: dict[int, deque[tuple[int, int]]] = {}
        self._seen: dict[int, int] = {}

    def write(self, result: FrameResult) -> None:
        image = self._canvas(result.frame)
        number = result.frame.number
        for d in result.detections:
            x1, y1, x2, y2 = (int(round(v)) for v in d["box"])
            track_id = d.get("track_id", -1)
            if track_id < 0:
                cv2.rectangle(image, (x1, y1), (x2, y2), (160, 160, 160), 1)
                continue
            colour = track_colour(track_id)
            trail = self._trails.setdefault(track_id, deque(maxlen=TRAIL_FRAMES))
            trail.append(((x1 + x2) // 2, (y1 + y2) // 2))
            self._seen[track_id] = number
            if len(trail) > 1:
                cv2.polylines(image, [np.array(trail, dtype=np.int32).reshape(-1, 1, 2)], False, colour, 2, cv2.LINE_AA)
            cv2.rectangle(image, (x1, y1), (x2, y2), colour, 2)
            _label(image, f"#{track_id} {d.get('class_name', '')}", (x1, y1), colour)
        for track_id in [t for t, last in self._seen.items() if number - last > TRAIL_FRAMES]:
            del self._seen[track_id], self._trails[track_id]  # a track gone this long starts a new trail
        status = f"frame {number}" + (f": {result.error}" if result.error else "")
        _label(image, status[:80], (0, 14), (0, 0, 255) if result.error else (40, 40, 40))
        self._write(image)

    def _canvas(self, frame: Frame) -> np.ndarray:
        if frame.pixels is not None:
            return frame.pixels.copy()
        height, width = self._size[::-1] if self._size else (480, 640)
        return np.full((height, width, 3), 64, dtype=np.uint8)  # a frame that did not decode

    def _write(self, image: np.ndarray) -> None:
        if self._writer is None:
            self._size = (image.shape[1], image.shape[0])
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, self._size)
            if not self._writer.isOpened():
                raise TrackingError(f"{self.path}: OpenCV cannot write an mp4v video there")
        if (image.shape[1], image.shape[0]) != self._size:
            image = cv2.resize(image, self._size)
        self._writer.write(image)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()


def _label(image: np.ndarray, text: str, corner: tuple[int, int], colour: tuple[int, int, int]) -> None:
    """White text on a ``colour`` band just above ``corner``, moved inside the image where it would stick out; the
    font grows with frames wider than 480 pixels."""
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.45 * max(1.0, image.shape[1] / 480)
    (width, height), _ = cv2.getTextSize(text, font, scale, 1)
    x, y = max(0, min(corner[0], image.shape[1] - width - 4)), max(corner[1], height + 4)
    cv2.rectangle(image, (x, y - height - 4), (x + width + 4, y), colour, -1)
    cv2.putText(image, text, (x + 2, y - 3), font, scale, (255, 255, 255), 1, cv2.LINE_AA)


# --- a source to files ---------------------------------------------------------------------------------------------


@dataclass
class TrackSummary:
    frames: int = 0
    rows: int = 0
    tracks: set[int] = field(default_factory=set)
    failed: list[str] = field(default_factory=list)  # "frame N (name): error"
    seconds: float = 0.0

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds else 0.0


def track_to_files(
    endpoints: Endpoints,
    model: str,
    source: Path,
    out: Path,
    save: Path | None = None,
    options: Mapping[str, Any] | None = None,
    sequence_id: str | None = None,
    frame_timeout: float = FRAME_TIMEOUT_S,
    fps: float | None = None,
    progress: bool = True,
) -> TrackSummary:
    """Track ``source`` through ``model``: MOTChallenge rows to ``out`` (written as frames are answered), the
    annotated video to ``save``; a frame the server refuses is reported on the progress bar and skipped."""
    info = source_info(source)
    summary = TrackSummary()
    video = AnnotatedVideo(save, fps or info.fps or 30.0) if save else None
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with (
        Prefetch(read_frames(source, pixels=video is not None)) as frames,
        open(out, "w") as rows,
        tqdm(total=info.frames, unit="frame", disable=not progress, dynamic_ncols=True) as bar,
    ):
        try:
            for result in track(endpoints, model, frames, options, sequence_id, frame_timeout):
                summary.frames += 1
                if result.error:
                    summary.failed.append(f"frame {result.frame.number} ({result.frame.name}): {result.error}")
                    bar.write(f"error: {summary.failed[-1]}", file=sys.stderr)
                lines = mot_rows(result)
                rows.writelines(line + "\n" for line in lines)
                summary.rows += len(lines)
                summary.tracks.update(d["track_id"] for d in result.detections if d.get("track_id", -1) >= 0)
                if video is not None:
                    video.write(result)
                bar.update()
        finally:
            summary.seconds = time.perf_counter() - start
            if video is not None:
                video.close()
    return summary
