"""A grid's outcome (a Hydra multirun of run.py): one line counting its jobs, and its exit code.

Hydra returns from a multirun with exit code 0 whatever its jobs did, and a job that diverged
returns NaN so that the grid goes on. Each job leaves ``metrics.json`` in its directory (its
status and error, whatever the launcher and wherever it ran), so the launching process counts
them when the grid ends. Torch-free: it runs in the launching process.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("fce")

EXIT_JOBS_FAILED = 1  # as a single run that diverges or fails mid-run
# Keys a run's name shows already (``<dataset>-<model>-s<seed>``).
NAMED_KEYS = ("dataset", "flow", "estimator", "seed")


def job_outcomes(sweep_dir: Path, since: float) -> list[tuple[str, str]]:
    """(job directory name, finished | diverged | failed) of each job this grid started: the
    directories under ``sweep_dir`` whose Hydra files were written at ``since`` or later."""
    found = []
    for hydra_yaml in sorted(sweep_dir.glob("*/.hydra/hydra.yaml")):
        job_dir = hydra_yaml.parent.parent
        if hydra_yaml.stat().st_mtime < since:
            continue  # a job of an earlier grid in the same hydra.sweep.dir
        try:
            outcome = json.loads((job_dir / "metrics.json").read_text())
        except (OSError, ValueError):
            outcome = {}  # the job ended before its run did (or before it existed)
        if outcome.get("status") == "FINISHED":
            found.append((job_dir.name, "finished"))
        elif str(outcome.get("error") or "").startswith("diverged"):
            found.append((job_dir.name, "diverged"))
        else:
            found.append((job_dir.name, "failed"))
    return found


def summary(sweep_dir: Path, outcomes: Sequence[tuple[str, str]]) -> str:
    counts = {kind: sum(1 for _, k in outcomes if k == kind) for kind in ("finished", "failed")}
    diverged = sum(1 for _, k in outcomes if k == "diverged")
    return (
        f"grid of {len(outcomes)} jobs in {sweep_dir}: {counts['finished']} finished, "
        f"{counts['failed']} failed, {diverged} diverged"
    )


class GridOutcome(Callback):
    """At the end of a multirun: the one line, and exit code 1 if any job did not finish."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        marker = sweep_dir / "multirun.yaml"  # written by the sweeper before any job starts
        if not marker.is_file():
            return  # not Hydra's basic sweeper: it knows its own jobs
        outcomes = job_outcomes(sweep_dir, marker.stat().st_mtime)
        line = summary(sweep_dir, outcomes)
        if all(kind == "finished" for _, kind in outcomes):
            log.info("%s", line)
            return
        # The CLI's one-line error, written here: fce.cli imports this module.
        print(f"error: {line}; each job's metrics.json says why", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_JOBS_FAILED)


def swept_values(sweep_dir: Path, job_overrides: Sequence[str]) -> list[str]:
    """The job's ``key=value`` of each key its grid sweeps (read from the grid's
    ``multirun.yaml``), without those a run's name shows already."""
    try:
        grid = OmegaConf.load(sweep_dir / "multirun.yaml")
        arguments = list(grid.hydra.overrides.task)
    except Exception:  # no file (another sweeper), or not Hydra's: no values to add
        return []
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(arguments)
    except Exception:
        return []
    swept = {o.get_key_element() for o in parsed if o.is_sweep_override()}
    values = []
    for override in job_overrides:
        key = re.split(r"=", override, maxsplit=1)[0]
        if key in swept and key.lstrip("+~").split(".")[0] not in NAMED_KEYS:
            values.append(override.lstrip("+"))
    return values
