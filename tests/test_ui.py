"""The MLflow UI: the suite's experiments are tagged as model training, and a real headless
browser shows the runs table on the link the suite gives (analysis/ui_check.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.helpers import HANG_GUARD_S, ROOT, store_uri

KIND = ("mlflow.experimentKind", "custom_model_development")


def test_a_new_experiment_is_tagged_as_model_training(tmp_path):
    from mlflow.tracking import MlflowClient

    from fce.tracking import MLflowTracker

    uri = store_uri(tmp_path)
    tracker = MLflowTracker(uri, "fresh")
    tracker.finish("FINISHED")
    tags = MlflowClient(tracking_uri=uri).get_experiment_by_name("fresh").tags
    assert tags.get(KIND[0]) == KIND[1]


def test_an_existing_experiment_gets_the_tag_and_a_chosen_kind_is_kept(tmp_path):
    from mlflow.tracking import MlflowClient

    from fce.tracking import MLflowTracker

    uri = store_uri(tmp_path)
    client = MlflowClient(tracking_uri=uri)
    client.create_experiment("old")  # made by an older fce: no kind
    client.create_experiment("mine", tags={KIND[0]: "genai_development"})  # the user's choice
    for name in ("old", "mine"):
        MLflowTracker(uri, name).finish("FINISHED")
    assert client.get_experiment_by_name("old").tags.get(KIND[0]) == KIND[1]
    assert client.get_experiment_by_name("mine").tags.get(KIND[0]) == "genai_development"


BROWSER = next(
    (b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None
)


@pytest.mark.slow
@pytest.mark.skipif(BROWSER is None, reason="no chromium: run analysis/install_chromium.sh")
def test_the_ui_opens_on_the_runs_table_in_a_headless_browser(tmp_path):
    done = subprocess.run(
        [sys.executable, "analysis/ui_check.py", "--keep", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert sum(line.startswith("ok: ") for line in lines) == 4, done.stdout
    assert (tmp_path / "runs-view.png").stat().st_size > 10_000
    assert "matching run" in (tmp_path / "runs-view.html").read_text()


def test_ui_check_names_a_missing_browser_in_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "analysis/ui_check.py", "--browser", "no-such-browser"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "error: --browser no-such-browser: no such program; install Debian's chromium with "
        "analysis/install_chromium.sh, or name one with --browser"
    )
