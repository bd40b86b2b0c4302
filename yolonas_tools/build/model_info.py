"""What scripts/model_info.py prints: a summary table of YOLO-NAS variants and, measured, what fusion saves.

The summaries themselves (parameters, fused parameters, GMACs, anchors) are ``yolonas.summarize``'s, built on the
meta device; ``fusion_timing`` times one batch-1 forward of the model as super-gradients trains it and of the fused
one, in turns after a warm-up.
"""

from __future__ import annotations

import copy
import json
import statistics

import torch

from yolonas import fuse_model, random_model, summarize
from yolonas.summary import ModelSummary
from yolonas_tools.measure.load import in_turns


class ImageSizeError(ValueError):
    """An image size that is not two positive multiples of 32."""


def image_size(values: list[int]) -> tuple[int, int]:
    height, width = values
    if height <= 0 or width <= 0 or height % 32 or width % 32:
        raise ImageSizeError(f"image size {height}x{width}: both sides must be positive multiples of 32")
    return height, width


def format_table(summaries: list[ModelSummary]) -> str:
    height, width = summaries[0].image_size
    macs_header = f"GMACs@{height}x{width}"
    lines = [
        f"{'model':<12} {'classes':>7} {'params (sg)':>13} {'params (fused)':>15} {macs_header:>15} {'anchors':>8}"
    ]
    for s in summaries:
        lines.append(
            f"{s.name:<12} {s.num_classes:>7} {s.params:>13,} {s.fused_params:>15,} {s.gmacs:>15.2f} {s.anchors:>8}"
        )
    return "\n".join(lines)


def fusion_timing(variant: str, num_classes: int, size: tuple[int, int], rounds: int) -> dict[str, float]:
    """Median milliseconds of a batch-1 forward, unfused and fused, measured in turns."""
    unfused = random_model(variant, num_classes).eval().to(memory_format=torch.channels_last)
    models = {"unfused": unfused, "fused": fuse_model(copy.deepcopy(unfused))}
    x = torch.rand(1, 3, *size).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        times = in_turns({name: (lambda model=model: model(x)) for name, model in models.items()}, rounds)
    result = {f"{name}_ms": statistics.median(ms for ms, _ in samples) for name, samples in times.items()}
    result["speedup"] = result["unfused_ms"] / result["fused_ms"]
    return result


def report(variants: list[str], num_classes: int, size: tuple[int, int], rounds: int, as_json: bool) -> str:
    """The summary of ``variants`` (JSON: one object per variant, in a list), timed over ``rounds`` if positive."""
    summaries = [summarize(v, num_classes, size) for v in variants]
    timings = {v: fusion_timing(v, num_classes, size, rounds) for v in variants} if rounds > 0 else {}
    if as_json:
        return json.dumps([{**s.as_dict(), **timings.get(v, {})} for v, s in zip(variants, summaries)], indent=2)
    lines = [format_table(summaries)]
    for variant, timing in timings.items():
        lines.append(
            f"yolo_nas_{variant}: forward at batch 1, {torch.get_num_threads()} threads: unfused "
            f"{timing['unfused_ms']:.1f} ms, fused {timing['fused_ms']:.1f} ms ({timing['speedup']:.2f}x)"
        )
    return "\n".join(lines)
