"""The scripts and notebooks import the installed package: no sys.path edits, and each script
starts from any directory, as `python <script>` with the project's environment."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.helpers import HANG_GUARD_S, ROOT

SCRIPTS = sorted(
    str(p.relative_to(ROOT))
    for folder in ("analysis", "benchmarks", "sweeps")
    for p in (ROOT / folder).glob("*.py")
    if p.name != "__init__.py" and "__main__" in p.read_text()
)
NOT_YET: set[str] = set()  # every script imports the installed package


def test_no_file_edits_sys_path():
    files = [
        p
        for pattern in ("*.py", "*.ipynb")
        for p in ROOT.rglob(pattern)
        if not {".venv", "multirun", "outputs", ".git"} & set(p.relative_to(ROOT).parts)
    ]
    assert len(files) > 20
    edit = re.compile(r"sys\.path\.(insert|append|extend)|sys\.path\s*\+?=")
    editing = sorted(str(p.relative_to(ROOT)) for p in files if edit.search(p.read_text()))
    assert set(editing) <= NOT_YET, editing


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s not in NOT_YET])
def test_script_starts_from_another_directory(script, tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / script), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage:")
