"""Sliced inference shown and measured: mosaics of the shapes model's validation images (small objects on a large
picture, with known boxes), recall at IoU 0.5, the plain-against-sliced picture (scripts/sliced_picture.py), and
scripts/bench.py --sliced: one sliced request against its tiles' bare forwards and against sahi's own loop calling
the same server tile by tile (``sahi_peer``).
"""

from __future__ import annotations

import io
import json
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from yolonas_serving.detector import Detector
from yolonas_serving.draw import draw_detections, encode_jpeg
from yolonas_serving.protocol.base import ImageResult
from yolonas_serving.protocol.plain import JsonAnswer, detection_entries
from yolonas_serving.timing import Timings
from yolonas_tools.build import archive
from yolonas_tools.data.datasets import load_dataset
from yolonas_tools.data.synthetic import shapes_image
from yolonas_tools.measure.bench import CORES, BenchOptions, build_archives, cpu_description, load
from yolonas_tools.measure.load import KeepAliveSession, in_turns
from yolonas_tools.serve import server
from yolonas_tools.serve.clients import Endpoints, authorized_request, option_headers


@dataclass
class Mosaic:
    """An RGB picture and its ground truth: xyxy boxes in its pixels and their class ids."""

    pixels: np.ndarray
    boxes: np.ndarray  # [N, 4] float64
    class_ids: np.ndarray  # [N] int64
    names: list[str]


def mosaic(data_yaml: Path, columns: int, rows: int, first: int = 0) -> Mosaic:
    """``columns`` x ``rows`` validation images of a dataset of equal-sized images pasted row by row, from the
    ``first``, their boxes moved with them. A plain request scales the whole mosaic down to the network's input
    (the shapes model's 320: 1/10 for 10x5 images), so its objects shrink to a few pixels; tiles of one image's
    size keep them at the size the model was trained on."""
    dataset = load_dataset(data_yaml)
    entries = dataset.images[first : first + columns * rows]
    if len(entries) < columns * rows:
        raise ValueError(f"{data_yaml}: {len(dataset.images)} images, not enough for {columns}x{rows} from {first}")
    width, height = entries[0].width, entries[0].height
    pixels = np.zeros((rows * height, columns * width, 3), np.uint8)
    boxes, class_ids = [], []
    for k, entry in enumerate(entries):
        if (entry.width, entry.height) != (width, height):
            raise ValueError(f"{entry.path}: {entry.width}x{entry.height}; a mosaic needs images of one size")
        x, y = (k % columns) * width, (k // columns) * height
        with Image.open(entry.path) as image:
            pixels[y : y + height, x : x + width] = np.asarray(image.convert("RGB"))
        for annotation in (a for a in dataset.annotations if a["image_id"] == entry.id):
            left, top, box_width, box_height = annotation["bbox"]
            boxes.append([x + left, y + top, x + left + box_width, y + top + box_height])
            class_ids.append(annotation["category_id"])
    return Mosaic(pixels, np.array(boxes, np.float64).reshape(-1, 4), np.array(class_ids, np.int64), dataset.names)


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    width = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    height = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = width * height
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / ((box[2] - box[0]) * (box[3] - box[1]) + areas - inter)


def found_objects(detections: list[dict[str, Any]], truth: Mosaic, iou: float = 0.5) -> int:
    """Ground-truth objects found: detections by score each take the unmatched object of their class they overlap
    most, at IoU >= ``iou`` (COCO's matching at one threshold)."""
    matched = np.zeros(len(truth.boxes), bool)
    for found in sorted(detections, key=lambda d: -d["score"]):
        candidates = np.flatnonzero(~matched & (truth.class_ids == found["class_id"]))
        if not len(candidates):
            continue
        overlaps = _iou(np.asarray(found["box"], np.float64), truth.boxes[candidates])
        best = int(np.argmax(overlaps))
        if overlaps[best] >= iou:
            matched[candidates[best]] = True
    return int(matched.sum())


def recall(detections: list[dict[str, Any]], truth: Mosaic, iou: float = 0.5) -> float:
    """The fraction of ground-truth objects found (see :func:`found_objects`)."""
    return found_objects(detections, truth, iou) / len(truth.boxes)


def _labelled(picture: Image.Image, text: str) -> Image.Image:
    """The picture under a white band with ``text``."""
    font = ImageFont.load_default(size=max(11, picture.width // 32))
    band = font.size * 2
    canvas = Image.new("RGB", (picture.width, picture.height + band), "white")
    canvas.paste(picture, (0, band))
    ImageDraw.Draw(canvas).text((font.size // 2, band // 2), text, fill="black", font=font, anchor="lm")
    return canvas


def plain_and_sliced_picture(
    detector: Detector, truth: Mosaic, options: dict[str, Any], width: int = 1600
) -> Image.Image:
    """The mosaic annotated twice, side by side: by a plain request, then by a sliced one (``options``, which hold
    ``slice``; the plain request has the others), each titled with its options and the objects it found; scaled to
    ``width`` pixels."""
    panels = []
    for title, request in (("plain", {**options, "slice": "off"}), ("sliced", options)):
        (found,) = detector.detect([detector.prepare(_png(truth.pixels), request)])
        count = found_objects(detection_entries(found, detector.names), truth)
        shown = ", ".join(f"{name} {value}" for name, value in request.items() if name != "slice" or title == "sliced")
        label = f"{title} ({shown}): {count} of {len(truth.boxes)} objects found"
        panels.append(_labelled(draw_detections(truth.pixels, found, detector.names), label))
    gap = panels[0].width // 100
    canvas = Image.new("RGB", (2 * panels[0].width + gap, panels[0].height), "white")
    for i, panel in enumerate(panels):
        canvas.paste(panel, (i * (panel.width + gap), 0))
    return canvas.resize((width, round(canvas.height * width / canvas.width)), Image.Resampling.LANCZOS)


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


# --- scripts/bench.py --sliced ------------------------------------------------------------------------------------

#  The bench's picture and tiles: a 12-megapixel photo in 640 tiles is 8 x 6 = 48 tiles, and the whole-image pass.
BENCH_SIZE = (4000, 3000)
BENCH_SLICE = 640
#  Random weights find boxes everywhere (hundreds per tile at 0.25); at this threshold a tile keeps a few (the
#  merge of the bench picture's 49 passes keeps about 160), as a trained model would on a busy photo, so that
#  merging and JSON carry a plausible load below max_det.
BENCH_CONF = 0.6
DEFAULT_BACKENDS = "int8,auto"
#  Targets: a sliced request costs at most this much more than its forwards alone; sahi's loop through the same
#  server takes at least this much longer than the one request.
MAX_OVER_FORWARDS = 1.15
MIN_SAHI_OVER_OURS = 1.25
CHAIN_STAGES = ("decode", "tiles", "forward", "merge", "json")


def bench_jpeg(seed: int = 0) -> bytes:
    """A 4000x3000 JPEG (quality 90) of 8 x 6 synthetic shapes scenes of 500 px: a busy picture of small objects."""
    rng = np.random.default_rng(seed)
    side = 500
    rows = [
        np.concatenate([shapes_image(rng, side) for _ in range(BENCH_SIZE[0] // side)], axis=1)
        for _ in range(BENCH_SIZE[1] // side)
    ]
    return encode_jpeg(Image.fromarray(np.concatenate(rows, axis=0)))


def chain_once(detector: Detector, jpeg: bytes, request: dict[str, Any]) -> dict[str, float]:
    """Milliseconds per stage of one sliced image through the in-process chain: full-resolution decode, cutting and
    preprocessing the tiles, the forwards, per-tile NMS with the merge, the JSON answer."""
    timings = Timings()
    with timings.stage("decode"):
        detector.decode(jpeg, full_resolution=True)
    with timings.stage("prepare"):
        prepared = detector.prepare(jpeg, request)  # decodes again: the tiles' share is prepare less decode
    (found,) = detector.detect([prepared], timings)
    with timings.stage("json"):
        JsonAnswer().render([ImageResult(found, prepared.size)], detector.model)
    ms = timings.ms
    return {"decode": ms["decode"], "tiles": ms["prepare"] - ms["decode"], "forward": ms["inference"],
            "merge": ms["postprocess"], "json": ms["json"]}  # fmt: skip


def bare_forwards(detector: Detector, tile: np.ndarray, count: int) -> None:
    """``count`` forwards of one tile's input at batch 1, back to back: as long a window as the sliced request's, so
    that the machine's slow and quick stretches fall on both alike."""
    for _ in range(count):
        detector.runtime(tile)


def served_once(endpoints: Endpoints, model: str, jpeg: bytes, request: dict[str, Any],
                session: KeepAliveSession) -> int:  # fmt: skip
    """One sliced request of the JPEG; the number of detections answered."""
    url = f"{endpoints.inference}/predictions/{model}"
    headers = {"Content-Type": "image/jpeg", **option_headers(request)}
    response = authorized_request(endpoints, "POST", url, session=session, data=jpeg, headers=headers, timeout=300)
    if response.status_code != 200:
        raise RuntimeError(f"{model}: {response.status_code} {response.text[:300]}")
    return len(json.loads(response.text)["detections"])


def sahi_once(endpoints: Endpoints, model: str, jpeg: bytes, request: dict[str, Any],
              session: KeepAliveSession) -> int:  # fmt: skip
    """sahi's get_sliced_prediction of the JPEG (decoded here, as sahi reads a file), each tile posted as a JPEG;
    the number of detections it merged."""
    from yolonas_tools.measure import sahi_peer

    pixels = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    peer = sahi_peer.served_model(endpoints, model, request, [], "jpeg", session)
    return len(sahi_peer.sliced_detections(peer, pixels))


def measure_sliced(options: BenchOptions, detectors: dict[str, Detector], models: dict[str, str],
                   endpoints: Endpoints, jpeg: bytes) -> list[dict[str, Any]]:  # fmt: skip
    """Per backend, in turn round after round: the served sliced request, sahi's loop through the same server, the
    bare forwards of one tile and the in-process chain; one row of medians each."""
    request = {"slice": BENCH_SLICE, "conf": BENCH_CONF}
    calls: dict[str, Callable[[], Any]] = {}
    tiles: dict[str, int] = {}
    session = KeepAliveSession()
    for backend, detector in detectors.items():
        prepared = detector.prepare(jpeg, request)
        tiles[backend] = len(prepared.tiles)
        tile, model = prepared.inputs[0].tensor[None], models[backend]
        calls[f"served {backend}"] = lambda m=model: served_once(endpoints, m, jpeg, request, session)
        calls[f"sahi {backend}"] = lambda m=model: sahi_once(endpoints, m, jpeg, request, session)
        calls[f"forwards {backend}"] = lambda d=detector, x=tile, n=tiles[backend] + 1: bare_forwards(d, x, n)
        calls[f"chain {backend}"] = lambda d=detector: chain_once(d, jpeg, request)
    results = in_turns(calls, options.repeats, options.budget, warm_up=1)
    rows = []
    for backend in detectors:
        served, sahi, forwards = (
            [ms for ms, _ in results[f"{kind} {backend}"]] for kind in ("served", "sahi", "forwards")
        )
        chain = results[f"chain {backend}"]
        stages = {stage: statistics.median(s[stage] for _, s in chain) for stage in CHAIN_STAGES}
        # Ratios per round (the calls of one round ran back to back), then their median.
        rows.append({"backend": backend, "tiles": tiles[backend], "rounds": len(served),
                     "served_ms": statistics.median(served), "sahi_ms": statistics.median(sahi),
                     "forwards_ms": statistics.median(forwards),
                     "forward_ms": statistics.median(forwards) / (tiles[backend] + 1),
                     "over_forwards": statistics.median(a / b for a, b in zip(served, forwards)),
                     "sahi_over_ours": statistics.median(a / b for a, b in zip(sahi, served)),
                     "detections": results[f"served {backend}"][-1][1],
                     "sahi_detections": results[f"sahi {backend}"][-1][1], "chain_ms": stages,
                     "load": load()})  # fmt: skip
    return rows


def print_sliced_table(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'sliced':<10} {'tiles':>5} {'served ms':>9} {'fwd ms':>7} {'(t+1)xfwd':>9} {'ratio':>6} "
          f"{'sahi ms':>8} {'sahi/ours':>9} {'dets':>5} {'load':>5}")  # fmt: skip
    for r in rows:
        print(f"{r['backend']:<10} {r['tiles']:>5} {r['served_ms']:>9.0f} {r['forward_ms']:>7.1f} "
              f"{r['forwards_ms']:>9.0f} {r['over_forwards']:>6.2f} {r['sahi_ms']:>8.0f} {r['sahi_over_ours']:>9.2f} "
              f"{r['detections']:>5} {r['load']:>5.1f}")  # fmt: skip
    print(f"\n{'in process':<10} " + " ".join(f"{stage:>8}" for stage in CHAIN_STAGES) + f" {'total':>8}")
    for r in rows:
        stages = r["chain_ms"]
        print(f"{r['backend']:<10} " + " ".join(f"{stages[s]:>8.0f}" for s in CHAIN_STAGES) +
              f" {sum(stages.values()):>8.0f}")  # fmt: skip
    print(
        f"goal: ratio (served over (tiles+1) bare forwards of one tile) <= {MAX_OVER_FORWARDS}; sahi/ours (sahi's "
        f"loop through the same server over one sliced request) >= {MIN_SAHI_OVER_OURS}; both ratios are medians of "
        "per-round ratios"
    )


def run_bench(options: BenchOptions, backends: list[str]) -> None:
    """scripts/bench.py --sliced: an archive per backend (reused from ``--store``), all served by one TorchServe and
    opened in process too; header, one JSON line per backend, then the tables (progress on stderr)."""
    torch.set_num_threads(options.threads)
    jpeg = bench_jpeg()
    header = (
        f"# sliced: {BENCH_SIZE[0]}x{BENCH_SIZE[1]} JPEG ({len(jpeg) / 1e6:.1f} MB) in {BENCH_SLICE} tiles, "
        f"conf {BENCH_CONF}, {options.variant.upper()}, {CORES} cores, {options.threads} threads in process, "
        f"load {load()}\n# CPU: {cpu_description()}"
    )
    print(header, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        archives, _, _ = build_archives(replace(options, backends=backends), tmp)
        detectors = {backend: archive.open_archive(mar, tmp / mar.stem) for backend, mar in archives.items()}
        models = {backend: mar.stem for backend, mar in archives.items()}
        store = next(iter(archives.values())).parent
        endpoints = server.start(tmp / "run", store, models=list(models.values()), ports=server.free_ports())
        try:
            rows = measure_sliced(options, detectors, models, endpoints, jpeg)
        finally:
            server.stop(tmp / "run")
    for row in rows:
        print(json.dumps(row))
    print(header)
    print_sliced_table(rows)
