"""Keep the README true: every script command it shows exists and accepts its flags, and its first command works."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from helpers import REPO

README = (REPO / "README.md").read_text()
COMMAND = re.compile(r"^\s*(?:#\s*)?(python|bash) (scripts/[\w.]+)(.*)$")


def readme_commands() -> list[tuple[str, str, str]]:
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.splitlines():
            match = COMMAND.match(line.split("  #")[0])
            if match:
                commands.append(match.groups())
    return commands


def test_the_readme_starts_with_the_two_commands():
    first_block = re.search(r"```bash\n(.*?)```", README, flags=re.S).group(1).strip().splitlines()
    assert [line.split("#")[0].strip() for line in first_block] == [
        "bash scripts/quickstart.sh",
        "bash scripts/test.sh",
    ]
    assert "bash scripts/test.sh" in (REPO / ".ci" / "run").read_text()


@pytest.mark.parametrize("runner, script, rest", readme_commands(), ids=lambda v: str(v)[:40])
def test_readme_command_exists_and_takes_its_flags(runner, script, rest):
    path = REPO / script
    assert path.is_file(), f"README names {script}, which does not exist"
    if runner == "bash":
        return
    flags = set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", rest))
    if not flags:
        return
    result = subprocess.run([sys.executable, str(path), *_subcommand(rest), "--help"], capture_output=True, text=True,
                            timeout=120, cwd=REPO)  # fmt: skip
    assert result.returncode == 0, result.stderr
    missing = {flag for flag in flags if flag not in result.stdout}
    assert not missing, f"{script} does not take {sorted(missing)}"


def _subcommand(rest: str) -> list[str]:
    """grpc_client.py-style subcommands come first."""
    first = rest.split()[0] if rest.split() else ""
    return [first] if re.fullmatch(r"[a-z]+", first) and first not in ("all",) else []


@pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java")
def test_quickstart_serves_the_sample_and_prints_detections():
    """The README's first command, as a user runs it (offline here: it falls back to random weights)."""
    try:
        result = subprocess.run(["bash", "scripts/quickstart.sh"], cwd=REPO, capture_output=True, text=True,
                                timeout=1200, env={**os.environ, "YOLONAS_RUN_DIR": str(REPO / "run")})  # fmt: skip
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        assert "assets/sample.jpg (960x640):" in result.stdout and "detections from yolo_nas_s" in result.stdout
        assert "OFFLINE" in result.stderr or "sha256" in result.stdout
    finally:
        subprocess.run(["bash", "scripts/serve.sh", "stop"], cwd=REPO, capture_output=True, timeout=120)
