"""Early stopping reproduces the Keras 3 EarlyStopping test sequences epoch for epoch."""

import math

import pytest
import torch

from core.engine.callbacks import CallbackList, Recorder, RunContext
from core.engine.stopping import EarlyStopping
from core.spec import EarlyStoppingSpec


def run_sequence(values, monitor="val/loss", **kw):
    """Feed one monitored value per epoch, as the trainer does; returns (callback, ctx, model, epochs run)."""
    model = torch.nn.Linear(1, 1, bias=False)
    es = EarlyStopping(EarlyStoppingSpec(monitor=monitor, **kw))
    rec = Recorder()
    cbs = CallbackList([es, rec])
    ctx = RunContext(model=model, epochs=len(values), steps_per_epoch=1, sink=cbs)
    cbs.on_train_begin(ctx)
    for i, v in enumerate(values):
        with torch.no_grad():
            model.weight.fill_(float(i))  # the weights remember which epoch produced them
        ctx.epoch += 1
        cbs.on_epoch_end(ctx, {monitor: v})
        if ctx.should_stop:
            break
    cbs.on_train_end(ctx)
    return es, ctx, model, rec


KERAS_LOSSES = [10, 9, 8, 9, 8.9, 8.8, 8.7, 8.6, 8.5]


@pytest.mark.parametrize("patience,stopped", [(0, 3), (1, 3), (2, 4), (3, 5)])
def test_patience_matches_keras(patience, stopped):
    es, ctx, _, rec = run_sequence(KERAS_LOSSES, patience=patience)
    assert es.stopped_epoch == max(patience, 1) + 2 == stopped
    assert ctx.stop_reason == "early_stop" and ctx.epoch == stopped + 1
    event = next(e for e in rec.events if e.kind == "early_stop")
    assert event.data["stopped_epoch"] == stopped + 1 and event.data["best"] == 8 and event.data["best_epoch"] == 3


def test_baseline_never_reached_trains_patience_epochs_and_restores_best():
    es, ctx, model, _ = run_sequence([0.9, 0.8, 0.7, 0.71, 0.72, 0.73], baseline=0.5, patience=5,
                                     restore_best_weights=True)
    assert ctx.epoch == 5 and es.stopped_epoch == 4
    assert model.weight.item() == 2.0  # epoch index 2 had the best loss


def test_restores_best_weights_even_without_early_stop():
    es, ctx, model, rec = run_sequence([3.0, 1.0, 2.0, 2.5], patience=10, restore_best_weights=True)
    assert not ctx.should_stop and es.stopped_epoch == 0
    assert model.weight.item() == 1.0
    assert [e.data["best_epoch"] for e in rec.events if e.kind == "restored"] == [2]


def test_no_restore_keeps_last_weights():
    _, _, model, _ = run_sequence([3.0, 1.0, 2.0], patience=10)
    assert model.weight.item() == 2.0


def test_min_delta_is_strict():
    # 0.9 is exactly min_delta below 1.0: not an improvement, so patience 1 stops at epoch 1
    es, ctx, _, _ = run_sequence([1.0, 0.9, 0.5], min_delta=0.1, patience=1)
    assert es.stopped_epoch == 1 and es.best == 1.0


def test_min_delta_sign_is_ignored_like_keras():
    es, _, _, _ = run_sequence([1.0, 0.9, 0.5], min_delta=-0.1, patience=1)
    assert es.stopped_epoch == 1


def test_start_from_epoch_ignores_early_epochs():
    es, ctx, _, _ = run_sequence([0.1, 0.2, 5.0, 5.0, 5.0, 5.0, 5.0], patience=2, start_from_epoch=2)
    assert es.best == 5.0  # the low values of ignored epochs never became best
    assert es.stopped_epoch == 4 and ctx.epoch >= 2 + 2


def test_auto_mode_maximizes_accuracy():
    es, _, _, _ = run_sequence([0.5, 0.6, 0.55, 0.58], monitor="val/acc", patience=1)
    assert es.mode == "max" and es.best == 0.6 and es.stopped_epoch == 2


def test_explicit_mode_overrides_auto():
    es, _, _, _ = run_sequence([0.5, 0.6, 0.7], monitor="val/loss", mode="max", patience=0)
    assert es.best == 0.7 and es.stopped_epoch == 0


def test_nan_is_no_improvement():
    es, ctx, _, rec = run_sequence([1.0, math.nan, 0.5], patience=0)
    assert es.stopped_epoch == 1 and es.best == 1.0
    assert next(e for e in rec.events if e.kind == "early_stop").data["current"] is None


def test_missing_monitor_skips_epoch():
    es, ctx, _, _ = run_sequence([None, None, None], patience=0)
    assert not ctx.should_stop and es.best is None


@pytest.mark.parametrize("kw", [{"patience": 3}, {"baseline": 8.5, "patience": 4}, {"start_from_epoch": 2}])
def test_an_epochs_report_is_the_state_its_epoch_leaves(kw):
    es = EarlyStopping(EarlyStoppingSpec(monitor="val/loss", **kw))
    ctx = RunContext(model=torch.nn.Linear(1, 1), epochs=len(KERAS_LOSSES), steps_per_epoch=1)
    reports, states = [], []
    for value in KERAS_LOSSES:
        ctx.epoch += 1
        reports.append(es.epoch_report(ctx, {"val/loss": value}))
        es.on_epoch_end(ctx, {"val/loss": value})
        states.append({"early_stopping/wait": es.wait, "early_stopping/patience": es.spec.patience,
                       "early_stopping/best": es.best})
    assert reports == states and len({r["early_stopping/wait"] for r in reports}) > 1


def test_state_resets_on_train_begin():
    es, ctx, _, _ = run_sequence(KERAS_LOSSES, patience=0)
    es.on_train_begin(ctx)
    assert (es.wait, es.stopped_epoch, es.best, es.best_epoch, es.best_weights) == (0, 0, None, 0, None)


def test_state_dict_round_trip_continues_identically():
    first, _, _, _ = run_sequence(KERAS_LOSSES[:3], patience=2, restore_best_weights=True)
    second = EarlyStopping(EarlyStoppingSpec(patience=2, restore_best_weights=True))
    second.load_state_dict(first.state_dict())
    assert second.state_dict()["best"] == 8 and second.wait == first.wait


def test_keras_monitor_names_are_accepted():
    assert EarlyStoppingSpec(monitor="val_accuracy").monitor == "val/acc"
    assert EarlyStoppingSpec(monitor="loss").monitor == "train/loss"
    with pytest.raises(ValueError, match="unknown monitor"):
        EarlyStoppingSpec(monitor="unknown")
