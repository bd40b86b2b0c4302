"""Speed of each backend: raw forward, the handler chain in process, and TorchServe end to end over REST.

    python scripts/bench.py --variant s
    python scripts/bench.py --variant m --backends torch,openvino-bf16,int8 --store bench_store

For each backend an archive is built with ``scripts/archive.py`` (or reused from ``--store``) and measured three ways:
1. forward: the archive's runtime alone on batches of 1 and 4 (the network input of a 1280x720 JPEG);
2. handler: one 1280x720 JPEG through the Detector in process, split into decode, preprocess, forward, postprocess
   (NMS, mapping back, JSON);
3. served: one TorchServe with every archive registered (their own batch size, delay and workers), the JPEG posted
   by 1, 4 and 8 concurrent clients: p50/p95 latency and images/s.
The baseline is the torch backend (fp32, fused, channels_last, eager) at batch 1, measured in the same run; every row
gives its speed-up over it. Backends are measured in turn, round after round (one call each for 1 and 2, a
``--duration / --rounds`` window each for 3), so that the load of other processes on a shared machine falls on all
of them alike. Warm-up first; times are medians; the 1-minute load average is recorded per row and ``busy`` marks
rows measured while it exceeded the core count. The load generator runs on the same machine as the server.
On a shared machine, run with ``OMP_WAIT_POLICY=PASSIVE`` (the server it starts inherits it): spin-waiting OpenMP
threads collapse when other processes hold the cores (torch fp32 S measured 3x slower that way at load 8 on 2 cores).
Output: progress on stderr; at the end one JSON line per row, then tables.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import requests
import torch
from PIL import Image
from synthetic_shapes import shapes_image, write_shapes_images

import archive
import server
from common import Endpoints
from yolonas_serving.detector import Detector, Timings
from yolonas_serving.draw import encode_jpeg
from yolonas_serving.protocol import ImageRequest

ALL_BACKENDS = ("torch", "torch-bf16", "onnx", "openvino", "openvino-bf16", "int8")
BASELINE = "torch"
STAGES = ("decode", "preprocess", "forward", "postprocess")
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def load() -> float:
    return round(os.getloadavg()[0], 2)


def emit(rows: list[dict[str, Any]], row: dict[str, Any]) -> None:
    row["load"] = load()
    row["busy"] = row["load"] > CORES
    rows.append(row)
    print(f"measured {row}", file=sys.stderr, flush=True)


def round_robin(calls: dict[str, Callable[[], Any]], repeats: int, budget_s: float) -> dict[str, list[tuple]]:
    """(milliseconds, result) of every call, calling them in turn: two warm-up rounds, then ``repeats`` rounds, or
    fewer (at least 3) once ``budget_s`` is spent."""
    for _ in range(2):
        for call in calls.values():
            call()
    results: dict[str, list[tuple]] = {name: [] for name in calls}
    deadline = time.perf_counter() + budget_s
    for done in range(repeats):
        if done >= 3 and time.perf_counter() > deadline:
            break
        for name, call in calls.items():
            start = time.perf_counter()
            value = call()
            results[name].append(((time.perf_counter() - start) * 1000, value))
    return results


def test_jpeg(seed: int = 0) -> bytes:
    """A 1280x720 JPEG of synthetic shapes (quality 90)."""
    return encode_jpeg(Image.fromarray(shapes_image(np.random.default_rng(seed), size=1280)[:720]), quality=90)


def handler_once(detector: Detector, jpeg: bytes) -> dict[str, float]:
    """Milliseconds per stage of one image through the in-process chain (as one TorchServe row)."""
    start = time.perf_counter()
    detector.decode(jpeg)
    decoded = time.perf_counter()
    prepared = detector.prepare(ImageRequest(jpeg))  # decodes again: preprocess = prepare - decode
    prepared_at = time.perf_counter()
    timings = Timings()
    (found,) = detector.detect([prepared], timings)
    detector.render(prepared, found)
    done = time.perf_counter()
    decode_ms = (decoded - start) * 1000
    return {
        "decode": decode_ms,
        "preprocess": (prepared_at - decoded) * 1000 - decode_ms,
        "forward": timings.inference_ms,
        "postprocess": (done - prepared_at) * 1000 - timings.inference_ms,
    }


def in_process(args: argparse.Namespace, archives: dict[str, Path], tmp: Path, jpeg: bytes, rows: list) -> None:
    """Forward at batch 1 and 4, then the handler chain, every backend in turn."""
    detectors = {backend: archive.open_archive(mar, tmp / mar.stem) for backend, mar in archives.items()}
    tensor = next(iter(detectors.values())).prepare(ImageRequest(jpeg)).tensor
    for batch in (1, 4):
        x = np.stack([tensor] * batch)
        calls = {backend: (lambda d=d: d.runtime(x)) for backend, d in detectors.items()}  # noqa: B023
        for backend, samples in round_robin(calls, args.repeats, args.budget).items():
            ms = statistics.median(t for t, _ in samples)
            emit(rows, {"kind": "forward", "backend": backend, "variant": args.variant, "batch": batch,
                        "input": list(tensor.shape[1:]), "ms": ms, "images_per_s": batch * 1000 / ms})  # fmt: skip
    calls = {backend: (lambda d=d: handler_once(d, jpeg)) for backend, d in detectors.items()}
    for backend, samples in round_robin(calls, args.repeats, args.budget).items():
        stages = {stage: statistics.median(s[stage] for _, s in samples) for stage in STAGES}
        total = sum(stages.values())
        emit(rows, {"kind": "handler", "backend": backend, "variant": args.variant, **stages, "total": total,
                    "images_per_s": 1000 / total})  # fmt: skip


def serve(
    endpoints: Endpoints, model: str, jpeg: bytes, concurrency: int, duration: float
) -> tuple[list[float], float]:
    """``concurrency`` clients posting ``jpeg`` back to back for ``duration`` seconds: (latencies in ms, wall s)."""
    url = f"{endpoints.inference}/predictions/{model}"
    headers = {**endpoints.auth(), "Content-Type": "image/jpeg"}
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + duration

    def client() -> None:
        with requests.Session() as session:
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                response = session.post(url, data=jpeg, headers=headers, timeout=300)
                elapsed = (time.perf_counter() - start) * 1000
                with lock:
                    (latencies if response.ok else errors).append(elapsed if response.ok else response.text[:200])

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"{model}: {len(errors)} failed requests, e.g. {errors[0]}")
    return latencies, time.perf_counter() - start


def served(args: argparse.Namespace, store: Path, archives: dict[str, Path], run_dir: Path, jpeg: bytes,
           rows: list) -> None:  # fmt: skip
    """Every archive registered on one TorchServe; per concurrency level, ``--rounds`` windows per backend in turn."""
    names = {backend: mar.stem for backend, mar in archives.items()}
    endpoints = server.start(run_dir, store, models=list(names.values()), ports=server.free_ports())
    try:
        for name in names.values():
            serve(endpoints, name, jpeg, 4, 3.0)  # warm-up: every batch size the worker will see
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            latencies: dict[str, list[float]] = {backend: [] for backend in names}
            wall = dict.fromkeys(names, 0.0)
            for _ in range(args.rounds):
                for backend, name in names.items():
                    times, seconds = serve(endpoints, name, jpeg, concurrency, args.duration / args.rounds)
                    latencies[backend] += times
                    wall[backend] += seconds
            for backend, times in latencies.items():
                emit(rows, {"kind": "served", "backend": backend, "variant": args.variant, "concurrency": concurrency,
                            "requests": len(times), "p50_ms": float(np.percentile(times, 50)),
                            "p95_ms": float(np.percentile(times, 95)),
                            "images_per_s": len(times) / wall[backend]})  # fmt: skip
    finally:
        server.stop(run_dir)


def add_ratios(rows: list[dict[str, Any]]) -> float:
    """Speed-up over the baseline for every row; served rows also relative to their backend's batch-4 forward.
    Returns the baseline's images/s."""
    forward = {(r["backend"], r["batch"]): r["images_per_s"] for r in rows if r["kind"] == "forward"}
    baseline = forward[BASELINE, 1]
    for row in rows:
        row["speedup"] = row["images_per_s"] / baseline
        if row["kind"] == "served":
            row["of_forward_b4"] = row["images_per_s"] / forward[row["backend"], 4]
    return baseline


def build_archives(args: argparse.Namespace, store: Path, tmp: Path) -> dict[str, Path]:
    """One archive per backend: reused from ``--store`` when present, else built there."""
    weights = args.weights
    if weights is None:
        from yolonas import save_random_checkpoint

        weights = save_random_checkpoint(tmp / f"random_{args.variant}.pth", args.variant, 80, 0)
    calibration = args.calibration_images
    archives = {}
    for backend in args.backends:
        name = archive.default_name(args.variant, backend)
        mar = store / f"{name}.mar"
        if mar.is_file():
            print(f"reusing {mar}", file=sys.stderr)
        else:
            flags = ["--batch-size", str(args.batch_size), "--workers", str(args.workers)]
            if backend == "int8":
                if calibration is None:
                    calibration = tmp / "calibration"
                    write_shapes_images(calibration, 32, seed=1)
                flags += ["--calibration-images", str(calibration)]
            archive.main(["--variant", args.variant, "--weights", str(weights), "--backend", backend,
                          "--export-path", str(store), *flags])  # fmt: skip
        archives[backend] = mar
    return archives


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=["s", "m", "l"], default="s")
    parser.add_argument("--backends", default=",".join(ALL_BACKENDS), help="comma-separated; torch is always added")
    parser.add_argument("--weights", type=Path, help="checkpoint (default: seeded random weights)")
    parser.add_argument("--calibration-images", type=Path, help="for int8 (default: synthetic shapes)")
    parser.add_argument("--store", type=Path, help="keep archives here and reuse those already there")
    parser.add_argument("--batch-size", type=int, default=archive.DEFAULT_BATCH_SIZE, help="archives' batchSize")
    parser.add_argument("--workers", type=int, default=archive.DEFAULT_WORKERS, help="archives' workers")
    parser.add_argument("--threads", type=int, default=CORES, help="threads for the in-process measurements")
    parser.add_argument("--repeats", type=int, default=15, help="in-process rounds (one call per backend each)")
    parser.add_argument("--budget", type=float, default=120.0, help="seconds per in-process measurement at most")
    parser.add_argument("--concurrency", default="1,4,8", help="served: concurrent clients, comma-separated")
    parser.add_argument("--duration", type=float, default=20.0, help="served: seconds per backend and level")
    parser.add_argument("--rounds", type=int, default=4, help="served: windows the duration is split into")
    parser.add_argument("--skip-server", action="store_true", help="in-process measurements only")
    args = parser.parse_args(argv)
    args.backends = [BASELINE] + [b for b in args.backends.split(",") if b and b != BASELINE]
    return args


def print_tables(rows: list[dict[str, Any]], baseline: float) -> None:
    print(f"\nbaseline: {BASELINE} fp32 eager forward at batch 1, {baseline:.2f} img/s ({1000 / baseline:.1f} ms)")
    print(f"\n{'forward':<14} {'batch':>5} {'ms':>8} {'img/s':>7} {'x base':>7} {'load':>5}")
    for r in sorted((r for r in rows if r["kind"] == "forward"), key=lambda r: r["batch"]):
        print(f"{r['backend']:<14} {r['batch']:>5} {r['ms']:>8.1f} {r['images_per_s']:>7.2f} {r['speedup']:>7.2f} "
              f"{r['load']:>5.1f}{' busy' if r['busy'] else ''}")  # fmt: skip
    print(
        f"\n{'handler':<14} {'decode':>7} {'prep':>7} {'forward':>8} {'post':>7} {'total':>8} {'img/s':>7} "
        f"{'x base':>7} {'load':>5}"
    )
    for r in (r for r in rows if r["kind"] == "handler"):
        print(f"{r['backend']:<14} {r['decode']:>7.1f} {r['preprocess']:>7.1f} {r['forward']:>8.1f} "
              f"{r['postprocess']:>7.1f} {r['total']:>8.1f} {r['images_per_s']:>7.2f} {r['speedup']:>7.2f} "
              f"{r['load']:>5.1f}{' busy' if r['busy'] else ''}")  # fmt: skip
    print(
        f"\n{'served':<14} {'conc':>4} {'p50 ms':>8} {'p95 ms':>8} {'img/s':>7} {'x base':>7} {'vs fwd b4':>9} "
        f"{'load':>5}"
    )
    for r in (r for r in rows if r["kind"] == "served"):
        print(f"{r['backend']:<14} {r['concurrency']:>4} {r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f} "
              f"{r['images_per_s']:>7.2f} {r['speedup']:>7.2f} {r['of_forward_b4']:>9.2f} {r['load']:>5.1f}"
              f"{' busy' if r['busy'] else ''}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    jpeg = test_jpeg()
    rows: list[dict[str, Any]] = []
    print(
        f"# {args.variant.upper()}, {CORES} cores, {args.threads} threads in process, load {load()}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(default)')}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store = args.store or tmp / "store"
        store.mkdir(parents=True, exist_ok=True)
        archives = build_archives(args, store, tmp)
        in_process(args, archives, tmp, jpeg, rows)
        if not args.skip_server:
            served(args, store, archives, tmp / "run", jpeg, rows)
    baseline = add_ratios(rows)
    for row in rows:
        print(json.dumps(row))
    print_tables(rows, baseline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
