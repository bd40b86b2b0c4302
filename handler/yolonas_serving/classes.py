"""Class names: COCO's 80 for 80-class models, an archive's ``index_to_name.json`` otherwise, else ``class_<id>``."""

from __future__ import annotations

import json
from pathlib import Path

COCO_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)  # fmt: skip

INDEX_TO_NAME = "index_to_name.json"


def default_names(num_classes: int) -> list[str]:
    if num_classes == len(COCO_NAMES):
        return list(COCO_NAMES)
    return [f"class_{i}" for i in range(num_classes)]


def names_from_mapping(mapping: dict[str, str], num_classes: int) -> list[str]:
    """TorchServe's ``{"0": "person", ...}``; ids missing from the mapping keep their default names."""
    names = default_names(num_classes)
    for key, name in mapping.items():
        index = int(key)
        if not 0 <= index < num_classes:
            raise ValueError(f"{INDEX_TO_NAME}: class id {index} is outside 0..{num_classes - 1}")
        names[index] = str(name)
    return names


def load_names(model_dir: str | Path, num_classes: int) -> list[str]:
    path = Path(model_dir) / INDEX_TO_NAME
    if not path.is_file():
        return default_names(num_classes)
    return names_from_mapping(json.loads(path.read_text()), num_classes)


def names_to_mapping(names: list[str]) -> dict[str, str]:
    return {str(i): name for i, name in enumerate(names)}


def read_names_file(path: str | Path) -> list[str]:
    """A names file: a JSON list, a JSON ``{"0": name}`` mapping, or one name per line."""
    text = Path(path).read_text()
    try:
        data = json.loads(text)
    except ValueError:
        return [line.strip() for line in text.splitlines() if line.strip()]
    if isinstance(data, list):
        return [str(n) for n in data]
    if isinstance(data, dict):
        return [str(data[k]) for k in sorted(data, key=int)]
    raise ValueError(f"{path}: expected a list of names or an index-to-name mapping")
