"""The trick engine: pure PyTorch training driven by a JobSpec, reporting through callbacks."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "Callback",
    "CallbackList",
    "Event",
    "EventKind",
    "Recorder",
    "RunContext",
    "RunResult",
    "StopFlag",
    "TimeLimit",
    "resolve_device",
    "train",
]

if TYPE_CHECKING:
    from core.engine.callbacks import Callback, CallbackList, Event, Recorder, RunContext, StopFlag, TimeLimit
    from core.engine.events import EventKind
    from core.engine.trainer import RunResult, resolve_device, train

# Each name is imported on first use: the API and the database layer read core.engine.events without torch, and
# the trainer pulls in the data loaders (scikit-learn, mnist1d).
_MODULES = {
    "Callback": "callbacks",
    "CallbackList": "callbacks",
    "Event": "callbacks",
    "EventKind": "events",
    "Recorder": "callbacks",
    "RunContext": "callbacks",
    "RunResult": "trainer",
    "StopFlag": "callbacks",
    "TimeLimit": "callbacks",
    "resolve_device": "trainer",
    "train": "trainer",
}


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return getattr(importlib.import_module(f"core.engine.{_MODULES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
