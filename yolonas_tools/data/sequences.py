"""Synthetic video sequences for the shapes model, with ground-truth track ids, and their scoring.

Shapes drawn as in ``synthetic.py`` (same classes, sizes and noisy gradient background) move at constant speed,
bounce off the edges and pass over each other: later shapes are drawn on top. Each sequence is written in the
MOTChallenge layout (``img1/000001.png``..., ``gt/gt.txt``) and optionally as an mp4, so tracking can be scored with
TrackEval's metrics as Roboflow's ``trackers.eval`` computes them (MOTA, IDF1, HOTA, ID switches).

    python -m yolonas_tools.data.sequences runs/shapes_seq --frames 300 --seed 0 --video

Ground-truth rows are ``frame,id,x,y,w,h,1,class,visibility`` in 0-based pixels (the served boxes' own coordinates;
MOTChallenge's files count from 1, but only IoU matters). A shape less than ``MIN_VISIBILITY`` visible is marked as a
distractor (class 8): a track on it is neither rewarded nor counted as a false positive, as TrackEval does for MOT17.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from yolonas_tools.data.synthetic import SHAPES, _background

#  MOTChallenge ground-truth classes trackers.eval reads: 1 is scored, 8 a distractor (neither hit nor miss).
SCORED, DISTRACTOR = 1, 8
#  Below this fraction of its pixels visible, a shape is a distractor in the ground truth.
MIN_VISIBILITY = 0.4
#  Side of a shape as a fraction of the frame (synthetic.py draws 0.07-0.32; the smallest are hard to follow) and
#  speed in pixels per frame.
SIDE_RANGE = (0.12, 0.26)
SPEED_RANGE = (1.5, 4.0)
NOISE_SIGMA = 4.0


@dataclass
class Mover:
    """One shape: its ground-truth id (from 1, as in MOTChallenge), look, box size and motion."""

    track_id: int
    shape: str
    colour: tuple[float, float, float]
    side: int
    height: int
    x: float
    y: float
    vx: float
    vy: float

    def box(self) -> tuple[int, int, int, int]:
        """x1, y1, x2, y2 of the drawn shape, in whole pixels."""
        x, y = round(self.x), round(self.y)
        return x, y, x + self.side, y + self.height

    def step(self, size: int) -> None:
        """Move one frame on, bouncing off the frame's edges."""
        self.x, self.vx = _bounce(self.x + self.vx, self.vx, size - self.side)
        self.y, self.vy = _bounce(self.y + self.vy, self.vy, size - self.height)

    def draw(self, image: np.ndarray, colour: tuple[float, ...] | float | None = None) -> None:
        """Draw the shape as synthetic.py does, in its colour (or ``colour``: masks)."""
        colour = self.colour if colour is None else colour
        x1, y1, x2, y2 = self.box()
        side = self.side
        if self.shape == "circle":
            cv2.circle(image, (x1 + side // 2, y1 + side // 2), side // 2, colour, -1, cv2.LINE_AA)
        elif self.shape == "square":
            cv2.rectangle(image, (x1, y1), (x2, y2), colour, -1)
        elif self.shape == "triangle":
            points = np.array([[x1 + side // 2, y1], [x1, y2], [x2, y2]], dtype=np.int32)
            cv2.fillPoly(image, [points], colour, cv2.LINE_AA)
        else:
            cv2.rectangle(image, (x1, y1), (x2, y2), colour, max(3, side // 10))


def _bounce(position: float, velocity: float, high: float) -> tuple[float, float]:
    if position < 0:
        return -position, -velocity
    if position > high:
        return 2 * high - position, -velocity
    return position, velocity


def make_movers(rng: np.random.Generator, count: int, size: int) -> list[Mover]:
    """``count`` shapes of random kind, colour, size, place and direction; the shape kinds cycle so that a sequence
    holds several."""
    movers = []
    first = int(rng.integers(len(SHAPES)))
    for i in range(count):
        shape = SHAPES[(first + i) % len(SHAPES)]
        side = int(rng.uniform(*SIDE_RANGE) * size)
        height = {"triangle": side * 3 // 4, "ring_rect": int(side * rng.uniform(0.5, 0.9))}.get(shape, side)
        angle, speed = rng.uniform(0, 2 * math.pi), rng.uniform(*SPEED_RANGE)
        colour = tuple(float(c) for c in rng.uniform(0, 255, 3))
        x, y = rng.uniform(0, size - side), rng.uniform(0, size - height)
        movers.append(Mover(i + 1, shape, colour, side, height, x, y, speed * math.cos(angle), speed * math.sin(angle)))
    return movers


@dataclass(frozen=True)
class Truth:
    """A shape's ground truth in one frame: id, box (x1, y1, x2, y2) and the fraction of it not hidden."""

    track_id: int
    box: tuple[int, int, int, int]
    visibility: float


@dataclass(frozen=True)
class SequenceFrame:
    image: np.ndarray  # RGB uint8
    truth: list[Truth]


def shapes_sequence(seed: int = 0, frames: int = 120, size: int = 320, objects: int = 4) -> Iterator[SequenceFrame]:
    """``frames`` frames of ``objects`` moving shapes on one background; the same seed gives the same sequence."""
    rng = np.random.default_rng(seed)
    background = _background(rng, size)
    movers = make_movers(rng, objects, size)
    for _ in range(frames):
        image = background.copy()
        masks = []
        for mover in movers:
            mover.draw(image)
            mask = np.zeros((size, size), dtype=np.uint8)
            mover.draw(mask, 1)
            masks.append(mask.astype(bool))
        image += rng.normal(0, NOISE_SIGMA, image.shape)
        truth = []
        for i, mover in enumerate(movers):
            covered = np.logical_or.reduce(masks[i + 1 :]) if i + 1 < len(masks) else False
            visible = np.count_nonzero(masks[i] & ~covered) / max(1, np.count_nonzero(masks[i]))
            truth.append(Truth(mover.track_id, mover.box(), visible))
        yield SequenceFrame(np.clip(image, 0, 255).astype(np.uint8), truth)
        for mover in movers:
            mover.step(size)


# --- MOTChallenge files --------------------------------------------------------------------------------------------


def mot_row(frame: int, track_id: int, box: tuple[float, float, float, float], score: float) -> str:
    """A tracker's row: ``frame,id,x,y,w,h,score,-1,-1,-1`` from an (x1, y1, x2, y2) box."""
    x1, y1, x2, y2 = box
    return f"{frame},{track_id},{x1:.2f},{y1:.2f},{x2 - x1:.2f},{y2 - y1:.2f},{score:.5f},-1,-1,-1"


def truth_row(frame: int, truth: Truth) -> str:
    """A ground-truth row: ``frame,id,x,y,w,h,1,class,visibility``; a mostly hidden shape is a distractor."""
    x1, y1, x2, y2 = truth.box
    kind = SCORED if truth.visibility >= MIN_VISIBILITY else DISTRACTOR
    return f"{frame},{truth.track_id},{x1},{y1},{x2 - x1},{y2 - y1},1,{kind},{truth.visibility:.3f}"


@dataclass(frozen=True)
class SequenceFiles:
    frames: Path  # folder of PNG frames, 000001.png ...
    gt: Path  # MOTChallenge ground truth
    video: Path | None  # the same frames as mp4 (lossy), when asked for


def write_sequence(
    folder: str | Path,
    seed: int = 0,
    frames: int = 120,
    size: int = 320,
    objects: int = 4,
    video: bool = False,
    fps: float = 30.0,
) -> SequenceFiles:
    """A sequence as MOTChallenge lays one out (``img1/``, ``gt/gt.txt``), plus ``video.mp4`` when ``video``."""
    folder = Path(folder)
    (folder / "img1").mkdir(parents=True, exist_ok=True)
    (folder / "gt").mkdir(exist_ok=True)
    files = SequenceFiles(folder / "img1", folder / "gt" / "gt.txt", folder / "video.mp4" if video else None)
    writer = cv2.VideoWriter(str(files.video), cv2.VideoWriter_fourcc(*"mp4v"), fps, (size, size)) if video else None
    rows = []
    try:
        for number, frame in enumerate(shapes_sequence(seed, frames, size, objects), 1):
            bgr = cv2.cvtColor(frame.image, cv2.COLOR_RGB2BGR)
            cv2.imwrite(str(files.frames / f"{number:06d}.png"), bgr)
            if writer is not None:
                writer.write(bgr)
            rows += [truth_row(number, truth) for truth in frame.truth]
    finally:
        if writer is not None:
            writer.release()
    files.gt.write_text("\n".join(rows) + "\n")
    return files


# --- scoring -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrackScores:
    """TrackEval's headline metrics of one sequence (fractions; IDSW a count)."""

    mota: float
    idf1: float
    hota: float
    idsw: int

    def line(self) -> str:
        return f"MOTA {self.mota:.3f}  IDF1 {self.idf1:.3f}  HOTA {self.hota:.3f}  IDSW {self.idsw}"


def score_tracks(gt: str | Path, tracks: str | Path) -> TrackScores:
    """MOTA, IDF1, HOTA and ID switches of a tracker's MOT file against the ground truth, IoU 0.5 (trackers.eval,
    TrackEval's matching). A file without rows tracked nothing: every metric is 0."""
    if not Path(tracks).read_text().strip():
        return TrackScores(0.0, 0.0, 0.0, 0)
    from trackers.eval import evaluate_mot_sequence

    result = evaluate_mot_sequence(gt, tracks, metrics=["CLEAR", "HOTA", "Identity"])
    return TrackScores(result.CLEAR.MOTA, result.Identity.IDF1, result.HOTA.HOTA, result.CLEAR.IDSW)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--frames", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--objects", type=int, default=4)
    parser.add_argument("--size", type=int, default=320, help="frame side in pixels (the shapes model's input)")
    parser.add_argument("--video", action="store_true", help="also write video.mp4 (mp4v)")
    args = parser.parse_args(argv)
    files = write_sequence(args.folder, args.seed, args.frames, args.size, args.objects, args.video)
    video = f", video {files.video}" if files.video else ""
    print(f"wrote {args.frames} frames to {files.frames}, ground truth {files.gt}{video}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
