"""Inference runtimes behind one call: float32 NCHW batch (numpy) -> (boxes [B, A, 4], scores [B, A, C]) on CPU."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class TorchRuntime:
    """Eager PyTorch: the fused model, channels_last; bf16 autocast on CPUs that have it, fp16 on CUDA."""

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu", precision: str = "fp32"):
        if precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16; got {precision!r}")
        self.device = torch.device(device)
        if precision == "fp16" and self.device.type != "cuda":
            raise ValueError("fp16 needs a CUDA device")
        self.precision = precision
        model = model.eval().to(self.device, memory_format=torch.channels_last)
        self.model = model.half() if precision == "fp16" else model

    def __call__(self, batch: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(batch)
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        x = x.contiguous(memory_format=torch.channels_last)
        if self.precision == "fp16":
            x = x.half()
        with torch.inference_mode(), torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"
        ):
            boxes, scores = self.model(x)
        return boxes.float().cpu(), scores.float().cpu()


def build_runtime(backend: str, weights: str, variant: str, num_classes: int, device: str = "cpu") -> TorchRuntime:
    """The runtime an archive asks for, loaded from its serialized file."""
    from yolonas import load_model

    precision = {"torch": "fp32", "torch-bf16": "bf16", "cuda-fp16": "fp16"}.get(backend)
    if precision is None:
        raise ValueError(f"unknown backend {backend!r}")
    if device.startswith("cuda") and precision == "fp32":
        precision = "fp16"  # on a GPU the torch archive runs in half precision
    return TorchRuntime(load_model(weights, variant, num_classes, fuse=True), device, precision)
