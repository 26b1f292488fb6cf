"""Where metrics, figures and files go. The training loop talks to a ``Tracker``, never MLflow.

``tracking=mlflow`` (the default) logs to an MLflow store; ``tracking=none`` to nowhere.
"""

from fce.recording import MemoryTracker, NullTracker, Tracker, flatten
from fce.tracking.mlflow_tracker import (
    MAX_TAG_LENGTH,
    PARENT_RUN_ID_ATTR,
    RUN_ID_ATTR,
    MLflowTracker,
    TrackingError,
    TrackingFault,
    check_reachable,
    check_sqlite_store,
    child_tags,
    open_run,
    set_run_status,
    tracking_uri,
)

__all__ = [
    "MAX_TAG_LENGTH",
    "PARENT_RUN_ID_ATTR",
    "RUN_ID_ATTR",
    "MLflowTracker",
    "MemoryTracker",
    "NullTracker",
    "Tracker",
    "TrackingError",
    "TrackingFault",
    "check_reachable",
    "check_sqlite_store",
    "child_tags",
    "flatten",
    "open_run",
    "set_run_status",
    "tracking_uri",
]
