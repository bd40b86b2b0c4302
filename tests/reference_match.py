"""Comparing detections with super-gradients' predict.json, order-independently, within what the README claims for
the torch backend in fp32: 0.05 px and 2e-4 in score (../shared/reference/README.md allows 0.5 px and 1e-3; measured:
0.007 px and 3.4e-5 on its two images, fused or not). fp32 ONNX Runtime and OpenVINO stay as close to torch."""

from __future__ import annotations

import numpy as np

BOX_TOL = 0.05  # px, after clipping both sides to the image
SCORE_TOL = 2e-4
THRESHOLD = 0.25


def clip(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    boxes = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    return boxes


def unmatched(ours: list[dict], record: dict) -> tuple[list, list]:
    """Order-independent matching by class, box and score; returns what is left on each side, excluding
    detections whose score lies within SCORE_TOL of the threshold (those may be on one side only)."""
    width, height = record["width"], record["height"]
    ref_boxes = clip(record["boxes_xyxy"], width, height)
    reference = list(zip(ref_boxes, record["scores"], record["class_ids"]))
    left = [(np.array(d["box"], dtype=np.float64), d["score"], d["class_id"]) for d in ours]
    missing = []
    for box, score, cls in reference:
        match = next(
            (
                i
                for i, (b, s, c) in enumerate(left)
                if c == cls and np.abs(b - box).max() <= BOX_TOL and abs(s - score) <= SCORE_TOL
            ),
            None,
        )
        if match is None:
            missing.append((box.tolist(), score, cls))
        else:
            left.pop(match)
    near = lambda s: abs(s - THRESHOLD) <= SCORE_TOL  # noqa: E731
    return [m for m in missing if not near(m[1])], [(b.tolist(), s, c) for b, s, c in left if not near(s)]
