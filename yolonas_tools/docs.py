"""The tables the docs show that code already holds: the request options (``yolonas_serving.options``) and the
backends (``yolonas_serving.backends``), rendered as markdown between markers in the README and docs pages
(``<!-- NAME:start -->`` ... ``<!-- NAME:end -->``), so that the docs never disagree with the code
(``scripts/docs_tables.py`` writes them, a test checks them)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from yolonas_serving.backends import BACKENDS
from yolonas_serving.options import OPTIONS, TileSize
from yolonas_tools.paths import REPO


def options_table() -> str:
    rows = ["| option | header | default | allowed | meaning |", "|---|---|---|---|---|"]
    for name, option in OPTIONS.items():
        shown = option.kind.to_config(option.default)
        default = "-" if option.default is None and not isinstance(option.kind, TileSize) else shown
        default = str(default).lower() if isinstance(default, bool) else default
        archive = "" if option.archive else " (per request only)"
        rows.append(f"| `{name}` | `{option.header}` | `{default}` | {option.kind.allowed} | {option.doc}{archive} |")
    return "\n".join(rows)


def backends_table() -> str:
    rows = [
        "| backend | runs | archive holds | default padding | calibration | what it is |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in BACKENDS.items():
        files = ", ".join(f"`{f}`" for f in row.files)
        padding = "minimal" if row.minimal_padding else "fixed"
        calibration = "yes" if row.needs_calibration else ""
        rows.append(
            f"| `{name}` | {row.family}, {row.precision} | {files} | {padding} | {calibration} | {row.summary} |"
        )
    return "\n".join(rows)


#  Which table goes where.
TABLES: dict[str, tuple[Path, Callable[[], str]]] = {
    "options-table": (REPO / "README.md", options_table),
    "backends-table": (REPO / "docs" / "configuration.md", backends_table),
}


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def filled(text: str, name: str, table: str) -> str:
    """``text`` with the table between its markers replaced by ``table``."""
    start, end = _markers(name)
    if start not in text or end not in text:
        raise ValueError(f"the markers {start} and {end} are missing")
    before, rest = text.split(start, 1)
    _, after = rest.split(end, 1)
    return f"{before}{start}\n{table}\n{end}{after}"


def stale_tables() -> list[str]:
    """The tables whose file does not show what the code holds now."""
    return [
        name for name, (path, render) in TABLES.items() if filled(path.read_text(), name, render()) != path.read_text()
    ]


def write_tables() -> list[Path]:
    """Write every table into its file; the files changed."""
    changed = []
    for name, (path, render) in TABLES.items():
        text = path.read_text()
        new = filled(text, name, render())
        if new != text:
            path.write_text(new)
            changed.append(path)
    return changed
