"""Sliced inference ("SAHI"): the tile grid, and the merge of the tiles' detections with a full-image pass.

Reproduces ``sahi.predict.get_sliced_prediction`` of sahi 0.12.8 with its defaults (GREEDYNMM over IOS at 0.5,
per class, sahi's numpy postprocess backend) so that a client who compares with sahi sees the same boxes, without
the worker needing sahi. The caller runs the detector on every tile (and on the whole image when
:func:`full_pass_needed`), then :func:`gather` and :func:`merge`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .postprocess import Detections

MERGE_METHODS = ("greedynmm", "nmm", "nms")
MATCH_METRICS = ("ios", "iou")
# Below this detector threshold sahi merges with NMS over IoU instead: merging many weak boxes inflates them.
LOW_CONFIDENCE = 0.1

Tile = tuple[int, int, int, int]


def _spans(length: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """Windows of ``size`` every ``size - overlap`` pixels; the one that would cross the end is pulled back inside."""
    spans = []
    start = 0
    while start + size < length:
        spans.append((start, start + size))
        start += size - overlap
    spans.append((max(0, length - size), length))
    return spans


def tile_grid(image_width: int, image_height: int, tile_width: int, tile_height: int, overlap: float) -> list[Tile]:
    """Tiles (x0, y0, x1, y1) row by row, as sahi's ``get_slice_bboxes``.

    The overlap in pixels is ``int(overlap * tile side)`` per axis; the last tile of a row or column is shifted
    back to end at the image's edge, and a side shorter than the tile gives one tile as long as the image.
    """
    if min(image_width, image_height, tile_width, tile_height) <= 0:
        raise ValueError(
            f"image {image_width}x{image_height} and tile {tile_width}x{tile_height} must have positive sides"
        )
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1); got {overlap}")
    columns = _spans(image_width, tile_width, int(overlap * tile_width))
    rows = _spans(image_height, tile_height, int(overlap * tile_height))
    return [(x0, y0, x1, y1) for y0, y1 in rows for x0, x1 in columns]


def full_pass_needed(tiles: Sequence[Tile]) -> bool:
    """sahi adds a pass over the whole image (for objects larger than a tile) only when there are several tiles."""
    return len(tiles) > 1


def shift(detections: Detections, x: int, y: int) -> Detections:
    """Move a tile's detections onto the full image, the tile's top-left corner being (x, y).

    The boxes come out in float64: sahi adds the offset in double precision and checks overlaps on those values.
    """
    offset = np.array([x, y, x, y], dtype=np.float64)
    return Detections(detections.boxes.astype(np.float64) + offset, detections.scores, detections.class_ids)


def gather(tiles: Sequence[Tile], per_tile: Sequence[Detections], full: Detections | None = None) -> Detections:
    """Every tile's detections on the full image in tile order, then the full-image pass's: sahi's merge order.

    The result is not sorted by score (:func:`merge` depends on this order, and sorts) and its boxes are float64.
    sahi clips nothing more here: each tile's boxes are already inside the tile, the full pass's inside the image.
    """
    if len(tiles) != len(per_tile):
        raise ValueError(f"{len(tiles)} tiles but {len(per_tile)} detection sets")
    parts = [shift(found, tile[0], tile[1]) for tile, found in zip(tiles, per_tile)]
    if full is not None:
        parts.append(full)
    return Detections(
        np.concatenate([p.boxes for p in parts]).astype(np.float64),
        np.concatenate([p.scores for p in parts]).astype(np.float32),
        np.concatenate([p.class_ids for p in parts]).astype(np.int64),
    )


def postprocess_for(confidence: float, method: str, metric: str) -> tuple[str, str]:
    """The (method, metric) sahi actually uses for a detector threshold of ``confidence``."""
    if confidence < LOW_CONFIDENCE and method != "nms":
        return "nms", "iou"
    return method, metric


def _overlaps(boxes: np.ndarray, areas: np.ndarray, i: int, others: np.ndarray, metric: str) -> np.ndarray:
    """IoU or IoS of box ``i`` with ``others`` in float32, operation by operation as sahi's matrix (0 where the
    denominator is not positive), so that comparisons with the threshold come out the same."""
    width = np.maximum(0, np.minimum(boxes[i, 2], boxes[others, 2]) - np.maximum(boxes[i, 0], boxes[others, 0]))
    height = np.maximum(0, np.minimum(boxes[i, 3], boxes[others, 3]) - np.maximum(boxes[i, 1], boxes[others, 1]))
    inter = width * height
    if metric == "iou":
        denominator = areas[i] + areas[others] - inter
    else:
        denominator = np.minimum(areas[i], areas[others])
    return np.divide(inter, denominator, out=np.zeros_like(inter), where=denominator > 0)


def _score_order(boxes: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Highest score first; ties by x1, y1, x2, y2 ascending, then input order."""
    return np.lexsort((boxes[:, 3], boxes[:, 2], boxes[:, 1], boxes[:, 0], -scores))


def _nms(boxes: np.ndarray, areas: np.ndarray, order: np.ndarray, metric: str, threshold: float) -> list[int]:
    """Each remaining box, best first, is kept and removes the later boxes that overlap it enough."""
    kept = []
    pending = order
    while len(pending):
        best, rest = pending[0], pending[1:]
        kept.append(int(best))
        pending = rest[_overlaps(boxes, areas, best, rest, metric) < threshold]
    return kept


def _greedy_groups(
    boxes: np.ndarray, areas: np.ndarray, order: np.ndarray, metric: str, threshold: float
) -> list[tuple[int, np.ndarray]]:
    """Each remaining box, best first, claims every later remaining box that overlaps it enough."""
    groups = []
    pending = order
    while len(pending):
        best, rest = pending[0], pending[1:]
        claimed = _overlaps(boxes, areas, best, rest, metric) >= threshold
        groups.append((int(best), rest[claimed]))
        pending = rest[~claimed]
    return groups


def _claim_rank(boxes: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Dense rank of (score, x1, y1, x2, y2): in NMM a box may claim any other whose rank is not above its own."""
    keys = np.column_stack([scores, boxes]).astype(np.float64)
    return np.unique(keys, axis=0, return_inverse=True)[1].ravel()


def _transitive_groups(
    boxes: np.ndarray, areas: np.ndarray, scores: np.ndarray, order: np.ndarray, metric: str, threshold: float
) -> list[tuple[int, np.ndarray]]:
    """Boxes in score order claim the free boxes they overlap and dominate, for their own group's keeper: a chain
    of overlaps joins one group. A box nobody claimed before its turn starts a group."""
    rank = _claim_rank(boxes, scores)
    keeper_of = np.full(len(boxes), -1, dtype=np.intp)
    members: dict[int, list[np.ndarray]] = {}
    for i in order:
        if keeper_of[i] < 0:
            keeper_of[i] = i
            members[int(i)] = []
        free = np.flatnonzero((keeper_of < 0) & (rank <= rank[i]))
        claimed = free[_overlaps(boxes, areas, i, free, metric) >= threshold]
        keeper_of[claimed] = keeper_of[i]
        members[int(keeper_of[i])].append(claimed)
    return [(keeper, np.concatenate(parts)) for keeper, parts in members.items()]


def _matches(a: list[float], b: list[float], metric: str, threshold: float) -> bool:
    """sahi's second check, in float64 against the merged box so far; a zero denominator never matches."""
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    denominator = area_a + area_b - inter if metric == "iou" else min(area_a, area_b)
    return denominator != 0 and inter / denominator >= threshold


def _fuse(
    groups: list[tuple[int, np.ndarray]], detections: Detections, metric: str, threshold: float
) -> tuple[list[list[float]], list[float], list[int]]:
    """Merge each group into its keeper, member by member: the union box, the higher score, and the class of the
    higher score (the member's on a tie). A member that no longer overlaps the grown box enough is dropped."""
    boxes = detections.boxes.astype(np.float64).tolist()
    scores = detections.scores.astype(np.float64).tolist()
    class_ids = detections.class_ids.tolist()
    out_boxes, out_scores, out_classes = [], [], []
    for keeper, group in groups:
        box, score, class_id = boxes[keeper], scores[keeper], class_ids[keeper]
        for m in group.tolist():
            if not _matches(box, boxes[m], metric, threshold):
                continue
            other = boxes[m]
            box = [min(box[0], other[0]), min(box[1], other[1]), max(box[2], other[2]), max(box[3], other[3])]
            if not score > scores[m]:
                class_id = class_ids[m]
            score = max(score, scores[m])
        out_boxes.append(box)
        out_scores.append(score)
        out_classes.append(class_id)
    return out_boxes, out_scores, out_classes


def merge(
    detections: Detections,
    method: str = "greedynmm",
    metric: str = "ios",
    threshold: float = 0.5,
    agnostic: bool = False,
) -> Detections:
    """Merge overlapping detections from tiles and the full-image pass as sahi's postprocess (numpy backend).

    ``detections`` are on the full image in sahi's order (:func:`gather`); ties are broken by that order. Overlaps
    are found on float32 boxes and confirmed on the given ones (float64 from :func:`gather`), as sahi does.
    ``nms`` keeps the best box of each overlapping set; ``greedynmm`` merges into each kept box the boxes that
    overlap it; ``nmm`` also merges boxes joined through a chain of overlaps. Per class unless ``agnostic``.
    """
    if method not in MERGE_METHODS:
        raise ValueError(f"merge method must be one of {list(MERGE_METHODS)}; got {method!r}")
    if metric not in MATCH_METRICS:
        raise ValueError(f"match metric must be one of {list(MATCH_METRICS)}; got {metric!r}")
    if not 0.0 < threshold <= 1.0:
        # sahi special-cases 0 (everything matches) and then departs from its own NMM: not worth copying.
        raise ValueError(f"match threshold must be in (0, 1]; got {threshold}")
    boxes = detections.boxes.astype(np.float32).reshape(-1, 4)
    scores = detections.scores.astype(np.float32)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    if agnostic:
        subsets = [np.arange(len(scores))]
    else:
        subsets = [np.flatnonzero(detections.class_ids == c) for c in np.unique(detections.class_ids)]

    kept: list[int] = []
    groups: list[tuple[int, np.ndarray]] = []
    for subset in subsets:
        local_boxes, local_scores, local_areas = boxes[subset], scores[subset], areas[subset]
        order = _score_order(local_boxes, local_scores)
        if method == "nms":
            kept += subset[_nms(local_boxes, local_areas, order, metric, threshold)].tolist()
            continue
        if method == "greedynmm":
            local = _greedy_groups(local_boxes, local_areas, order, metric, threshold)
        else:
            local = _transitive_groups(local_boxes, local_areas, local_scores, order, metric, threshold)
        groups += [(int(subset[keeper]), subset[members]) for keeper, members in local]

    if method == "nms":
        index = np.array(kept, dtype=np.intp)
        merged = Detections(boxes[index], scores[index], detections.class_ids[index].astype(np.int64))
    else:
        merged_boxes, merged_scores, merged_classes = _fuse(groups, detections, metric, threshold)
        merged = Detections(
            np.array(merged_boxes, dtype=np.float32).reshape(-1, 4),
            np.array(merged_scores, dtype=np.float32),
            np.array(merged_classes, dtype=np.int64),
        )
    rank = np.argsort(-merged.scores, kind="stable")
    return Detections(merged.boxes[rank], merged.scores[rank], merged.class_ids[rank])
