"""What super-gradients 3.7.1's predict() does with a Trainer checkpoint's processing_params, written out
independently of the product code so tests can hold the served answers against it for steps the reference data does
not cover. A rewrite, not super-gradients: test_finetuned.py holds it to super-gradients' own predict.json, and the
README's parity claims rest on ../shared/reference (yolo_nas_s, and the shapes model's mAP), not on it.

super-gradients' ``models.get(..., checkpoint_path=...)`` reads ``processing_params`` and its ``predict()``:
1. runs ComposeProcessing's steps in order on the RGB uint8 HWC image: ReverseImageChannels flips to BGR;
   DetectionLongestMaxSizeRescale scales by s = min(H_out/h, W_out/w) to (round(h*s), round(w*s)) with
   cv2.INTER_LINEAR, skipping s == 1; DetectionRescale resizes to exactly output_shape; DetectionCenterPadding pads
   (H_out-h)//2 on top and (W_out-w)//2 left; DetectionBottomRightPadding pads bottom/right only;
   DetectionAutoPadding pads bottom/right up to the next multiple of shape_multiple;
   StandardizeImage divides by max_value; NormalizeImage subtracts mean and divides by std; ImagePermute transposes;
2. runs the network (eval mode) and the PPYoloE post-prediction callback: scores > conf, multi-label, top 1024
   by score, class-aware batched NMS at iou, first 300;
3. undoes the steps in reverse order: padding subtracts (left, top); a rescale multiplies x by 1/sx and y by 1/sy.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torchvision


def _step(entry):
    if isinstance(entry, str):
        return entry, {}
    ((name, args),) = entry.items()
    return name, args or {}


def preprocess(image: np.ndarray, processings: list) -> tuple[np.ndarray, list]:
    undo = []
    for entry in processings:
        name, args = _step(entry)
        h, w = image.shape[:2]
        if name == "ReverseImageChannels":
            image = image[..., ::-1]
        elif name == "DetectionLongestMaxSizeRescale":
            out_h, out_w = args["output_shape"]
            s = min(out_h / h, out_w / w)
            if s != 1.0:
                image = cv2.resize(image, (round(w * s), round(h * s)), interpolation=cv2.INTER_LINEAR)
            undo.append(("scale", s, s))
        elif name == "DetectionRescale":
            out_h, out_w = args["output_shape"]
            undo.append(("scale", out_w / w, out_h / h))
            image = cv2.resize(image, (out_w, out_h), interpolation=cv2.INTER_LINEAR)
        elif name in ("DetectionCenterPadding", "DetectionBottomRightPadding"):
            out_h, out_w = args["output_shape"]
            top = (out_h - h) // 2 if name == "DetectionCenterPadding" else 0
            left = (out_w - w) // 2 if name == "DetectionCenterPadding" else 0
            value = args.get("pad_value", 114)
            fill = [value] * 3 if np.isscalar(value) else list(value)
            padded = np.empty((out_h, out_w, 3), dtype=image.dtype)
            padded[:] = np.array(fill, dtype=image.dtype)
            padded[top : top + h, left : left + w] = image
            image = padded
            undo.append(("pad", left, top))
        elif name == "DetectionAutoPadding":
            mult_h, mult_w = args.get("shape_multiple", (32, 32))
            out_h, out_w = -(-h // mult_h) * mult_h, -(-w // mult_w) * mult_w
            padded = np.full((out_h, out_w, 3), args.get("pad_value", 114), dtype=image.dtype)
            padded[:h, :w] = image
            image = padded
            undo.append(("pad", 0, 0))
        elif name == "StandardizeImage":
            image = (image / float(args.get("max_value", 255.0))).astype(np.float32)
        elif name == "NormalizeImage":
            mean = np.array(args["mean"], dtype=np.float32).reshape(1, 1, -1)
            std = np.array(args["std"], dtype=np.float32).reshape(1, 1, -1)
            image = (image - mean) / std
        elif name == "ImagePermute":
            image = np.ascontiguousarray(image.transpose(*args.get("permutation", (2, 0, 1))))
        else:
            raise AssertionError(f"the oracle does not know {name}")
    return image.astype(np.float32), undo


@torch.no_grad()
def predict(model: torch.nn.Module, image: np.ndarray, processing_params: dict) -> list[dict]:
    """Detections as the product reports them (boxes clipped to the image for comparison)."""
    processings = processing_params["image_processor"]["ComposeProcessing"]["processings"]
    tensor, undo = preprocess(image, processings)
    boxes, scores = model.eval()(torch.from_numpy(tensor)[None])
    boxes, scores = boxes[0], scores[0]
    anchor, label = (scores > processing_params["conf"]).nonzero(as_tuple=True)
    conf = scores[anchor, label]
    if len(conf) > 1024:
        top = conf.topk(1024).indices
        anchor, label, conf = anchor[top], label[top], conf[top]
    keep = torchvision.ops.batched_nms(boxes[anchor], conf, label, processing_params["iou"])[:300]
    kept = boxes[anchor][keep].numpy().astype(np.float32)
    for kind, a, b in reversed(undo):
        if kind == "pad":
            kept = kept - np.array([a, b, a, b], dtype=np.float32)
        else:
            kept = kept * np.array([1 / a, 1 / b, 1 / a, 1 / b], dtype=np.float32)
    h, w = image.shape[:2]
    kept[:, 0::2] = kept[:, 0::2].clip(0, w)
    kept[:, 1::2] = kept[:, 1::2].clip(0, h)
    names = processing_params["class_names"]
    return [
        {"box": box.tolist(), "score": float(s), "class_id": int(c), "class_name": names[int(c)]}
        for box, s, c in zip(kept, conf[keep].tolist(), label[keep].tolist())
    ]


def as_record(detections: list[dict], width: int, height: int) -> dict:
    """The oracle's answer in predict.json's layout, for reference_match.unmatched."""
    return {
        "width": width,
        "height": height,
        "boxes_xyxy": [d["box"] for d in detections],
        "scores": [d["score"] for d in detections],
        "class_ids": [d["class_id"] for d in detections],
    }
