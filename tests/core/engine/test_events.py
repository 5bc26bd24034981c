"""Which event kinds are metrics: what GET /metrics serves is also what a replay never stores twice."""

from core.engine.events import METRIC_KINDS, ONE_PER_STEP_KINDS, EventKind


def test_metric_kinds_are_the_per_epoch_points_and_are_kept_once_per_step():
    assert METRIC_KINDS == ("epoch_end", "test")
    assert ONE_PER_STEP_KINDS == ("progress", "epoch_end", "test")  # the partial unique index of the migration
    assert all(EventKind(kind).is_one_per_step for kind in METRIC_KINDS)
    assert not EventKind.progress.is_metric and not EventKind.status.is_one_per_step
