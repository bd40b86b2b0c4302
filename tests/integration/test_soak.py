"""A short soak with scripts/soak.py against the session TorchServe: no errors, no restarts, bounded memory growth.
The ten-minute version is run by hand (see README, "Load and soak")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO

MINUTES = 1  # the README's CI soak: many full batches on a 2-core CPU; the bound below is generous on purpose
MAX_GROWTH_MB = 300


def test_short_soak_has_no_errors_and_no_memory_growth(endpoints, reference_dir: Path, tmp_path: Path):
    report_file = tmp_path / "soak.json"
    image = reference_dir / "images" / "img_b_h800_w600.png"
    command = [sys.executable, str(REPO / "scripts" / "soak.py"), "--model", "yolo_nas_s", "--minutes", str(MINUTES),
               "--concurrency", "2", "--image", str(image), "--sample-every", "10", "--json", str(report_file),
               "--run-dir", str(endpoints.run_dir)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "latency ms: p50" in done.stdout and "worker RSS MB" in done.stdout

    report = json.loads(report_file.read_text())
    assert report["errors"] == {} and not report["workers_restarted"]
    assert report["served"] >= 2 and report["requests_per_s"] > 0
    latency = report["latency_ms"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
    memory = report["memory"]
    assert len(memory) >= 3 and memory[0]["workers_mb"] > 100  # a loaded YOLO-NAS S worker, not a stray process
    assert abs(report["growth_mb"]["workers"]) < MAX_GROWTH_MB, memory
    assert abs(report["growth_mb"]["workers_trend"]) < MAX_GROWTH_MB, memory
    assert report["growth_mb"]["frontend"] is not None and report["growth_mb"]["frontend"] < MAX_GROWTH_MB
