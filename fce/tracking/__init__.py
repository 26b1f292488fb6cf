"""Where metrics, figures and files go. The training loop talks to a ``Tracker``, never MLflow.

``tracking=mlflow`` (the default) logs to an MLflow store; ``tracking=none`` to nowhere.
"""

from fce.recording import MemoryTracker, NullTracker, Tracker, flatten
from fce.tracking.mlflow_tracker import (
    MLflowTracker,
    TrackingError,
    TrackingFault,
    check_reachable,
    check_sqlite_store,
    set_run_status,
    tracking_uri,
)

__all__ = [
    "MLflowTracker",
    "MemoryTracker",
    "NullTracker",
    "Tracker",
    "TrackingError",
    "TrackingFault",
    "check_reachable",
    "check_sqlite_store",
    "flatten",
    "set_run_status",
    "tracking_uri",
]
