"""Where metrics, figures and files go. The training loop talks to a ``Tracker``, never MLflow."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # matplotlib loads only where a figure is drawn
    from matplotlib.figure import Figure

log = logging.getLogger("fce")


class Tracker(Protocol):
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Scalars that share one step (an evaluation)."""

    def log_history(self, steps: Sequence[int], metrics: Mapping[str, Sequence[float]]) -> None:
        """Per-step scalars buffered by the loop, written in one batch."""

    def log_figure(self, figure: Figure, name: str) -> None:
        """A figure, under an artifact path such as ``densities/step_001000.png``."""

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """A file produced by the run (a checkpoint, a config)."""


class NullTracker:
    """Discards everything."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_history(self, steps: Sequence[int], metrics: Mapping[str, Sequence[float]]) -> None:
        pass

    def log_figure(self, figure: Figure, name: str) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass


class MemoryTracker:
    """Keeps everything in memory: for tests, notebooks and the curves figure."""

    def __init__(self) -> None:
        self.history: dict[str, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
        self.figures: list[str] = []
        self.artifacts: list[tuple[Path, str | None]] = []

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.history[name][0].append(step)
            self.history[name][1].append(float(value))

    def log_history(self, steps: Sequence[int], metrics: Mapping[str, Sequence[float]]) -> None:
        for name, values in metrics.items():
            self.history[name][0].extend(steps)
            self.history[name][1].extend(float(v) for v in values)

    def log_figure(self, figure: Figure, name: str) -> None:
        self.figures.append(name)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.artifacts.append((Path(path), artifact_path))


def default_tracking_uri(project_root: Path) -> str:
    """The project's store: an absolute SQLite URI, whatever the working directory."""
    return f"sqlite:///{(project_root / 'mlflow.db').resolve()}"


def set_run_status(
    uri: str, run_id: str, status: str | None, tags: Mapping[str, str] | None = None
) -> None:
    """Tag a run and/or end it with ``status`` (e.g. a sweep trial whose worker died)."""
    from mlflow.entities import RunTag
    from mlflow.tracking import MlflowClient

    with store_lock(uri):
        client = MlflowClient(tracking_uri=uri)
    if tags:
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
    if status is not None:
        client.set_terminated(run_id, status=status)


def flatten(tree: Mapping, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"dataset.name": "8gaussians", ...}; MLflow would stringify dicts."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = "null" if value is None else str(value)
    return flat


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Serialise first contact with a SQLite store across processes.

    The first client of a new SQLite file creates MLflow's tables; two processes doing it at
    once (a parallel grid, sweep workers) fail with "table already exists". Other stores
    handle their own concurrency.
    """
    if not uri.startswith("sqlite:///"):
        yield
        return
    lock_path = Path(uri.removeprefix("sqlite:///") + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class TrackingError(ValueError):
    """The MLflow store cannot be opened, or the run to resume is not in it."""


PROBE_TIMEOUT_S = 5.0


def check_reachable(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Fail in seconds when an HTTP tracking server does not answer.

    MLflow's client retries a refused connection with backoff for minutes (4 min 12 s measured
    against a closed port) before it gives up; one plain request with a timeout tells sooner.
    Other stores (SQLite, databases) fail fast by themselves.
    """
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

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


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of a process, from Linux's /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], fields[19]


def process_identity() -> dict[str, str]:
    """Run tags that let a later process tell whether this one is still alive."""
    stat = _proc_stat(os.getpid())
    return {
        "fce.host": socket.gethostname(),
        "fce.pid": str(os.getpid()),
        "fce.pid_start": stat[1] if stat else "",
    }


def process_gone(pid: int, started: str) -> bool:
    """True when ``pid`` has exited (a zombie counts) or now names another process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, owned by another user
    stat = _proc_stat(pid)
    if stat is None:
        return False  # no /proc here: trust the signal check
    state, start = stat
    return state == "Z" or (bool(started) and start != started)


def reconcile_dead_runs(client: Any, experiment_id: str) -> list[str]:
    """Mark KILLED the RUNNING runs of this host whose process is gone; return their ids.

    A run killed with SIGKILL (or by the out-of-memory killer, or a lost node) never ends its
    MLflow run; without this it would stay RUNNING for ever. Only runs of this host can be
    checked: a pid means nothing elsewhere.
    """
    host = socket.gethostname()
    found = client.search_runs(
        [experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`fce.host` = '{host}'",
        max_results=1000,
    )
    ended = []
    for run in found:
        pid, started = run.data.tags.get("fce.pid"), run.data.tags.get("fce.pid_start", "")
        if not pid or not pid.isdigit() or int(pid) == os.getpid():
            continue
        if not process_gone(int(pid), started):
            continue
        now = client.get_run(run.info.run_id)  # a resume may have taken it over meanwhile
        if now.info.status != "RUNNING" or now.data.tags.get("fce.pid") != pid:
            continue
        client.set_tag(run.info.run_id, "fce.ended_by", f"process {pid} gone; reconciled")
        client.set_terminated(run.info.run_id, status="KILLED")
        ended.append(run.info.run_id)
    return ended


# MLflow 3 opens an experiment without this tag in its GenAI view (traces, judges); tagged as
# model training, it opens on the runs table and their charts.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


class MLflowTracker:
    """One MLflow run, written through ``MlflowClient`` (no fluent global state, so it is safe
    in parallel processes), metrics in batches. The only module that imports mlflow.
    """

    _BATCH = 1000  # MLflow's limit of metrics per log_batch call

    def __init__(
        self,
        uri: str,
        experiment: str,
        run_name: str | None = None,
        run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        from mlflow.tracking import MlflowClient

        check_reachable(uri)
        tags = {**(tags or {}), **process_identity()}
        try:
            # Under the lock, so that no other process reconciles between our check of the
            # store and the identity tags of the run we start or resume.
            with store_lock(uri):
                self.client = MlflowClient(tracking_uri=uri)
                if run_id is not None:
                    # Resume: the same run continues; it must exist in this store.
                    resumed = self.client.get_run(run_id).info
                    experiment_id = resumed.experiment_id
                else:
                    experiment_id = self._experiment_id(uri, experiment)
                for ended in reconcile_dead_runs(self.client, experiment_id):
                    log.warning("MLflow run %s: its process is gone; marked KILLED", ended)
                if run_id is not None:
                    self.run_id = resumed.run_id
                    self.set_tags(tags)
                    self.client.update_run(self.run_id, status="RUNNING")
                else:
                    run = self.client.create_run(experiment_id, run_name=run_name, tags=tags)
                    self.run_id = run.info.run_id
        except Exception as error:  # any store failure: one line for the user, not a trace
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
            what = f"run {run_id} to resume" if run_id else "store"
            raise TrackingError(
                f"tracking.uri={uri}: cannot open the MLflow {what} ({reason})"
            ) from None

    def _experiment_id(self, uri: str, name: str) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            if EXPERIMENT_KIND[0] not in found.tags:  # made by an older fce, or by hand
                self.client.set_experiment_tag(found.experiment_id, *EXPERIMENT_KIND)
            return found.experiment_id
        location = None
        if uri.startswith("sqlite:///"):
            # Artifacts beside the database, not in the working directory.
            root = Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts"
            location = (root / name).as_uri()
        try:
            return self.client.create_experiment(
                name, artifact_location=location, tags=dict([EXPERIMENT_KIND])
            )
        except MlflowException:
            # Another process created it between our lookup and our create.
            return self.client.get_experiment_by_name(name).experiment_id

    def log_params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.log_history([step], {name: [value] for name, value in metrics.items()})

    def log_history(self, steps: Sequence[int], metrics: Mapping[str, Sequence[float]]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [
            Metric(name, float(value), now, int(step))
            for name, values in metrics.items()
            for step, value in zip(steps, values, strict=True)
        ]
        for start in range(0, len(rows), self._BATCH):
            self.client.log_batch(self.run_id, metrics=rows[start : start + self._BATCH])

    def log_figure(self, figure: Figure, name: str) -> None:
        self.client.log_figure(self.run_id, figure, name)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(self, status: str) -> None:
        """FINISHED, FAILED or KILLED."""
        self.client.set_terminated(self.run_id, status=status)
