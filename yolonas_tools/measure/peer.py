"""The peer that scripts/bench.py --peer measures us against: modern-yolonas (PyPI), its fused model converted to
OpenVINO and timed bare, one synchronous ``infer()`` of one image, nothing around it: its own input for the
picture (``peer_input``: modern-yolonas letterboxes every picture to 640x640).

The peer's network gets our seeded weights: modern-yolonas keeps super-gradients' module names, so a
super-gradients state dict loads into it key for key (strictly; the outputs equal ours before fusion). Timing does
not depend on weight values, but INT8 calibration and fp32 parity do, so both sides share them. The peer is fused
with its own ``fuse_block_residual_branches`` and converted with ``openvino.convert_model`` straight from PyTorch,
as its ``yolonas export --format openvino`` does; INT8 is NNCF post-training quantization on our calibration
batches with the decoding tail left in float, like our own INT8 archives. The OpenVINO CPU plugin's defaults are
kept (latency hint, every core, its own thread pinning) except the inference precision, which is that of the
backend compared.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from yolonas_tools.build.backends import quantize_int8

#  In a graph converted from PyTorch, the ops of NDFLHeads.forward itself (softmax over distance bins, anchors) are
#  named "__module.heads/aten::..."; the head convolutions are "__module.heads.head1...".
PEER_DECODING_TAIL = r"^__module\.heads/"


def available() -> bool:
    try:
        import modern_yolonas  # noqa: F401
    except ImportError:
        return False
    return True


def peer_model(weights: Path, variant: str, num_classes: int) -> torch.nn.Module:
    """modern-yolonas' network with our checkpoint's state dict, fused as its export fuses it."""
    from modern_yolonas import YoloNAS
    from modern_yolonas.weights import remap_state_dict

    from yolonas import read_checkpoint

    model = YoloNAS.from_config(f"yolo_nas_{variant}", num_classes=num_classes).eval()
    model.load_state_dict(remap_state_dict(read_checkpoint(weights).state_dict), strict=True)
    for module in model.modules():
        if hasattr(module, "fuse_block_residual_branches"):
            module.fuse_block_residual_branches()
    return model


def peer_input(jpeg: bytes) -> np.ndarray:
    """The peer's own network input for a picture ([1, 3, 640, 640] float32): decoded by OpenCV and letterboxed by
    modern-yolonas' ``preprocess``, as its detector does."""
    import cv2
    from modern_yolonas.inference.preprocess import preprocess

    bgr = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    tensor, _, _ = preprocess(bgr)
    return tensor.numpy()


def peer_forward(
    weights: Path,
    variant: str,
    num_classes: int,
    precision: str,
    example: np.ndarray,
    calibration: list[np.ndarray] | None = None,
) -> Callable[[np.ndarray], None]:
    """A call that runs the peer's bare forward once on the [1, 3, H, W] float32 input it is given; ``precision``
    is f32, bf16 or int8. Converted from PyTorch with ``example`` as its export does, the model keeps dynamic
    height and width (as the peer ships it), so any input size runs on the one compilation; each size gets its own
    infer request, so timing one size between calls of another does not charge it for the change of shape."""
    import openvino as ov

    model = peer_model(weights, variant, num_classes)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on the peer's shape arithmetic
        converted = ov.convert_model(model, example_input=torch.from_numpy(example))
    if precision == "int8":
        if not calibration:
            raise ValueError("the peer's INT8 needs calibration batches")
        converted = quantize_int8(converted, calibration, left_in_float=PEER_DECODING_TAIL)
    hint = "f32" if precision == "int8" else precision
    compiled = ov.Core().compile_model(converted, "CPU", {"INFERENCE_PRECISION_HINT": hint})
    infer_requests: dict[tuple[int, ...], Any] = {}

    def forward(image: np.ndarray) -> None:
        if image.shape not in infer_requests:
            infer_requests[image.shape] = compiled.create_infer_request()
        infer_requests[image.shape].infer({0: image})

    return forward
