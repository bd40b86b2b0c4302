"""The frames of a video (decoded by OpenCV) or of a folder of images, numbered and read ahead on a background
thread: the tracking client (``serve/track.py``) streams them while the next ones are read and encoded."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Generic, TypeVar

import cv2
import numpy as np

from yolonas_tools.data.images import is_image

#  Frames read and encoded ahead of the one in flight.
PREFETCH_FRAMES = 4
#  Video frames are sent as JPEG: a fraction of PNG's encoding time, and the server decodes either.
JPEG_QUALITY = 95
T = TypeVar("T")


class SourceError(RuntimeError):
    """The video or folder cannot be read."""


@dataclass(frozen=True)
class Frame:
    """A frame as sent: its number (from 1), name (file name, or its number in a video), encoded bytes, pixels (BGR,
    when kept for drawing) and whether it is the sequence's last."""

    number: int
    name: str
    data: bytes
    pixels: np.ndarray | None = None
    last: bool = False


def folder_images(folder: Path) -> list[Path]:
    """The images of a folder, sorted by name (zero-padded numbers keep frame order)."""
    return sorted((path for path in folder.iterdir() if path.is_file() and is_image(path)), key=lambda p: p.name)


def _folder_frames(folder: Path, pixels: bool) -> Iterator[tuple[str, bytes, np.ndarray | None]]:
    """Each image's bytes as they are: the server decodes them exactly as it would a single request."""
    images = folder_images(folder)
    if not images:
        raise SourceError(f"{folder}: no images in this folder")
    for path in images:
        data = path.read_bytes()
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if pixels else None
        yield path.name, data, decoded


def _video_frames(path: Path, pixels: bool) -> Iterator[tuple[str, bytes, np.ndarray | None]]:
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise SourceError(f"{path}: OpenCV cannot open this video")
    try:
        number = 0
        while True:
            ok, image = capture.read()
            if not ok:
                break
            number += 1
            ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
            yield f"frame {number}", encoded.tobytes(), image if pixels else None
        if not number:
            raise SourceError(f"{path}: OpenCV decodes no frame of this video")
    finally:
        capture.release()


def read_frames(source: Path, pixels: bool = False) -> Iterator[Frame]:
    """The frames of a video file (decoded by OpenCV, sent as JPEG) or of a folder of images (sent as stored), in
    order, numbered from 1, the last one marked (read one ahead). ``pixels`` keeps each frame's BGR pixels."""
    source = Path(source)
    if not source.exists():
        raise SourceError(f"{source}: no such video or folder")
    items = _folder_frames(source, pixels) if source.is_dir() else _video_frames(source, pixels)
    previous = None
    for number, (name, data, decoded) in enumerate(items, 1):
        if previous is not None:
            yield previous
        previous = Frame(number, name, data, decoded)
    if previous is not None:
        yield replace(previous, last=True)


@dataclass(frozen=True)
class SourceInfo:
    frames: int | None  # None where the video does not say
    fps: float | None


def source_info(source: Path) -> SourceInfo:
    """How many frames (for the progress bar) and at what rate (for the annotated video), where known."""
    source = Path(source)
    if source.is_dir():
        return SourceInfo(len(folder_images(source)), None)
    capture = cv2.VideoCapture(str(source))
    try:
        count, fps = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), capture.get(cv2.CAP_PROP_FPS)
    finally:
        capture.release()
    return SourceInfo(count if count > 0 else None, fps if fps > 0 else None)


class Prefetch(Generic[T]):
    """Items produced on a background thread, up to ``depth`` ahead of the consumer: frames are read and encoded
    while the server works on the one in flight. An exception of the producer is raised to the consumer in order;
    ``close()`` stops the producer."""

    def __init__(self, items: Iterable[T], depth: int = PREFETCH_FRAMES):
        self._items = items
        self._buffer: queue.Queue[tuple[bool, Any]] = queue.Queue(depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, daemon=True, name="prefetch")
        self._thread.start()

    def _put(self, entry: tuple[bool, Any]) -> bool:
        while not self._stop.is_set():
            try:
                self._buffer.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        iterator = iter(self._items)
        try:
            for item in iterator:
                if not self._put((True, item)):
                    return
            self._put((False, None))
        except Exception as exc:  # handed to the consumer, raised there
            self._put((False, exc))
        finally:
            getattr(iterator, "close", lambda: None)()

    def __iter__(self) -> Iterator[T]:
        while not self._stop.is_set():
            try:
                more, item = self._buffer.get(timeout=0.1)
            except queue.Empty:
                continue
            if not more:
                if item is not None:
                    raise item
                return
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> Prefetch[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
