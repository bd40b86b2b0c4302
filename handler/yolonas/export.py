"""ONNX export of the network, optionally with NMS inside the graph.

Plain export keeps the model's contract: ``images`` [B, 3, H, W] float32 in [0, 1] -> ``boxes`` [B, A, 4] (xyxy,
input pixels) and ``scores`` [B, A, C] (after sigmoid). With :class:`ExportNMS` the graph ends in ONNX
``NonMaxSuppression`` and returns super-gradients' "batch" layout instead: ``num_predictions`` [B, 1] (int64),
``boxes`` [B, K, 4], ``scores`` [B, K], ``classes`` [B, K] (int64), K = max_det, rows beyond num_predictions
padded with 0 (class -1).

It lives beside the model because it describes the network's graph (which axes may vary, how NMS attaches to its
outputs); archive time (the onnx and openvino backends convert from it) and ``scripts/export_onnx.py`` share it.
The classic TorchScript exporter is used (``dynamo=False``): it needs no onnxscript and keeps node names that follow
the module tree (``/heads/Softmax``), which INT8 quantization relies on to leave the decoding tail in float.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

OPSET = 17
EXAMPLE_SIZE = (640, 640)  # traced shape when height and width stay dynamic


@dataclass(frozen=True)
class ExportNMS:
    """NMS as the graph runs it: scores above ``conf`` (strict), class-aware at ``iou``, best ``max_det`` kept."""

    conf: float = 0.25
    iou: float = 0.7
    max_det: int = 300


class _NonMaxSuppression(torch.autograd.Function):
    """ONNX NonMaxSuppression (per image, per class); the eager forward computes the same with torchvision so that
    tracing sees realistic outputs."""

    @staticmethod
    def forward(ctx, boxes: Tensor, scores: Tensor, max_per_class: int, iou: float, conf: float) -> Tensor:
        # boxes [B, A, 4], scores [B, C, A] -> selected [N, 3] rows of (image, class, anchor)
        rows = [torch.zeros(0, 3, dtype=torch.int64)]
        for image in range(boxes.shape[0]):
            for cls in range(scores.shape[1]):
                candidates = (scores[image, cls] > conf).nonzero().squeeze(1)
                keep = torchvision.ops.nms(boxes[image, candidates], scores[image, cls, candidates], iou)
                anchors = candidates[keep[:max_per_class]]
                prefix = torch.tensor([[image, cls]], dtype=torch.int64).expand(len(anchors), 2)
                rows.append(torch.cat([prefix, anchors[:, None]], dim=1))
        return torch.cat(rows)

    @staticmethod
    def symbolic(g, boxes, scores, max_per_class: int, iou: float, conf: float):
        return g.op(
            "NonMaxSuppression",
            boxes,
            scores,
            g.op("Constant", value_t=torch.tensor([max_per_class], dtype=torch.int64)),
            g.op("Constant", value_t=torch.tensor([iou], dtype=torch.float32)),
            g.op("Constant", value_t=torch.tensor([conf], dtype=torch.float32)),
        )


class DetectorWithNMS(nn.Module):
    """The network followed by NMS and a fixed-size, padded "batch" layout (see the module docstring)."""

    def __init__(self, model: nn.Module, nms: ExportNMS):
        super().__init__()
        self.model = model
        self.nms = nms

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        boxes, scores = self.model(images)
        k = self.nms.max_det
        selected = _NonMaxSuppression.apply(boxes, scores.transpose(1, 2), k, self.nms.iou, self.nms.conf)
        image, cls, anchor = selected[:, 0], selected[:, 1], selected[:, 2]
        picked_scores = scores[image, anchor, cls]
        # Rank each image's detections by score: a [B, N + k] table holding the image's own scores and -1 elsewhere;
        # the k padding columns make top-k valid however few detections there are.
        own = image[None, :] == torch.arange(boxes.shape[0], device=boxes.device)[:, None]
        table = torch.where(own, picked_scores[None, :], torch.full_like(picked_scores, -1.0)[None, :])
        top_scores, top = nn.functional.pad(table, (0, k), value=-1.0).topk(k, dim=1)
        valid = top_scores >= 0
        out_boxes = nn.functional.pad(boxes[image, anchor], (0, 0, 0, k))[top]
        out_classes = nn.functional.pad(cls, (0, k), value=-1)[top]
        return (
            valid.sum(dim=1, keepdim=True),
            torch.where(valid[..., None], out_boxes, torch.zeros_like(out_boxes)),
            torch.where(valid, top_scores, torch.zeros_like(top_scores)),
            torch.where(valid, out_classes, torch.full_like(out_classes, -1)),
        )


def export_onnx(
    model: nn.Module,
    path: str | Path,
    input_size: tuple[int, int] | None = EXAMPLE_SIZE,
    dynamic_batch: bool = True,
    nms: ExportNMS | None = None,
    opset: int = OPSET,
) -> Path:
    """Write ``model`` (fused, eval, float32, on CPU) to one self-contained .onnx file and check it.

    ``input_size`` (height, width) fixes the input; None leaves height and width dynamic (multiples of 32), for
    pipelines that pad automatically. Without ``dynamic_batch`` the batch is fixed at 1.
    """
    import onnx

    path = Path(path)
    height, width = input_size or EXAMPLE_SIZE
    example = torch.rand(2 if dynamic_batch else 1, 3, height, width, generator=torch.Generator().manual_seed(0))
    module = DetectorWithNMS(model, nms) if nms else model
    outputs = ["num_predictions", "boxes", "scores", "classes"] if nms else ["boxes", "scores"]
    axes: dict[str, dict[int, str]] = {}
    if dynamic_batch:
        axes = {name: {0: "batch"} for name in ["images", *outputs]}
    if input_size is None:
        axes.setdefault("images", {}).update({2: "height", 3: "width"})
        if not nms:
            for name in outputs:
                axes.setdefault(name, {})[1] = "anchors"
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        # Shapes turned into graph ops are what we want; the exporter's notes about them are noise.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
        warnings.simplefilter("ignore", DeprecationWarning)  # the classic exporter (dynamo=False) is deliberate
        torch.onnx.export(
            module.eval(),
            (example,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=["images"],
            output_names=outputs,
            dynamic_axes=axes or None,
        )
    onnx.checker.check_model(str(path))
    return path
