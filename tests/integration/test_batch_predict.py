"""scripts/batch_predict.py against the session TorchServe: REST and gRPC give the same COCO results, a corrupt
image ends in the failures file, and a rerun resumes from the journal (also after a crash mid-line)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from PIL import Image

from helpers import REPO
from yolonas_tools.serve import batch

MODEL = "yolo_nas_s"
GOOD = ["img_a_h480_w640.png", "nested/deeper/img_b_h800_w600.png", "nested/small.JPG"]
BROKEN = "nested/broken.jpg"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory, reference_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("batch_images")
    images = reference_dir / "images"
    (root / "nested" / "deeper").mkdir(parents=True)
    shutil.copy(images / "img_a_h480_w640.png", root / GOOD[0])
    shutil.copy(images / "img_b_h800_w600.png", root / GOOD[1])
    small = Image.open(images / "img_a_h480_w640.png").convert("RGB").resize((160, 120))
    buffer = io.BytesIO()
    small.save(buffer, "JPEG", quality=90)
    (root / GOOD[2]).write_bytes(buffer.getvalue())  # upper-case extension: still an image
    (root / BROKEN).write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (root / "notes.txt").write_text("not an image extension: ignored")
    return root


def expected_detections(endpoints, folder: Path) -> dict[str, dict]:
    """What the server answers for each good image, one plain REST request each."""
    answers = {}
    for name in GOOD:
        response = requests.post(f"{endpoints.inference}/predictions/{MODEL}", data=(folder / name).read_bytes(),
                                 headers={**endpoints.auth(), "Content-Type": "image/png"}, timeout=120)  # fmt: skip
        assert response.status_code == 200, response.text
        answers[name] = response.json()
    return answers


def read_outputs(out: Path) -> dict[str, object]:
    paths = batch.output_paths(out)
    return {kind: json.loads(paths[kind].read_text()) for kind in ("results", "images", "failures", "summary")}


def check_outputs(outputs: dict, expected: dict[str, dict]) -> None:
    """Every image in exactly one place; results in COCO form, equal to the server's own answers."""
    images = {image["file_name"]: image for image in outputs["images"]["images"]}
    assert sorted(images) == sorted(GOOD)
    assert [f["file_name"] for f in outputs["failures"]] == [BROKEN]
    failure = outputs["failures"][0]
    assert failure["status"] in (400, "handler") and not failure["transient"] and "image" in failure["error"]
    ids = {image["id"] for image in images.values()}
    assert len(ids) == len(images)
    names = {c["id"]: c["name"] for c in outputs["images"]["categories"]}
    for name, answer in expected.items():
        assert [images[name]["width"], images[name]["height"]] == answer["image_size"]
        records = [r for r in outputs["results"] if r["file_name"] == name]
        assert all(r["image_id"] == images[name]["id"] for r in records)
        got = [(r["category_id"], r["score"], [r["bbox"][0], r["bbox"][1], r["bbox"][0] + r["bbox"][2],
                r["bbox"][1] + r["bbox"][3]]) for r in records]  # fmt: skip
        want = [(d["class_id"], d["score"], d["box"]) for d in answer["detections"]]
        assert [c for c, _, _ in got] == [c for c, _, _ in want]
        for (_, score, box), (_, reference_score, reference) in zip(got, want):
            assert score == pytest.approx(reference_score, abs=1e-4)  # batches of other sizes: float noise at most
            assert box == pytest.approx(reference, abs=0.02)  # xywh rounded to 0.01, then back
        assert all(names[r["category_id"]] for r in records)
    summary = outputs["summary"]
    assert (summary["images"], summary["succeeded"], summary["failed"]) == (4, 3, 1)
    assert summary["detections"] == len(outputs["results"]) == sum(len(a["detections"]) for a in expected.values())


@pytest.fixture(scope="module")
def expected(ts_server, folder: Path) -> dict[str, dict]:
    return expected_detections(ts_server, folder)


def run_cli(endpoints, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "scripts" / "batch_predict.py"), *args, "--run-dir", str(endpoints.run_dir)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=dict(os.environ))


def test_rest_writes_coco_results_and_lists_the_corrupt_image(endpoints, folder: Path, expected, tmp_path: Path):
    out = tmp_path / "rest" / "results.json"
    done = run_cli(endpoints, str(folder), "--model", MODEL, "--out", str(out), "--concurrency", "2")
    assert done.returncode == 1, done.stderr  # 1: some image failed, and it says where
    assert "1 image(s) failed" in done.stderr and "results.failures.json" in done.stderr
    outputs = read_outputs(out)
    check_outputs(outputs, expected)
    assert outputs["summary"]["sent_this_run"] == 4 and outputs["summary"]["images_per_s"] > 0


def test_grpc_gives_the_same_results(endpoints, folder: Path, expected, tmp_path: Path):
    out = tmp_path / "grpc.json"
    done = run_cli(endpoints, str(folder), "--out", str(out), "--transport", "grpc", "--concurrency", "3")
    assert done.returncode == 1, done.stderr
    check_outputs(read_outputs(out), expected)


def test_rerun_resumes_from_the_journal(endpoints, folder: Path, expected, tmp_path: Path):
    out = tmp_path / "resume.json"
    header = {"model": MODEL, "folder": str(folder.resolve()), "options": {}}
    send = batch.rest_sender(endpoints, MODEL, {}, timeout=120)
    first = batch.run(folder, out, send, header, concurrency=2)
    assert (first["sent_this_run"], first["failed"]) == (4, 1)

    # A crash: the journal keeps its header, one finished image and half of the next line.
    journal = batch.output_paths(out)["journal"]
    lines = journal.read_text().splitlines()
    kept = next(line for line in lines[1:] if json.loads(line)["file_name"] == GOOD[0])
    journal.write_text(f"{lines[0]}\n{kept}\n{lines[2][: len(lines[2]) // 2]}")
    second = batch.run(folder, out, send, header, concurrency=2)
    assert (second["skipped_finished_earlier"], second["sent_this_run"]) == (1, 3)
    check_outputs(read_outputs(out), expected)

    # Done: nothing is sent again, the refused image included, unless asked.
    third = batch.run(folder, out, send, header)
    assert (third["sent_this_run"], third["failed"]) == (0, 1)
    check_outputs(read_outputs(out), expected)
    fourth = batch.run(folder, out, send, header, retry_failed=True)
    assert (fourth["sent_this_run"], fourth["failed"], fourth["failed_this_run"]) == (1, 1, 1)

    with pytest.raises(batch.JournalError, match="belongs to another job"):  # other options would mix results
        batch.run(folder, out, send, {**header, "options": {"conf": 0.5}})


def test_an_unknown_model_stops_the_run_and_keeps_every_image_listed(endpoints, folder: Path, tmp_path: Path):
    out = tmp_path / "unknown.json"
    done = run_cli(endpoints, str(folder), "--model", "no_such_model", "--out", str(out), "--retries", "0")
    assert done.returncode == 1
    assert "stopped early" in done.stderr and "Model not found" in done.stderr
    outputs = read_outputs(out)
    assert outputs["results"] == [] and len(outputs["failures"]) == 4
    assert all(f["transient"] for f in outputs["failures"])  # a rerun (with the right model) sends them all


def test_retry_policy_without_a_server(tmp_path: Path):
    """Transient failures are retried up to the limit, 4xx never; every image still ends in one of the files."""
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("busy_once", "always_busy", "refused", "fine"):
        (folder / f"{name}.png").write_bytes(b"stand-in bytes: the sender below never decodes them")
    calls: dict[str, int] = {}

    def send(data: bytes, file_name: str) -> dict:
        name = Path(file_name).stem
        calls[name] = calls.get(name, 0) + 1
        if name == "refused":
            raise batch.PermanentError("not an image", 400)
        if name == "always_busy" or (name == "busy_once" and calls[name] == 1):
            raise batch.TransientError("Worker died.", 507)
        return {
            "image_size": [4, 3],
            "detections": [{"box": [0, 0, 2, 1], "score": 0.9, "class_id": 3, "class_name": "c"}],
        }

    summary = batch.run(folder, tmp_path / "out.json", send, {"model": "m"}, retries=2, backoff=0.001)
    assert calls == {"busy_once": 2, "always_busy": 3, "refused": 1, "fine": 1}
    assert (summary["succeeded"], summary["failed"], summary["retries_this_run"]) == (2, 2, 3)
    outputs = read_outputs(tmp_path / "out.json")
    failures = {f["file_name"]: f for f in outputs["failures"]}
    assert failures["always_busy.png"]["transient"] and failures["always_busy.png"]["attempts"] == 3
    assert not failures["refused.png"]["transient"] and failures["refused.png"]["attempts"] == 1
    assert outputs["results"][0]["bbox"] == [0, 0, 2, 1]  # xyxy [0, 0, 2, 1] -> xywh
    # The rerun resends only the transient failure.
    batch.run(folder, tmp_path / "out.json", send, {"model": "m"}, retries=0)
    assert calls == {"busy_once": 2, "always_busy": 4, "refused": 1, "fine": 1}
