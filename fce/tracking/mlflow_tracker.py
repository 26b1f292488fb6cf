"""The MLflow tracker: one MLflow run per FCE run. The only module that imports mlflow."""

from __future__ import annotations

import functools
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from fce.errors import first_line
from fce.tracking.housekeeping import (
    MLFLOW_TABLES,
    process_identity,
    reconcile_dead_runs,
    sqlite_tables,
    store_lock,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger("fce")

PROBE_TIMEOUT_S = 5.0
# MLflow 3 opens an experiment without this tag in its GenAI view (traces, judges); with it,
# on runs and charts.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
MAX_EXPERIMENT_NAME = 500  # MLflow's limit (mlflow.utils.validation)
# MLflow's HTTP client retries a failed request 7 times with pauses that grow to minutes, and
# waits 120 s for each answer: a tracking server that dies mid-run would hold training for
# about 8 minutes. These bounds apply unless the user sets the variables.
HTTP_BOUNDS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}


class TrackingError(ValueError):
    """The MLflow store cannot be opened, or the run to resume is not in it."""


class TrackingFault(RuntimeError):
    """The store failed while the run was writing to it (locked, full, its server gone)."""


def bound_http_retries() -> None:
    """Apply ``HTTP_BOUNDS`` where the environment does not set them already."""
    for name, value in HTTP_BOUNDS.items():
        os.environ.setdefault(name, value)


def _quiet_store_errors() -> None:
    """MLflow's SQL store logs each failed query with its SQL, its parameters and a traceback
    before raising; the suite reports the failure itself, in one line."""
    store_log = logging.getLogger("mlflow.store.db.utils")
    if not any(isinstance(f, _BelowError) for f in store_log.filters):
        store_log.addFilter(_BelowError())


class _BelowError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


def tracking_uri(configured: str | None, project_root: Path) -> str:
    """The store a run logs to: ``tracking.uri`` if set, else ``$MLFLOW_TRACKING_URI`` (as
    every MLflow tool reads it), else the project's ``sqlite:///<project root>/mlflow.db``."""
    if configured:
        return configured
    from_env = os.environ.get("MLFLOW_TRACKING_URI")
    if from_env:
        return from_env
    return f"sqlite:///{(project_root / 'mlflow.db').resolve()}"


def check_reachable(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Fail in seconds when an HTTP tracking server does not answer.

    MLflow's client retries a refused connection with backoff for minutes before it gives up;
    one plain request with a timeout tells sooner. SQLite and databases fail fast by themselves.
    """
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # a server answers (perhaps asking for credentials): MLflow takes it from here
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", None) or error
        raise TrackingError(
            f"tracking.uri={uri}: no MLflow server answers ({reason}); start one "
            "(mlflow server) or use sqlite:///<path>/mlflow.db"
        ) from None


def check_sqlite_store(uri: str) -> None:
    """Refuse a SQLite store that would lose or pollute data, or fail only after minutes.

    In memory (``sqlite://``): every run is lost when the process ends. A directory: MLflow
    retries for about two minutes before its error. A read-only file: MLflow's error comes
    with an SQL dump. Another program's database: MLflow would create its tables inside it.
    """
    if not uri.startswith("sqlite:"):
        return
    path = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else ""
    if path in ("", ":memory:") or "mode=memory" in uri:
        raise TrackingError(
            f"tracking.uri={uri}: an in-memory store loses every run when the process ends; "
            "use sqlite:///<path>/mlflow.db"
        )
    database = Path(path)
    if database.is_dir():
        raise TrackingError(
            f"tracking.uri={uri}: {database} is a directory; name a database file, "
            f"e.g. sqlite:///{database / 'mlflow.db'}"
        )
    if not database.is_file():
        return  # a new store: created on first contact
    try:
        with open(database, "r+b"):
            pass
    except OSError as error:
        raise TrackingError(
            f"tracking.uri={uri}: {database} is read-only ({error.strerror}); "
            "make it writable or choose another store"
        ) from None
    with store_lock(uri):  # not while another process is creating MLflow's tables
        tables = sqlite_tables(database)
    if tables and not tables >= MLFLOW_TABLES:
        shown = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
        raise TrackingError(
            f"tracking.uri={uri}: {database} is a SQLite database but not an MLflow store "
            f"(tables: {shown}); MLflow would add its tables to it; choose a new file or "
            "an MLflow store"
        )


def check_experiment_name(name: str) -> None:
    if len(name) > MAX_EXPERIMENT_NAME:
        raise TrackingError(
            f"tracking.experiment={name[:40]}...: {len(name)} characters; MLflow allows at "
            f"most {MAX_EXPERIMENT_NAME}"
        )


def set_run_status(
    uri: str,
    run_id: str,
    status: str | None,
    tags: Mapping[str, str] | None = None,
    if_running: bool = False,
) -> None:
    """Tag a run and/or end it with ``status`` (e.g. a sweep trial whose worker died); with
    ``if_running``, end it only if it is still RUNNING (its own end was lost)."""
    from mlflow.entities import RunTag
    from mlflow.tracking import MlflowClient

    bound_http_retries()
    with store_lock(uri):
        client = MlflowClient(tracking_uri=uri)
    if tags:
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
    if status is not None and not (if_running and client.get_run(run_id).info.status != "RUNNING"):
        client.set_terminated(run_id, status=status)


Method = TypeVar("Method", bound=Callable[..., Any])


def _store_call(method: Method) -> Method:
    """A write to the store that fails (locked, full, its server gone) raises
    ``TrackingFault`` naming the store and the fault in one line."""

    @functools.wraps(method)
    def wrapper(self: MLflowTracker, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except Exception as error:
            raise TrackingFault(f"MLflow store {self.uri}: {first_line(error)}") from error

    return wrapper  # type: ignore[return-value]


class MLflowTracker:
    """One MLflow run, written through ``MlflowClient`` (no fluent global state, so it is safe
    in parallel processes), metrics in batches.

    A resumed run (``run_id`` given) logs each metric at each step once: steps already in the
    store, logged before an interrupt and replayed since the last checkpoint, are skipped.

    Args:
        uri: the store; None for ``tracking_uri``'s default.
        experiment: the experiment's name (created, tagged as model training, if new).
        run_name: the new run's name.
        run_id: the run to continue instead of starting one.
        tags: set on the run, with this process's identity (host, pid) for liveness checks.
        project_root: where the default SQLite store lives.
    """

    _BATCH = 1000  # MLflow's limit of metrics per log_batch call

    def __init__(
        self,
        uri: str | None,
        experiment: str,
        run_name: str | None = None,
        run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
        project_root: Path | None = None,
    ) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = uri = tracking_uri(uri, project_root or Path.cwd())
        bound_http_retries()
        _quiet_store_errors()
        check_reachable(uri)
        check_sqlite_store(uri)
        check_experiment_name(experiment)
        tags = {**(tags or {}), **process_identity()}
        self._logged_upto: dict[str, int] = {}
        try:
            # Under the lock, so that no other process reconciles between our check of the
            # store and the identity tags of the run we start or resume.
            with store_lock(uri):
                self.client = MlflowClient(tracking_uri=uri)
                if run_id is not None:
                    resumed = self.client.get_run(run_id)
                    experiment_id = resumed.info.experiment_id
                else:
                    experiment_id = self._experiment_id(uri, experiment)
                self.experiment_id = experiment_id
                for ended in reconcile_dead_runs(self.client):
                    log.warning("MLflow run %s: its process is gone; marked KILLED", ended)
                if run_id is not None:
                    self.run_id = resumed.info.run_id
                    self._logged_upto = self._last_logged_steps(resumed.data.metrics)
                    self.set_tags(tags)
                    self.client.update_run(self.run_id, status="RUNNING")
                else:
                    run = self.client.create_run(experiment_id, run_name=run_name, tags=tags)
                    self.run_id = run.info.run_id
        except Exception as error:  # any store failure: one line for the user, not a trace
            reason = first_line(error)
            what = f"run {run_id} to resume" if run_id else "store"
            raise TrackingError(
                f"tracking.uri={uri}: cannot open the MLflow {what} ({reason})"
            ) from None

    def _experiment_id(self, uri: str, name: str) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            for key, value in EXPERIMENT_KIND.items():
                # Made by an older fce or by hand: tagged; a kind set on purpose stays.
                if key not in found.tags:
                    self.client.set_experiment_tag(found.experiment_id, key, value)
            return found.experiment_id
        location = None
        if uri.startswith("sqlite:///"):
            # Artifacts beside the database, not in the working directory.
            root = Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts"
            location = (root / name).as_uri()
        try:
            return self.client.create_experiment(
                name, artifact_location=location, tags=EXPERIMENT_KIND
            )
        except MlflowException:
            # Another process created it between our lookup and our create; else a real error.
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def _last_logged_steps(self, latest: Mapping[str, float]) -> dict[str, int]:
        """The last step at which each metric of the resumed run is already in the store."""
        return {
            name: max(m.step for m in self.client.get_metric_history(self.run_id, name))
            for name in latest
        }

    def ui_link(self, base: str = "http://127.0.0.1:5000", run: bool = False) -> str:
        """The UI's page of this run's experiment (the runs table), or with ``run`` of the run
        itself, in model-training mode: MLflow 3's UI opens a page without ``workflowType``
        in its GenAI view (docs/reliability.md), unless the browser kept a click on "Model
        training" (the parameter is not kept: the pages a link leads to drop it)."""
        if self.uri.startswith(("http://", "https://")):
            base = self.uri.rstrip("/")
        page = f"{self.experiment_id}/runs/{self.run_id}" if run else self.experiment_id
        return f"{base}/#/experiments/{page}?workflowType=machine_learning"

    def describe(self, full: bool = False) -> str:
        """The run as MLflow names it; with ``full``, the UI's pages of the run and of its
        experiment (and the command that serves them, for a store that is not a server)."""
        if not full:
            return f"MLflow run {self.run_id}"
        links = f"{self.ui_link()} (all runs) or {self.ui_link(run=True)} (this run)"
        if not self.uri.startswith(("http://", "https://")):
            links = f"mlflow ui --backend-store-uri {self.uri}, then {links}"
        return f"MLflow run {self.run_id}; to look at it: {links}"

    @_store_call
    def log_params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    @_store_call
    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.log_history([step], {name: [value] for name, value in metrics.items()})

    @_store_call
    def log_history(self, steps: Sequence[int], metrics: Mapping[str, Sequence[float]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [
            Metric(name, float(value), now, int(step))
            for name, values in metrics.items()
            for step, value in zip(steps, values, strict=True)
            if step > self._logged_upto.get(name, -1)
        ]
        for start in range(0, len(rows), self._BATCH):
            self.client.log_batch(self.run_id, metrics=rows[start : start + self._BATCH])

    @_store_call
    def log_figure(self, figure: Figure, name: str) -> None:
        self.client.log_figure(self.run_id, figure, name)

    @_store_call
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    @_store_call
    def finish(self, status: str) -> None:
        """FINISHED, FAILED or KILLED."""
        self.client.set_terminated(self.run_id, status=status)


# --- runs of a study: how the sweep layer ties trials to runs without naming the store --------

# The Optuna user attributes that hold a trial's run and a study's parent run (named when this
# store was the only one; studies keep them, so they stay).
RUN_ID_ATTR = "mlflow_run_id"
PARENT_RUN_ID_ATTR = "mlflow_parent_run_id"
MAX_TAG_LENGTH = 5000  # the store's limit on a tag's value


def child_tags(parent_run_id: str | None) -> dict[str, str]:
    """The tags that make a run a child of ``parent_run_id`` (none without a parent)."""
    return {"mlflow.parentRunId": parent_run_id} if parent_run_id else {}


def open_run(
    uri: str | None,
    experiment: str,
    run_name: str | None = None,
    run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
) -> MLflowTracker:
    """A tracked run in the store at ``uri``: new, or ``run_id`` reopened; the child of
    ``parent_run_id`` where one is given."""
    tags = {**(tags or {}), **child_tags(parent_run_id)}
    return MLflowTracker(uri, experiment, run_name=run_name, run_id=run_id, tags=tags)
