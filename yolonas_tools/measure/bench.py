"""Speed of each backend (scripts/bench.py): raw forward, the handler chain in process, and TorchServe end to end.

Archives are built with the ``archive`` command (or reused from a store) and measured in turn, round after round,
so that the load of other processes falls on all of them alike: the runtime's forward at batches 1 and 4, one JPEG
through the Detector split into stages, and one TorchServe with every archive registered under 1, 4 and 8
concurrent clients (``load.drive``, nearest-rank percentiles). With ``peer`` the peer's bare OpenVINO forward
(``peer.py``) is timed beside ours. ``run`` prints the header, one JSON line per row and the tables; progress goes
to stderr.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from yolonas import save_random_checkpoint
from yolonas_serving.backends import BACKENDS, cpu_has_bf16
from yolonas_serving.detector import Detector
from yolonas_serving.draw import encode_jpeg
from yolonas_serving.pipeline import COCO_PIPELINE
from yolonas_serving.protocol.base import ImageResult
from yolonas_serving.protocol.plain import JsonAnswer
from yolonas_serving.settings import available_cores
from yolonas_serving.timing import Timings
from yolonas_tools.build import archive
from yolonas_tools.build.backends import calibration_batches
from yolonas_tools.cli import run_command
from yolonas_tools.data.synthetic import shapes_image, write_shapes_images
from yolonas_tools.measure import peer
from yolonas_tools.measure.load import KeepAliveSession, Load, drive, in_turns, percentile
from yolonas_tools.serve import server
from yolonas_tools.serve.clients import Endpoints, authorized_request

#  Every backend a CPU runs as archived (auto resolves to one of these; cuda-fp16 needs a GPU).
ALL_BACKENDS = tuple(name for name, row in BACKENDS.items() if row.family != "auto" and row.precision != "fp16")
BASELINE = "torch"
STAGES = ("decode", "preprocess", "forward", "postprocess")
CORES = available_cores()
ISA_FLAGS = ("amx_tile", "amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx512f")


#  The peer's bare forward on the [1, 3, H, W] input it is given.
PeerForward = Callable[[np.ndarray], Any]


class BenchError(Exception):
    """A benchmark that cannot run as asked (the peer's package missing)."""


@dataclass(frozen=True)
class BenchOptions:
    """What scripts/bench.py's flags set; ``backends`` starts with the baseline."""

    variant: str
    backends: list[str]
    weights: Path | None
    calibration_images: Path | None
    store: Path | None
    batch_size: int
    workers: int
    threads: int
    repeats: int
    budget: float
    concurrency: str
    duration: float
    rounds: int
    skip_server: bool
    peer: bool
    padding: str | None = None


def cpu_description() -> str:
    """The CPU model and the ISA flags that decide which precisions are fast."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    present = [flag for flag in ISA_FLAGS if flag in flags]
    missing = [flag for flag in ISA_FLAGS if flag not in flags]
    return f"{model}; has {' '.join(present) or 'none'}; lacks {' '.join(missing) or 'none'}"


def peer_precision(backend: str) -> str | None:
    """The peer's precision that matches an OpenVINO backend (None for the others: no OpenVINO peer)."""
    if backend == "auto":
        backend = "openvino-bf16" if cpu_has_bf16() else "openvino"
    row = BACKENDS[backend]
    if row.family != "openvino":
        return None
    precision = {"fp32": "f32"}.get(row.precision, row.precision)
    return "f32" if precision == "bf16" and not cpu_has_bf16() else precision


def load() -> float:
    return round(os.getloadavg()[0], 2)


def emit(rows: list[dict[str, Any]], row: dict[str, Any]) -> None:
    row["load"] = load()
    row["busy"] = row["load"] > CORES
    rows.append(row)
    print(f"measured {row}", file=sys.stderr, flush=True)


def test_jpeg(seed: int = 0) -> bytes:
    """A 1280x720 JPEG of synthetic shapes (quality 90)."""
    return encode_jpeg(Image.fromarray(shapes_image(np.random.default_rng(seed), size=1280)[:720]), quality=90)


def handler_once(detector: Detector, jpeg: bytes) -> dict[str, float]:
    """Milliseconds per stage of one image through the in-process chain (as one TorchServe row)."""
    timings = Timings()
    with timings.stage("decode"):
        detector.decode(jpeg)
    with timings.stage("prepare"):
        prepared = detector.prepare(jpeg)  # decodes again: preprocess is prepare less decode
    (found,) = detector.detect([prepared], timings)
    with timings.stage("postprocess"):
        JsonAnswer().render([ImageResult(found, prepared.size)], detector.model)
    return {
        "decode": timings.ms["decode"],
        "preprocess": timings.ms["prepare"] - timings.ms["decode"],
        "forward": timings.ms["inference"],
        "postprocess": timings.ms["postprocess"],
    }


def peer_calls(peers: dict[str, PeerForward], peer_tensor: np.ndarray,
               ours: dict[str, np.ndarray]) -> dict[str, Callable]:  # fmt: skip
    """The peer's calls by name: its bare forward on its own input as "peer <precision>", and where our input of that
    precision (``ours``: precision -> [3, h, w]) has another size, the same forward on it as "peer <precision> on
    ours" (forward against forward)."""
    calls = {}
    for precision, forward in peers.items():
        calls[f"peer {precision}"] = lambda forward=forward: forward(peer_tensor)
        tensor = ours.get(precision)
        if tensor is not None and peer_tensor.shape[1:] != tensor.shape:
            calls[f"peer {precision} on ours"] = lambda forward=forward, x=tensor[None]: forward(x)
    return calls


def in_process(options: BenchOptions, detectors: dict[str, Detector], tensors: dict[str, np.ndarray], jpeg: bytes,
               peers: dict[str, PeerForward], peer_tensor: np.ndarray, rows: list) -> None:  # fmt: skip
    """Forward at batch 1 (the peers' bare forwards in the same rounds) and 4, each backend on its own input for the
    picture (``tensors``), then the handler chain, every backend in turn."""
    ours = {peer_precision(backend): tensor for backend, tensor in tensors.items() if peer_precision(backend)}
    for batch in (1, 4):
        inputs = {backend: np.stack([tensor] * batch) for backend, tensor in tensors.items()}
        calls = {backend: (lambda d=d, x=inputs[backend]: d.runtime(x)) for backend, d in detectors.items()}
        if batch == 1:
            calls.update(peer_calls(peers, peer_tensor, ours))
        for backend, samples in in_turns(calls, options.repeats, options.budget, warm_up=2).items():
            ms = statistics.median(t for t, _ in samples)
            if backend.startswith("peer "):
                precision, _, on_ours = backend[5:].partition(" on ")
                height_width = ours[precision].shape[1:] if on_ours else peer_tensor.shape[2:]
                emit(rows, {"kind": "peer", "precision": precision, "input": list(height_width),
                            "where": "in process, our input" if on_ours else "in process", "ms": ms,
                            "images_per_s": 1000 / ms})  # fmt: skip
                continue
            emit(rows, {"kind": "forward", "backend": backend, "variant": options.variant, "batch": batch,
                        "input": list(tensors[backend].shape[1:]), "ms": ms,
                        "images_per_s": batch * 1000 / ms})  # fmt: skip
    calls = {backend: (lambda d=d: handler_once(d, jpeg)) for backend, d in detectors.items()}
    for backend, samples in in_turns(calls, options.repeats, options.budget, warm_up=2).items():
        stages = {stage: statistics.median(s[stage] for _, s in samples) for stage in STAGES}
        total = sum(stages.values())
        emit(rows, {"kind": "handler", "backend": backend, "variant": options.variant, **stages, "total": total,
                    "images_per_s": 1000 / total})  # fmt: skip


def serve(endpoints: Endpoints, model: str, jpeg: bytes, concurrency: int, duration: float, load: Load) -> Load:
    """``concurrency`` clients posting ``jpeg`` back to back for ``duration`` seconds, added to ``load``; each on one
    keep-alive connection, which takes less of the cores the server runs on than requests does."""
    url = f"{endpoints.inference}/predictions/{model}"
    headers = {"Content-Type": "image/jpeg"}

    def send(session: KeepAliveSession) -> str | None:
        response = authorized_request(endpoints, "POST", url, session=session, data=jpeg, headers=headers, timeout=300)
        return None if response.ok else response.text[:200]

    drive(send, concurrency, seconds=duration, load=load, session=KeepAliveSession)
    if load.errors:
        raise RuntimeError(f"{model}: {sum(load.errors.values())} failed requests, e.g. {next(iter(load.errors))}")
    return load


def timed_window(call: Callable[[], Any], seconds: float) -> list[float]:
    """Milliseconds of each call of ``call``, back to back for ``seconds`` (at least one call)."""
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while not times or time.perf_counter() < deadline:
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    return times


def served(options: BenchOptions, store: Path, archives: dict[str, Path], run_dir: Path, jpeg: bytes,
           peers: dict[str, PeerForward], peer_tensor: np.ndarray, rows: list) -> None:  # fmt: skip
    """Every archive registered on one TorchServe; per concurrency level, ``--rounds`` windows per backend in turn,
    each followed by a window of the matching peer's bare forward on its own input (half as long) while the server
    idles."""
    names = {backend: mar.stem for backend, mar in archives.items()}
    endpoints = server.start(run_dir, store, models=list(names.values()), ports=server.free_ports())
    try:
        for name in names.values():
            serve(endpoints, name, jpeg, 4, 3.0, Load())  # warm-up: every batch size the worker will see
        peer_times: dict[str, list[float]] = {precision: [] for precision in peers}
        for concurrency in (int(c) for c in options.concurrency.split(",")):
            loads = {backend: Load() for backend in names}
            for _ in range(options.rounds):
                for backend, name in names.items():
                    serve(endpoints, name, jpeg, concurrency, options.duration / options.rounds, loads[backend])
                    precision = peer_precision(backend)
                    if precision in peers:
                        peer_times[precision] += timed_window(
                            lambda: peers[precision](peer_tensor),  # noqa: B023
                            options.duration / options.rounds / 2,
                        )
            for backend, load in loads.items():
                emit(rows, {"kind": "served", "backend": backend, "variant": options.variant,
                            "concurrency": concurrency, "requests": load.served, "p50_ms": load.percentile(50),
                            "p95_ms": load.percentile(95),
                            "images_per_s": load.per_second})  # fmt: skip
        for precision, times in peer_times.items():
            ms = statistics.median(times)
            emit(rows, {"kind": "peer", "precision": precision, "input": list(peer_tensor.shape[2:]),
                        "where": "between served windows", "ms": ms,
                        "p95_ms": percentile(times, 95), "calls": len(times),
                        "images_per_s": 1000 / ms})  # fmt: skip
    finally:
        server.stop(run_dir)


def add_ratios(rows: list[dict[str, Any]]) -> float:
    """Speed-up over the baseline for every row; served rows also relative to their backend's batch-4 forward.
    Returns the baseline's images/s."""
    forward = {(r["backend"], r["batch"]): r["images_per_s"] for r in rows if r["kind"] == "forward"}
    baseline = forward[BASELINE, 1]
    for row in rows:
        if row["kind"] == "peer":
            continue
        row["speedup"] = row["images_per_s"] / baseline
        if row["kind"] == "served":
            row["of_forward_b4"] = row["images_per_s"] / forward[row["backend"], 4]
    return baseline


def build_archives(options: BenchOptions, tmp: Path) -> tuple[dict[str, Path], Path, Path]:
    """One archive per backend, reused from ``--store`` when present, else built there (in ``tmp`` without one) from
    ``--weights`` (random where none), int8 calibrated on ``--calibration-images`` (synthetic shapes where none).
    Returns the archives, the weights and the calibration images."""
    store = options.store or tmp / "store"
    store.mkdir(parents=True, exist_ok=True)
    weights = options.weights or save_random_checkpoint(tmp / f"random_{options.variant}.pth", options.variant, 80, 0)
    calibration = options.calibration_images
    if calibration is None:
        calibration = tmp / "calibration"
        write_shapes_images(calibration, 32, seed=1)
    archives = {}
    for backend in options.backends:
        name = archive.default_name(options.variant, backend)
        mar = store / f"{name}.mar"
        if mar.is_file():
            print(f"reusing {mar}", file=sys.stderr)
        else:
            flags = ["--batch-size", str(options.batch_size), "--workers", str(options.workers)]
            if options.padding:
                flags += ["--padding", options.padding]
            if backend == "int8":
                flags += ["--calibration-images", str(calibration)]
            built = run_command("archive", ["--variant", options.variant, "--weights", str(weights),
                                            "--backend", backend, "--export-path", str(store), *flags])  # fmt: skip
            if built != 0:
                raise BenchError(f"could not archive the {backend} backend (the archive command's error is above)")
        archives[backend] = mar
    return archives, weights, calibration


def build_peers(options: BenchOptions, weights: Path, calibration: Path,
                peer_tensor: np.ndarray) -> dict[str, PeerForward]:  # fmt: skip
    """precision -> the peer's bare forward, for every precision an OpenVINO backend of this run compares with. Its
    INT8 is calibrated on its own kind of input (super-gradients' COCO letterbox, which its preprocess repeats)."""
    if not options.peer:
        return {}
    precisions = sorted({p for p in map(peer_precision, options.backends) if p})
    batches = calibration_batches(calibration, COCO_PIPELINE) if "int8" in precisions else None
    print(f"building the peer's OpenVINO models: {', '.join(precisions)}", file=sys.stderr, flush=True)
    return {p: peer.peer_forward(weights, options.variant, 80, p, peer_tensor, batches) for p in precisions}


def print_peer_table(rows: list[dict[str, Any]]) -> None:
    """Ours against the peer's bare forward of the same precision (timed between the served windows)."""
    peers = {r["precision"]: r for r in rows if r["kind"] == "peer" and r["where"] == "between served windows"}
    peers = peers or {r["precision"]: r for r in rows if r["kind"] == "peer" and r["where"] == "in process"}
    print(f"\n{'vs peer':<14} {'peer':>5} {'peer ms':>8} {'peer/s':>7} {'ours b1/s':>9} {'chain/s':>8} {'served/s':>9} "
          f"{'ratio':>6} {'p50 1c':>7} {'p95 1c':>7} {'p50/peer':>8} {'p95/peer':>8} {'p95/peer p95':>12} "
          f"{'peer p95/p50':>12}")  # fmt: skip
    forward = {r["backend"]: r for r in rows if r["kind"] == "forward" and r["batch"] == 1}
    chain = {r["backend"]: r for r in rows if r["kind"] == "handler"}
    for backend in dict.fromkeys(r["backend"] for r in rows if r["kind"] == "forward"):
        precision = peer_precision(backend)
        if precision not in peers:
            continue
        bare = peers[precision]
        served = {r["concurrency"]: r for r in rows if r["kind"] == "served" and r["backend"] == backend}
        line = f"{backend:<14} {precision:>5} {bare['ms']:>8.1f} {bare['images_per_s']:>7.2f} "
        line += f"{forward[backend]['images_per_s']:>9.2f} {chain[backend]['images_per_s']:>8.2f} "
        many = served.get(4)
        line += (
            f"{many['images_per_s']:>9.2f} {many['images_per_s'] / bare['images_per_s']:>6.2f} " if many else " " * 17
        )
        one = served.get(1)
        if one:
            line += f"{one['p50_ms']:>7.1f} {one['p95_ms']:>7.1f} {one['p50_ms'] / bare['ms']:>8.2f} "
            line += f"{one['p95_ms'] / bare['ms']:>8.2f} "
            if "p95_ms" in bare:  # with the peer's own spread: how noisy the machine was during the run
                line += f"{one['p95_ms'] / bare['p95_ms']:>12.2f} {bare['p95_ms'] / bare['ms']:>12.2f}"
        print(line)
    for r in (r for r in rows if r["kind"] == "peer" and r["where"] == "in process, our input"):
        ours = ", ".join(f"{b} {forward[b]['ms']:.1f} ms" for b in forward if peer_precision(b) == r["precision"])
        print(f"peer {r['precision']} on our {r['input'][1]}x{r['input'][0]} input: {r['ms']:.1f} ms in process "
              f"(ours at batch 1: {ours})")  # fmt: skip
    print(
        "goal: ratio (served img/s at 4 clients over the peer's bare img/s) >= 1.0; at 1 client, p50 and p95 at most "
        "1.3x the peer's bare forward (p95 against its median and against its own p95)"
    )


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
    if any(r["kind"] == "peer" for r in rows):
        print_peer_table(rows)


def run(options: BenchOptions) -> None:
    """Measure every backend of ``options`` and print the header, the JSON rows and the tables (progress on
    stderr)."""
    if options.peer and not peer.available():
        raise BenchError("--peer needs modern-yolonas (the dev extra): pip install -e '.[dev]'")
    torch.set_num_threads(options.threads)
    jpeg = test_jpeg()
    rows: list[dict[str, Any]] = []
    header = (
        f"# {options.variant.upper()}, {CORES} cores, {options.threads} threads in process, load {load()}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(default)')}\n# CPU: {cpu_description()}"
    )
    print(header, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        archives, weights, calibration = build_archives(options, tmp)
        detectors = {backend: archive.open_archive(mar, tmp / mar.stem) for backend, mar in archives.items()}
        tensors = {backend: d.prepare(jpeg).inputs[0].tensor for backend, d in detectors.items()}
        peer_tensor = peer.peer_input(jpeg) if options.peer else tensors[BASELINE][None]
        peers = build_peers(options, weights, calibration, peer_tensor)
        in_process(options, detectors, tensors, jpeg, peers, peer_tensor, rows)
        del detectors
        if not options.skip_server:
            served(options, archives[BASELINE].parent, archives, tmp / "run", jpeg, peers, peer_tensor, rows)
    baseline = add_ratios(rows)
    for row in rows:
        print(json.dumps(row))
    print(header)
    print_tables(rows, baseline)
