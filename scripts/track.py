"""Track objects in a video or a folder of frames through the server, writing MOTChallenge rows.

    python scripts/track.py video.mp4 --model shapes_track --out tracks.txt [--save annotated.mp4] [--conf 0.4]
    python scripts/track.py frames/ --model shapes_track --out tracks.txt --gt gt/gt.txt   # and score the tracks

The model must be a tracking archive (``scripts/archive.py ... --tracker bytetrack``). The frames (a video decoded
by OpenCV, or a folder's images sorted by name) go to the server of ``--run-dir`` over gRPC StreamPredictions2 as one
sequence, one frame in flight while the next is read; the last one ends the sequence. Each tracked detection becomes
a row ``frame,id,x,y,w,h,score,-1,-1,-1`` (frames from 1, pixels of the frame, detections without a track id left
out). ``--save`` writes the frames with their tracks as an mp4. A frame the server refuses (a corrupt image) is
reported and the others go on; exit status 1 then. ``--gt`` prints MOTA, IDF1, HOTA and ID switches against a
MOTChallenge ground truth (``python -m yolonas_tools.data.sequences`` writes synthetic sequences with one).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc

from yolonas_tools.data.frames import SourceError
from yolonas_tools.data.sequences import score_tracks
from yolonas_tools.paths import RUN_DIR
from yolonas_tools.serve.clients import Endpoints, NoServerError, add_option_arguments, request_options
from yolonas_tools.serve.grpc_client import PredictionError
from yolonas_tools.serve.track import FRAME_TIMEOUT_S, TrackingError, track_to_files


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="a video file, or a folder of frames (sorted by name)")
    parser.add_argument("--model", required=True, help="a tracking model of the server")
    parser.add_argument("--out", type=Path, required=True, help="the MOTChallenge rows (tracks.txt)")
    parser.add_argument("--save", type=Path, help="also write the annotated frames as this mp4")
    parser.add_argument("--fps", type=float, help="frame rate of --save (default: the video's, or 30 for a folder)")
    parser.add_argument("--gt", type=Path, help="MOTChallenge ground truth: print MOTA, IDF1, HOTA, ID switches")
    parser.add_argument("--sequence-id", help="default: a new random id")
    parser.add_argument(
        "--frame-timeout", type=float, default=FRAME_TIMEOUT_S, help="seconds a frame may wait for its answer"
    )
    parser.add_argument("--run-dir", type=Path, default=RUN_DIR, help="the server's working folder (server.json, keys)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_option_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = track_to_files(
            Endpoints.load(args.run_dir), args.model, args.source, args.out, args.save, request_options(args),
            args.sequence_id, args.frame_timeout, args.fps, progress=not args.quiet,
        )  # fmt: skip
    except (NoServerError, SourceError, TrackingError, PredictionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    saved = f"; annotated video {args.save}" if args.save else ""
    print(
        f"{args.out}: {summary.rows} rows, {len(summary.tracks)} tracks over {summary.frames} frames "
        f"({summary.fps:.1f} frames/s){saved}"
    )
    if args.gt:
        print(score_tracks(args.gt, args.out).line())
    if summary.failed:
        print(f"{len(summary.failed)} frame(s) failed: " + "; ".join(summary.failed[:5]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
