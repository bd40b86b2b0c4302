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
Output: progress on stderr; at the end one JSON line per row, then tables. Every table names the CPU and its ISA
flags (AMX, AVX-512 BF16 / VNNI): they change every number.

``--peer`` adds the peer (``peer.py``: modern-yolonas, fused, converted to OpenVINO, one bare ``infer()`` at batch
1 of its own input for the picture, letterboxed to 640x640) at the precision of each OpenVINO backend compared
(``auto`` -> what it resolves to here, bf16 on a CPU with native bf16; ``int8`` -> NNCF INT8 calibrated on the same
images as ours). Its forward is timed in process beside ours and again between the served windows, while the server
idles, so both see the same background load; the last table gives served images/s at 4 clients over the peer's bare
images/s, and the 1-client p50/p95 over the peer's bare milliseconds. Each backend runs its archive's own input
for the picture: minimal padding (640x384 for this 16:9 picture) is the default of auto and int8, so the peer is
also timed on that input, forward against forward. It installs
nothing: modern-yolonas comes from requirements-dev.txt.

    python scripts/bench.py --peer --backends auto,int8 --concurrency 1,4     # about 4-8 minutes on 2 cores

``--sliced [BACKENDS]`` measures sliced inference instead (``yolonas_tools/measure/sliced.py``, docs/slicing.md): a
4000x3000 JPEG in 640 tiles on one TorchServe against (tiles+1) bare forwards of one tile in process and against
sahi's own loop calling the same server tile by tile; backends int8,auto unless named. ``--repeats`` sets the rounds.

    python scripts/bench.py --sliced --repeats 7

``--tracking`` measures tracking instead (``yolonas_tools/measure/tracking_bench.py``, docs/tracking.md): frames per
second of a ByteTrack archive through TorchServe against the same detection without a tracker, 1 and 4 streams of a
synthetic shapes sequence; ``--weights`` must detect those shapes (the shapes reference model), ``--duration`` and
``--rounds`` as for the served measurements, ``--store`` as above.

    python scripts/bench.py --tracking --weights ../shared/reference/shapes/checkpoint.pth
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from yolonas import VARIANTS
from yolonas_serving.pipeline import PADDING_MODES
from yolonas_tools.build import archive
from yolonas_tools.measure.bench import ALL_BACKENDS, BASELINE, CORES, BenchError, BenchOptions, run
from yolonas_tools.measure.sliced import DEFAULT_BACKENDS as SLICED_BACKENDS
from yolonas_tools.measure.sliced import run_bench
from yolonas_tools.measure.tracking_bench import TrackingBenchOptions, run_tracking


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=list(VARIANTS), default="s")
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
    parser.add_argument("--peer", action="store_true", help="compare with modern-yolonas' bare OpenVINO forward")
    parser.add_argument(
        "--padding",
        choices=PADDING_MODES,
        help="archives' padding (default: each backend's own, see archive.py --help)",
    )
    parser.add_argument("--sliced", nargs="?", const=SLICED_BACKENDS, metavar="BACKENDS",
                        help=f"sliced inference against bare forwards and sahi ({SLICED_BACKENDS})")  # fmt: skip
    parser.add_argument("--tracking", action="store_true", help="tracked frames/s against plain detection (--weights)")
    args = parser.parse_args(argv)
    args.backends = [BASELINE] + [b for b in args.backends.split(",") if b and b != BASELINE]
    return args


def main(argv: list[str] | None = None) -> int:
    args = vars(parse_args(argv))
    sliced = args.pop("sliced")
    tracking = args.pop("tracking")
    try:
        if tracking:
            run_tracking(TrackingBenchOptions(args["weights"], args["store"], args["duration"], args["rounds"]))
            return 0
        if sliced:
            run_bench(BenchOptions(**args), sliced.split(","))
            return 0
        run(BenchOptions(**args))
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
