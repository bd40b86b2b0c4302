"""The documentation site builds without a single warning (every page in the navigation, every link and anchor
resolved, every README section the site includes present), and the README's own links lead somewhere."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from helpers import REPO


def test_the_site_builds_strictly_without_warnings(tmp_path: Path):
    site = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)], cwd=REPO,
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    warnings = [line for line in output.splitlines() if re.match(r"\s*(WARNING|ERROR)\b", line)]
    assert not warnings, "\n".join(warnings)
    pages = {path.relative_to(site).as_posix() for path in site.rglob("index.html")}
    expected = {"index.html"} | {
        f"{page.stem}/index.html" for page in (REPO / "docs").glob("*.md") if page.stem != "index"
    }
    assert expected <= pages, sorted(expected - pages)


def _anchors(page: Path) -> set[str]:
    """Heading ids as MkDocs makes them (Python-Markdown's slugify); the same as GitHub's for headings of words,
    digits, hyphens and spaces."""
    anchors = set()
    for heading in re.findall(r"^#{1,6} (.+?)\s*$", page.read_text(), flags=re.M):
        text = re.sub(r"[^\w\s-]", "", heading.replace("`", "")).strip().lower()
        anchors.add(re.sub(r"[-\s]+", "-", text))
    return anchors


def test_the_readme_links_lead_to_pages_and_headings_that_exist():
    readme = REPO / "README.md"
    links = re.findall(r"\]\(([^)\s]+)\)", readme.read_text())
    local = [link for link in links if not link.startswith(("http://", "https://"))]
    assert any(link.startswith("docs/") for link in local)
    for link in local:
        path, _, anchor = link.partition("#")
        target = REPO / path if path else readme
        assert target.exists(), f"README links to {link}: no such file"
        if anchor:
            assert anchor in _anchors(target), f"README links to {link}: no such heading"
