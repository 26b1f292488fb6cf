"""Regions of README.md and docs/*.md that a command makes from the results a benchmark wrote
(benchmarks/results/, docs/figures/): each stands between

    <!-- NAME: made by `COMMAND` -->
    ...
    <!-- /NAME -->

and is rewritten by the command's ``--write``, never by hand (benchmarks/costs.py: the costs;
benchmarks/tables.py: the results); tests/test_generated_docs.py makes every region again in
memory and compares it with the file.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

MARKER = re.compile(r"<!-- (?P<name>[^:>]+): made by `(?P<command>[^`]+)` -->")


@dataclass(frozen=True)
class Region:
    path: Path
    name: str
    command: str
    make: Callable[[], str]  # the region's text, ending in a newline
    indent: str = ""  # inside a list item: each line of the region, end marker included

    @property
    def begin(self) -> str:
        return f"<!-- {self.name}: made by `{self.command}` -->"

    @property
    def end(self) -> str:
        return f"<!-- /{self.name} -->"

    def block(self) -> str:
        body = "".join(self.indent + line for line in self.make().splitlines(keepends=True))
        return f"{self.begin}\n{body}{self.indent}{self.end}"

    def current(self, text: str) -> str | None:
        """The region as ``text`` holds it, markers included; None without them."""
        if self.begin not in text or self.end not in text:
            return None
        start = text.index(self.begin)
        return text[start : text.index(self.end, start) + len(self.end)]


def write(regions: Sequence[Region], prog: str) -> int:
    """Rewrite every region in its file; 1, saying which, where a file lacks its markers."""
    for region in regions:
        text = region.path.read_text()
        old = region.current(text)
        if old is None:
            print(f"{prog}: error: {region.path.name} has no {region.begin}", file=sys.stderr)
            return 1
        new = region.block()
        if new != old:
            region.path.write_text(text.replace(old, new))
            print(f"{prog}: wrote {region.name} in {region.path.name}")
    return 0
