"""The kinds of event a run reports; torch-free, so the database layer and the API can name them."""

from __future__ import annotations

import enum
from typing import Any


class EventKind(enum.StrEnum):
    """What an event tells; its value is stored in job_event.kind and sent as the SSE `event:` name."""

    progress = "progress"  # running training loss and speed, within an epoch
    epoch_end = "epoch_end"  # the epoch's metrics
    early_stop = "early_stop"  # early stopping ended the run
    restored = "restored"  # early stopping put the best epoch's weights back
    checkpoint = "checkpoint"
    warning = "warning"
    resumed = "resumed"  # a retry continues from a checkpoint
    test = "test"  # the final metrics on the test split
    diverged = "diverged"  # the training loss is not finite: the run fails
    status = "status"  # a job's lifecycle transition, recorded by the database layer, not by the engine
    pruned = "pruned"  # a study's pruner stopped the trial (its rule, epoch, value and threshold); database layer

    @property
    def is_metric(self) -> bool:
        """Its data are per-epoch metric points (`val/loss`: value), as GET /v1/jobs/{id}/metrics serves them."""
        return self in (EventKind.epoch_end, EventKind.test)

    @property
    def is_one_per_step(self) -> bool:
        """At most one per (job, attempt, kind, step): a retry that replays these steps does not store them twice."""
        return self.is_metric or self == EventKind.progress


METRIC_KINDS = tuple(kind for kind in EventKind if kind.is_metric)
# progress, epoch_end, test: the kinds of job_event's partial unique index on (job, attempt, kind, step)
ONE_PER_STEP_KINDS = tuple(kind for kind in EventKind if kind.is_one_per_step)

# Keys of an epoch_end event's data that are a callback's state (`early_stopping/wait`), not metric points.
STATE_PREFIXES = ("early_stopping/",)


def is_metric_name(key: str) -> bool:
    """Whether a key of a metric event's data names a metric (`val/loss`) rather than a callback's state."""
    return not key.startswith(STATE_PREFIXES)


# How a metric event's data spells the numbers JSON cannot hold (core.jobs writes them so).
NOT_FINITE = ("NaN", "Infinity", "-Infinity")


def is_metric_value(value: Any) -> bool:
    """Whether a value of a metric event's data is a metric point: a number (not a bool), or a spelled NaN or
    infinity."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int | float) or value in NOT_FINITE
