"""Sliced inference ("SAHI" on the server) against a real TorchServe: the same answer as sahi's own
get_sliced_prediction driving the served model tile by tile, a known answer on a mosaic of the shapes model's
validation images, and a sliced request's limits, errors and answer forms.

One server for the module with two archives: the shapes model (its own 320 pipeline) and a random-weights S on
the COCO pipeline (636 rescale, centre padding) built with max_tiles=4.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image
from sahi.postprocess.backends import get_postprocess_backend, set_postprocess_backend

from helpers import REPO, SHAPES, build_archive, require
from yolonas_serving.draw import draw_detections, encode_jpeg
from yolonas_serving.postprocess import Detections
from yolonas_tools.measure.load import KeepAliveSession
from yolonas_tools.measure.sahi_peer import encode, served_model, sliced_detections
from yolonas_tools.measure.sliced import Mosaic, found_objects, mosaic
from yolonas_tools.serve import server
from yolonas_tools.serve.clients import Endpoints, option_headers
from yolonas_tools.serve.grpc_client import GrpcClient

SHAPES_MODEL = "shapes"
COCO_MODEL = "coco_tiles4"
SLICED_BY_DEFAULT = "shapes_sliced"  # the shapes archive built with --set slice=320 --set overlap=0.25
MAX_TILES = 4
#  Objects of the 10x5 mosaic (all 50 validation images, 3200x1600) found at IoU 0.5, as measured (of 171): a
#  plain request found 0, sliced at 320 with sahi's defaults 150, without the whole-image pass 166.
PLAIN_FOUND_AT_MOST = 5
SLICED_RECALL_AT_LEAST = 0.80
NO_STANDARD_PRED_RECALL_AT_LEAST = 0.92


@pytest.fixture(scope="module", autouse=True)
def numpy_merge():
    # sahi merges on torchvision where CUDA is present, whose NMS over IoU tests '>' rather than '>=': the server
    # follows sahi's numpy backend.
    before = get_postprocess_backend()
    set_postprocess_backend("numpy")
    yield
    set_postprocess_backend(before)


@pytest.fixture(scope="module")
def sliced_server(tmp_path_factory: pytest.TempPathFactory, random_checkpoint, shapes_archive: Path) -> Endpoints:
    store = tmp_path_factory.mktemp("sliced_store")
    shutil.copy(shapes_archive, store / f"{SHAPES_MODEL}.mar")  # the session's shapes archive, not built again
    build_archive(random_checkpoint("s"), store, COCO_MODEL, "--set", f"max_tiles={MAX_TILES}")
    build_archive(SHAPES / "checkpoint.pth", store, SLICED_BY_DEFAULT, "--set", "slice=320", "--set", "overlap=0.25")
    run_dir = tmp_path_factory.mktemp("sliced_run")
    models = [SHAPES_MODEL, COCO_MODEL, SLICED_BY_DEFAULT]
    endpoints = server.start(run_dir, store, models=models, ports=server.free_ports())
    yield endpoints
    server.stop(run_dir)


@pytest.fixture(scope="module")
def truth() -> Mosaic:
    return mosaic(require(SHAPES) / "val" / "data.yaml", columns=10, rows=5)


@pytest.fixture(scope="module")
def small_mosaic() -> Mosaic:
    """2x2 images (640x640): 3x3 tiles of 320 and the whole-image pass, quick to serve."""
    return mosaic(require(SHAPES) / "val" / "data.yaml", columns=2, rows=2, first=10)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """The 960x640 sample picture: in 600x400 tiles, 2x2 non-square tiles, each rescaled to 636x424 and centre
    padded to 640x640."""
    with Image.open(REPO / "assets" / "sample.jpg") as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def session():
    with KeepAliveSession() as keep_alive:
        yield keep_alive


def post(endpoints: Endpoints, model: str, pixels: np.ndarray, **options) -> requests.Response:
    """A PNG of ``pixels`` as the raw body, options as X- headers."""
    headers = {**endpoints.auth(), "Content-Type": "image/png", **option_headers(options)}
    data = encode(pixels, "png")
    return requests.post(f"{endpoints.inference}/predictions/{model}", data=data, headers=headers, timeout=300)


def detect(endpoints: Endpoints, model: str, pixels: np.ndarray, **options) -> list[dict]:
    response = post(endpoints, model, pixels, **options)
    assert response.status_code == 200, response.text
    return response.json()["detections"]


def agreement(ours: list[dict], theirs: list[dict]) -> float:
    """The fraction of ``ours`` with a partner of their own in ``theirs``: the same class, every coordinate within
    1 px and the score within 1e-3."""
    free = list(theirs)
    paired = 0
    for found in ours:
        for k, other in enumerate(free):
            if (
                other["class_id"] == found["class_id"]
                and np.abs(np.subtract(other["box"], found["box"])).max() <= 1.0
                and abs(other["score"] - found["score"]) <= 1e-3
            ):
                paired += 1
                del free[k]
                break
    return paired / len(ours) if ours else float(not theirs)


def assert_same_as_sahi(ours: list[dict], theirs: list[dict]) -> None:
    both_ways = agreement(ours, theirs), agreement(theirs, ours)
    assert min(both_ways) >= 0.97, f"{len(ours)} ours, {len(theirs)} sahi's; paired {both_ways}"


# --- the same answer as sahi, and a known answer ------------------------------------------------------------------


def test_a_mosaic_sliced_finds_what_a_plain_request_misses_and_sahi_finds_the_same(sliced_server, truth, session):
    """Sliced at 320 with sahi's defaults, the server finds most of the 171 objects a plain request cannot see
    (it scales the 3200x1600 mosaic to 320x160); sahi's own loop, calling the same server once per PNG tile over
    one keep-alive connection, gives the same boxes."""
    total = len(truth.boxes)
    plain = detect(sliced_server, SHAPES_MODEL, truth.pixels)
    assert found_objects(plain, truth) <= PLAIN_FOUND_AT_MOST

    ours = detect(sliced_server, SHAPES_MODEL, truth.pixels, slice=320)
    model = served_model(sliced_server, SHAPES_MODEL, {"slice": 320}, truth.names, session=session)
    theirs = sliced_detections(model, truth.pixels)
    assert model.requests == 78 + 1  # 13 x 6 tiles, then the whole image
    assert_same_as_sahi(ours, theirs)
    assert found_objects(ours, truth) >= SLICED_RECALL_AT_LEAST * total
    assert abs(found_objects(ours, truth) - found_objects(theirs, truth)) <= 0.03 * total

    # The whole-image pass sees the objects at 1/10 scale: its spurious large boxes swallow true ones in the merge
    # (IoS of a small box inside a large one is 1). Without it, recall is higher.
    alone = detect(sliced_server, SHAPES_MODEL, truth.pixels, slice=320, standard_pred=False)
    assert found_objects(alone, truth) >= NO_STANDARD_PRED_RECALL_AT_LEAST * total


@pytest.mark.parametrize(
    "options",
    [
        {"slice": "600x400"},
        {"slice": "600x400", "merge": "nmm", "match_metric": "iou", "match_threshold": 0.4},
        {"slice": "600x400", "agnostic": True},
    ],
    ids=["defaults", "nmm-iou", "agnostic"],
)
def test_the_coco_pipeline_sliced_matches_sahi(sliced_server, photo, session, options):
    """Random weights give hundreds of overlapping boxes of many classes: a hard case for the merge. sahi sees the
    server's rounded JSON boxes; max_det is raised because sahi keeps every merged box."""
    options = {**options, "max_det": 2000}
    ours = detect(sliced_server, COCO_MODEL, photo, **options)
    names = [str(i) for i in range(80)]
    theirs = sliced_detections(served_model(sliced_server, COCO_MODEL, options, names, session=session), photo)
    assert len(ours) > 20
    assert_same_as_sahi(ours, theirs)


# --- bounded, checked, complete -----------------------------------------------------------------------------------


def test_more_tiles_than_max_tiles_is_refused_with_413(sliced_server, photo):
    response = post(sliced_server, COCO_MODEL, photo, slice=320)  # 4 x 3 tiles of the 960x640 picture
    assert response.status_code == 413, response.text
    assert response.json()["error"] == (
        f"slice 320x320 cuts this 960x640 image into 12 tiles; at most {MAX_TILES} (max_tiles): send a larger slice"
    )


@pytest.mark.parametrize(
    "option, value, allowed",
    [
        ("slice", "16", "off, or a tile size N or WxH in pixels, each side at least 32"),
        ("slice", "640x20", "off, or a tile size N or WxH in pixels, each side at least 32"),
        ("overlap", "0.95", "a number in [0, 0.9]"),
        ("match_threshold", "0", "a number in (0, 1]"),
        ("merge", "soft", "one of greedynmm, nmm, nms"),
        ("match_metric", "dice", "one of ios, iou"),
    ],
)
def test_slicing_values_out_of_range_get_400_naming_them(sliced_server, small_mosaic, option, value, allowed):
    options = {option: value} if option == "slice" else {"slice": 320, option: value}
    response = post(sliced_server, SHAPES_MODEL, small_mosaic.pixels, **options)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == f"{option}: got '{value}'; allowed: {allowed}"


def test_the_picture_answer_draws_the_merged_boxes(sliced_server, small_mosaic):
    pixels = small_mosaic.pixels
    response = post(sliced_server, SHAPES_MODEL, pixels, slice=320, format="jpeg")
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("image/jpeg")
    picture = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"), dtype=float)
    assert picture.shape == pixels.shape

    def drawn(detections: list[dict]) -> np.ndarray:
        found = Detections(
            np.array([d["box"] for d in detections], np.float32).reshape(-1, 4),
            np.array([d["score"] for d in detections], np.float32),
            np.array([d["class_id"] for d in detections], np.int64),
        )
        picture = encode_jpeg(draw_detections(pixels, found, small_mosaic.names))
        return np.asarray(Image.open(io.BytesIO(picture)), dtype=float)

    sliced = detect(sliced_server, SHAPES_MODEL, pixels, slice=320)
    plain = detect(sliced_server, SHAPES_MODEL, pixels)
    assert len(sliced) != len(plain)
    off_sliced, off_plain = np.abs(picture - drawn(sliced)).mean(), np.abs(picture - drawn(plain)).mean()
    assert off_sliced < 0.1 and off_plain > 1.0  # the same drawing, encoded alike


def b64(pixels: np.ndarray) -> str:
    return base64.b64encode(encode(pixels, "png")).decode()


def test_several_images_per_request_and_v2_carry_sliced_results(sliced_server, small_mosaic, truth):
    images = [small_mosaic.pixels, np.ascontiguousarray(truth.pixels[:640, 960:2240])]
    alone = [detect(sliced_server, SHAPES_MODEL, pixels, slice="320", overlap=0.25) for pixels in images]
    url = f"{sliced_server.inference}/predictions/{SHAPES_MODEL}"
    body = {"images": [b64(pixels) for pixels in images], "slice": "320", "overlap": 0.25}
    response = requests.post(url, json=body, headers=sliced_server.auth(), timeout=300)
    assert response.status_code == 200, response.text
    assert [r["detections"] for r in response.json()["results"]] == alone

    v2 = {
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": [b64(p) for p in images]}],
        "parameters": {"slice": 320, "overlap": 0.25},
    }
    response = requests.post(f"{sliced_server.inference}/v2/models/{SHAPES_MODEL}/infer", json=v2,
                             headers=sliced_server.auth(), timeout=300)  # fmt: skip
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    counts = outputs["num_detections"]["data"]
    assert counts == [len(a) for a in alone] and min(counts) > 0
    boxes = np.reshape(outputs["boxes"]["data"], (2, max(counts), 4))
    scores = np.reshape(outputs["scores"]["data"], (2, max(counts)))
    for slot, expected in enumerate(alone):
        np.testing.assert_allclose(boxes[slot, : counts[slot]], [d["box"] for d in expected], atol=0.011)
        np.testing.assert_allclose(scores[slot, : counts[slot]], [d["score"] for d in expected], atol=1e-5)


def test_every_way_in_takes_the_slicing_options(sliced_server, small_mosaic, tmp_path: Path):
    """Headers, form fields, JSON keys, v2 parameters (above), gRPC input entries, the three clients' flags and an
    archive's default all give the answer of the same sliced request; a request turns the default off."""
    png = encode(small_mosaic.pixels, "png")
    expected = detect(sliced_server, SHAPES_MODEL, small_mosaic.pixels, slice=320, overlap=0.25)
    plain = detect(sliced_server, SHAPES_MODEL, small_mosaic.pixels)
    assert expected != plain
    url = f"{sliced_server.inference}/predictions/{SHAPES_MODEL}"
    auth = sliced_server.auth()

    form = requests.post(url, files={"image": ("m.png", png, "image/png")}, data={"slice": "320", "overlap": "0.25"},
                         headers=auth, timeout=300)  # fmt: skip
    as_json = requests.post(url, json={"image": base64.b64encode(png).decode(), "slice": 320, "overlap": 0.25},
                            headers=auth, timeout=300)  # fmt: skip
    for response in (form, as_json):
        assert response.status_code == 200, response.text
        assert response.json()["detections"] == expected
    with GrpcClient(sliced_server) as client:
        answer = json.loads(client.predict(SHAPES_MODEL, png, {"slice": 320, "overlap": 0.25}))
    assert answer["detections"] == expected

    image = tmp_path / "images" / "mosaic.png"
    image.parent.mkdir()
    image.write_bytes(png)
    env = dict(os.environ, YOLONAS_RUN_DIR=str(sliced_server.run_dir))

    def command(script: str, *args: str) -> str:
        done = subprocess.run([sys.executable, str(REPO / "scripts" / script), *args], env=env, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    flags = ("--model", SHAPES_MODEL, "--slice", "320", "--overlap", "0.25")
    assert json.loads(command("predict.py", str(image), *flags, "--json"))["detections"] == expected
    assert json.loads(command("grpc_client.py", "predict", str(image), *flags, "--json"))["detections"] == expected
    command("batch_predict.py", str(image.parent), *flags, "--out", str(tmp_path / "results.json"))
    coco = json.loads((tmp_path / "results.json").read_text())
    assert [(r["category_id"], r["score"]) for r in coco] == [(d["class_id"], d["score"]) for d in expected]
    for row, want in zip(coco, expected, strict=True):
        x0, y0, x1, y1 = want["box"]
        np.testing.assert_allclose(row["bbox"], [x0, y0, x1 - x0, y1 - y0], atol=0.02)

    assert detect(sliced_server, SLICED_BY_DEFAULT, small_mosaic.pixels) == expected
    assert detect(sliced_server, SLICED_BY_DEFAULT, small_mosaic.pixels, slice="off") == plain


def test_max_det_applies_after_merging(sliced_server, small_mosaic, session):
    """Each tile keeps max_det boxes, and so does the merge: the answer is the best max_det of sahi's merge of the
    same tiles' answers."""
    options = {"slice": 320, "max_det": 3}
    model = served_model(sliced_server, SHAPES_MODEL, options, small_mosaic.names, session=session)
    merged = sliced_detections(model, small_mosaic.pixels)
    assert len(merged) > 3
    ours = detect(sliced_server, SHAPES_MODEL, small_mosaic.pixels, **options)
    assert len(ours) == 3 and agreement(ours, merged[:3]) == 1.0


def tiles_histogram(endpoints: Endpoints) -> tuple[float, float]:
    """(count, sum) of the shapes model's YoloNASTilesPerRequest series (in hundreds of tiles)."""
    text = requests.get(f"{endpoints.metrics}/metrics", timeout=30).text
    found = {"count": 0.0, "sum": 0.0}
    for line in text.splitlines():
        match = re.match(r"YoloNASTilesPerRequest_(count|sum)\{(.*)\} (\S+)$", line)
        if match and f'ModelName="{SHAPES_MODEL}"' in match.group(2):
            found[match.group(1)] = float(match.group(3))
    return found["count"], found["sum"]


def test_tiles_per_request_reach_the_metrics_endpoint(sliced_server, small_mosaic):
    count, total = tiles_histogram(sliced_server)
    detect(sliced_server, SHAPES_MODEL, small_mosaic.pixels, slice=320)  # 3 x 3 tiles
    deadline = time.monotonic() + 30
    while tiles_histogram(sliced_server)[0] < count + 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    after = tiles_histogram(sliced_server)
    assert after[0] == count + 1 and after[1] == pytest.approx(total + 0.09)
