"""Print a summary of YOLO-NAS S, M and L, like Ultralytics' ``model.info()``.

    python scripts/model_info.py [--variant s|m|l|all] [--num-classes 80] [--image-size 640 640] [--json]
    python scripts/model_info.py --variant s --time 10     # also: what fusion saves, measured

Per variant: parameters as super-gradients counts them (the unused ``rbr_reparam`` placeholders included), parameters
after fusion (what serving runs), GMACs of one image at the given size (convolutions of the fused model) and the number
of anchors. Built on the meta device: no weights are needed and nothing is computed for real.

``--time N`` also measures one forward pass at batch 1 (eager fp32, channels_last, seeded random weights, torch's
default threads) of the model as super-gradients trains it and of the fused one, N rounds taking turns after a
warm-up, and prints the medians and their ratio.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch

import common  # noqa: F401  (puts handler/ on sys.path)
from yolonas import VARIANTS, fuse_model, random_model, summarize
from yolonas.summary import ModelSummary


def image_size(values: list[int]) -> tuple[int, int]:
    height, width = values
    if height <= 0 or width <= 0 or height % 32 or width % 32:
        raise argparse.ArgumentTypeError(f"image size {height}x{width}: both sides must be positive multiples of 32")
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
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for round_ in range(rounds + 1):  # round 0 warms up
            for name, model in models.items():
                start = time.perf_counter()
                model(x)
                if round_:
                    times[name].append((time.perf_counter() - start) * 1000)
    result = {f"{name}_ms": statistics.median(values) for name, values in times.items()}
    result["speedup"] = result["unfused_ms"] / result["fused_ms"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=[*VARIANTS, "all"], default="all")
    parser.add_argument("--num-classes", type=int, default=80)
    parser.add_argument("--image-size", type=int, nargs=2, default=[640, 640], metavar=("H", "W"))
    parser.add_argument("--json", action="store_true", help="one JSON object per variant, in a list")
    parser.add_argument("--time", type=int, default=0, metavar="N", help="also time unfused vs fused, N rounds")
    args = parser.parse_args(argv)
    if args.num_classes < 1:
        parser.error("--num-classes must be at least 1")
    try:
        size = image_size(args.image_size)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    variants = list(VARIANTS) if args.variant == "all" else [args.variant]
    summaries = [summarize(v, args.num_classes, size) for v in variants]
    timings = {v: fusion_timing(v, args.num_classes, size, args.time) for v in variants} if args.time > 0 else {}
    if args.json:
        print(json.dumps([{**s.as_dict(), **timings.get(v, {})} for v, s in zip(variants, summaries)], indent=2))
        return 0
    print(format_table(summaries))
    for variant, timing in timings.items():
        print(
            f"yolo_nas_{variant}: forward at batch 1, {torch.get_num_threads()} threads: unfused "
            f"{timing['unfused_ms']:.1f} ms, fused {timing['fused_ms']:.1f} ms ({timing['speedup']:.2f}x)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
