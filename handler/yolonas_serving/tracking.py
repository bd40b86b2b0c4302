"""Object tracking per TorchServe sequence: one tracker of Roboflow's ``trackers`` package per sequence id.

An archive built with a tracker keeps its trackers in the worker. TorchServe 0.12 never tells a worker that a
sequence ended or expired (its worker protocol has only load and inference messages) and may later send the same id
again, or to another worker; so the state here expires on its own after ``idle_s`` without frames, and the number of
sequences a worker holds is bounded. The trackers match boxes whatever their class: with multi-label NMS, one object
found in two classes gets two boxes and so two tracks. ``trackers`` (with ``supervision`` and scipy) takes most of a
second to import: it is imported when the first tracker is made, never by archives without tracking.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import RequestError
from .postprocess import Detections

#  BoT-SORT's three association stages; C-BIoU adds its buffers to the same.
_THREE_STAGE: dict[str, Any] = {
    "lost_track_buffer": 30,
    "frame_rate": 30.0,
    "track_activation_threshold": 0.7,
    "minimum_consecutive_frames": 2,
    "minimum_iou_threshold_first_assoc": 0.2,
    "minimum_iou_threshold_second_assoc": 0.5,
    "minimum_iou_threshold_unconfirmed_assoc": 0.3,
    "high_conf_det_threshold": 0.6,
    "instant_first_frame_activation": True,
}
#  Each kind's parameters with trackers 2.6.1's defaults (tests compare them with the library's signatures). The
#  state estimator and IoU classes stay the library's. BoT-SORT's camera motion compensation is left out: it needs
#  the frame, which the handler does not pass (without one the library silently skips it).
TRACKER_DEFAULTS: dict[str, dict[str, Any]] = {
    "bytetrack": {
        "lost_track_buffer": 30,
        "frame_rate": 30.0,
        "track_activation_threshold": 0.7,
        "minimum_consecutive_frames": 2,
        "minimum_iou_threshold": 0.1,
        "high_conf_det_threshold": 0.6,
    },
    "sort": {
        "lost_track_buffer": 30,
        "frame_rate": 30.0,
        "track_activation_threshold": 0.25,
        "minimum_consecutive_frames": 3,
        "minimum_iou_threshold": 0.3,
    },
    "ocsort": {
        "lost_track_buffer": 30,
        "frame_rate": 30.0,
        "minimum_consecutive_frames": 3,
        "minimum_iou_threshold": 0.3,
        "direction_consistency_weight": 0.2,
        "high_conf_det_threshold": 0.6,
        "delta_t": 3,
    },
    "botsort": _THREE_STAGE,
    "cbiou": {**_THREE_STAGE, "buffer_ratio_first": 0.3, "buffer_ratio_second": 0.5},
}
#  The classes behind the kinds, in the ``trackers`` package.
TRACKER_CLASSES = {
    "bytetrack": "ByteTrackTracker",
    "sort": "SORTTracker",
    "ocsort": "OCSORTTracker",
    "botsort": "BoTSORTTracker",
    "cbiou": "CBIoUTracker",
}
#  Accepted values of the numeric parameters that are not fractions from 0 to 1 (thresholds, weights, ratios).
_LIMITS: dict[str, tuple[Callable[[float], bool], str]] = {
    "lost_track_buffer": (lambda v: v >= 0, ">= 0"),
    "frame_rate": (lambda v: v > 0, "> 0"),
    "minimum_consecutive_frames": (lambda v: v >= 1, ">= 1"),
    "delta_t": (lambda v: v >= 1, ">= 1"),
}
_FRACTION = (lambda v: 0 <= v <= 1, "from 0 to 1")
#  Where each detection's position rides through the tracker: the trackers reorder detections, and BoT-SORT and
#  C-BIoU drop those with confidence <= 0.1.
_INDEX = "yolonas_index"


def _problem(name: str, value: Any, default: Any) -> str | None:
    """Why ``value`` does not fit parameter ``name`` (typed like its default), or None when it does."""
    if isinstance(default, bool):
        return None if isinstance(value, bool) else f"{name}: got {value!r}, allowed: true or false"
    if isinstance(default, int):
        number, allowed = isinstance(value, int) and not isinstance(value, bool), "an integer"
    else:
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        allowed = "a number"
    check, limits = _LIMITS.get(name, _FRACTION)
    return None if number and check(value) else f"{name}: got {value!r}, allowed: {allowed} {limits}"


@dataclass(frozen=True)
class TrackerSettings:
    """Which tracker and the parameters set for it; the others keep the library's defaults for that kind
    (``TRACKER_DEFAULTS``). Checked when made, so a bad archive fails at load, not on its first frame."""

    kind: str = "bytetrack"
    parameters: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or self.kind not in TRACKER_DEFAULTS:
            raise ValueError(f"unknown tracker {self.kind!r}; allowed: {', '.join(TRACKER_DEFAULTS)}")
        defaults = TRACKER_DEFAULTS[self.kind]
        unknown = sorted(name for name, _ in self.parameters if name not in defaults)
        problems = [f"unknown parameters {unknown} (known: {', '.join(defaults)})"] if unknown else []
        problems += [
            problem
            for name, value in self.parameters
            if name in defaults and (problem := _problem(name, value, defaults[name]))
        ]
        if problems:
            raise ValueError(f"tracker {self.kind}: " + "; ".join(problems))

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> TrackerSettings:
        """From a config section such as ``{"kind": "bytetrack", "lost_track_buffer": 60}``."""
        parameters = {name: value for name, value in section.items() if name != "kind"}
        return cls(section.get("kind", "bytetrack"), tuple(sorted(parameters.items())))

    def arguments(self) -> dict[str, Any]:
        """The tracker's constructor arguments: the library's defaults for the kind, overridden by ours."""
        arguments = {**TRACKER_DEFAULTS[self.kind], **dict(self.parameters)}
        if self.kind == "botsort":
            arguments["enable_cmc"] = False
        return arguments

    def create(self) -> Any:
        """A new tracker of this kind (imports ``trackers`` on first use)."""
        import trackers

        return getattr(trackers, TRACKER_CLASSES[self.kind])(**self.arguments())


class TooManySequences(RequestError):
    """A new sequence while the worker already holds as many as it may; the others go on unaffected."""

    def __init__(self, limit: int, idle_s: float):
        super().__init__(
            f"too many tracked sequences: this worker already follows {limit} (the limit); a sequence is forgotten "
            f"after {idle_s:g} s without frames or when it ends. Retry later or end a sequence.",
            status=429,
        )


class SequenceTrackers:
    """One tracker per sequence id, created on the sequence's first frame, dropped when the sequence ends, after
    ``idle_s`` seconds without frames, or never more than ``max_sequences`` at once. A TorchServe worker handles one
    batch at a time, so there is no locking."""

    def __init__(
        self,
        settings: TrackerSettings,
        max_sequences: int,
        idle_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_sequences < 1:
            raise ValueError(f"max_sequences must be at least 1; got {max_sequences}")
        if not idle_s > 0:
            raise ValueError(f"idle_s must be above 0; got {idle_s}")
        settings.create()  # imports the library now, not on the first frame, and fails at load if it is missing
        self.settings = settings
        self.max_sequences = max_sequences
        self.idle_s = idle_s
        self.clock = clock
        #  sequence id -> (tracker, time of its last frame), least recently used first.
        self._sequences: OrderedDict[str, tuple[Any, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sequences)

    def __contains__(self, sequence_id: object) -> bool:
        return sequence_id in self._sequences

    def update(self, sequence_id: str, detections: Detections) -> np.ndarray:
        """The next frame of ``sequence_id`` -> one track id per detection, in the detections' order: -1 where the
        tracker gives none (a track not yet confirmed, a detection below the thresholds). A frame without detections
        still ages the sequence's tracks. Raises TooManySequences for a new sequence beyond the bound."""
        self.expire()
        if sequence_id in self._sequences:
            tracker = self._sequences.pop(sequence_id)[0]
        elif len(self._sequences) >= self.max_sequences:
            raise TooManySequences(self.max_sequences, self.idle_s)
        else:
            tracker = self.settings.create()
        self._sequences[sequence_id] = (tracker, self.clock())
        tracked = tracker.update(_to_supervision(detections))
        ids = np.full(len(detections), -1, dtype=np.int64)
        if len(tracked):
            ids[tracked.data[_INDEX]] = tracked.tracker_id
        return ids

    def end(self, sequence_id: str) -> None:
        """Forget ``sequence_id`` (nothing happens if it is unknown); its next frame starts a new tracker."""
        self._sequences.pop(sequence_id, None)

    def expire(self) -> list[str]:
        """Forget the sequences without frames for ``idle_s`` seconds; their ids."""
        deadline = self.clock() - self.idle_s
        expired = []
        while self._sequences:
            sequence_id, (_, last) = next(iter(self._sequences.items()))
            if last > deadline:
                break
            del self._sequences[sequence_id]
            expired.append(sequence_id)
        return expired


def _to_supervision(detections: Detections) -> Any:
    """Our detections as ``supervision.Detections``, each carrying its position (``_INDEX``)."""
    import supervision

    converted = supervision.Detections(
        xyxy=np.asarray(detections.boxes, dtype=np.float32).reshape(-1, 4),
        confidence=np.asarray(detections.scores, dtype=np.float32),
        class_id=np.asarray(detections.class_ids, dtype=np.int64),
    )
    converted.data[_INDEX] = np.arange(len(detections))
    return converted
