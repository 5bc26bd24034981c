"""The trick engine: pure PyTorch training driven by a JobSpec, reporting through callbacks."""

from typing import Any

from core.engine.callbacks import Callback, CallbackList, Event, Recorder, RunContext, StopFlag, TimeLimit

__all__ = [
    "Callback",
    "CallbackList",
    "Event",
    "Recorder",
    "RunContext",
    "RunResult",
    "StopFlag",
    "TimeLimit",
    "resolve_device",
    "train",
]


def __getattr__(name: str) -> Any:
    # The trainer pulls in data loaders (scikit-learn, mnist1d); import it only when it is used.
    if name in ("RunResult", "resolve_device", "train"):
        from core.engine import trainer

        return getattr(trainer, name)
    raise AttributeError(name)
