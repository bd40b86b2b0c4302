"""``yolonas-serve``: every command in ``scripts/`` as a subcommand, as Ultralytics' ``yolo`` does.

    yolonas-serve --help                                  # the commands, each with the first line of its docstring
    yolonas-serve predict assets/sample.jpg --model yolo_nas_s
    yolonas-serve serve start yolo_nas_s                  # the shell commands too (bash scripts/serve.sh ...)

``scripts/`` stays the one list of commands: a Python command runs its own ``main(argv)``, a shell command runs
under bash, with the same arguments and exit status as when called by path.
"""

from __future__ import annotations

import ast
import itertools
import runpy
import subprocess
import sys
from pathlib import Path

from yolonas_tools.paths import SCRIPTS_DIR

SUMMARY_WIDTH = 90  # characters of a command's first sentence in the listing


def commands() -> dict[str, Path]:
    """Command name -> its file in scripts/ (``predict`` -> scripts/predict.py, ``serve`` -> scripts/serve.sh)."""
    files = sorted([*SCRIPTS_DIR.glob("*.py"), *SCRIPTS_DIR.glob("*.sh")])
    return {path.stem: path for path in files}


def summary(path: Path) -> str:
    """The first sentence of a command's docstring (Python) or of its leading comment (shell)."""
    if path.suffix == ".py":
        text = (ast.get_docstring(ast.parse(path.read_text())) or "").split("\n\n")[0]
    else:
        lines = path.read_text().splitlines()[1:]
        text = " ".join(line.lstrip("# ") for line in itertools.takewhile(lambda line: line.startswith("#"), lines))
    sentence = " ".join(text.split()).split(". ")[0].removesuffix(".")
    return sentence if len(sentence) <= SUMMARY_WIDTH else sentence[: SUMMARY_WIDTH - 3].rsplit(" ", 1)[0] + " ..."


def run_command(name: str, argv: list[str]) -> int:
    """Run a command of scripts/ with ``argv`` in this process (Python) or under bash (shell); its exit status."""
    path = commands()[name]
    if path.suffix == ".sh":
        return subprocess.call(["bash", str(path), *argv])
    return runpy.run_path(str(path), run_name=f"yolonas_serve_{name}")["main"](argv)


def usage() -> str:
    found = commands()
    width = max(map(len, found))
    lines = [f"  {name:<{width}}  {summary(path)}" for name, path in found.items()]
    return "usage: yolonas-serve COMMAND [ARGS ...]   (yolonas-serve COMMAND --help for its flags)\n\ncommands:\n" + (
        "\n".join(lines)
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] not in commands():
        print(f"yolonas-serve: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return run_command(argv[0], argv[1:])
