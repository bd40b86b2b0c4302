"""scripts/bench.py --peer, a short in-process run (no server): it installs nothing, names the CPU and its ISA flags,
runs each backend on its archive's own input, and times the peer on its own 640x640 input and, where our input is
smaller (minimal padding, openvino-bf16's default), on ours as well."""

from __future__ import annotations

import json

import pytest
import torch

from yolonas_tools.cli import run_command
from yolonas_tools.measure.bench import peer_precision

pytest.importorskip("openvino")
pytest.importorskip("modern_yolonas", reason="the peer comes with the dev extra (requirements-dev.txt)")


def test_bench_peer_times_the_peer_on_its_input_and_on_ours(tmp_path, capsys):
    argv = ["--peer", "--backends", "openvino-bf16", "--skip-server", "--repeats", "3",
            "--budget", "1", "--threads", str(torch.get_num_threads()), "--store", str(tmp_path)]  # fmt: skip
    assert run_command("bench", argv) == 0
    out = capsys.readouterr().out
    assert "# CPU: " in out and " lacks " in out
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    peers = {(r["where"], tuple(r["input"])): r for r in rows if r["kind"] == "peer"}
    assert set(peers) == {("in process", (640, 640)), ("in process, our input", (384, 640))}
    inputs = {r["backend"]: tuple(r["input"]) for r in rows if r["kind"] == "forward"}
    assert inputs == {"torch": (640, 640), "openvino-bf16": (384, 640)}  # the 1280x720 test picture
    precision = peer_precision("openvino-bf16")
    table = out[out.index("vs peer") :].splitlines()
    assert table[1].split()[:3] == ["openvino-bf16", precision, f"{peers['in process', (640, 640)]['ms']:.1f}"]
    assert table[2].startswith(f"peer {precision} on our 640x384 input: ")
