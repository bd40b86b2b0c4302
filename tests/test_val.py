"""Validation: dataset loading (YOLO and COCO), known-answer COCO metrics on tiny datasets written on the fly with
detections fed straight into the evaluation (no model), and the shapes model's known mAP run in process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from helpers import MAP_TOLERANCE
from yolonas_serving.postprocess import Detections
from yolonas_tools.cli import run_command
from yolonas_tools.data.datasets import DatasetError, label_path, load_dataset
from yolonas_tools.measure import evaluation

NAMES = ["cat", "dog", "emu"]
COCO_IDS = [3, 7, 11]  # deliberately not 0..n-1: class index i must map to the i-th sorted category


def dets(*rows: tuple[float, float, float, float, float, int]) -> Detections:
    """Rows of (x1, y1, x2, y2, score, class index)."""
    array = np.array(rows, dtype=np.float64).reshape(-1, 6)
    return Detections(array[:, :4], array[:, 4], array[:, 5].astype(np.int64))


def write_datasets(root: Path, images: dict[str, tuple[int, int, list[tuple[int, float, float, float, float]]]]):
    """The same ground truth twice: YOLO (data.yaml, images/val, labels/val) and COCO (instances_val.json).

    ``images``: name -> (width, height, [(class, x1, y1, x2, y2) in pixels]). Returns (yaml path, json path)."""
    (root / "images" / "val").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    coco = {"images": [], "annotations": [], "categories": [{"id": c, "name": n} for c, n in zip(COCO_IDS, NAMES)]}
    for image_id, (name, (width, height, boxes)) in enumerate(sorted(images.items()), 1):
        Image.new("RGB", (width, height), (114, 114, 114)).save(root / "images" / "val" / f"{name}.png")
        coco["images"].append({"id": image_id, "file_name": f"{name}.png", "width": width, "height": height})
        lines = []
        for c, x1, y1, x2, y2 in boxes:
            cx, cy, w, h = (x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height
            lines.append(f"{c} {cx} {cy} {w} {h}")
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": image_id,
                                        "category_id": COCO_IDS[c], "bbox": [x1, y1, x2 - x1, y2 - y1]})  # fmt: skip
        if boxes:  # an image with no objects gets no label file, as Ultralytics allows
            (root / "labels" / "val" / f"{name}.txt").write_text("\n".join(lines) + "\n")
    data = {"path": ".", "val": "images/val", "names": dict(enumerate(NAMES))}
    (root / "data.yaml").write_text(yaml.safe_dump(data))
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_val.json").write_text(json.dumps(coco))
    return root / "data.yaml", root / "annotations" / "instances_val.json"


#  Three images, 100x100: a cat and a dog; a lone cat; no objects at all. No emu anywhere.
SCENE = {
    "a": (100, 100, [(0, 10, 10, 30, 30), (1, 50, 50, 90, 80)]),
    "b": (100, 100, [(0, 20, 20, 40, 40)]),
    "c": (100, 100, []),
}


@pytest.fixture(params=["yolo", "coco"])
def scene(request, tmp_path: Path):
    """The SCENE dataset loaded from either format, and image name -> image id."""
    yaml_path, json_path = write_datasets(tmp_path, SCENE)
    if request.param == "yolo":
        dataset = load_dataset(yaml_path)
    else:
        dataset = load_dataset(json_path, tmp_path / "images" / "val")
    return dataset, {e.path.stem: e.id for e in dataset.images}


def truth(images=SCENE, score: float = 0.9) -> dict[str, list[tuple]]:
    """Detections equal to the ground truth, per image name."""
    return {name: [(x1, y1, x2, y2, score, c) for c, x1, y1, x2, y2 in boxes] for name, (_, _, boxes) in images.items()}


def by_id(ids: dict[str, int], rows: dict[str, list[tuple]]) -> dict[int, Detections]:
    return {ids[name]: dets(*r) for name, r in rows.items()}


# --- loading ----------------------------------------------------------------------------------------------


def test_yolo_and_coco_load_the_same_ground_truth(tmp_path: Path):
    yaml_path, json_path = write_datasets(tmp_path, SCENE)
    yolo, coco = load_dataset(yaml_path), load_dataset(json_path)  # COCO finds images/val from the file's name
    assert yolo.names == coco.names == NAMES
    assert yolo.category_ids == [0, 1, 2] and coco.category_ids == COCO_IDS
    sizes = [(e.path.name, e.width, e.height) for e in yolo.images]
    assert sizes == [(e.path.name, e.width, e.height) for e in coco.images] == [(f"{n}.png", 100, 100) for n in "abc"]
    for a, b in zip(yolo.annotations, coco.annotations):
        assert a["image_id"] == b["image_id"] and COCO_IDS[a["category_id"]] == b["category_id"]
        assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-9) and a["area"] == pytest.approx(b["area"])


def test_yolo_labels_become_pixel_boxes(tmp_path: Path):
    """cx cy w h normalised -> x y w h pixels; a polygon row -> its bounding box; a .txt list of images."""
    (tmp_path / "set" / "images").mkdir(parents=True)
    (tmp_path / "set" / "labels").mkdir(parents=True)
    Image.new("RGB", (200, 100)).save(tmp_path / "set" / "images" / "wide.jpg")
    (tmp_path / "set" / "labels" / "wide.txt").write_text("0 0.5 0.5 0.2 0.4\n1 0.1 0.1 0.3 0.1 0.3 0.5\n")
    (tmp_path / "set" / "val.txt").write_text("./images/wide.jpg\n")
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({"path": "set", "val": "val.txt", "names": ["a", "b"]}))
    dataset = load_dataset(tmp_path / "data.yaml")
    assert [(e.width, e.height) for e in dataset.images] == [(200, 100)]
    boxes = [(a["category_id"], a["bbox"]) for a in dataset.annotations]
    assert boxes[0] == (0, pytest.approx([80, 30, 40, 40]))
    assert boxes[1] == (1, pytest.approx([20, 10, 40, 40]))


def test_label_path_replaces_the_last_images_folder():
    assert label_path(Path("/d/images/x/images/val/a.b.jpg")) == Path("/d/images/x/labels/val/a.b.txt")


@pytest.mark.parametrize(
    "label, message",
    [("5 0.5 0.5 0.1 0.1", "outside 0..2"), ("0 0.5 0.5 0.1", "4 box values"), ("x 1 2 3 4", "not a YOLO")],
)
def test_bad_labels_are_refused_with_their_line(tmp_path: Path, label: str, message: str):
    yaml_path, _ = write_datasets(tmp_path, {"a": (10, 10, [])})
    (tmp_path / "labels" / "val" / "a.txt").write_text(label)
    with pytest.raises(DatasetError, match=message) as info:
        load_dataset(yaml_path)
    assert "a.txt:1" in str(info.value)


def test_unusable_dataset_arguments(tmp_path: Path):
    _, json_path = write_datasets(tmp_path, SCENE)
    with pytest.raises(DatasetError, match="missing"):
        load_dataset(json_path, tmp_path)  # the wrong image folder
    (tmp_path / "x.csv").write_text("")
    with pytest.raises(DatasetError, match="expected"):
        load_dataset(tmp_path / "x.csv")


# --- known answers ---------------------------------------------------------------------------------------


def test_detections_equal_to_ground_truth_give_one(scene):
    dataset, ids = scene
    results = evaluation.evaluate(dataset, by_id(ids, truth()))
    assert results.map50_95 == pytest.approx(1.0) and results.map50 == pytest.approx(1.0)
    assert (results.precision, results.recall, results.f1_conf) == pytest.approx((1.0, 1.0, 0.9))
    assert results.images == 3 and results.instances == 3


@pytest.mark.parametrize("shift, matched", [(2, 9), (4, 7), (8, 4)])
def test_a_shifted_box_counts_only_at_thresholds_below_its_iou(scene, shift: int, matched: int):
    """The only dog (40x30 in image a) detected ``shift`` px to the right: IoU = (40 - s) / (40 + s).
    s=2: 38/42 = 0.905 -> a match at IoU 0.50 ... 0.90 (9 of the 10 thresholds); s=4: 36/44 = 0.818 -> 0.50 ... 0.80
    (7); s=8: 32/48 = 0.667 -> 0.50 ... 0.65 (4). AP is 1 where it matches and 0 elsewhere: dog AP50-95 = matched / 10,
    AP50 = 1. The cats are exact: mAP50-95 = (1 + matched / 10) / 2."""
    dataset, ids = scene
    rows = truth()
    rows["a"] = [rows["a"][0], (50 + shift, 50, 90 + shift, 80, 0.9, 1)]
    results = evaluation.evaluate(dataset, by_id(ids, rows))
    cat, dog, emu = results.classes
    assert (cat.ap50_95, dog.ap50, dog.ap50_95) == pytest.approx((1.0, 1.0, matched / 10))
    assert results.map50_95 == pytest.approx((1 + matched / 10) / 2) and results.map50 == pytest.approx(1.0)
    assert results.coco_stats[2] == pytest.approx(1.0 if matched >= 6 else 0.5)  # AP75: the dog matches for s <= 4


def test_a_false_positive_ranked_first_halves_ap_and_one_ranked_last_costs_nothing(scene):
    """A cat predicted on the image without objects, at 0.95 (above both true cats at 0.9): ranked FP, TP, TP,
    cat precision is 1/2 at recall 1/2 and 2/3 at recall 1; COCO's envelope makes it 2/3 at every recall point,
    so cat AP = 2/3 at every IoU (the dog stays 1). Images without objects do count false positives."""
    dataset, ids = scene
    base = truth()
    rows = {**base, "c": [(60, 60, 80, 80, 0.95, 0)]}
    results = evaluation.evaluate(dataset, by_id(ids, rows))
    assert (results.classes[0].ap50, results.classes[0].ap50_95) == pytest.approx((2 / 3, 2 / 3))
    assert results.map50_95 == pytest.approx((2 / 3 + 1) / 2)
    # The same false positive below every true one: AP stays 1; the best-F1 threshold drops it (P = R = 1).
    rows = {**base, "c": [(60, 60, 80, 80, 0.3, 0)]}
    results = evaluation.evaluate(dataset, by_id(ids, rows))
    assert results.map50_95 == pytest.approx(1.0)
    assert (results.precision, results.recall, results.f1_conf) == pytest.approx((1.0, 1.0, 0.9))


def test_precision_and_recall_at_the_best_mean_f1_threshold(scene):
    """Cats: TP 0.9 (image a), FP 0.8 (image c), TP 0.3 (image b). Dog: TP 0.6.
    Thresholds (every detection score) and per class (P, R) -> F1, then the mean over cat and dog:
      0.9: cat (1, 1/2) 2/3, dog (0, 0) 0      -> 1/3
      0.8: cat (1/2, 1/2) 1/2, dog 0           -> 1/4
      0.6: cat (1/2, 1/2) 1/2, dog (1, 1) 1    -> 3/4
      0.3: cat (2/3, 1) 4/5, dog (1, 1) 1      -> 9/10  <- best
    so P = (2/3 + 1) / 2, R = 1 at f1_conf 0.3. Cat AP: precision 1 up to recall 1/2, then 2/3 (envelope of the
    2/3 at recall 1): 51 of COCO's 101 recall points at 1 (0.00 ... 0.50), 50 at 2/3 -> (51 + 100/3) / 101."""
    dataset, ids = scene
    rows = {"a": [(10, 10, 30, 30, 0.9, 0), (50, 50, 90, 80, 0.6, 1)], "b": [(20, 20, 40, 40, 0.3, 0)],
            "c": [(60, 60, 80, 80, 0.8, 0)]}  # fmt: skip
    results = evaluation.evaluate(dataset, by_id(ids, rows))
    cat, dog, emu = results.classes
    assert results.f1_conf == pytest.approx(0.3)
    assert (cat.precision, cat.recall, dog.precision, dog.recall) == pytest.approx((2 / 3, 1.0, 1.0, 1.0))
    assert (results.precision, results.recall) == pytest.approx((5 / 6, 1.0))
    assert cat.ap50 == pytest.approx((51 + 100 / 3) / 101)
    assert emu.precision is None and emu.recall is None


def test_classes_without_ground_truth_are_left_out_even_when_predicted(scene):
    """COCOeval gives a category without ground truth -1 (even with detections): no AP, out of every mean."""
    dataset, ids = scene
    rows = truth()
    rows["c"] = [(5, 5, 50, 50, 0.99, 2)]  # an emu, a class absent from the ground truth
    results = evaluation.evaluate(dataset, by_id(ids, rows))
    emu = results.classes[2]
    assert (emu.name, emu.instances, emu.ap50_95, emu.ap50) == ("emu", 0, None, None)
    assert (results.map50_95, results.precision) == pytest.approx((1.0, 1.0))
    assert "1 class(es) without ground truth" in evaluation.format_table(results)


def test_a_class_with_ground_truth_but_no_prediction_counts_as_zero(scene):
    dataset, ids = scene
    rows = truth()
    rows["a"] = rows["a"][:1]  # the dog is never predicted
    results = evaluation.evaluate(dataset, by_id(ids, rows))
    cat, dog, _ = results.classes
    assert (dog.ap50_95, dog.precision, dog.recall) == (0.0, 0.0, 0.0)
    assert (cat.ap50_95, cat.precision, cat.recall) == pytest.approx((1.0, 1.0, 1.0))
    assert results.map50_95 == pytest.approx(0.5)
    assert results.map50_95 == pytest.approx(np.mean([c.ap50_95 for c in results.classes if c.ap50_95 is not None]))


def test_no_detections_at_all(scene):
    dataset, _ = scene
    results = evaluation.evaluate(dataset, {})
    assert (results.map50_95, results.map50, results.precision, results.recall) == (0.0, 0.0, 0.0, 0.0)
    assert results.f1_conf is None


def test_no_ground_truth_at_all(tmp_path: Path):
    yaml_path, _ = write_datasets(tmp_path, {"a": (50, 50, []), "b": (50, 50, [])})
    dataset = load_dataset(yaml_path)
    results = evaluation.evaluate(dataset, {1: dets((1, 1, 20, 20, 0.9, 0))})
    assert (results.map50_95, results.map50, results.precision, results.recall) == (None, None, None, None)
    assert "-" in evaluation.format_table(results).splitlines()[1]


def test_crowd_regions_neither_count_nor_punish(tmp_path: Path):
    """A detection on an ``iscrowd`` region is ignored by COCOeval: neither a hit nor a false positive."""
    _, json_path = write_datasets(tmp_path, {"a": (100, 100, [(0, 10, 10, 30, 30)])})
    coco = json.loads(json_path.read_text())
    coco["annotations"].append({"id": 9, "image_id": 1, "category_id": 3, "bbox": [50, 50, 40, 40], "iscrowd": 1})
    json_path.write_text(json.dumps(coco))
    dataset = load_dataset(json_path)
    results = evaluation.evaluate(dataset, {1: dets((55, 55, 85, 85, 0.99, 0), (10, 10, 30, 30, 0.5, 0))})
    assert results.map50_95 == pytest.approx(1.0) and results.classes[0].instances == 1
    assert (results.precision, results.recall) == pytest.approx((1.0, 1.0))


def test_class_indices_map_to_sorted_coco_category_ids(tmp_path: Path):
    _, json_path = write_datasets(tmp_path, SCENE)
    dataset = load_dataset(json_path)
    records = evaluation.coco_results(dataset, {1: dets((1, 2, 11, 22, 0.5, 1))})
    assert records == [{"image_id": 1, "category_id": 7, "bbox": [1.0, 2.0, 10.0, 20.0], "score": 0.5}]
    with pytest.raises(ValueError, match="outside"):
        evaluation.coco_results(dataset, {1: dets((1, 2, 11, 22, 0.5, 3))})


def test_collect_checks_responses_against_the_dataset(scene, capsys):
    dataset, ids = scene
    found = {"box": [1, 2, 3, 4], "score": 0.5, "class_id": 1, "class_name": "class_1"}
    responses = [{"image_size": [100, 100], "detections": [found]}, {"image_size": [80, 100], "detections": []},
                 {"image_size": [100, 100], "detections": []}]  # fmt: skip
    detections = evaluation.collect(dataset, iter(responses))
    assert [len(detections[ids[n]]) for n in "abc"] == [1, 0, 0]
    warnings = capsys.readouterr().err
    assert "class 1: model 'class_1', dataset 'dog'" in warnings and "1 image(s) decode to another size" in warnings
    with pytest.raises(evaluation.EvaluationError, match="predicts class 5"):
        evaluation.collect(dataset, iter([{"image_size": [100, 100], "detections": [{**found, "class_id": 5}]}]))


def test_results_json_reports_null_for_classes_without_ground_truth(scene):
    dataset, ids = scene
    report = evaluation.evaluate(dataset, by_id(ids, truth())).to_json()
    json.dumps(report)  # plain types only
    assert report["metrics"]["mAP50-95"] == pytest.approx(1.0)
    assert [c["AP50-95"] for c in report["classes"]] == [pytest.approx(1.0), pytest.approx(1.0), None]
    assert len(report["coco_stats"]) == 12


# --- the shapes model, in process ------------------------------------------------------------------------


def test_shapes_reproduces_super_gradients_map_in_process(shapes_dir: Path, tmp_path: Path, capsys):
    """super-gradients' own mAP for the trained shapes checkpoint (expected.json), through the in-process Detector
    built from the checkpoint's processing_params (320x320, bottom-right padding, its class names)."""
    expected = json.loads((shapes_dir / "expected.json").read_text())
    out = tmp_path / "shapes.json"
    argv = ["--model", "shapes", "--data", str(shapes_dir / "val" / "data.yaml"),
            "--weights", str(shapes_dir / "checkpoint.pth"), "--out", str(out)]  # fmt: skip
    assert run_command("val", argv) == 0
    report = json.loads(out.read_text())
    assert report["images"] == expected["images"] and report["instances"] == expected["gt_boxes"]
    assert report["metrics"]["mAP50-95"] == pytest.approx(expected["mAP50-95"], abs=MAP_TOLERANCE)
    assert report["metrics"]["mAP50"] == pytest.approx(expected["mAP50"], abs=MAP_TOLERANCE)
    assert [c["name"] for c in report["classes"]] == ["circle", "square", "triangle", "ring_rect"]
    assert report["options"] == {"conf": 0.001, "iou": 0.7, "max_det": 300}
    printed = capsys.readouterr()
    assert "ring_rect" in printed.out and "mAP50-95" in printed.out
    assert "WARNING" not in printed.err  # the checkpoint's class names are the dataset's
