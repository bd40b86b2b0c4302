"""Served answers in the form ``reference_match.unmatched`` compares with."""

from __future__ import annotations


def as_record(body: dict) -> dict:
    """A plain JSON answer (``image_size``, ``detections``) as a reference record."""
    found = body["detections"]
    width, height = body["image_size"]
    return {"width": width, "height": height, "boxes_xyxy": [d["box"] for d in found],
            "scores": [d["score"] for d in found], "class_ids": [d["class_id"] for d in found]}  # fmt: skip
