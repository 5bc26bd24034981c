"""The training loop end to end on tiny data: events, early stopping, divergence, stop flag, resume, transfer."""

import math

import pytest
import torch

from core.engine import Callback, Recorder, StopFlag, train
from core.engine.checkpoint import load_checkpoint, load_model_file
from core.spec import JobSpec


def make_spec(**overrides) -> JobSpec:
    """A small synthetic job that trains in well under a second; override any top-level part."""
    body = {
        "data": {"dataset": "builtin:synthetic", "synthetic": {"n_samples": 400, "n_features": 12, "n_classes": 3}},
        "model": {"arch": "mlp", "layers": [32], "dropout": 0.2},
        "optim": {"name": "adam", "lr": 0.01},
        "train": {"epochs": 4, "batch_size": 32, "progress_interval_s": 0.001},
        "resources": {"device": "cpu"},
    }
    for key, value in overrides.items():
        body[key] = {**body.get(key, {}), **value} if isinstance(value, dict) else value
    return JobSpec.model_validate(body)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_events_arrive_in_order_with_namespaced_keys():
    rec = Recorder()
    result = train(make_spec(), [rec])
    kinds = rec.kinds()
    assert result.status == "succeeded" and result.epochs_run == 4
    assert kinds.count("epoch_end") == 4 and kinds[-1] == "test" and "progress" in kinds
    assert kinds.index("progress") < kinds.index("epoch_end")
    assert rec.calls[0] == "train_begin" and rec.calls[-1] == "train_end"
    logs = [e for e in rec.events if e.kind == "epoch_end"]
    assert [e.epoch for e in logs] == [1, 2, 3, 4]
    assert {"train/loss", "train/acc", "val/loss", "val/acc", "lr", "epoch_time_s"} <= set(logs[0].data)
    assert all(isinstance(v, (int, float)) for v in logs[0].data.values())
    progress = next(e for e in rec.events if e.kind == "progress")
    assert {"step_in_epoch", "samples_per_s", "train/loss"} <= set(progress.data)


def test_learns_synthetic_data():
    result = train(make_spec(train={"epochs": 8}))
    assert result.metrics["test/acc"] > 0.8
    assert result.history[-1]["train/loss"] < result.history[0]["train/loss"]


def test_same_seed_same_result_and_different_seed_differs():
    a, b = train(make_spec()), train(make_spec())
    c = train(make_spec(train={"seed": 1}))
    assert a.metrics["test/loss"] == b.metrics["test/loss"]
    assert a.metrics["test/loss"] != c.metrics["test/loss"]


def test_early_stopping_ends_run_and_restores_best_weights():
    spec = make_spec(train={"epochs": 30, "early_stopping": {"monitor": "val/loss", "patience": 1,
                                                             "restore_best_weights": True}},
                     optim={"lr": 0.05})
    rec = Recorder()
    result = train(spec, [rec])
    stop = next(e for e in rec.events if e.kind == "early_stop")
    assert result.status == "early_stopped" and result.stop_reason == "early_stop"
    assert result.epochs_run == stop.data["stopped_epoch"] < 30
    val_losses = [h["val/loss"] for h in result.history]
    assert result.best_epoch == stop.data["best_epoch"] and val_losses[result.best_epoch - 1] == stop.data["best"]
    assert rec.kinds().index("restored") < rec.kinds().index("test")
    last_epoch_end = max(i for i, k in enumerate(rec.kinds()) if k == "epoch_end")
    assert rec.kinds()[last_epoch_end + 1] == "early_stop"  # the epoch's metrics, then the decision


def test_epoch_end_events_carry_the_early_stopping_count_after_that_epoch():
    spec = make_spec(train={"epochs": 30, "early_stopping": {"monitor": "val/loss", "patience": 2}}, optim={"lr": 0.05})
    rec = Recorder()
    result = train(spec, [rec])
    epochs = [e.data for e in rec.events if e.kind == "epoch_end"]
    stop = next(e for e in rec.events if e.kind == "early_stop")
    assert all(d["early_stopping/patience"] == 2 for d in epochs)
    assert epochs[0]["early_stopping/wait"] == 0 and epochs[0]["early_stopping/best"] == epochs[0]["val/loss"]
    assert epochs[-1]["early_stopping/wait"] == stop.data["wait"] == 2  # the count the run stopped on
    assert epochs[-1]["early_stopping/best"] == stop.data["best"]
    assert not any(k.startswith("early_stopping/") for logs in result.history for k in logs)


def test_non_finite_loss_fails_as_diverged():
    rec = Recorder()
    result = train(make_spec(optim={"name": "sgd", "lr": 10.0}, model={"batch_norm": False, "init": "normal",
                                                                        "init_scale": 10.0},
                             train={"epochs": 20}), [rec])
    assert result.status == "failed" and result.stop_reason == "diverged"
    assert "diverged" in rec.kinds() and result.epochs_run < 20


class StopAt(Callback):
    """Sets a stop flag once the run reaches a given global step (as a cancel request would)."""

    def __init__(self, flag: StopFlag, step: int):
        self.flag, self.step = flag, step

    def on_step_end(self, ctx):
        if ctx.step == self.step:
            self.flag.set()


def test_stop_flag_stops_at_the_next_step_and_checkpoints(tmp_path):
    flag = StopFlag()
    rec = Recorder()
    result = train(make_spec(), [StopAt(flag, 5), flag, rec], out_dir=tmp_path)
    assert result.status == "cancelled" and rec.events[-2].kind in ("checkpoint", "test")
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["step"] == 5 and state["epoch_progress"]["batch"] == 5


@pytest.mark.parametrize("stop_step", [13, 20])  # mid-epoch, and exactly at an epoch boundary (10 steps/epoch)
def test_resume_equals_uninterrupted_run(tmp_path, stop_step):
    spec = make_spec(data={"augment": {"noise": {"std": 0.1, "p": 0.5}}}, train={"epochs": 4})
    full = train(spec, out_dir=tmp_path / "full")
    flag = StopFlag()
    train(spec, [StopAt(flag, stop_step), flag], out_dir=tmp_path / "cut")
    rec = Recorder()
    resumed = train(spec, [rec], resume_from=tmp_path / "cut" / "checkpoint.pt", out_dir=tmp_path / "cut")
    assert rec.events[0].kind == "resumed" and rec.events[0].data["from_step"] == stop_step
    for k, v in weights(full.model).items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    drop_time = [{k: v for k, v in h.items() if k != "epoch_time_s"} for h in full.history]
    assert drop_time == [{k: v for k, v in h.items() if k != "epoch_time_s"} for h in resumed.history]


def test_model_file_holds_weights_and_spec(tmp_path):
    spec = make_spec()
    result = train(spec, out_dir=tmp_path)
    tensors, meta = load_model_file(result.model_path)
    assert meta["spec"] == spec.model_dump(mode="json")
    for k, v in result.model.state_dict().items():
        assert torch.equal(tensors[k], v)


def test_transfer_freezes_body_and_replaces_head(tmp_path):
    source = train(make_spec(), out_dir=tmp_path / "src")
    spec = make_spec(
        data={"synthetic": {"n_samples": 400, "n_features": 12, "n_classes": 4, "seed": 3}},
        transfer={"from_path": str(tmp_path / "src"), "freeze": "small"},
    )
    before = weights(source.model)
    result = train(spec)
    after = result.model.state_dict()
    body = [k for k in before if k.startswith("body.")]
    assert body and all(torch.equal(before[k], after[k]) for k in body)  # params and BN buffers untouched
    assert after["head.weight"].shape[0] == 4 and result.info["transfer"]["new_head"]


def test_time_limit_fails_as_timeout():
    result = train(make_spec(resources={"device": "cpu", "max_runtime_s": 1e-6}, train={"epochs": 50}))
    assert result.status == "failed" and result.stop_reason == "timeout" and result.epochs_run < 50


def test_zero_init_leaves_hidden_units_identical():
    result = train(make_spec(model={"init": "zeros", "batch_norm": False, "dropout": 0.0}, train={"epochs": 2}))
    w = result.model.state_dict()["body.1.0.weight"] if "body.1.0.weight" in result.model.state_dict() else next(
        v for k, v in result.model.state_dict().items() if k.startswith("body") and v.dim() == 2)
    assert torch.allclose(w, w[0].expand_as(w))


def test_results_are_json_clean():
    result = train(make_spec(train={"epochs": 1}))
    assert all(v is None or math.isfinite(v) for v in result.metrics.values())
