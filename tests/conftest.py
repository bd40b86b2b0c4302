"""Shared fixtures: the reference data in ../shared (skipped where absent), seeded checkpoints made on the fly,
archives, and real TorchServe servers on free ports in temporary folders. Helpers tests import live in helpers.py.

The skip policy lives here too: every run ends with its skips counted and grouped by reason, and under ``CI=true``
a skip fails the run unless its reason names CUDA (CI has no GPU; everything else it is meant to have)."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest
import torch

from helpers import REFERENCE, SHAPES, build_archive, require
from yolonas import save_random_checkpoint
from yolonas_tools.serve import server
from yolonas_tools.serve.clients import Endpoints

torch.set_num_threads(2)

# -- skip policy ----------------------------------------------------------------------------------------------------

ON_CI = os.environ.get("CI", "").lower() == "true"
#  Every skip of the run as (reason, allowed under CI), collection-time skips included.
SKIPS = pytest.StashKey[list[tuple[str, bool]]]()


def skip_reason(report: pytest.CollectReport | pytest.TestReport) -> str:
    """The reason pytest recorded for a skip: its longrepr is (path, line, "Skipped: reason")."""
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return reason.removeprefix("Skipped: ")


def allowed_on_ci(reason: str) -> bool:
    return "cuda" in reason.lower()


def record_skip(config: pytest.Config, reason: str) -> bool:
    """Note the skip; whether it may stay a skip."""
    allowed = not ON_CI or allowed_on_ci(reason)
    config.stash.setdefault(SKIPS, []).append((reason, allowed))
    return allowed


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Under CI=true a test's skip (setup or call: a fixture's require(), importorskip, a skipif mark) becomes its
    failure, with the reason it would have skipped for."""
    report = yield
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = skip_reason(report)
        if not record_skip(item.config, reason):
            report.outcome = "failed"
            report.longrepr = f"skipped under CI=true, where only a missing CUDA device may skip: {reason}"
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    """A module skipped as a whole (a module-level importorskip) stays a skip in its report, since a failed
    collection would stop the whole run; pytest_sessionfinish fails the run for it instead."""
    report = yield
    if report.skipped:
        record_skip(collector.config, skip_reason(report))
    return report


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    refused = [reason for reason, allowed in session.config.stash.get(SKIPS, []) if not allowed]
    if refused and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """How many tests were skipped and why, grouped by reason, on every run (CI's log shows what it did not test)."""
    skips = config.stash.get(SKIPS, [])
    terminalreporter.write_sep("=", f"{len(skips)} skipped" + (" (CI=true)" if ON_CI else ""))
    for (reason, allowed), count in Counter(skips).most_common():
        verdict = "" if allowed else "  [fails the run: CI=true allows only CUDA skips]"
        terminalreporter.write_line(f"{count:5d} x {reason}{verdict}")
    refused = sum(not allowed for _, allowed in skips)
    if refused:
        terminalreporter.write_line(f"{refused} of these skips fail the run: CI=true allows only CUDA skips", red=True)


# -- fixtures -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return require(REFERENCE)


@pytest.fixture(scope="session")
def shapes_dir() -> Path:
    return require(SHAPES)


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """make(variant, num_classes=80, seed=0) -> path of a seeded {"net": sd} checkpoint, cached for the session."""
    folder = tmp_path_factory.mktemp("checkpoints")
    made: dict[tuple, Path] = {}

    def make(variant: str = "s", num_classes: int = 80, seed: int = 0) -> Path:
        key = (variant, num_classes, seed)
        if key not in made:
            made[key] = save_random_checkpoint(
                folder / f"{variant}_{num_classes}_{seed}.pth", variant, num_classes, seed
            )
        return made[key]

    return make


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model_store")


@pytest.fixture(scope="session")
def s_archive(random_checkpoint, model_store: Path) -> Path:
    """YOLO-NAS S with seeded random weights, archived as yolo_nas_s.mar."""
    return build_archive(random_checkpoint("s"), model_store, "yolo_nas_s")


@pytest.fixture(scope="session")
def ts_server(tmp_path_factory: pytest.TempPathFactory, model_store: Path, s_archive: Path):
    """One TorchServe for the session, shipped config on free ports, yolo_nas_s registered."""
    run_dir = tmp_path_factory.mktemp("run")
    endpoints = server.start(run_dir, model_store, models=["yolo_nas_s"], ports=server.free_ports())
    yield endpoints
    server.stop(run_dir)


@pytest.fixture
def endpoints(ts_server: Endpoints) -> Endpoints:
    return ts_server
