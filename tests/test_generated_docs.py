"""Every table of README.md and docs/*.md that a command makes from benchmark results
(analysis.regions) is what that command makes now: none retyped, none stale."""

from __future__ import annotations

import importlib.util
import re

import pytest

from analysis.regions import MARKER, Region
from tests.helpers import ROOT


def script(name: str):
    # The commands are scripts, not modules: loaded by path.
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The commands that make regions: each lists its own in REGIONS.
SCRIPTS = ("costs", "dimension", "speed", "tables", "whole_run")
REGIONS: list[Region] = [region for name in SCRIPTS for region in script(name).REGIONS]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("region", REGIONS, ids=lambda r: f"{r.path.name}:{r.name}")
def test_the_page_holds_what_the_results_make(region):
    # A rerun benchmark changes its results: its command's --write then (the region's marker
    # names it).
    assert region.current(region.path.read_text()) == region.block()


def test_every_marked_region_is_checked_here():
    known = {(r.path, r.begin) for r in REGIONS}
    unchecked = [
        f"{page.name}: {match.group(0)}"
        for page in PAGES
        for match in MARKER.finditer(page.read_text())
        if (page, match.group(0)) not in known
    ]
    # Each needs an analysis.regions.Region in its command's REGIONS, and the command in SCRIPTS.
    assert unchecked == []
    assert len(known) == len(REGIONS)  # no region twice


def test_write_replaces_only_its_regions(tmp_path):
    from analysis.regions import write

    page = tmp_path / "page.md"
    region = Region(page, "numbers", "python make.py --write", lambda: "| 1 |\n| 2 |\n")
    page.write_text(f"before\n{region.begin}\n| stale |\n{region.end}\nafter\n")
    assert write([region], "make.py") == 0
    assert page.read_text() == f"before\n{region.begin}\n| 1 |\n| 2 |\n{region.end}\nafter\n"
    listed = Region(page, "list", "python make.py --write", lambda: "| 3 |\n", indent="  ")
    page.write_text(f"- item:\n\n  {listed.begin}\n  | old |\n  {listed.end}\n")
    assert write([listed], "make.py") == 0
    assert page.read_text() == f"- item:\n\n  {listed.begin}\n  | 3 |\n  {listed.end}\n"
    page.write_text("no markers\n")
    assert write([region], "make.py") == 1
    assert re.fullmatch(r"no markers\n", page.read_text())
