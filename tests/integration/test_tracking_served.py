"""Tracking through a real TorchServe (one for the module) with the shapes model on synthetic moving-shape sequences:
concurrent streams keep their own ids, the idle timeout and the sequence limit as a client sees them, a corrupt frame
mid-stream, HTTP sequences, scripts/track.py on a video and on a folder, and the known answer: served tracking scores
at least as well as the same tracker run in process on the same served detections. Last, a dead worker: a clear
timeout, and unregister + register brings the model back."""

from __future__ import annotations

import os
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests

from helpers import SHAPES, build_archive, require
from yolonas_tools.cli import run_command
from yolonas_tools.data.frames import Frame, read_frames
from yolonas_tools.data.sequences import mot_row, score_tracks, write_sequence
from yolonas_tools.serve import server
from yolonas_tools.serve.clients import Endpoints, authorized_request
from yolonas_tools.serve.track import FrameResult, FrameTimeout, SequenceLimitError, track

trackers = pytest.importorskip("trackers", reason="tracking needs Roboflow's trackers package")

#  ByteTrack, lost_track_buffer 60, room for the module's sequences. TorchServe 0.12 polls at most batchSize of a
#  worker's sequences at once (one waiting thread each, idle ones included): raise both together (docs/tracking.md).
TRACK = "shapes_track"
SHORT = "shapes_short"  # the same with a short idle timeout and 2 sequences at most
DETECT = "shapes_detect"  # the same detections without a tracker (sequence batching, single-label NMS)
#  Short, yet long enough that a loaded machine answering a frame slowly does not expire the other open sequence.
SHORT_IDLE_S = 2.5
#  The worker forgets a sequence this long after its last frame (handler: sequenceMaxIdleMSec + 5 s).
WORKER_FORGETS_S = SHORT_IDLE_S + 5.0
FRAMES = 24


@pytest.fixture(scope="module")
def endpoints(tmp_path_factory: pytest.TempPathFactory):
    """The three archives, built as a user builds them (side by side), served by one TorchServe."""
    checkpoint = require(SHAPES / "checkpoint.pth")
    store = tmp_path_factory.mktemp("tracking_store")
    builds = {
        TRACK: ["--tracker", "bytetrack", "--set", "lost_track_buffer=60", "--set", "maxNumSequence=8",
                "--batch-size", "8"],
        SHORT: ["--tracker", "bytetrack", "--set", "lost_track_buffer=60",
                "--set", f"sequenceMaxIdleMSec={int(SHORT_IDLE_S * 1000)}", "--set", "maxNumSequence=2"],
        DETECT: ["--sequence-batching", "--set", "multi_label=false"],
    }  # fmt: skip
    with ThreadPoolExecutor(len(builds)) as pool:
        list(pool.map(lambda item: build_archive(checkpoint, store, item[0], *item[1]), builds.items()))
    run_dir = tmp_path_factory.mktemp("tracking_run")
    endpoints = server.start(run_dir, store, ports=server.free_ports())
    try:
        with ThreadPoolExecutor(len(builds)) as pool:  # each worker loads its model while the others do
            list(pool.map(lambda name: server.register(endpoints, name), builds))
        yield endpoints
    finally:
        server.stop(run_dir)


@pytest.fixture(scope="module")
def sequences(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two sequences of different shapes (different seeds and counts); ``a`` also as video.mp4."""
    root = tmp_path_factory.mktemp("sequences")
    return {
        "a": write_sequence(root / "a", seed=0, frames=FRAMES, video=True).frames.parent,
        "b": write_sequence(root / "b", seed=5, frames=FRAMES, objects=5).frames.parent,
    }


def frames_of(folder: Path, stop: int | None = None) -> list[Frame]:
    """The sequence's first ``stop`` frames, the last of them marked last."""
    frames = list(read_frames(folder / "img1"))[:stop]
    return [Frame(i, f.name, f.data, last=i == len(frames)) for i, f in enumerate(frames, 1)]


def ids_and_boxes(results: list[FrameResult]) -> list[dict[int, list[float]]]:
    """Per frame: track id -> box, for the tracked detections."""
    return [{d["track_id"]: d["box"] for d in r.detections if d["track_id"] >= 0} for r in results]


def assert_same_tracks(got: list[FrameResult], expected: list[FrameResult]) -> None:
    """Same ids on the same objects frame by frame (boxes within a pixel: batches of two round differently)."""
    assert len(got) == len(expected)
    for number, (mine, theirs) in enumerate(zip(ids_and_boxes(got), ids_and_boxes(expected)), 1):
        assert mine.keys() == theirs.keys(), f"frame {number}: ids {sorted(mine)} != {sorted(theirs)}"
        for track_id, box in mine.items():
            assert np.allclose(box, theirs[track_id], atol=1.0), f"frame {number}, id {track_id}"


@pytest.fixture(scope="module")
def alone(endpoints: Endpoints, sequences: dict[str, Path]) -> dict[str, list[FrameResult]]:
    """Each sequence streamed on its own."""
    return {name: list(track(endpoints, TRACK, frames_of(folder))) for name, folder in sequences.items()}


def test_a_stream_tracks_its_shapes(alone):
    ids = ids_and_boxes(alone["a"])
    assert ids[0] == {}, "ByteTrack confirms a track on its second frame"
    assert len(ids[1]) >= 2 and min(ids[1]) == 0, "ids count from 0 in every sequence"
    assert all(not r.error for r in alone["a"])


def test_concurrent_streams_keep_their_own_ids(endpoints, sequences, alone):
    with ThreadPoolExecutor(2) as pool:
        together = dict(zip(alone, pool.map(lambda folder: list(track(endpoints, TRACK, frames_of(folder))),
                                            sequences.values())))  # fmt: skip
    for name in alone:
        assert_same_tracks(together[name], alone[name])
    assert ids_and_boxes(alone["a"])[5] != ids_and_boxes(alone["b"])[5], "different shapes: a swap would show"


def test_a_corrupt_frame_gets_its_error_and_the_tracker_goes_on(endpoints, sequences, alone):
    """A corrupt frame slipped in after frame 10: every real frame is answered exactly as without it."""
    frames = frames_of(sequences["a"])
    with_corrupt = frames[:10] + [Frame(0, "corrupt", b"\x89PNG but not really")] + frames[10:]
    results = list(track(endpoints, TRACK, with_corrupt))
    assert results[10].error and "image" in results[10].error and results[10].detections == []
    assert_same_tracks(results[:10] + results[11:], alone["a"])


def post(endpoints: Endpoints, model: str, frame: Frame, headers: dict[str, str]) -> requests.Response:
    headers = {"Content-Type": "image/png", **headers}
    url = f"{endpoints.inference}/predictions/{model}"
    response = authorized_request(endpoints, "POST", url, data=frame.data, headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    return response


def test_http_sequences_carry_their_id_and_keep_their_tracks(endpoints, sequences, alone):
    frames = frames_of(sequences["a"], stop=8)
    first = post(endpoints, TRACK, frames[0], {})
    sequence_id = first.headers["ts_request_sequence_id"]
    assert sequence_id.startswith("ts-seq-"), "TorchServe names a sequence started without an id"
    results = [FrameResult(frames[0], first.json()["detections"])]
    for frame in frames[1:]:
        answer = post(endpoints, TRACK, frame, {"ts_request_sequence_id": sequence_id})
        assert answer.headers["ts_request_sequence_id"] == sequence_id
        results.append(FrameResult(frame, answer.json()["detections"]))
    assert_same_tracks(results, alone["a"][:8])

    own = f"http-{uuid.uuid4()}"
    for frame, end in zip(frames[:3], ("false", "false", "true")):  # X-Sequence-End frees the tracker after a frame
        answer = post(endpoints, TRACK, frame, {"ts_request_sequence_id": own, "X-Sequence-End": end})
        assert answer.headers["ts_request_sequence_id"] == own
    assert {d["track_id"] for d in answer.json()["detections"]} - {-1}, "tracked on the third frame"
    again = post(endpoints, TRACK, frames[3], {"ts_request_sequence_id": own}).json()["detections"]
    assert again and {d["track_id"] for d in again} == {-1}, "a new tracker after sequence_end"


def test_one_sequence_over_the_limit_is_refused_clearly_while_the_others_go_on(endpoints, sequences, alone):
    first, second = (track(endpoints, SHORT, frames_of(sequences[name], stop=12)) for name in ("a", "b"))
    results = {"a": [next(first)], "b": [next(second)]}
    with pytest.raises(SequenceLimitError, match="already serves as many sequences as it may"):
        list(track(endpoints, SHORT, frames_of(sequences["a"], stop=2)))
    for a, b in zip(first, second):  # in turns: each stays well within the idle timeout
        results["a"].append(a)
        results["b"].append(b)
    for name in results:
        assert_same_tracks(results[name], alone[name][:12])


def test_after_the_idle_timeout_a_new_tracker_starts(endpoints, sequences):
    """Past the idle timeout TorchServe forgets the sequence (the next frame silently opens a new one) but the worker
    keeps the tracker 5 s more, so ids go on; after that the worker has forgotten it too and ids start again."""
    time.sleep(SHORT_IDLE_S + 0.5)  # the previous test's sequences free their places
    frames, sequence_id = frames_of(sequences["a"]), f"idle-{uuid.uuid4()}"

    def part(start: int, stop: int) -> list[dict[int, list[float]]]:
        return ids_and_boxes(list(track(endpoints, SHORT, frames[start:stop], sequence_id=sequence_id, end=False)))

    before = part(0, 6)
    time.sleep(SHORT_IDLE_S + 1.0)
    resumed = part(6, 9)
    assert resumed[0] and set(resumed[0]) <= set().union(*before), "within the worker's margin: the same tracker"
    time.sleep(WORKER_FORGETS_S + 1.0)
    fresh = part(9, 14)
    assert fresh[0] == {}, "a new tracker confirms nothing on its first frame"
    assert min(fresh[1]) == 0 and max(fresh[1]) < len(fresh[1]), "ids count from 0 again"


def test_track_command_on_a_video_saves_a_playable_annotated_video(endpoints, sequences, tmp_path: Path, capsys):
    out, video = tmp_path / "tracks.txt", tmp_path / "annotated.mp4"
    argv = [str(sequences["a"] / "video.mp4"), "--model", TRACK, "--out", str(out), "--save", str(video),
            "--run-dir", str(endpoints.run_dir)]  # fmt: skip
    assert run_command("track", argv) == 0
    printed = capsys.readouterr()
    assert f"over {FRAMES} frames" in printed.out and f"{FRAMES}/{FRAMES}" in printed.err, "summary and progress bar"
    rows = [line.split(",") for line in out.read_text().splitlines()]
    assert rows and all(len(row) == 10 and row[7:] == ["-1", "-1", "-1"] for row in rows)
    assert all(1 <= int(row[0]) <= FRAMES and int(row[1]) >= 0 and 0 < float(row[6]) <= 1 for row in rows)
    assert all(float(row[4]) > 0 and float(row[5]) > 0 for row in rows)
    assert [int(row[0]) for row in rows] == sorted(int(row[0]) for row in rows)
    capture = cv2.VideoCapture(str(video))
    decoded = 0
    while (frame := capture.read()[1]) is not None:
        assert frame.shape == (320, 320, 3)
        decoded += 1
    assert decoded == FRAMES


def trackers_detections(detections: list[dict]):
    import supervision

    return supervision.Detections(
        xyxy=np.array([d["box"] for d in detections], dtype=np.float32).reshape(-1, 4),
        confidence=np.array([d["score"] for d in detections], dtype=np.float32),
        class_id=np.array([d["class_id"] for d in detections], dtype=np.int64),
    )


def test_served_tracking_scores_at_least_as_well_as_the_tracker_in_process(endpoints, sequences, tmp_path: Path):
    """The known answer: track.py on the folder, against ByteTrack (same parameters) run here on the detections the
    same model serves without tracking, frame by frame; both scored by trackers.eval against the ground truth."""
    folder = sequences["a"]
    served = tmp_path / "served.txt"
    argv = ["--model", TRACK, "--out", str(served), "--run-dir", str(endpoints.run_dir), "--quiet"]
    assert run_command("track", [str(folder / "img1"), *argv]) == 0
    tracker = trackers.ByteTrackTracker(lost_track_buffer=60)
    rows = []
    for result in track(endpoints, DETECT, frames_of(folder)):
        detections = result.detections
        assert all("track_id" not in d for d in detections), "the detection archive does not track"
        tracked = tracker.update(trackers_detections(detections))
        rows += [mot_row(result.frame.number, int(i), tuple(box), float(score))
                 for box, score, i in zip(tracked.xyxy, tracked.confidence, tracked.tracker_id) if i >= 0]  # fmt: skip
    in_process = tmp_path / "in_process.txt"
    in_process.write_text("".join(row + "\n" for row in rows))
    gt = folder / "gt" / "gt.txt"
    ours, theirs = score_tracks(gt, served), score_tracks(gt, in_process)
    print(f"served: {ours.line()}\nin process: {theirs.line()}")
    assert ours.idf1 >= theirs.idf1 and ours.mota >= theirs.mota
    assert theirs.mota > 0.5 and theirs.idf1 > 0.5, "the shapes model and ByteTrack do track these sequences"


def test_a_dead_worker_is_a_clear_timeout_and_unregister_register_recovers(endpoints, sequences):
    """TorchServe 0.12 never restarts a sequence-batching worker: its streams get no answer at all."""
    describe = f"{endpoints.management}/models/{SHORT}"
    [worker] = authorized_request(endpoints, "GET", describe, "management", timeout=30).json()[0]["workers"]
    os.kill(int(worker["pid"]), signal.SIGKILL)
    frames = frames_of(sequences["a"], stop=3)
    start = time.monotonic()
    with pytest.raises(FrameTimeout, match="unregister"):
        list(track(endpoints, SHORT, frames, frame_timeout=2.0))
    assert time.monotonic() - start < 10
    deleted = authorized_request(endpoints, "DELETE", describe, "management", timeout=60)
    assert deleted.ok, deleted.text
    server.register(endpoints, SHORT)
    assert len(list(track(endpoints, SHORT, frames, frame_timeout=30.0))) == 3
