"""Evaluation: COCO metrics of detections on a labelled dataset (pycocotools), the detections a running server, a
checkpoint or an archive gives, and how closely two sets of detections agree.

Metrics, all from pycocotools' COCOeval (bbox, area "all", maxDets 100):
- mAP50-95 / mAP50: COCO AP averaged over IoU 0.50:0.95 / at IoU 0.50, mean over classes with ground truth.
- precision / recall: at IoU 0.50 on COCOeval's own matches, at the one score threshold (``f1_conf``) that maximises
  the mean F1 over classes with ground truth (Ultralytics' definition, computed exactly rather than on a grid);
  a class with no detection above that threshold has precision 0.
- AR100: COCO's average recall at 100 detections per image, IoU 0.50:0.95.
COCOeval leaves classes without ground-truth boxes out of every mean (its -1 entries), even when the model
predicted them; they appear as ``null`` in results. A class with ground truth but no prediction counts as AP 0.
"""

from __future__ import annotations

import sys
from collections import Counter, defaultdict, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from yolonas import read_checkpoint
from yolonas_serving.detector import Detector, Prepared
from yolonas_serving.errors import RequestError
from yolonas_serving.postprocess import Detections
from yolonas_serving.protocol.base import ImageResult
from yolonas_serving.protocol.plain import result_json
from yolonas_serving.settings import settings_from_checkpoint
from yolonas_tools.data.datasets import Dataset, ImageEntry, quiet
from yolonas_tools.serve.clients import Endpoints, option_headers, predict


class EvaluationError(Exception):
    """An image the model refused, or detections that do not fit the dataset; the message says which."""


#  Written into --out so a results file explains itself.
DEFINITIONS = {
    "mAP50-95": "COCOeval bbox AP, IoU 0.50:0.95, area all, maxDets 100, mean over classes with ground truth",
    "mAP50": "the same at IoU 0.50",
    "precision": "at IoU 0.50 (COCOeval matches) and score >= f1_conf, mean over classes with ground truth",
    "recall": "the same",
    "f1_conf": "the highest score threshold maximising the mean F1 over classes with ground truth",
    "AR100": "COCOeval average recall, IoU 0.50:0.95, maxDets 100",
    "null": "a class without ground truth: COCOeval's -1, left out of every mean",
}


@dataclass(frozen=True)
class EvalOptions:
    """super-gradients' validation settings (its predict() with conf 0.001)."""

    conf: float = 0.001
    iou: float = 0.7
    max_det: int = 300


@dataclass
class ClassResult:
    class_id: int
    category_id: int
    name: str
    images: int
    instances: int
    ap50_95: float | None
    ap50: float | None
    precision: float | None
    recall: float | None


@dataclass
class Results:
    images: int
    instances: int
    map50_95: float | None
    map50: float | None
    precision: float | None
    recall: float | None
    f1_conf: float | None
    ar100: float | None
    coco_stats: list[float]
    coco_summary: str
    classes: list[ClassResult]

    def to_json(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "instances": self.instances,
            "metrics": {"mAP50-95": self.map50_95, "mAP50": self.map50, "precision": self.precision,
                        "recall": self.recall, "f1_conf": self.f1_conf, "AR100": self.ar100},  # fmt: skip
            "coco_stats": self.coco_stats,
            "classes": [
                {"class_id": c.class_id, "category_id": c.category_id, "name": c.name, "images": c.images,
                 "instances": c.instances, "AP50-95": c.ap50_95, "AP50": c.ap50, "precision": c.precision,
                 "recall": c.recall}
                for c in self.classes
            ],
        }  # fmt: skip


# --- the model's detections -----------------------------------------------------------------------------------


def detections_from_response(body: dict[str, Any]) -> Detections:
    """The plain JSON response (boxes in original pixels, clipped) -> Detections."""
    found = body["detections"]
    return Detections(
        np.array([d["box"] for d in found], dtype=np.float64).reshape(-1, 4),
        np.array([d["score"] for d in found], dtype=np.float64),
        np.array([d["class_id"] for d in found], dtype=np.int64),
    )


def server_responses(
    endpoints: Endpoints, model: str, images: list[ImageEntry], options: EvalOptions, concurrency: int
) -> Iterator[dict[str, Any]]:
    """One JSON response per image, in order; ``concurrency`` requests in flight so TorchServe can batch them
    (a bounded window, so a failure stops the run instead of draining every queued image first)."""
    headers = option_headers({"conf": options.conf, "iou": options.iou, "max_det": options.max_det})

    def ask(entry: ImageEntry) -> dict[str, Any]:
        response = predict(endpoints, model, entry.path, headers, timeout=300)
        if not response.ok:
            raise EvaluationError(
                f"{entry.path}: HTTP {response.status_code} from model {model}: {response.text.strip()}"
            )
        return response.json()

    with ThreadPoolExecutor(concurrency) as pool:
        pending: deque[Future[dict[str, Any]]] = deque()
        for entry in images:
            pending.append(pool.submit(ask, entry))
            if len(pending) >= concurrency:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def local_detector(weights: Path, model: str, device: str = "cpu") -> Detector:
    """The Detector an archive of this checkpoint would hold (processing_params honoured), without TorchServe."""
    ckpt = read_checkpoint(weights)
    settings, names = settings_from_checkpoint(ckpt.num_classes, ckpt.variant, ckpt.processing_params)
    return Detector.from_settings(settings, str(weights), names, model, device)


def local_responses(
    detector: Detector, images: list[ImageEntry], options: EvalOptions, batch_size: int
) -> Iterator[dict[str, Any]]:
    """The server's JSON responses, made in process by the same Detector (same parsing, rounding and clipping)."""
    request_options = {"conf": options.conf, "iou": options.iou, "max_det": options.max_det}

    def prepare(entry: ImageEntry) -> Prepared:
        try:
            return detector.prepare(entry.path.read_bytes(), request_options)
        except RequestError as exc:
            raise EvaluationError(f"{entry.path}: {exc.message}") from None

    todo = iter(images)
    while batch := list(islice(todo, batch_size)):
        prepared = [prepare(entry) for entry in batch]
        for item, found in zip(prepared, detector.detect(prepared)):
            yield {"model": detector.model.name, **result_json(ImageResult(found, item.size), detector.names)}


# --- metrics --------------------------------------------------------------------------------------------------


def coco_results(dataset: Dataset, detections: dict[int, Detections]) -> list[dict[str, Any]]:
    """Detections per image id (xyxy, original pixels) -> COCO result records (xywh, dataset category ids)."""
    records = []
    for image_id, found in detections.items():
        for box, score, class_id in zip(found.boxes, found.scores, found.class_ids):
            if not 0 <= class_id < len(dataset.category_ids):
                raise ValueError(f"class id {class_id} is outside the dataset's {len(dataset.category_ids)} classes")
            x1, y1, x2, y2 = (float(v) for v in box)
            records.append({"image_id": image_id, "category_id": dataset.category_ids[class_id],
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})  # fmt: skip
    return records


def _iou50_matches(ev: COCOeval) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Per category: detection scores (descending), their true-positive flags at IoU 0.5 and the number of
    ground-truth boxes, from COCOeval's own per-image matching (area "all", maxDets 100; crowd matches left out)."""
    p = ev.params
    assert p.iouThrs[0] == 0.5 and p.areaRng[0][1] >= 1e10, "COCOeval's default parameters expected"
    n_images, n_areas = len(p.imgIds), len(p.areaRng)
    matches = []
    for k in range(len(p.catIds)):
        start = k * n_areas * n_images  # evalImgs is ordered category, area range, image
        evals = [e for e in ev.evalImgs[start : start + n_images] if e is not None]
        scores = np.concatenate([np.asarray(e["dtScores"], dtype=np.float64) for e in evals] or [np.zeros(0)])
        hits = np.concatenate([e["dtMatches"][0] > 0 for e in evals] or [np.zeros(0, dtype=bool)])
        ignored = np.concatenate([e["dtIgnore"][0] > 0 for e in evals] or [np.zeros(0, dtype=bool)])
        n_gt = sum(int(np.count_nonzero(e["gtIgnore"] == 0)) for e in evals)
        scores, hits = scores[~ignored], hits[~ignored]
        order = np.argsort(-scores, kind="mergesort")
        matches.append((scores[order], hits[order], n_gt))
    return matches


def _precision_recall(
    scores: np.ndarray, hits: np.ndarray, n_gt: int, thresholds: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall of one class keeping the detections with score >= each threshold."""
    kept = np.searchsorted(-scores, -thresholds, side="right")
    true = np.concatenate([[0], np.cumsum(hits)])[kept]
    precision = np.divide(true, kept, out=np.zeros(len(thresholds)), where=kept > 0)
    return precision, true / n_gt


def best_f1_threshold(matches: list[tuple[np.ndarray, np.ndarray, int]]) -> float | None:
    """The highest score threshold at which the mean F1 over classes with ground truth peaks."""
    valid = [m for m in matches if m[2] > 0]
    thresholds = np.unique(np.concatenate([m[0] for m in valid] or [np.zeros(0)]))[::-1]
    if not len(thresholds):
        return None
    mean_f1 = np.zeros(len(thresholds))
    for scores, hits, n_gt in valid:
        p, r = _precision_recall(scores, hits, n_gt, thresholds)
        mean_f1 += np.divide(2 * p * r, p + r, out=np.zeros(len(thresholds)), where=p + r > 0) / len(valid)
    return float(thresholds[int(np.argmax(mean_f1))])


def _mean(values: np.ndarray) -> float | None:
    """COCOeval's convention: -1 marks an entry without ground truth; None when nothing is left."""
    values = values[values > -1]
    return float(values.mean()) if values.size else None


def _empty_results(gt: COCO) -> COCO:
    """What ``gt.loadRes([])`` would give if pycocotools accepted an empty list (it reads the first record)."""
    dt = COCO()
    dt.dataset = {"images": list(gt.dataset["images"]), "categories": list(gt.dataset["categories"]), "annotations": []}
    dt.createIndex()
    return dt


def _instance_counts(dataset: Dataset) -> dict[int, tuple[int, int]]:
    """Per category: (images holding it, boxes), crowd regions left out as COCOeval leaves them out."""
    images: dict[int, set[int]] = defaultdict(set)
    boxes: Counter[int] = Counter()
    for ann in dataset.annotations:
        if not ann.get("iscrowd", 0):
            images[ann["category_id"]].add(ann["image_id"])
            boxes[ann["category_id"]] += 1
    return {c: (len(images[c]), boxes[c]) for c in boxes}


def evaluate(dataset: Dataset, detections: dict[int, Detections]) -> Results:
    """COCO bbox evaluation of ``detections`` (per image id; an image without an entry has none) on ``dataset``."""
    gt = dataset.coco()
    records = coco_results(dataset, detections)
    with quiet():
        ev = COCOeval(gt, gt.loadRes(records) if records else _empty_results(gt), "bbox")
        ev.evaluate()
        ev.accumulate()
    with quiet() as printed:
        ev.summarize()
    precision = ev.eval["precision"]  # [IoU thresholds, recall thresholds, categories, area ranges, max dets]
    matches = _iou50_matches(ev)
    conf = best_f1_threshold(matches)
    counts = _instance_counts(dataset)
    classes = []
    for k, category_id in enumerate(ev.params.catIds):
        scores, hits, n_gt = matches[k]
        p = r = None
        if n_gt:  # no detection at all (conf None): keep none, P = R = 0
            at = np.array([np.inf if conf is None else conf])
            p, r = (float(v[0]) for v in _precision_recall(scores, hits, n_gt, at))
        class_id = dataset.category_ids.index(category_id)
        classes.append(ClassResult(
            class_id, int(category_id), dataset.names[class_id], *counts.get(category_id, (0, 0)),
            ap50_95=_mean(precision[:, :, k, 0, -1]), ap50=_mean(precision[0, :, k, 0, -1]), precision=p, recall=r,
        ))  # fmt: skip
    with_gt = [c for c in classes if c.precision is not None]
    stats = [float(s) for s in ev.stats]
    return Results(
        images=len(dataset.images),
        instances=sum(c.instances for c in classes),
        map50_95=stats[0] if stats[0] > -1 else None,
        map50=stats[1] if stats[1] > -1 else None,
        precision=float(np.mean([c.precision for c in with_gt])) if with_gt else None,
        recall=float(np.mean([c.recall for c in with_gt])) if with_gt else None,
        f1_conf=conf,
        ar100=stats[8] if stats[8] > -1 else None,
        coco_stats=stats,
        coco_summary=printed.getvalue(),
        classes=classes,
    )


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def format_table(results: Results) -> str:
    """Ultralytics-style table: one row for all classes, then one per class."""
    header = f"{'class':>20} {'images':>7} {'instances':>9} {'P':>7} {'R':>7} {'mAP50':>7} {'mAP50-95':>8}"
    rows = [header, f"{'all':>20} {results.images:>7} {results.instances:>9} {_cell(results.precision):>7} "
            f"{_cell(results.recall):>7} {_cell(results.map50):>7} {_cell(results.map50_95):>8}"]  # fmt: skip
    for c in results.classes:
        rows.append(f"{c.name[:20]:>20} {c.images:>7} {c.instances:>9} {_cell(c.precision):>7} {_cell(c.recall):>7} "
                    f"{_cell(c.ap50):>7} {_cell(c.ap50_95):>8}")  # fmt: skip
    absent = [c.name for c in results.classes if c.ap50_95 is None]
    if absent:
        rows.append(f"{len(absent)} class(es) without ground truth, left out of the means as COCOeval does: "
                    f"{', '.join(absent[:10])}{' ...' if len(absent) > 10 else ''}")  # fmt: skip
    if results.f1_conf is not None:
        rows.append(f"P and R at IoU 0.50 and score >= {results.f1_conf:.4f} (best mean F1); "
                    f"AR100 {_cell(results.ar100)}")  # fmt: skip
    return "\n".join(rows)


def collect(dataset: Dataset, responses: Iterator[dict[str, Any]]) -> dict[int, Detections]:
    """Responses in dataset order -> detections per image id, with a progress bar and consistency checks."""
    detections: dict[int, Detections] = {}
    resized, renamed = [], set()
    for entry, body in zip(dataset.images, tqdm(responses, total=len(dataset.images), desc="val", unit="img")):
        if tuple(body["image_size"]) != (entry.width, entry.height):
            resized.append(entry.path.name)
        for d in body["detections"]:
            if d["class_id"] >= len(dataset.names):
                raise EvaluationError(f"the model predicts class {d['class_id']} ({d['class_name']}); "
                                      f"the dataset has {len(dataset.names)} classes")  # fmt: skip
            if d["class_name"] != dataset.names[d["class_id"]]:
                renamed.add((d["class_id"], d["class_name"]))
        detections[entry.id] = detections_from_response(body)
    if resized:
        print(
            f"WARNING: {len(resized)} image(s) decode to another size than the dataset records (EXIF "
            f"orientation?), e.g. {resized[0]}: their boxes may not line up with the labels",
            file=sys.stderr,
        )
    if renamed:
        class_id, name = sorted(renamed)[0]
        print(
            f"WARNING: the model's class names differ from the dataset's (class {class_id}: model {name!r}, "
            f"dataset {dataset.names[class_id]!r}); classes are matched by index",
            file=sys.stderr,
        )
    return detections


# --- agreement between two runs -------------------------------------------------------------------------------


def match(reference: Detections, other: Detections, min_iou: float = 0.5) -> tuple[list[float], list[float]]:
    """Greedy same-class matching, highest reference score first: (IoUs, absolute score differences)."""
    ious = torchvision.ops.box_iou(torch.from_numpy(reference.boxes).float(), torch.from_numpy(other.boxes).float())
    taken = np.zeros(len(other), dtype=bool)
    matched_ious, score_diffs = [], []
    for i in np.argsort(-reference.scores, kind="stable"):
        row = ious[i].numpy().copy()
        row[taken | (other.class_ids != reference.class_ids[i])] = -1
        j = int(np.argmax(row)) if len(row) else -1
        if j >= 0 and row[j] >= min_iou:
            taken[j] = True
            matched_ious.append(float(row[j]))
            score_diffs.append(abs(float(reference.scores[i]) - float(other.scores[j])))
    return matched_ious, score_diffs


def agreement(reference: list[Detections], other: list[Detections]) -> dict[str, float]:
    ious, diffs, total = [], [], 0
    for ref, oth in zip(reference, other):
        found_ious, found_diffs = match(ref, oth)
        ious += found_ious
        diffs += found_diffs
        total += max(len(ref), len(oth))
    return {
        "matched": len(ious) / total if total else 1.0,
        "mean_iou": float(np.mean(ious)) if ious else float("nan"),
        "max_score_diff": max(diffs, default=0.0),
        "detections_fp32": sum(len(r) for r in reference),
        "detections": sum(len(o) for o in other),
    }


def detect_all(detector: Detector, images: list[Path]) -> list[Detections]:
    found = []
    for path in images:
        prepared = detector.prepare(path.read_bytes())
        found += detector.detect([prepared])
    return found
