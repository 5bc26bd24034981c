"""How the engine talks: a run context, events, and callbacks with no-op hooks fanned out by CallbackList."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from core.engine.events import EventKind


@dataclass
class Event:
    """One thing that happened in a run; `data` holds plain scalars with namespaced keys (`val/loss`)."""

    kind: EventKind
    step: int
    epoch: int
    data: dict[str, Any]
    at: float = field(default_factory=time.time)


@dataclass
class RunContext:
    """Mutable state of one run that callbacks may read; they stop a run only through `should_stop`."""

    model: torch.nn.Module
    epochs: int
    steps_per_epoch: int
    epoch: int = 0  # epochs completed; during an epoch, its 1-based number is epoch + 1
    step: int = 0  # optimizer steps taken so far, over the whole run
    should_stop: bool = False
    stop_reason: str | None = None  # early_stop | cancelled | timeout | diverged
    history: list[dict[str, float]] = field(default_factory=list)
    sink: Any = None  # set by the trainer: the CallbackList, so callbacks can emit events

    def stop(self, reason: str) -> None:
        """Ask the loop to stop at the next step boundary; the first reason given wins."""
        if not self.should_stop:
            self.should_stop, self.stop_reason = True, reason

    def emit(self, kind: EventKind, data: dict[str, Any], epoch: int | None = None) -> None:
        """Send an event to every callback; its epoch is the last completed one unless given."""
        if self.sink is not None:
            self.sink.on_event(self, Event(kind, self.step, self.epoch if epoch is None else epoch, data))


class Callback:
    """Base class: override the hooks you need. Stateful callbacks also implement state_dict/load_state_dict."""

    def on_train_begin(self, ctx: RunContext) -> None: ...

    def on_step_end(self, ctx: RunContext) -> None: ...

    def on_epoch_end(self, ctx: RunContext, logs: dict[str, float]) -> None: ...

    def epoch_report(self, ctx: RunContext, logs: dict[str, float]) -> dict[str, Any]:
        """Scalars to send with the epoch's metrics (`early_stopping/wait`), as they will stand once on_epoch_end has
        seen these logs; changes nothing."""
        return {}

    def on_checkpoint(self, ctx: RunContext, path: str) -> None: ...

    def on_train_end(self, ctx: RunContext) -> None: ...

    def on_event(self, ctx: RunContext, event: Event) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class CallbackList(Callback):
    """Fans every hook out to its callbacks, in order."""

    def __init__(self, callbacks: list[Callback] | tuple[Callback, ...] = ()):
        self.callbacks = list(callbacks)

    def on_train_begin(self, ctx: RunContext) -> None:
        for cb in self.callbacks:
            cb.on_train_begin(ctx)

    def on_step_end(self, ctx: RunContext) -> None:
        for cb in self.callbacks:
            cb.on_step_end(ctx)

    def on_epoch_end(self, ctx: RunContext, logs: dict[str, float]) -> None:
        for cb in self.callbacks:
            cb.on_epoch_end(ctx, logs)

    def epoch_report(self, ctx: RunContext, logs: dict[str, float]) -> dict[str, Any]:
        return {key: value for cb in self.callbacks for key, value in cb.epoch_report(ctx, logs).items()}

    def on_checkpoint(self, ctx: RunContext, path: str) -> None:
        for cb in self.callbacks:
            cb.on_checkpoint(ctx, path)

    def on_train_end(self, ctx: RunContext) -> None:
        for cb in self.callbacks:
            cb.on_train_end(ctx)

    def on_event(self, ctx: RunContext, event: Event) -> None:
        for cb in self.callbacks:
            cb.on_event(ctx, event)

    def state_dict(self) -> dict[str, Any]:
        return {f"{i}:{type(cb).__name__}": cb.state_dict() for i, cb in enumerate(self.callbacks)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for i, cb in enumerate(self.callbacks):
            key = f"{i}:{type(cb).__name__}"
            if key in state:
                cb.load_state_dict(state[key])


class StopFlag(Callback):
    """Cooperative stop: anything (a cancel request, a signal handler) calls `set()`; the loop stops at a step."""

    def __init__(self, reason: str = "cancelled"):
        self.reason = reason
        self._set = False

    def set(self) -> None:
        self._set = True

    def on_step_end(self, ctx: RunContext) -> None:
        if self._set:
            ctx.stop(self.reason)


class TimeLimit(Callback):
    """Stops the run once `max_runtime_s` of wall time have passed since training began (Lightning's Timer)."""

    def __init__(self, max_runtime_s: float):
        self.max_runtime_s = max_runtime_s
        self._deadline = float("inf")

    def on_train_begin(self, ctx: RunContext) -> None:
        self._deadline = time.monotonic() + self.max_runtime_s

    def on_step_end(self, ctx: RunContext) -> None:
        if time.monotonic() >= self._deadline:
            ctx.stop("timeout")


class Recorder(Callback):
    """Keeps every event and hook call in order; used by tests and the command line."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.calls: list[str] = []

    def on_train_begin(self, ctx: RunContext) -> None:
        self.calls.append("train_begin")

    def on_epoch_end(self, ctx: RunContext, logs: dict[str, float]) -> None:
        self.calls.append("epoch_end")

    def on_checkpoint(self, ctx: RunContext, path: str) -> None:
        self.calls.append("checkpoint")

    def on_train_end(self, ctx: RunContext) -> None:
        self.calls.append("train_end")

    def on_event(self, ctx: RunContext, event: Event) -> None:
        self.events.append(event)

    def kinds(self) -> list[EventKind]:
        return [e.kind for e in self.events]
