"""scripts/bench.py --peer, a short in-process run (no server): it installs nothing, names the CPU and its ISA flags,
times the peer on its own 640x640 input and, where our input is smaller (--padding minimal), on ours as well."""

from __future__ import annotations

import json

import pytest
import torch

from yolonas_tools.cli import run_command

pytest.importorskip("openvino")
pytest.importorskip("modern_yolonas", reason="the peer comes with the dev extra (requirements-dev.txt)")


def test_bench_peer_times_the_peer_on_its_input_and_on_ours(tmp_path, capsys):
    argv = ["--peer", "--backends", "openvino", "--padding", "minimal", "--skip-server", "--repeats", "3",
            "--budget", "1", "--threads", str(torch.get_num_threads()), "--store", str(tmp_path)]  # fmt: skip
    assert run_command("bench", argv) == 0
    out = capsys.readouterr().out
    assert "# CPU: " in out and " lacks " in out
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    peers = {(r["where"], tuple(r["input"])): r for r in rows if r["kind"] == "peer"}
    assert set(peers) == {("in process", (640, 640)), ("in process, our input", (384, 640))}
    forward = [r for r in rows if r["kind"] == "forward" and r["backend"] == "openvino"]
    assert {tuple(r["input"]) for r in forward} == {(384, 640)}  # the 1280x720 test picture, minimally padded
    table = out[out.index("vs peer") :].splitlines()
    assert table[1].split()[:3] == ["openvino", "f32", f"{peers['in process', (640, 640)]['ms']:.1f}"]
    assert table[2].startswith("peer f32 on our 640x384 input: ")
