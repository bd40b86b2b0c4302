"""The tracking client without TorchServe: synthetic sequences and their ground truth, MOTChallenge rows and scores,
frame sources, prefetching, and the stream's behaviour against a fake gRPC server (sequence_end on the last frame
only, a refused frame reported and passed, TorchServe's limit refusal translated, a silent worker timed out)."""

from __future__ import annotations

import json
import threading
from concurrent import futures
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest

from yolonas_tools.cli import run_command
from yolonas_tools.data.frames import Frame, Prefetch, SourceError, read_frames
from yolonas_tools.data.sequences import (
    DISTRACTOR,
    MIN_VISIBILITY,
    SCORED,
    Truth,
    mot_row,
    score_tracks,
    shapes_sequence,
    truth_row,
    write_sequence,
)
from yolonas_tools.generated import inference_pb2, inference_pb2_grpc
from yolonas_tools.serve.clients import Endpoints
from yolonas_tools.serve.track import (
    FrameResult,
    FrameTimeout,
    SequenceLimitError,
    mot_rows,
    track,
    track_to_files,
)

#  What TorchServe 0.12 answers a sequence beyond maxNumSequence (seen; docs/tracking.md).
REFUSAL = (
    'Model "m" has no worker to serve inference request. Please use scale workers API to add workers. If this is a '
    "sequence inference, please check if it is closed, or expired; or exceeds maxSequenceJobQueueSize"
)


# --- synthetic sequences -------------------------------------------------------------------------------------------


def test_a_seed_gives_the_same_sequence_and_another_seed_another():
    first, again = list(shapes_sequence(3, frames=5)), list(shapes_sequence(3, frames=5))
    other = list(shapes_sequence(4, frames=5))
    assert all(np.array_equal(a.image, b.image) and a.truth == b.truth for a, b in zip(first, again))
    assert not np.array_equal(first[0].image, other[0].image)
    assert first[0].image.shape == (320, 320, 3) and first[0].image.dtype == np.uint8


def test_shapes_stay_in_the_frame_bounce_and_pass_over_each_other():
    frames = list(shapes_sequence(0, frames=300, objects=5))
    boxes = np.array([[t.box for t in frame.truth] for frame in frames])  # frames x objects x 4
    assert boxes.min() >= 0 and boxes[..., 2:].max() <= 320
    steps = np.sign(np.diff(boxes[:, :, 0], axis=0))
    assert (np.diff(steps[steps != 0].reshape(-1)) != 0).any(), "some shape turns back at an edge"
    hidden = [t.visibility for frame in frames for t in frame.truth]
    assert min(hidden) < MIN_VISIBILITY < 1 == max(hidden), "shapes pass over each other, most of the time apart"
    assert [t.track_id for t in frames[0].truth] == [1, 2, 3, 4, 5]


def test_ground_truth_rows_mark_hidden_shapes_as_distractors():
    assert truth_row(7, Truth(2, (10, 20, 50, 80), 0.9)) == f"7,2,10,20,40,60,1,{SCORED},0.900"
    assert truth_row(7, Truth(2, (10, 20, 50, 80), 0.1)).split(",")[7] == str(DISTRACTOR)


def test_perfect_tracks_score_perfectly_and_swapped_ids_do_not(tmp_path: Path):
    files = write_sequence(tmp_path / "seq", seed=1, frames=30, video=True)
    assert len(list(files.frames.glob("*.png"))) == 30 and files.video.is_file()
    rows = [line.split(",") for line in files.gt.read_text().splitlines()]
    assert {int(r[0]) for r in rows} == set(range(1, 31))

    def tracks(name: str, track_id) -> Path:
        path = tmp_path / name
        path.write_text("".join(
            mot_row(int(r[0]), track_id(int(r[0]), int(r[1])), (float(r[2]), float(r[3]), float(r[2]) + float(r[4]),
                    float(r[3]) + float(r[5])), 0.9) + "\n"
            for r in rows
        ))  # fmt: skip
        return path

    perfect = score_tracks(files.gt, tracks("perfect.txt", lambda frame, gt_id: gt_id + 10))
    assert (perfect.mota, perfect.idf1, perfect.idsw) == (1.0, 1.0, 0) and perfect.hota > 0.99
    swapped = score_tracks(files.gt, tracks("swapped.txt", lambda frame, gt_id: gt_id % 2 if frame > 15 else gt_id))
    assert swapped.idsw > 0 and swapped.idf1 < 1 and swapped.mota < 1
    (tmp_path / "empty.txt").write_text("")
    assert score_tracks(files.gt, tmp_path / "empty.txt").mota == 0


def test_sequences_module_writes_a_sequence_from_the_command_line(tmp_path: Path):
    from yolonas_tools.data.sequences import main

    assert main([str(tmp_path / "s"), "--frames", "3", "--objects", "2"]) == 0
    assert len((tmp_path / "s" / "gt" / "gt.txt").read_text().splitlines()) == 6


# --- MOT rows and frame sources ------------------------------------------------------------------------------------


def test_mot_rows_keep_only_tracked_detections():
    detections = [
        {"box": [10.0, 20.0, 30.5, 60.0], "score": 0.91234, "track_id": 3},
        {"box": [1.0, 2.0, 3.0, 4.0], "score": 0.5, "track_id": -1},
        {"box": [0.0, 0.0, 5.0, 5.0], "score": 0.4, "track_id": 0},
        {"box": [0.0, 0.0, 5.0, 5.0], "score": 0.4},  # an archive that does not track
    ]
    rows = mot_rows(FrameResult(Frame(1, "a.png", b""), detections))
    assert rows == ["1,3,10.00,20.00,20.50,40.00,0.91234,-1,-1,-1", "1,0,0.00,0.00,5.00,5.00,0.40000,-1,-1,-1"]


def test_a_folder_gives_its_images_by_name_numbered_from_one_the_last_marked(tmp_path: Path):
    image = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes()
    for name in ("b.png", "a.png", "10.jpg"):
        (tmp_path / name).write_bytes(image)
    (tmp_path / "notes.txt").write_text("not a frame")
    frames = list(read_frames(tmp_path))
    assert [(f.name, f.last) for f in frames] == [("10.jpg", False), ("a.png", False), ("b.png", True)]
    assert [f.number for f in frames] == [1, 2, 3]
    assert frames[0].data == image and frames[0].pixels is None
    assert list(read_frames(tmp_path, pixels=True))[0].pixels.shape == (8, 8, 3)


def test_a_video_gives_every_frame_as_jpeg(tmp_path: Path):
    files = write_sequence(tmp_path, frames=12, video=True)
    frames = list(read_frames(files.video, pixels=True))
    assert [f.number for f in frames] == list(range(1, 13)) and [f.last for f in frames] == [False] * 11 + [True]
    assert frames[0].data[:3] == b"\xff\xd8\xff" and frames[0].pixels.shape == (320, 320, 3)


def test_unreadable_sources_are_clear_errors(tmp_path: Path):
    with pytest.raises(SourceError, match="no such video or folder"):
        list(read_frames(tmp_path / "missing.mp4"))
    with pytest.raises(SourceError, match="no images"):
        list(read_frames(tmp_path))
    (tmp_path / "clip.mp4").write_bytes(b"not a video")
    with pytest.raises(SourceError, match="OpenCV"):
        list(read_frames(tmp_path / "clip.mp4"))


def test_prefetch_keeps_order_raises_the_producers_error_and_stops_when_closed():
    def failing():
        yield from range(3)
        raise ValueError("disk gone")

    seen = []
    with pytest.raises(ValueError, match="disk gone"), Prefetch(failing(), depth=2) as items:
        seen.extend(items)
    assert seen == [0, 1, 2]
    produced = []

    def endless():
        while True:
            produced.append(len(produced))
            yield produced[-1]

    with Prefetch(endless(), depth=2) as items:
        assert next(iter(items)) == 0
    count = len(produced)
    threading.Event().wait(0.3)
    assert len(produced) == count <= 4, "the producer stops once closed"


# --- the stream, against a fake TorchServe -------------------------------------------------------------------------


class FakeTorchServe(inference_pb2_grpc.InferenceAPIsServiceServicer):
    """StreamPredictions2 as TorchServe 0.12 answers it: one reply per frame; ``refuse`` answers the limit refusal,
    ``silent`` never answers (a dead worker); a frame b"bad" gets the handler's error body."""

    def __init__(self, mode: str = "answer"):
        self.mode = mode
        self.requests: list[inference_pb2.PredictionsRequest] = []

    def StreamPredictions2(self, request_iterator, context):  # noqa: N802 (gRPC's name)
        for request in request_iterator:
            self.requests.append(request)
            if self.mode == "silent":
                continue
            if self.mode == "refuse":
                yield inference_pb2.PredictionResponse(status={"code": 13, "message": REFUSAL})
            elif request.input["data"] == b"bad":
                yield inference_pb2.PredictionResponse(prediction=b'{"error": "not an image"}')
            else:
                detection = {"box": [1, 2, 30, 40], "score": 0.9, "class_name": "square", "track_id": 7}
                yield inference_pb2.PredictionResponse(prediction=json.dumps({"detections": [detection]}).encode())


@pytest.fixture
def fake_server(tmp_path: Path):
    """start(mode) -> (Endpoints of a fake TorchServe in tmp_path, its servicer)."""
    servers = []

    def start(mode: str = "answer") -> tuple[Endpoints, FakeTorchServe]:
        servicer = FakeTorchServe(mode)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        inference_pb2_grpc.add_InferenceAPIsServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        address = f"127.0.0.1:{port}"
        places = {"inference": "http://127.0.0.1:9", "management": "http://127.0.0.1:9", "metrics": ""}
        places |= {"grpc_inference": address, "grpc_management": address}
        (tmp_path / "server.json").write_text(json.dumps(places))
        keys = {kind: {"key": "k"} for kind in ("inference", "management", "API")}
        (tmp_path / "key_file.json").write_text(json.dumps(keys))
        return Endpoints.load(tmp_path), servicer

    yield start
    for server in servers:
        server.stop(0)


def frames_of(*datas: bytes) -> list[Frame]:
    return [Frame(i, f"f{i}", data, last=i == len(datas)) for i, data in enumerate(datas, 1)]


def test_frames_go_as_one_sequence_ending_on_the_last_and_a_refused_frame_is_passed(fake_server):
    endpoints, servicer = fake_server()
    results = list(track(endpoints, "m", frames_of(b"1", b"bad", b"3"), {"conf": 0.5}, sequence_id="cam-1"))
    assert [r.frame.number for r in results] == [1, 2, 3]
    assert [r.error for r in results] == [None, "not an image", None] and results[2].detections[0]["track_id"] == 7
    assert {r.sequence_id for r in servicer.requests} == {"cam-1"}
    assert [r.input.get("sequence_end") for r in servicer.requests] == [None, None, b"true"]
    assert all(r.input["conf"] == b"0.5" for r in servicer.requests)
    list(track(endpoints, "m", frames_of(b"1", b"2"), end=False))
    assert "sequence_end" not in servicer.requests[-1].input


def test_the_sequence_limit_is_a_clear_error(fake_server):
    endpoints, _ = fake_server("refuse")
    with pytest.raises(SequenceLimitError, match="maxNumSequence") as error:
        list(track(endpoints, "m", frames_of(b"1", b"2")))
    assert "sequenceMaxIdleMSec" in str(error.value) and REFUSAL in str(error.value)


def test_a_worker_that_never_answers_is_a_timeout_not_a_hang(fake_server):
    endpoints, _ = fake_server("silent")
    with pytest.raises(FrameTimeout, match="frame 1 got no answer from m within 0.5 s") as error:
        list(track(endpoints, "m", frames_of(b"1", b"2"), frame_timeout=0.5))
    assert "unregister" in str(error.value) and "register" in str(error.value)


def test_track_command_writes_rows_and_video_and_reports_a_bad_frame(fake_server, tmp_path: Path, capsys):
    endpoints, _ = fake_server()
    folder = tmp_path / "frames"
    write_sequence(folder, frames=4)
    (folder / "img1" / "000003.png").write_bytes(b"bad")
    summary = track_to_files(endpoints, "m", folder / "img1", tmp_path / "t.txt", tmp_path / "a.mp4", progress=False)
    assert (summary.frames, summary.rows, summary.tracks) == (4, 3, {7})
    assert summary.failed == ["frame 3 (000003.png): not an image"]
    assert [line.split(",")[0] for line in (tmp_path / "t.txt").read_text().splitlines()] == ["1", "2", "4"]
    video = cv2.VideoCapture(str(tmp_path / "a.mp4"))
    assert int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == 4
    argv = [str(folder / "img1"), "--model", "m", "--out", str(tmp_path / "cli.txt"), "--run-dir", str(tmp_path),
            "--quiet", "--conf", "0.3"]  # fmt: skip
    assert run_command("track", argv) == 1  # the bad frame
    out, err = capsys.readouterr()
    assert "3 rows, 1 tracks over 4 frames" in out and "frame 3 (000003.png): not an image" in err


def test_the_tracking_page_lists_every_tracker_with_its_parameters_and_defaults():
    from yolonas_serving.tracking import TRACKER_CLASSES, TRACKER_DEFAULTS
    from yolonas_tools.paths import REPO

    page = (REPO / "docs" / "tracking.md").read_text().splitlines()
    rows = {line.split("|")[1].strip(" `"): line.split("|") for line in page if line.startswith("| `")}
    for kind, defaults in TRACKER_DEFAULTS.items():
        shown = {f"`{name}={str(v).lower() if isinstance(v, bool) else v}`" for name, v in defaults.items()}
        assert set(rows[kind][3].strip().split(", ")) == shown, kind
        assert rows[kind][2].strip() == f"`{TRACKER_CLASSES[kind]}`"
