"""Trackers per sequence: independent ids per sequence, ids in the detections' order, idle expiry, the bound, end."""

from __future__ import annotations

import inspect
import subprocess
import sys

import numpy as np
import pytest

from yolonas_serving.errors import RequestError
from yolonas_serving.postprocess import Detections
from yolonas_serving.tracking import (
    TRACKER_CLASSES,
    TRACKER_DEFAULTS,
    SequenceTrackers,
    TooManySequences,
    TrackerSettings,
)

trackers = pytest.importorskip("trackers", reason="tracking needs Roboflow's trackers package")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def frame(*boxes: tuple[float, float], scores: list[float] | None = None, size: float = 60.0) -> Detections:
    """Square boxes of ``size`` at the given top-left corners, confident unless told otherwise."""
    xyxy = np.array([[x, y, x + size, y + size] for x, y in boxes], dtype=np.float32).reshape(-1, 4)
    confidence = np.array(scores if scores is not None else [0.9] * len(boxes), dtype=np.float32)
    return Detections(xyxy, confidence, np.zeros(len(boxes), dtype=np.int64))


def make(max_sequences: int = 8, idle_s: float = 10.0, **settings) -> tuple[SequenceTrackers, FakeClock]:
    clock = FakeClock()
    kind = settings.pop("kind", "bytetrack")
    return SequenceTrackers(TrackerSettings(kind, tuple(sorted(settings.items()))), max_sequences, idle_s, clock), clock


def test_a_moving_box_keeps_its_id_over_many_frames():
    tracked, _ = make()
    ids = [tracked.update("cam", frame((10 + 4 * t, 50 + 2 * t)))[0] for t in range(200)]
    # ByteTrack confirms a track on its second frame (minimum_consecutive_frames=2), then keeps it.
    assert ids[0] == -1
    assert set(ids[1:]) == {0}


def test_interleaved_sequences_have_their_own_ids():
    """Sequence b's object sits where sequence a's second object is: one shared tracker would match it to a's
    track (or number it after a's); separate trackers number each sequence from 0 and never mix them."""
    tracked, _ = make()
    a_ids, b_ids = [], []
    for t in range(30):
        a_ids.append(tracked.update("a", frame((10 + 3 * t, 20), (400 + 3 * t, 300))).tolist())
        b_ids.append(tracked.update("b", frame((400 - 3 * t, 300))).tolist())
    assert a_ids[1:] == [[0, 1]] * 29
    assert b_ids[1:] == [[0]] * 29


def test_ids_follow_the_detections_order_and_every_detection_is_kept():
    """ByteTrack returns low-confidence detections before the high ones: the ids must come back in input order."""
    tracked, _ = make()
    ids = [tracked.update("s", frame((0, 0), (300, 0), scores=[0.3, 0.9])).tolist() for _ in range(3)]
    assert ids == [[-1, -1], [-1, 0], [-1, 0]]


def test_detections_the_tracker_drops_get_no_id():
    # BoT-SORT discards detections with confidence <= 0.1 from its output; they still get a place, with -1.
    tracked, _ = make(kind="botsort")
    ids = [tracked.update("s", frame((0, 0), (300, 0), scores=[0.05, 0.9])).tolist() for _ in range(3)]
    assert ids == [[-1, 0]] * 3


def test_frames_without_detections_keep_the_tracker_going():
    tracked, _ = make()
    for t in range(5):
        tracked.update("s", frame((10 + 5 * t, 10)))
    for _ in range(3):
        assert tracked.update("s", frame()).shape == (0,)
    # The track survived the gap (lost_track_buffer 30) and its prediction moved on with the frames.
    assert tracked.update("s", frame((10 + 5 * 8, 10))).tolist() == [0]


def test_empty_frames_age_tracks():
    # With a buffer of one frame, two empty frames lose the track: the box then starts a new one.
    tracked, _ = make(lost_track_buffer=1)
    for t in range(3):
        tracked.update("s", frame((10 + 5 * t, 10)))
    tracked.update("s", frame())
    tracked.update("s", frame())
    assert [tracked.update("s", frame((10 + 5 * t, 10))).tolist() for t in (5, 6)] == [[-1], [1]]


def test_idle_sequences_are_forgotten():
    tracked, clock = make(idle_s=10.0)
    for _ in range(3):
        tracked.update("old", frame((10, 10)))
    clock.now += 6
    tracked.update("recent", frame((10, 10)))
    clock.now += 4
    assert tracked.expire() == ["old"]
    assert "old" not in tracked and "recent" in tracked and len(tracked) == 1
    # The sequence comes back with a new tracker: its box is unconfirmed again.
    assert tracked.update("old", frame((10, 10))).tolist() == [-1]


def test_a_frame_keeps_its_sequence_alive():
    tracked, clock = make(idle_s=10.0)
    for _ in range(5):
        tracked.update("s", frame((10, 10)))
        clock.now += 9
    assert tracked.expire() == [] and "s" in tracked


def test_the_bound_refuses_new_sequences_only():
    tracked, clock = make(max_sequences=2, idle_s=10.0)
    tracked.update("a", frame((10, 10)))
    tracked.update("b", frame((10, 10)))
    with pytest.raises(TooManySequences) as refused:
        tracked.update("c", frame((10, 10)))
    assert isinstance(refused.value, RequestError) and refused.value.status == 429
    assert "2" in refused.value.message and "10 s" in refused.value.message
    assert "c" not in tracked
    # The open sequences go on.
    assert tracked.update("a", frame((10, 10))).tolist() == [0]
    assert tracked.update("b", frame((10, 10))).tolist() == [0]
    # Idle sequences are forgotten before a new one is refused.
    clock.now += 10
    tracked.update("c", frame((10, 10)))
    assert [s for s in ("a", "b", "c") if s in tracked] == ["c"]


def test_end_frees_the_sequence():
    tracked, _ = make(max_sequences=1)
    tracked.update("a", frame((10, 10)))
    assert tracked.update("a", frame((10, 10))).tolist() == [0]
    tracked.end("a")
    tracked.end("never seen")
    assert len(tracked) == 0
    tracked.update("b", frame((10, 10)))
    tracked.end("b")
    assert tracked.update("a", frame((10, 10))).tolist() == [-1]


@pytest.mark.parametrize("kind", sorted(TRACKER_DEFAULTS))
def test_defaults_are_the_library_defaults(kind: str):
    signature = inspect.signature(getattr(trackers, TRACKER_CLASSES[kind]).__init__)
    library = {name: p.default for name, p in signature.parameters.items() if name in TRACKER_DEFAULTS[kind]}
    assert library == TRACKER_DEFAULTS[kind]
    scalars = {name for name, p in signature.parameters.items() if isinstance(p.default, (int, float))}
    assert scalars - set(TRACKER_DEFAULTS[kind]) <= {"enable_cmc", "cmc_downscale"}


@pytest.mark.parametrize("kind", sorted(TRACKER_DEFAULTS))
def test_every_kind_tracks(kind: str):
    tracked, _ = make(kind=kind)
    ids = [tracked.update("s", frame((10 + 3 * t, 10), (300, 300 - 3 * t))).tolist() for t in range(6)]
    assert ids[-1][0] >= 0 and ids[-1][1] >= 0 and ids[-1][0] != ids[-1][1]
    assert ids[-1] == ids[-2]


def test_settings():
    settings = TrackerSettings.from_config({"kind": "sort", "lost_track_buffer": 60, "frame_rate": 25})
    assert settings.arguments() == {**TRACKER_DEFAULTS["sort"], "lost_track_buffer": 60, "frame_rate": 25}
    assert TrackerSettings.from_config({}).kind == "bytetrack"
    assert TrackerSettings("botsort").arguments()["enable_cmc"] is False
    assert type(settings.create()).__name__ == "SORTTracker"


@pytest.mark.parametrize(
    ("section", "complaint"),
    [
        ({"kind": "deepsort"}, "unknown tracker 'deepsort'"),
        ({"kind": "sort", "high_conf_det_threshold": 0.5}, "unknown parameters ['high_conf_det_threshold']"),
        ({"track_activation_threshold": 1.5}, "track_activation_threshold: got 1.5, allowed: a number from 0 to 1"),
        ({"lost_track_buffer": 2.5}, "lost_track_buffer: got 2.5, allowed: an integer >= 0"),
        ({"lost_track_buffer": True}, "lost_track_buffer: got True"),
        ({"frame_rate": 0}, "frame_rate: got 0, allowed: a number > 0"),
        ({"kind": "botsort", "instant_first_frame_activation": 1}, "allowed: true or false"),
    ],
)
def test_bad_settings_are_refused(section: dict, complaint: str):
    with pytest.raises(ValueError, match=complaint.replace("[", r"\[").replace("]", r"\]")):
        TrackerSettings.from_config(section)


def test_bad_bounds_are_refused():
    with pytest.raises(ValueError, match="max_sequences"):
        SequenceTrackers(TrackerSettings(), 0, 10.0)
    with pytest.raises(ValueError, match="idle_s"):
        SequenceTrackers(TrackerSettings(), 4, 0)


def test_importing_the_module_does_not_import_the_trackers():
    """Archives without tracking must not pay for trackers' import (most of a second) in every worker."""
    code = "import sys, yolonas_serving.tracking; print('trackers' in sys.modules, 'supervision' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]
