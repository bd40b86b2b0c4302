"""Network output -> detections: threshold, top-k, class-aware NMS, keep max_det, map back, clip.

Follows super-gradients' PPYoloE post-prediction callback (multi-label by default) so results match its predict().
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torchvision

from .steps import BoxTransform


@dataclass(frozen=True)
class NMSOptions:
    """What ``select`` needs; made from the request's options (``RequestOptions.nms``), whose table holds the
    defaults and ranges."""

    conf: float
    iou: float
    pre_nms_top_k: int
    max_det: int
    multi_label: bool
    agnostic: bool
    classes: tuple[int, ...] | None  # keep only these class ids (applied before top-k)


@dataclass
class Detections:
    """Detections of one image, sorted by score (highest first). Boxes xyxy float32."""

    boxes: np.ndarray  # [N, 4]
    scores: np.ndarray  # [N]
    class_ids: np.ndarray  # [N] int64
    track_ids: np.ndarray | None = None  # [N] int64, -1 where untracked; None: not tracked at all

    def __len__(self) -> int:
        return len(self.scores)

    def first(self, count: int) -> Detections:
        """The ``count`` highest-scoring detections."""
        tracks = None if self.track_ids is None else self.track_ids[:count]
        return Detections(self.boxes[:count], self.scores[:count], self.class_ids[:count], tracks)

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))


def select(boxes: torch.Tensor, scores: torch.Tensor, options: NMSOptions) -> tuple[torch.Tensor, ...]:
    """NMS for one image: boxes [A, 4], scores [A, C] -> (boxes [N, 4], scores [N], class ids [N])."""
    boxes, scores = boxes.float(), scores.float()
    if options.classes is not None:
        keep_classes = torch.zeros(scores.shape[1], dtype=torch.bool, device=scores.device)
        keep_classes[list(options.classes)] = True
        scores = scores.masked_fill(~keep_classes, 0.0)
    # Thresholding runs in numpy: torch parallelises these whole-matrix ops over the worker's threads, and with the
    # cores shared (TorchServe's frontend, other workers) each parallel op then waits milliseconds for its threads.
    matrix = scores.numpy()
    if options.multi_label:
        # Most anchors are below conf in every class: find the others first, then their classes; the same (anchor,
        # class) pairs in the same order as thresholding the whole matrix, for a fraction of the cost. any() of the
        # comparison rather than max(): numpy reduces rows of 80 slowly, and just after a forward pass the scores are
        # out of cache (S at 640x384: 0.16 against 1.0 ms).
        rows = np.flatnonzero((matrix > options.conf).any(axis=1))
        local, labels = np.nonzero(matrix[rows] > options.conf)
        anchors = rows[local]
    else:
        best = matrix.argmax(axis=1)
        anchors = np.flatnonzero(matrix[np.arange(len(best)), best] >= options.conf)
        labels = best[anchors]
    anchor, label = torch.from_numpy(anchors), torch.from_numpy(labels)
    conf = scores[anchor, label]
    if conf.numel() > options.pre_nms_top_k:
        top = torch.topk(conf, options.pre_nms_top_k).indices
        anchor, label, conf = anchor[top], label[top], conf[top]
    candidates = boxes[anchor]
    if options.agnostic:
        keep = torchvision.ops.nms(candidates, conf, options.iou)
    else:
        keep = torchvision.ops.batched_nms(candidates, conf, label, options.iou)
    keep = keep[: options.max_det]
    return candidates[keep], conf[keep], label[keep]


def to_original(
    boxes: torch.Tensor, scores: torch.Tensor, class_ids: torch.Tensor, transform: BoxTransform, clip: bool = True
) -> Detections:
    """Map network-input boxes back onto the original image and clip them to it (after NMS, as super-gradients)."""
    mapped = transform.to_original(boxes.cpu().numpy())
    if clip:
        width, height = transform.original_size
        np.clip(mapped[:, 0::2], 0, width, out=mapped[:, 0::2])
        np.clip(mapped[:, 1::2], 0, height, out=mapped[:, 1::2])
    return Detections(mapped, scores.cpu().numpy().astype(np.float32), class_ids.cpu().numpy().astype(np.int64))


def postprocess(
    boxes: torch.Tensor, scores: torch.Tensor, transforms: list[BoxTransform], options: list[NMSOptions]
) -> list[Detections]:
    """Batch version: boxes [B, A, 4], scores [B, A, C], one transform and one option set per image."""
    return [to_original(*select(boxes[i], scores[i], options[i]), transforms[i]) for i in range(len(transforms))]
