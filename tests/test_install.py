"""The repository is installed in editable mode (scripts/setup.sh): its packages import from any folder, and a
worker still imports ``yolonas`` and ``yolonas_serving`` from its archive, not from the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from helpers import REPO

WHERE = (
    "import yolonas, yolonas_serving, yolonas_tools as t; print(yolonas.__file__, yolonas_serving.__file__, t.__file__)"
)


def _where(cwd: Path, pythonpath: str = "") -> list[Path]:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    result = subprocess.run([sys.executable, "-c", WHERE], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [Path(path) for path in result.stdout.split()]


def test_packages_import_from_any_folder(tmp_path: Path):
    assert _where(tmp_path) == [
        REPO / "handler" / "yolonas" / "__init__.py",
        REPO / "handler" / "yolonas_serving" / "__init__.py",
        REPO / "yolonas_tools" / "__init__.py",
    ]


def test_a_worker_imports_the_packages_its_archive_carries(s_archive: Path, tmp_path: Path):
    """TorchServe puts the extracted archive on the worker's PYTHONPATH; the editable install's finder comes after
    every sys.path entry, so the archive's copies win."""
    with zipfile.ZipFile(s_archive) as archive:
        archive.extractall(tmp_path / "model")
    yolonas, serving, _ = _where(tmp_path, pythonpath=str(tmp_path / "model"))
    assert yolonas == tmp_path / "model" / "yolonas" / "__init__.py"
    assert serving == tmp_path / "model" / "yolonas_serving" / "__init__.py"


def test_yolonas_serve_lists_every_command_and_runs_them(tmp_path: Path):
    """The console entry point: one subcommand per file of scripts/, run with the command's own flags."""
    command = str(Path(sys.executable).parent / "yolonas-serve")
    listing = subprocess.run([command, "--help"], capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0, listing.stderr
    listed = {line.split()[0] for line in listing.stdout.splitlines() if line.startswith("  ")}
    assert listed == {path.stem for path in (REPO / "scripts").iterdir() if path.suffix in (".py", ".sh")}
    out = tmp_path / "w.pth"
    made = subprocess.run([command, "make_random_weights", "--variant", "s", "--out", str(out)], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert made.returncode == 0 and out.is_file(), made.stderr
    unknown = subprocess.run([command, "no_such_command"], capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 2 and "unknown command 'no_such_command'" in unknown.stderr
