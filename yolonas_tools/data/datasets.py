"""Validation datasets as COCO ground truth: an Ultralytics-style YAML with YOLO txt labels, or a COCO JSON.

Whatever the source, a :class:`Dataset` holds COCO images, annotations and categories, and the mapping from the
model's class index ``i`` to the COCO category id ``category_ids[i]`` (sorted category ids for COCO JSON, as
super-gradients and Ultralytics map COCO's 80 classes; the class index itself for YOLO labels).
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from PIL import ExifTags, Image
from pycocotools.coco import COCO

from yolonas_tools.data.images import is_image


class DatasetError(ValueError):
    """A dataset description we cannot read; the message names the file and what was wrong."""


@dataclass(frozen=True)
class ImageEntry:
    id: int
    path: Path
    width: int
    height: int


@dataclass
class Dataset:
    source: str
    images: list[ImageEntry]
    names: list[str]
    category_ids: list[int]
    annotations: list[dict[str, Any]]  # COCO: id, image_id, category_id, bbox [x, y, w, h] pixels, area, iscrowd

    def coco(self) -> COCO:
        """The ground truth as a pycocotools COCO object."""
        gt = COCO()
        gt.dataset = {
            "images": [
                {"id": e.id, "file_name": e.path.name, "width": e.width, "height": e.height} for e in self.images
            ],
            "annotations": self.annotations,
            "categories": [{"id": c, "name": n} for c, n in zip(self.category_ids, self.names)],
        }
        with quiet():
            gt.createIndex()
        return gt


@contextlib.contextmanager
def quiet() -> Iterator[io.StringIO]:
    """pycocotools prints progress to stdout: capture it (the buffer is yielded for what is worth keeping)."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        yield buffer


def load_dataset(path: Path, images_dir: Path | None = None) -> Dataset:
    """``*.yaml`` / ``*.yml``: Ultralytics data file; ``*.json``: COCO annotations (images in ``images_dir``)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such dataset file")
    if path.suffix.lower() in (".yaml", ".yml"):
        return load_yolo(path)
    if path.suffix.lower() == ".json":
        return load_coco(path, images_dir)
    raise DatasetError(f"{path}: expected an Ultralytics .yaml data file or a COCO .json annotation file")


# --- Ultralytics YAML + YOLO txt labels ---------------------------------------------------------------------


def _yolo_names(data: dict[str, Any], path: Path) -> list[str]:
    names = data.get("names")
    if isinstance(names, dict):
        ids = sorted(int(k) for k in names)
        if ids != list(range(len(ids))):
            raise DatasetError(f"{path}: names must number the classes 0..n-1; got ids {ids}")
        return [str(names[i] if i in names else names[str(i)]) for i in ids]
    if isinstance(names, list) and names:
        return [str(n) for n in names]
    raise DatasetError(f"{path}: needs `names` (a list, or a mapping from class id to name)")


def _dataset_root(data: dict[str, Any], yaml_path: Path) -> Path:
    """``path`` as written (absolute), else relative to the YAML's folder, else to the working directory."""
    root = Path(str(data.get("path") or "."))
    if root.is_absolute():
        return root
    for base in (yaml_path.parent, Path.cwd()):
        if (base / root).is_dir():
            return (base / root).resolve()
    raise DatasetError(f"{yaml_path}: path {root} is neither beside the YAML nor under the working directory")


def _list_images(entry: Path, yaml_path: Path) -> list[Path]:
    if entry.is_dir():
        return sorted(p for p in entry.rglob("*") if is_image(p))
    if entry.is_file() and entry.suffix == ".txt":  # one image path per line, relative to the list's folder
        lines = [line.strip() for line in entry.read_text().splitlines() if line.strip()]
        return [p if p.is_absolute() else (entry.parent / p).resolve() for p in map(Path, lines)]
    raise DatasetError(f"{yaml_path}: val entry {entry} is neither an image folder nor a .txt list of images")


def label_path(image: Path) -> Path:
    """Ultralytics' rule: the last ``images`` folder in the path becomes ``labels``, the suffix ``.txt``."""
    parts = list(image.parts)
    if "images" not in parts:
        raise DatasetError(f"{image}: YOLO labels are found by replacing an `images` folder with `labels`")
    index = len(parts) - 1 - parts[::-1].index("images")
    parts[index] = "labels"
    return Path(*parts).with_suffix(".txt")


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) after EXIF orientation, as the server decodes the image; reads only the header."""
    with Image.open(path) as image:
        width, height = image.size
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _yolo_boxes(label_file: Path, num_classes: int) -> list[tuple[int, float, float, float, float]]:
    """Rows ``class cx cy w h`` (normalised) or ``class x1 y1 x2 y2 ...`` (a polygon: its bounding box)."""
    if not label_file.is_file():
        return []  # an image without a label file has no objects
    boxes = []
    for number, line in enumerate(label_file.read_text().splitlines(), 1):
        values = line.split()
        if not values:
            continue
        where = f"{label_file}:{number}"
        try:
            class_id, coords = int(values[0]), [float(v) for v in values[1:]]
        except ValueError:
            raise DatasetError(f"{where}: not a YOLO label row: {line!r}") from None
        if not 0 <= class_id < num_classes:
            raise DatasetError(f"{where}: class {class_id} is outside 0..{num_classes - 1}")
        if len(coords) == 4:
            cx, cy, w, h = coords
        elif len(coords) >= 6 and len(coords) % 2 == 0:
            xs, ys = coords[0::2], coords[1::2]
            cx, cy, w, h = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, max(xs) - min(xs), max(ys) - min(ys)
        else:
            raise DatasetError(f"{where}: expected 4 box values or a polygon; got {len(coords)} values")
        boxes.append((class_id, cx, cy, w, h))
    return boxes


def load_yolo(yaml_path: Path) -> Dataset:
    data = yaml.safe_load(Path(yaml_path).read_text()) or {}
    if "val" not in data:
        raise DatasetError(f"{yaml_path}: needs a `val` entry (image folder, .txt list, or a list of those)")
    names = _yolo_names(data, yaml_path)
    root = _dataset_root(data, yaml_path)
    entries = data["val"] if isinstance(data["val"], list) else [data["val"]]
    paths = [p for entry in entries for p in _list_images(root / str(entry), yaml_path)]
    if not paths:
        raise DatasetError(f"{yaml_path}: no images found under {', '.join(map(str, entries))} in {root}")
    images, annotations = [], []
    for image_id, path in enumerate(paths, 1):
        width, height = image_size(path)
        images.append(ImageEntry(image_id, path, width, height))
        for class_id, cx, cy, w, h in _yolo_boxes(label_path(path), len(names)):
            box = [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": class_id,
                                "bbox": box, "area": box[2] * box[3], "iscrowd": 0})  # fmt: skip
    return Dataset(str(yaml_path), images, names, list(range(len(names))), annotations)


# --- COCO JSON ------------------------------------------------------------------------------------------


def default_images_dir(json_path: Path) -> Path | None:
    """COCO's layout: ``annotations/instances_val2017.json`` beside ``val2017/`` or ``images/val2017/``."""
    split, root = json_path.stem.split("_")[-1], json_path.parent.parent
    for candidate in (root / split, root / "images" / split, json_path.parent / split):
        if candidate.is_dir():
            return candidate
    return None


def load_coco(json_path: Path, images_dir: Path | None = None) -> Dataset:
    data = json.loads(Path(json_path).read_text())
    if not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
        raise DatasetError(f"{json_path}: a COCO file needs `images`, `annotations` and `categories` lists")
    images_dir = images_dir or default_images_dir(Path(json_path))
    if images_dir is None:
        raise DatasetError(f"{json_path}: give the image folder (--images); none found beside the annotations")
    categories = sorted(data["categories"], key=lambda c: c["id"])
    images = [ImageEntry(int(i["id"]), Path(images_dir) / i["file_name"], int(i["width"]), int(i["height"]))
              for i in sorted(data["images"], key=lambda i: i["id"])]  # fmt: skip
    missing = [e.path for e in images if not e.path.is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} of {len(images)} images are missing from {images_dir}, e.g. {missing[0]}")
    annotations = []
    for number, ann in enumerate(data["annotations"], 1):
        ann = dict(ann)
        # Custom COCO files often omit these; COCOeval needs them (area only for its small/medium/large split).
        ann.setdefault("id", number)
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", ann["bbox"][2] * ann["bbox"][3])
        annotations.append(ann)
    names = [str(c["name"]) for c in categories]
    return Dataset(str(json_path), images, names, [c["id"] for c in categories], annotations)
