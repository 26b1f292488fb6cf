"""Open the MLflow UI on a run of the suite in a real headless browser, and check what it shows.

    analysis/install_chromium.sh          # once: Debian's chromium (apt-get, as root)
    python analysis/ui_check.py           # about a minute; exit 0 when every check passes
    python analysis/ui_check.py --keep ui-check/   # also keep the screenshots and the DOMs

In a temp dir: one short run (experiment=smoke) into a temp SQLite store, then `mlflow server`
on that store, then chromium --headless loads two pages of it:

- the link the suite gives (``/#/experiments/<id>?workflowType=machine_learning``): it must
  show the runs table with the run's name and the model-training side bar, and none of the
  GenAI view's panels (traces, token usage, judges);
- the bare experiment page (``/#/experiments/<id>``), as a first visit with a fresh browser
  profile sees it: reported, not checked (docs/reliability.md says what it showed: the
  GenAI | Model training switch of the side bar, not the experiment's
  ``mlflow.experimentKind`` tag, decides, from the link's ``workflowType`` or from what the
  browser last chose).

Also checked: the experiment carries ``mlflow.experimentKind=custom_model_development``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from analysis.loader import ROOT

KIND = ("mlflow.experimentKind", "custom_model_development")
# Text that only the GenAI view renders, and text of the runs view.
GENAI_MARKERS = ("Token Usage", "Judges", "Sessions", "Playground", "Tokens per Trace")
RUNS_MARKERS = ("Runs", "Model registry", "matching run")
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def page_text(html: str) -> str:
    """The visible text of a dumped DOM, whitespace collapsed."""
    html = re.sub(r"<(script|style)\b.*?</\1>", " ", html, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html)).strip()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, server: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {server.returncode}")
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2).close()
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"mlflow server at {url} not up after {timeout_s:.0f} s")


def browse(browser: str, url: str, out: Path, name: str, budget_ms: int) -> str:
    """Load ``url`` headless (fresh profile): save ``<name>.png`` and return the DOM's text."""
    common = [
        browser,
        "--headless",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--window-size=1400,900",
        f"--virtual-time-budget={budget_ms}",  # let the app fetch and render before the dump
        f"--user-data-dir={out / f'profile-{name}'}",  # a first visit: nothing remembered
    ]
    if os.geteuid() == 0:
        common.append("--no-sandbox")  # chromium refuses to run as root with its sandbox
    shot = f"--screenshot={out / f'{name}.png'}"
    dom = subprocess.run(
        [*common, shot, "--dump-dom", url], capture_output=True, text=True, timeout=120
    )
    if dom.returncode != 0:
        raise RuntimeError(f"{browser} exited with {dom.returncode}: {dom.stderr[-500:]}")
    (out / f"{name}.html").write_text(dom.stdout)
    return page_text(dom.stdout)


def check(browser: str, out: Path, budget_ms: int) -> list[tuple[str, bool]]:
    """Make the run, serve the store, load the pages; (what was checked, passed) pairs."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{out / 'mlflow.db'}"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "run.py"),
            "experiment=smoke",
            "progress=none",
            f"tracking.uri={uri}",
            f"hydra.run.dir={out / 'run'}",
        ],
        cwd=out,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if run.returncode != 0:
        raise RuntimeError(f"run.py exited with {run.returncode}: {run.stderr[-500:]}")
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("fce")
    (logged,) = client.search_runs([experiment.experiment_id])
    results = [(f"experiment tagged {'='.join(KIND)}", experiment.tags.get(KIND[0]) == KIND[1])]

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    serve = ["server", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", *serve, "--workers", "1"],
        cwd=out,
        stdout=subprocess.DEVNULL,
        stderr=open(out / "server.log", "w"),  # noqa: SIM115 (closed with the process)
        start_new_session=True,
    )
    try:
        wait_healthy(base, server, timeout_s=120)
        link = f"{base}/#/experiments/{experiment.experiment_id}?workflowType=machine_learning"
        text = browse(browser, link, out, "runs-view", budget_ms)
        genai = [m for m in GENAI_MARKERS if m in text]
        results += [
            (f"{link} lists the run {logged.info.run_name!r}", logged.info.run_name in text),
            (f"... shows the runs view {RUNS_MARKERS}", all(m in text for m in RUNS_MARKERS)),
            (f"... shows no GenAI panel (found: {genai or 'none'})", not genai),
        ]
        bare = f"{base}/#/experiments/{experiment.experiment_id}"
        text = browse(browser, bare, out, "first-visit", budget_ms)
        seen = "the GenAI overview" if any(m in text for m in GENAI_MARKERS) else "the runs view"
        print(f"info: {bare} on a first visit shows {seen}")
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="keep screenshots, DOMs and the store here")
    parser.add_argument("--browser", help=f"the browser (default: the first of {BROWSERS})")
    parser.add_argument(
        "--budget-ms", type=int, default=20_000, help="virtual time for the page to render"
    )
    args = parser.parse_args(argv)
    browser = args.browser or next((b for b in BROWSERS if shutil.which(b)), None)
    if browser is None or not shutil.which(browser):
        print(
            f"error: --browser {browser or ''}: no such program; install Debian's chromium "
            "with analysis/install_chromium.sh, or name one with --browser",
            file=sys.stderr,
        )
        return 2
    if args.budget_ms < 1000:
        print(f"error: --budget-ms {args.budget_ms}: at least 1000", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="fce-ui-check-") as tmp:
        out = args.keep.resolve() if args.keep else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        results = check(browser, out, args.budget_ms)
    for what, passed in results:
        print(f"{'ok' if passed else 'FAILED'}: {what}")
    if args.keep:
        print(f"screenshots and DOMs in {out}")
    return 0 if all(passed for _, passed in results) else 1


if __name__ == "__main__":
    sys.exit(main())
