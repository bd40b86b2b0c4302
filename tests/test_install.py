"""The repository is installed in editable mode (scripts/setup.sh): its packages import from any folder, and a
worker still imports ``yolonas`` and ``yolonas_serving`` from its archive, not from the checkout. Under ``CI=true``
the suite's conftest.py fails a run that skips for anything but a missing CUDA device, so CI proves the installation
complete."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

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


# -- the suite's skip policy (tests/conftest.py) --------------------------------------------------------------------

SKIPPING_TESTS = """
import pytest
from helpers import require


def test_runs():
    pass


@pytest.mark.skipif(True, reason="no CUDA device")
def test_needs_a_gpu():
    pass


def test_needs_a_missing_module():
    pytest.importorskip("no_such_module_for_the_skip_policy")


def test_needs_reference_data(tmp_path):
    require(tmp_path / "absent")
"""
SKIPPED_MODULE = """
import pytest

pytest.importorskip("another_missing_module")


def test_never_collected():
    pass
"""


@pytest.fixture
def run_suite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    """run(ci, *args) -> (exit code, output): pytest, in this process, on the two files above under a copy of this
    suite's conftest.py, with or without CI=true (in process: a subprocess would spend seconds importing torch)."""
    for name in ("conftest.py", "helpers.py"):
        shutil.copy(REPO / "tests" / name, tmp_path / name)
    (tmp_path / "test_skipping.py").write_text(SKIPPING_TESTS)
    (tmp_path / "test_skipped_module.py").write_text(SKIPPED_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PYTEST_ADDOPTS", raising=False)  # the outer run's options (-x, say) would change the counts
    # The inner run imports its conftest and test files by bare name and puts tmp_path on sys.path: put back ours.
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setitem(sys.modules, "conftest", sys.modules["conftest"])

    def run(ci: bool, *args: str) -> tuple[int, str]:
        if ci:
            monkeypatch.setenv("CI", "true")
        else:
            monkeypatch.delenv("CI", raising=False)
        code = pytest.main(["-p", "no:cacheprovider", "-s", "-rA", *args])
        for name, module in list(sys.modules.items()):
            if tmp_path in Path(getattr(module, "__file__", None) or "/").parents:
                del sys.modules[name]  # imported afresh by the next run, with its own CI setting
        return code, capsys.readouterr().out

    return run


def test_under_ci_a_skip_fails_unless_it_is_for_cuda(run_suite):
    code, out = run_suite(True, "test_skipping.py")
    assert code == pytest.ExitCode.TESTS_FAILED, out
    assert "PASSED test_skipping.py::test_runs" in out
    assert re.search(r"SKIPPED \[1\] test_skipping.py:\d+: no CUDA device", out), out
    only_cuda = "skipped under CI=true, where only a missing CUDA device may skip"
    assert (f"FAILED test_skipping.py::test_needs_a_missing_module - {only_cuda}: could not import "
            "'no_such_module_for_the_skip_policy'") in out  # fmt: skip
    assert f"FAILED test_skipping.py::test_needs_reference_data - {only_cuda}: reference data not found" in out
    assert "2 failed, 1 passed, 1 skipped" in out


def test_under_ci_a_module_skipped_at_collection_fails_the_run(run_suite):
    code, out = run_suite(True, "test_skipped_module.py", "test_skipping.py", "-k", "runs or gpu")
    assert code == pytest.ExitCode.TESTS_FAILED, out
    assert "1 passed, 2 skipped, 2 deselected" in out
    summary = out.split("= 2 skipped (CI=true) =", 1)[1].splitlines()
    assert "    1 x no CUDA device" in summary
    assert ("    1 x could not import 'another_missing_module': No module named 'another_missing_module'  [fails the "
            "run: CI=true allows only CUDA skips]") in summary  # fmt: skip
    assert "1 of these skips fail the run: CI=true allows only CUDA skips" in summary


def test_without_ci_skips_pass_and_are_summed_up_by_reason(run_suite):
    code, out = run_suite(False)
    assert code == pytest.ExitCode.OK, out
    summary = out.split("= 4 skipped =", 1)[1].splitlines()
    assert "    1 x no CUDA device" in summary
    assert "    1 x could not import 'another_missing_module': No module named 'another_missing_module'" in summary
    assert not [line for line in summary if "fails the run" in line]
