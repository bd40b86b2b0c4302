"""Hostile input against the session TorchServe: every bad request gets a 4xx with a clear message, the others in
its batch still succeed, and the worker neither dies nor restarts and keeps giving the same detections. Compressed
raw bodies (Content-Encoding: gzip) are served like plain ones, within the handler's bound on their expansion."""

from __future__ import annotations

import base64
import gzip
import io
import json
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from PIL import Image

MODEL = "yolo_nas_s"
#  A compressed body may expand to twice the request limit (protocol/request.py: MAX_EXPANSION x max_request_bytes).
EXPANSION_BOUND = 2 * 20 * 1024 * 1024
GZIP = {"Content-Encoding": "gzip"}


@dataclass(frozen=True)
class Case:
    name: str
    body: bytes
    content_type: str
    status: int
    message: str | None  # a fragment of the {"error": ...} text; None for the frontend's empty 413
    headers: dict[str, str] = field(default_factory=dict)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def as_json(**body) -> bytes:
    return json.dumps(body).encode()


def zip_file() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("photo.jpg", b"\xff\xd8\xff" + b"\x00" * 100)
    return buffer.getvalue()


def hostile_cases(jpeg: bytes, png: bytes) -> list[Case]:
    corrupt_png = bytearray(png)
    idat = png.find(b"IDAT")
    corrupt_png[idat + 50 : idat + 60] = bytes(10)
    corrupt_jpeg = bytearray(jpeg)
    corrupt_jpeg[2:40] = bytes(38)  # the APP0/quantisation headers zeroed: no decoder recognises it
    v2 = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64(png)]}]}
    return [
        Case("truncated jpeg", jpeg[: len(jpeg) // 2], "image/jpeg", 400, "image file is truncated"),
        Case("truncated png", png[: len(png) // 2], "image/png", 400, "corrupt image data (PNG)"),
        Case("corrupt jpeg", bytes(corrupt_jpeg), "image/jpeg", 400, "not an image"),
        Case("corrupt png", bytes(corrupt_png), "image/png", 400, "corrupt image data (PNG)"),
        Case("zero bytes", b"", "image/jpeg", 400, "empty image"),
        Case("bomb 20000x20000", encode(Image.new("1", (20_000, 20_000)), "PNG"), "image/png", 413,
             "decompression bomb"),
        Case("49 megapixels", encode(Image.new("1", (7_000, 7_000)), "PNG"), "image/png", 413,
             "the limit is 40000000"),
        Case("image labelled json", png, "application/json", 400, "not valid JSON"),
        Case("json labelled jpeg", as_json(hello="world"), "image/jpeg", 400, 'needs "image"'),
        Case("text", b"hello world", "text/plain", 400, "not valid JSON"),
        Case("pdf", b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n",
             "application/pdf", 400, "not an image"),
        Case("zip", zip_file(), "application/zip", 400, "not an image"),
        Case("malformed json", b'{"image": "aGVsbG8=", ', "application/json", 400, "not valid JSON"),
        Case("json nested too deep", b"[" * 100_000, "application/json", 400, "not valid JSON"),
        Case("bad base64", as_json(image="@@not base64@@"), "application/json", 400, "not valid base64"),
        Case("base64 of text", as_json(image=b64(b"just text")), "application/json", 400, "not an image"),
        Case("negative conf", png, "image/png", 400, "conf: got '-0.5'; allowed: a number in [0, 1]",
             {"X-Conf": "-0.5"}),
        Case("iou above 1", png, "image/png", 400, "iou: got '1.5'; allowed: a number in (0, 1]", {"X-Iou": "1.5"}),
        Case("max_det 10^9", png, "image/png", 400, "max_det: got '1000000000'; allowed: an integer in [1, 10000]",
             {"X-Max-Det": "1000000000"}),
        Case("max_det infinity", b'{"image": "%s", "max_det": Infinity}' % b64(png).encode(), "application/json",
             400, "max_det: got inf"),
        Case("unknown class", png, "image/png", 400, "classes: got 'unicorn'; allowed: class ids or names",
             {"X-Classes": "person,unicorn"}),
        Case("unknown option", as_json(image=b64(png), confidence=0.5), "application/json", 400,
             "unknown option(s) ['confidence']"),
        # Non-ASCII in a message once corrupted TorchServe's reply framing and killed the worker.
        Case("superscript class id", png, "image/png", 400, r"classes: got '\xb2'", {"X-Classes": "²"}),
        Case("non-ascii option name", as_json(image=b64(png), **{"größe": 1}), "application/json", 400,
             r"unknown option(s) ['gr\xf6\xdfe']"),
        Case("non-ascii format", png, "image/png", 400, r"got 'p\xf1g'", {"X-Format": "pñg"}),
        Case("v2 parameters not an object", as_json(**v2, parameters=[1, 2]), "application/json", 400,
             "v2 parameters must be a JSON object"),
        Case("50 MB body", bytes(50 * 1024 * 1024), "image/jpeg", 413, None),
        # A small compressed body that would fill the worker's memory: refused once past the bound, not inflated.
        Case("gzip bomb", gzip.compress(bytes(EXPANSION_BOUND + 1), compresslevel=1), "application/octet-stream", 413,
             f"the gzip body expands beyond {EXPANSION_BOUND} bytes", GZIP),
        Case("truncated gzip", gzip.compress(png)[:-100], "image/png", 400, "the gzip body is truncated", GZIP),
        Case("gzip label on plain bytes", png, "image/png", 400, "the body is not valid gzip data", GZIP),
        Case("unknown encoding", png, "image/png", 415, "Content-Encoding 'br' is not supported",
             {"Content-Encoding": "br"}),
    ]  # fmt: skip


def post(endpoints, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> requests.Response:
    headers = {**endpoints.auth(), "Content-Type": content_type, **(headers or {})}
    return requests.post(f"{endpoints.inference}/predictions/{MODEL}", data=body, headers=headers, timeout=120)


def workers(endpoints) -> list[tuple]:
    response = requests.get(f"{endpoints.management}/models/{MODEL}", headers=endpoints.auth("management"), timeout=30)
    response.raise_for_status()
    return [(w["id"], w["pid"], w["startTime"], w["status"]) for w in response.json()[0]["workers"]]


#  The well-formed images each barrage is checked with, as named in ``images``.
GOOD = ("png", "other png")


@pytest.fixture(scope="module")
def images(reference_dir: Path) -> dict[str, bytes]:
    png = (reference_dir / "images" / "img_a_h480_w640.png").read_bytes()
    return {"png": png, "jpeg": encode(Image.open(io.BytesIO(png)).convert("RGB"), "JPEG", quality=90),
            "other png": (reference_dir / "images" / "img_b_h800_w600.png").read_bytes()}  # fmt: skip


@pytest.fixture(scope="module")
def cases(images) -> list[Case]:
    return hostile_cases(images["jpeg"], images["png"])


@pytest.fixture(scope="module")
def before(ts_server, images) -> tuple[dict[str, dict], list[tuple]]:
    """Each good image's detections, and the workers, before any hostile request."""
    answers = {}
    for name in GOOD:
        response = post(ts_server, images[name], "image/png")
        assert response.status_code == 200, response.text
        assert response.json()["detections"], "the seeded random model detects plenty"
        answers[name] = response.json()
    assert answers["png"]["image_size"] != answers["other png"]["image_size"], "a mix-up must show"
    state = workers(ts_server)
    assert [status for *_, status in state] == ["READY"]
    return answers, state


def check_refused(case: Case, response: requests.Response) -> None:
    assert response.status_code == case.status, f"{case.name}: {response.status_code} {response.text[:300]}"
    if case.message is not None:
        assert response.headers["Content-Type"].startswith("application/json")
        error = response.json()["error"]
        assert case.message in error, f"{case.name}: {error!r}"


def assert_same_detections(result: dict, expected: dict) -> None:
    """Equal up to float noise: batches of other sizes may run other convolution kernels."""
    assert result["image_size"] == expected["image_size"]
    assert [d["class_id"] for d in result["detections"]] == [d["class_id"] for d in expected["detections"]]
    for got, want in zip(result["detections"], expected["detections"]):
        assert got["score"] == pytest.approx(want["score"], abs=1e-3)
        assert got["box"] == pytest.approx(want["box"], abs=0.1)


def assert_worker_survived(endpoints, before, images) -> None:
    """The same worker process (id, pid, start time) is READY, and each good image gets exactly the detections it
    got before any hostile request."""
    for name, expected in before[0].items():
        response = post(endpoints, images[name], "image/png")
        assert response.status_code == 200, response.text
        assert response.json() == expected, name
    assert workers(endpoints) == before[1]


def test_each_hostile_request_gets_a_4xx_with_a_clear_message(endpoints, before, cases, images):
    for case in cases:
        check_refused(case, post(endpoints, case.body, case.content_type, case.headers))
    assert_worker_survived(endpoints, before, images)


def test_hostile_requests_inside_busy_batches_fail_alone(endpoints, before, cases, images):
    """Hostile requests sent concurrently with good ones (two different images, in turn) share batches with them;
    each good one gets its own image's detections, the bad ones their 4xx."""
    goods = [Case(name, images[name], "image/png", 200, None) for name in GOOD]
    mixed = [item for i, case in enumerate(cases) for item in ([goods[i // 6 % 2], case] if i % 6 == 0 else [case])]
    assert {case.name for case in mixed} >= set(GOOD)
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda c: post(endpoints, c.body, c.content_type, c.headers), mixed))
    for case, response in zip(mixed, responses, strict=True):
        if case.status == 200:
            assert response.status_code == 200, response.text
            assert_same_detections(response.json(), before[0][case.name])
        else:
            check_refused(case, response)
    assert_worker_survived(endpoints, before, images)


def test_a_1x1_image_is_valid_and_scaled_up(endpoints, before, images):
    for fmt, content_type in (("PNG", "image/png"), ("JPEG", "image/jpeg")):
        response = post(endpoints, encode(Image.new("RGB", (1, 1), (200, 30, 30)), fmt), content_type)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["image_size"] == [1, 1]
        for detection in body["detections"]:
            assert all(0 <= v <= 1 for v in detection["box"])
    assert_worker_survived(endpoints, before, images)


def test_mislabelled_image_bytes_are_served_by_content(endpoints, before, images):
    """Raw bodies are recognised by their bytes, not their label: a valid image sent as text/plain or
    application/octet-stream is served as usual (only a JSON label makes the handler read JSON)."""
    for content_type in ("text/plain", "application/octet-stream", "image/gif"):
        response = post(endpoints, images["png"], content_type)
        assert response.status_code == 200, f"{content_type}: {response.text[:200]}"
        assert response.json() == before[0]["png"]
    assert_worker_survived(endpoints, before, images)


def test_gzip_compressed_raw_bodies_are_served_like_plain_ones(endpoints, before, images):
    """Content-Encoding: gzip on a raw image body, labelled as the image or as bytes: the handler inflates it and
    answers exactly what the plain body gets (the bound on inflation is a hostile case above)."""
    for name in GOOD:
        for content_type in ("image/png", "application/octet-stream"):
            response = post(endpoints, gzip.compress(images[name]), content_type, GZIP)
            assert response.status_code == 200, f"{name}, {content_type}: {response.text[:200]}"
            assert response.json() == before[0][name]
    assert_worker_survived(endpoints, before, images)
