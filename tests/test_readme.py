"""Keep the README and the docs true: every script command they show exists and accepts its flags, the README keeps
its shape, and its first command works."""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import runpy
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from helpers import REPO

README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
COMMAND = re.compile(r"^\s*(?:#\s*)?(python|bash) (scripts/[\w.]+)(.*)$")
#  serve.sh passes its arguments on to server.py, so its flags are server.py's.
FLAGS_OF = {"scripts/serve.sh": "scripts/server.py"}


def commands_in(page: Path) -> list:
    """One pytest param (page, runner, script, the rest of the line) per script command in the page's ```bash
    blocks, named after the page and line."""
    commands, in_bash = [], False
    name = page.relative_to(REPO).as_posix()
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if line.startswith("```"):
            in_bash = not in_bash and line.strip() == "```bash"
            continue
        match = COMMAND.match(line.split("  #")[0]) if in_bash else None
        if match:
            commands.append(pytest.param(name, *match.groups(), id=f"{name}:{number}"))
    return commands


ALL_COMMANDS = [command for page in [README, *DOCS] for command in commands_in(page)]


@functools.cache
def help_text(script: str, subcommand: str | None) -> str:
    """``script [subcommand] --help``, once per session for each pair, in this process: the scripts' imports are
    the tests' own, so it takes milliseconds instead of a new interpreter's seconds."""
    argv = [*([subcommand] if subcommand else []), "--help"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(REPO / script), run_name=f"help_of_{Path(script).stem}")["main"](argv)
    assert exit_.value.code in (0, None), f"{script} {' '.join(argv)} exited with {exit_.value.code}"
    return printed.getvalue()


def test_the_readme_starts_with_the_two_commands():
    text = README.read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, flags=re.S)
    assert text.index("```bash") < text.index("\n## "), "the two commands come before any section"
    assert [line.split("#")[0].strip() for line in first_block.group(1).strip().splitlines()] == [
        "bash scripts/quickstart.sh",
        "bash scripts/test.sh",
    ]
    assert "bash scripts/test.sh" in (REPO / ".ci" / "run").read_text()


def test_the_readme_stays_a_front_page_with_the_options_table_between_its_markers():
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    start, end = "<!-- options-table:start -->", "<!-- options-table:end -->"
    assert text.count(start) == 1 and text.count(end) == 1
    table = text[text.index(start) + len(start) : text.index(end)].strip().splitlines()
    assert table[0].startswith("| option |") and all(line.startswith("|") for line in table)


def test_every_page_shows_commands():
    pages = {param.values[0] for param in ALL_COMMANDS}
    assert "README.md" in pages and len(pages) >= 5, pages


@pytest.mark.parametrize("page, runner, script, rest", ALL_COMMANDS)
def test_command_exists_and_takes_its_flags(page, runner, script, rest):
    assert (REPO / script).is_file(), f"{page} names {script}, which does not exist"
    flags = set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", rest))
    if not flags or (runner == "bash" and script not in FLAGS_OF):
        return
    target = FLAGS_OF.get(script, script)
    usage = help_text(target, _subcommand(rest))
    missing = {flag for flag in flags if flag not in usage}
    assert not missing, f"{page}: {target} does not take {sorted(missing)}"


def _subcommand(rest: str) -> str | None:
    """grpc_client.py- and server.py-style subcommands come first."""
    first = rest.split()[0] if rest.split() else ""
    return first if re.fullmatch(r"[a-z]+", first) and first not in ("all",) else None


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java")
def test_quickstart_serves_the_sample_and_prints_detections(tmp_path: Path):
    """The README's first command, as a user runs it, beside whatever server runs from run/: its own run folder,
    model store and free ports. No network: pip stays on what is installed, and downloads go to a closed port, so
    weights already in weights/ are used and otherwise the quickstart falls back to random weights."""
    closed = "http://127.0.0.1:9"  # the discard port: nothing listens there
    env = {
        **os.environ,
        "YOLONAS_RUN_DIR": str(tmp_path / "run"),
        "YOLONAS_MODEL_STORE": str(tmp_path / "model_store"),
        "YOLONAS_PORTS": " ".join(map(str, _free_ports(5))),
        "PIP_NO_INDEX": "1",
        "PIP_NO_BUILD_ISOLATION": "0",  # pip reads this as --no-build-isolation: setuptools from .venv
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        **{name: closed for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")},
        **{name: "127.0.0.1,localhost" for name in ("NO_PROXY", "no_proxy")},
    }
    try:
        result = subprocess.run(["bash", "scripts/quickstart.sh"], cwd=REPO, capture_output=True, text=True,
                                timeout=1200, env=env)  # fmt: skip
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        assert "assets/sample.jpg (960x640):" in result.stdout and "detections from yolo_nas_s" in result.stdout
        assert "OFFLINE" in result.stderr or "sha256" in result.stdout
        assert f"inference http://127.0.0.1:{env['YOLONAS_PORTS'].split()[0]}" in result.stdout
        assert (tmp_path / "model_store" / "yolo_nas_s.mar").is_file()
    finally:
        subprocess.run(["bash", "scripts/serve.sh", "stop"], cwd=REPO, capture_output=True, timeout=120, env=env)
